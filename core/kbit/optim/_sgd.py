"""SGD with momentum, 32-bit or 8-bit state (``docs/formats.md`` section 5, kind ``momentum``)."""

from __future__ import annotations

from typing import Any, Iterable

from .._errors import KbitValueError
from ._base import Optimizer1State
from ._config import refuse_unsupported

__all__ = ["SGD", "SGD8bit", "SGD32bit"]


def check_momentum(owner: str, momentum: float, dampening: float, nesterov: bool) -> None:
    """The fused momentum kernels need ``momentum > 0``, no dampening and no Nesterov."""
    if isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and momentum == 0:
        raise KbitValueError(owner, "momentum", momentum, "momentum > 0: without momentum there is no state; use torch.optim.SGD")
    refuse_unsupported(
        owner,
        dampening=(dampening, 0, "the fused momentum kernels have no dampening"),
        nesterov=(nesterov, False, "the fused momentum kernels have no Nesterov momentum"),
    )


class SGD(Optimizer1State):
    """SGD with momentum; matches ``torch.optim.SGD`` (L2 weight decay added to the gradient).

    ``lr`` is required and ``momentum`` must be positive; ``dampening`` and ``nesterov``
    are accepted for signature compatibility and must stay at their defaults. Options after
    ``min_8bit_size`` are keyword-only and mean what they mean for :class:`~kbit.optim.Adam`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
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
        check_momentum(type(self).__name__, momentum, dampening, nesterov)
        super().__init__(
            "momentum", params, lr, (momentum, 0.0), 0.0, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise, max_unorm=max_unorm,
            skip_zeros=skip_zeros, is_paged=is_paged,
        )  # fmt: skip


class SGD8bit(SGD, optim_bits=8):
    """SGD with momentum and 8-bit blockwise state."""


class SGD32bit(SGD, optim_bits=32):
    """SGD with momentum and 32-bit state."""
