"""LAMB with 32-bit or 8-bit state (``docs/formats.md`` section 5, kind ``lamb``)."""

from __future__ import annotations

from typing import Any, Iterable

from ._base import Optimizer2State
from ._config import refuse_unsupported

__all__ = ["LAMB", "LAMB8bit", "LAMB32bit"]


class LAMB(Optimizer2State):
    """LAMB: the Adam update (decoupled weight decay), scaled down to at most
    ``max_unorm * ||p||`` per parameter tensor (the layer-wise trust ratio).

    8-bit state defaults to whole-tensor scales (``block_wise=False``) because blockwise
    8-bit state has no update-norm clipping. ``bias_correction``, ``amsgrad`` and
    ``adam_w_mode`` are accepted for signature compatibility and must stay at their
    defaults. Options after ``min_8bit_size`` are keyword-only.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        adam_w_mode: bool = True,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        *,
        percentile_clipping: int = 100,
        block_wise: bool = False,
        max_unorm: float = 1.0,
        skip_zeros: bool = False,
        is_paged: bool = False,
    ) -> None:
        refuse_unsupported(
            type(self).__name__,
            bias_correction=(bias_correction, True, "the fused kernels always correct the bias"),
            amsgrad=(amsgrad, False, "the fused kernels have no AMSGrad"),
            adam_w_mode=(adam_w_mode, True, "weight decay is always decoupled"),
        )
        super().__init__(
            "lamb", params, lr, betas, eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise, max_unorm=max_unorm,
            skip_zeros=skip_zeros, is_paged=is_paged,
        )  # fmt: skip


class LAMB8bit(LAMB, optim_bits=8):
    """LAMB with 8-bit state."""


class LAMB32bit(LAMB, optim_bits=32):
    """LAMB with 32-bit state."""
