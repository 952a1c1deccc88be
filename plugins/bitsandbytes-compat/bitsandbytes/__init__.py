"""The ``bitsandbytes`` import name, served by kbit.

This package is kbit's compatibility distribution, not the bitsandbytes project. Code that
does ``import bitsandbytes as bnb`` (transformers, peft, accelerate, user code) gets kbit's
API: ``bnb.nn``, ``bnb.functional``, ``bnb.utils``, ``bnb.cextension`` and ``bnb.autograd``
*are* the kbit modules (``bitsandbytes.nn.modules`` is ``kbit.nn.modules``, and so on);
``bnb.optim`` holds kbit's optimizers under ``bitsandbytes.optim`` names, because the
Trainer recognises bitsandbytes optimizers by their qualified name; and the
``torch.ops.bitsandbytes`` ops exist with bitsandbytes' schemas, routed to kbit's backends.

``bnb.supported_torch_devices`` is computed when read: the device types kbit can serve in
this process (see :func:`bitsandbytes._devices.supported_torch_devices`).
"""

from __future__ import annotations

import sys
from typing import Any

from kbit import MatmulLtState, autograd, cextension, features, functional, matmul, matmul_4bit, nn, utils

from . import _guard, _ops, optim
from ._devices import supported_torch_devices as _supported_torch_devices

#: The bitsandbytes API level kbit implements, with the local label that marks this
#: distribution as kbit's (the installed metadata says the same).
__version__ = "0.50.2+kbit"

# ``import bitsandbytes.nn.modules`` and friends must find the kbit modules themselves,
# not second copies loaded under another name.
for _name, _module in {
    "functional": functional,
    "nn": nn,
    "nn.modules": nn.modules,
    "utils": utils,
    "cextension": cextension,
    "autograd": autograd,
}.items():
    sys.modules.setdefault(f"{__name__}.{_name}", _module)

_guard.report_other_distribution(__version__)

__all__ = [
    "__version__",
    "MatmulLtState",
    "autograd",
    "cextension",
    "features",
    "functional",
    "matmul",
    "matmul_4bit",
    "nn",
    "optim",
    "supported_torch_devices",
    "utils",
]


def __getattr__(name: str) -> Any:
    # Computed on read (PEP 562): the answer depends on the backends and devices present,
    # which importing must not probe.
    if name == "supported_torch_devices":
        return _supported_torch_devices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
