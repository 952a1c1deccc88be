"""AdEMAMix with 32-bit or 8-bit state (``docs/formats.md`` section 5, kind ``ademamix``)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from ._base import Optimizer2State

__all__ = [
    "AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit", "PagedAdEMAMix", "PagedAdEMAMix8bit", "PagedAdEMAMix32bit",
]  # fmt: skip


class AdEMAMix(Optimizer2State):
    """AdEMAMix: Adam's fast momentum mixed with a slow one (``beta3``) weighted by ``alpha``.

    ``p -= lr * (m1 / c1 + alpha * m2) / (sqrt(nu) / c2 + eps)`` with decoupled weight
    decay. ``t_alpha`` / ``t_beta3`` warm ``alpha`` and ``beta3`` up over that many steps
    (``None``: no warm-up). The two first moments are stacked in ``state1`` (shape
    ``(2, *p.shape)``); 8-bit state is always blockwise. Options after ``min_8bit_size``
    are keyword-only.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        t_alpha: Optional[int] = None,
        t_beta3: Optional[int] = None,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        optim_bits: int = 32,
        min_8bit_size: int = 4096,
        *,
        args: Any = None,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        is_paged: bool = False,
    ) -> None:
        super().__init__(
            "ademamix", params, lr, betas, eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise, max_unorm=max_unorm,
            skip_zeros=skip_zeros, is_paged=is_paged, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3,
        )  # fmt: skip


class AdEMAMix8bit(AdEMAMix, optim_bits=8):
    """AdEMAMix with 8-bit blockwise state."""


class AdEMAMix32bit(AdEMAMix, optim_bits=32):
    """AdEMAMix with 32-bit state."""


class PagedAdEMAMix(AdEMAMix, is_paged=True):
    """AdEMAMix with paged state."""


class PagedAdEMAMix8bit(AdEMAMix, optim_bits=8, is_paged=True):
    """AdEMAMix with paged 8-bit blockwise state."""


class PagedAdEMAMix32bit(AdEMAMix, optim_bits=32, is_paged=True):
    """AdEMAMix with paged 32-bit state."""
