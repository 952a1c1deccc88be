"""Optimizers with 32-bit or 8-bit state, mirroring ``bitsandbytes.optim``.

``kbit.optim.Adam8bit(model.parameters(), lr=1e-3)`` is a drop-in for ``torch.optim.Adam``
that keeps its two moments in 8 bits (2 bytes per parameter instead of 8). Every family
comes plain (``optim_bits`` chooses), as ``...8bit`` and ``...32bit``, and for Adam, AdamW,
Lion and AdEMAMix as ``Paged...``. See ``docs/optimizers.md``.
"""

from .._errors import KbitPagedMemoryWarning  # also kbit.KbitPagedMemoryWarning
from ._adagrad import Adagrad, Adagrad8bit, Adagrad32bit
from ._adam import (
    Adam,
    Adam8bit,
    Adam32bit,
    AdamW,
    AdamW8bit,
    AdamW32bit,
    PagedAdam,
    PagedAdam8bit,
    PagedAdam32bit,
    PagedAdamW,
    PagedAdamW8bit,
    PagedAdamW32bit,
)
from ._ademamix import (
    AdEMAMix,
    AdEMAMix8bit,
    AdEMAMix32bit,
    PagedAdEMAMix,
    PagedAdEMAMix8bit,
    PagedAdEMAMix32bit,
)
from ._base import Optimizer1State, Optimizer2State, Optimizer8bit
from ._lamb import LAMB, LAMB8bit, LAMB32bit
from ._lars import LARS, LARS8bit, LARS32bit, PytorchLARS
from ._lion import Lion, Lion8bit, Lion32bit, PagedLion, PagedLion8bit, PagedLion32bit
from ._manager import GlobalOptimManager
from ._rmsprop import RMSprop, RMSprop8bit, RMSprop32bit
from ._sgd import SGD, SGD8bit, SGD32bit

__all__ = [
    "Adagrad", "Adagrad8bit", "Adagrad32bit",
    "Adam", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam8bit", "PagedAdam32bit",
    "AdamW", "AdamW8bit", "AdamW32bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit",
    "AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit", "PagedAdEMAMix", "PagedAdEMAMix8bit", "PagedAdEMAMix32bit",
    "LAMB", "LAMB8bit", "LAMB32bit",
    "LARS", "LARS8bit", "LARS32bit", "PytorchLARS",
    "Lion", "Lion8bit", "Lion32bit", "PagedLion", "PagedLion8bit", "PagedLion32bit",
    "RMSprop", "RMSprop8bit", "RMSprop32bit",
    "SGD", "SGD8bit", "SGD32bit",
    "Optimizer8bit", "Optimizer1State", "Optimizer2State",
    "GlobalOptimManager",
    "KbitPagedMemoryWarning",
]  # fmt: skip
