"""Adagrad with 32-bit or 8-bit state (``docs/formats.md`` section 5, kind ``adagrad``)."""

from __future__ import annotations

from typing import Any, Iterable

from ._base import Optimizer1State
from ._config import refuse_unsupported

__all__ = ["Adagrad", "Adagrad8bit", "Adagrad32bit"]


class Adagrad(Optimizer1State):
    """Adagrad; matches ``torch.optim.Adagrad`` with ``lr_decay=0`` and a zero initial
    accumulator (the only values the fused kernels implement; others raise).

    Options after ``min_8bit_size`` are keyword-only and mean what they mean for
    :class:`~kbit.optim.Adam`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        *,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        is_paged: bool = False,
    ) -> None:
        refuse_unsupported(
            type(self).__name__,
            lr_decay=(lr_decay, 0, "the fused Adagrad kernels have no learning-rate decay"),
            initial_accumulator_value=(initial_accumulator_value, 0, "the accumulator starts at zero"),
        )
        super().__init__(
            "adagrad", params, lr, (0.0, 0.0), eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise, max_unorm=max_unorm,
            skip_zeros=skip_zeros, is_paged=is_paged,
        )  # fmt: skip


class Adagrad8bit(Adagrad, optim_bits=8):
    """Adagrad with 8-bit blockwise state."""


class Adagrad32bit(Adagrad, optim_bits=32):
    """Adagrad with 32-bit state."""
