"""RMSprop with 32-bit or 8-bit state (``docs/formats.md`` section 5, kind ``rmsprop``)."""

from __future__ import annotations

from typing import Any, Iterable

from .._errors import KbitValueError
from ._base import Optimizer1State
from ._config import refuse_unsupported

__all__ = ["RMSprop", "RMSprop8bit", "RMSprop32bit"]


class RMSprop(Optimizer1State):
    """RMSprop; matches ``torch.optim.RMSprop`` without momentum and centering.

    ``alpha`` is the smoothing constant (must be > 0); ``momentum`` and ``centered`` are
    accepted for signature compatibility and must stay at their defaults. Options after
    ``min_8bit_size`` are keyword-only and mean what they mean for :class:`~kbit.optim.Adam`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
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
        owner = type(self).__name__
        if isinstance(alpha, (int, float)) and alpha == 0:
            raise KbitValueError(owner, "alpha", alpha, "alpha > 0 (alpha = 0 keeps no history)")
        refuse_unsupported(
            owner,
            momentum=(momentum, 0, "the fused RMSprop kernels have no momentum buffer"),
            centered=(centered, False, "the fused RMSprop kernels are not centered"),
        )
        super().__init__(
            "rmsprop", params, lr, (alpha, 0.0), eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise, max_unorm=max_unorm,
            skip_zeros=skip_zeros, is_paged=is_paged,
        )  # fmt: skip


class RMSprop8bit(RMSprop, optim_bits=8):
    """RMSprop with 8-bit blockwise state."""


class RMSprop32bit(RMSprop, optim_bits=32):
    """RMSprop with 32-bit state."""
