"""kbit's optimizers under ``bitsandbytes.optim`` names.

Each optimizer class of :mod:`kbit.optim` gets a subclass here with the same name whose
qualified name is ``bitsandbytes.optim.<Name>``: the Trainer of transformers keeps
``nn.Embedding`` state in 32-bit only when ``"bitsandbytes" in str(optimizer_cls)``. The
subclasses add nothing else, and they are made from whatever classes ``kbit.optim``
exports, so they follow kbit's definitions as those change. The bases
(``Optimizer8bit``, ``Optimizer1State``, ``Optimizer2State``) and ``GlobalOptimManager``
are kbit's own objects: one manager singleton serves both names.
"""

from __future__ import annotations

import torch

import kbit.optim as _kbit_optim
from kbit.optim import GlobalOptimManager, Optimizer1State, Optimizer2State, Optimizer8bit

from . import optimizer  # noqa: F401 - the bitsandbytes.optim.optimizer import path

_SHARED = {"GlobalOptimManager", "Optimizer8bit", "Optimizer1State", "Optimizer2State"}


def _bitsandbytes_named(cls: type) -> type:
    """A subclass of ``cls`` that differs only in living under this module's name."""
    doc = f"{cls.__doc__ or cls.__name__}\n\n(kbit's ``{cls.__module__}.{cls.__name__}`` under its bitsandbytes name.)"
    return type(cls.__name__, (cls,), {"__module__": __name__, "__qualname__": cls.__name__, "__doc__": doc})


__all__ = sorted(_SHARED)
for _name in _kbit_optim.__all__:
    _value = getattr(_kbit_optim, _name)
    if _name in _SHARED or not (isinstance(_value, type) and issubclass(_value, torch.optim.Optimizer)):
        continue
    globals()[_name] = _bitsandbytes_named(_value)
    __all__.append(_name)
del _name, _value
