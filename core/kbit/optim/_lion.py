"""Lion with 32-bit or 8-bit state (``docs/formats.md`` section 5, kind ``lion``)."""

from __future__ import annotations

from typing import Any, Iterable

from ._base import Optimizer1State

__all__ = ["Lion", "Lion8bit", "Lion32bit", "PagedLion", "PagedLion8bit", "PagedLion32bit"]


class Lion(Optimizer1State):
    """Lion (evolved sign momentum): ``p -= lr * sign(b1 m + (1 - b1) g)``, then
    ``m = b2 m + (1 - b2) g``; decoupled weight decay.

    Options after ``min_8bit_size`` are keyword-only and mean what they mean for
    :class:`~kbit.optim.Adam`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
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
        super().__init__(
            "lion", params, lr, betas, 0.0, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise, max_unorm=max_unorm,
            skip_zeros=skip_zeros, is_paged=is_paged,
        )  # fmt: skip


class Lion8bit(Lion, optim_bits=8):
    """Lion with 8-bit blockwise state."""


class Lion32bit(Lion, optim_bits=32):
    """Lion with 32-bit state."""


class PagedLion(Lion, is_paged=True):
    """Lion with paged state."""


class PagedLion8bit(Lion, optim_bits=8, is_paged=True):
    """Lion with paged 8-bit blockwise state."""


class PagedLion32bit(Lion, optim_bits=32, is_paged=True):
    """Lion with paged 32-bit state."""
