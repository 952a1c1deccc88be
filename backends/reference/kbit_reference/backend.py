"""The reference backend class: one mixin per op family."""

from __future__ import annotations

from kbit.backend import Backend

from ._blockwise8 import Blockwise8Ops
from ._int8 import Int8Ops
from ._optim import OptimizerOps
from ._quant4 import Quant4Ops


class ReferenceBackend(Blockwise8Ops, Quant4Ops, Int8Ops, OptimizerOps, Backend):
    """Pure-PyTorch implementation of every kbit op; runs wherever torch runs."""

    def is_available(self) -> bool:
        return True
