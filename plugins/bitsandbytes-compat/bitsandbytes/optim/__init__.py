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
from . import optimizer  # noqa: F401 - the bitsandbytes.optim.optimizer import path

_SHARED = {"GlobalOptimManager", "Optimizer8bit", "Optimizer1State", "Optimizer2State"}


def _bitsandbytes_named(cls: type) -> type:
    """A subclass of ``cls`` that differs only in living under this module's name."""
    doc = f"{cls.__doc__ or cls.__name__}\n\n(kbit's ``{cls.__module__}.{cls.__name__}`` under its bitsandbytes name.)"
    return type(cls.__name__, (cls,), {"__module__": __name__, "__qualname__": cls.__name__, "__doc__": doc})


__all__ = list(_kbit_optim.__all__)
for _name in __all__:
    _value = getattr(_kbit_optim, _name)
    is_optimizer = isinstance(_value, type) and issubclass(_value, torch.optim.Optimizer)
    # Everything else (the bases, the manager, the paging warning) is kbit's object itself.
    globals()[_name] = _bitsandbytes_named(_value) if is_optimizer and _name not in _SHARED else _value
del _name, _value, is_optimizer
