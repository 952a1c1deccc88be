"""Adam and AdamW with 32-bit or 8-bit state (``docs/formats.md`` section 5, kind ``adam``)."""

from __future__ import annotations

from typing import Any, Iterable

from ._base import Optimizer2State
from ._config import refuse_unsupported

__all__ = [
    "Adam", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam8bit", "PagedAdam32bit",
    "AdamW", "AdamW8bit", "AdamW32bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit",
]  # fmt: skip


class Adam(Optimizer2State):
    """Adam with 32-bit or 8-bit state.

    Matches ``torch.optim.Adam`` for ``weight_decay=0``. Weight decay is decoupled (the
    parameter is scaled by ``1 - lr * weight_decay``, as in AdamW), like the bitsandbytes
    kernels; ``torch.optim.Adam`` adds it to the gradient instead.

    Args:
        params: parameters or param-group dicts.
        lr, betas, eps, weight_decay: as in ``torch.optim.Adam``.
        amsgrad: must be False (the fused kernels have no AMSGrad).
        optim_bits: 32 or 8 (8-bit state for parameters with at least ``min_8bit_size``
            elements).
        args: options object whose fields override the keyword options.
        min_8bit_size: smaller parameters keep 32-bit state.
        percentile_clipping: clip gradients at this percentile of the last 100 norms
            (100: off).
        block_wise: 8-bit state with one scale per 256 elements (else one per tensor).
        max_unorm: scale updates down to at most ``max_unorm * ||p||`` (needs 32-bit or
            ``block_wise=False`` state).
        skip_zeros: leave elements with a zero gradient untouched.
        is_paged: allocate state in paged memory where the backend has it.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
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
        refuse_unsupported(type(self).__name__, amsgrad=(amsgrad, False, "the fused kernels have no AMSGrad"))
        super().__init__(
            "adam", params, lr, betas, eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise, max_unorm=max_unorm,
            skip_zeros=skip_zeros, is_paged=is_paged,
        )  # fmt: skip


class AdamW(Adam):
    """AdamW: :class:`Adam` with decoupled weight decay, default ``weight_decay=1e-2``.

    Matches ``torch.optim.AdamW``. Arguments as for :class:`Adam`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
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
            params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise, max_unorm=max_unorm,
            skip_zeros=skip_zeros, is_paged=is_paged,
        )  # fmt: skip


class Adam8bit(Adam, optim_bits=8):
    """Adam with 8-bit blockwise state."""


class Adam32bit(Adam, optim_bits=32):
    """Adam with 32-bit state."""


class PagedAdam(Adam, is_paged=True):
    """Adam with paged state."""


class PagedAdam8bit(Adam, optim_bits=8, is_paged=True):
    """Adam with paged 8-bit blockwise state."""


class PagedAdam32bit(Adam, optim_bits=32, is_paged=True):
    """Adam with paged 32-bit state."""


class AdamW8bit(AdamW, optim_bits=8):
    """AdamW with 8-bit blockwise state."""


class AdamW32bit(AdamW, optim_bits=32):
    """AdamW with 32-bit state."""


class PagedAdamW(AdamW, is_paged=True):
    """AdamW with paged state."""


class PagedAdamW8bit(AdamW, optim_bits=8, is_paged=True):
    """AdamW with paged 8-bit blockwise state."""


class PagedAdamW32bit(AdamW, optim_bits=32, is_paged=True):
    """AdamW with paged 32-bit state."""
