"""The ``nn.modules`` import path of bitsandbytes: ``from kbit.nn.modules import Linear8bitLt``.

Every class is defined once in its own private module and re-exported by :mod:`kbit.nn`;
this module only makes the longer path that downstream code uses work as well.
"""

from . import *  # noqa: F403 - the same public names as kbit.nn
from . import __all__  # noqa: F401
