"""LARS: fused (32-bit or 8-bit state, kind ``lars``) and in plain PyTorch (:class:`PytorchLARS`)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from .._errors import KbitValueError
from ._base import Optimizer1State
from ._config import refuse_unsupported
from ._sgd import check_momentum

__all__ = ["LARS", "LARS8bit", "LARS32bit", "PytorchLARS"]


class LARS(Optimizer1State):
    """LARS: SGD with momentum whose update is scaled down to at most
    ``max_unorm * ||p||`` per parameter tensor (the layer-wise trust ratio).

    ``momentum`` must be positive; ``dampening`` and ``nesterov`` must stay at their
    defaults. 8-bit state uses whole-tensor scales (blockwise state has no update-norm
    clipping). Options after ``min_8bit_size`` are keyword-only.
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
        max_unorm: float = 0.02,
        block_wise: bool = False,
        skip_zeros: bool = False,
        is_paged: bool = False,
    ) -> None:
        check_momentum(type(self).__name__, momentum, dampening, nesterov)
        super().__init__(
            "lars", params, lr, (momentum, 0.0), 0.0, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise, max_unorm=max_unorm,
            skip_zeros=skip_zeros, is_paged=is_paged,
        )  # fmt: skip


class LARS8bit(LARS, optim_bits=8):
    """LARS with 8-bit whole-tensor state."""


class LARS32bit(LARS, optim_bits=32):
    """LARS with 32-bit state."""




class PytorchLARS(torch.optim.Optimizer):
    """LARS written with plain PyTorch ops (no kbit kernels), for comparison and CPU use.

    Per parameter: ``d = g + weight_decay * p``; momentum buffer ``b = d`` at the first
    step, then ``b = momentum * b + (1 - dampening) * d``; the update is ``d + momentum * b``
    with ``nesterov`` else ``b`` (``d`` without momentum); with ``max_unorm > 0`` it is
    scaled down to at most ``max_unorm * ||p||``; then ``p -= lr * update``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        max_unorm: float = 0.02,
    ) -> None:
        owner = type(self).__name__
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("max_unorm", max_unorm)):
            if value < 0.0:
                raise KbitValueError(owner, name, value, "a non-negative number")
        if nesterov:
            refuse_unsupported(owner, dampening=(dampening, 0, "Nesterov momentum needs dampening=0"))
            if momentum <= 0:
                raise KbitValueError(owner, "momentum", momentum, "momentum > 0 with nesterov=True")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, max_unorm=max_unorm)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, max_unorm = group["momentum"], group["max_unorm"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.float()
                if group["weight_decay"] != 0:
                    update = update.add(p.float(), alpha=group["weight_decay"])
                if momentum != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        buffer = state["momentum_buffer"] = update.clone()
                    else:
                        buffer = state["momentum_buffer"]
                        buffer.mul_(momentum).add_(update, alpha=1.0 - group["dampening"])
                    update = update.add(buffer, alpha=momentum) if group["nesterov"] else buffer
                scale = 1.0
                if max_unorm > 0.0:
                    param_norm = torch.linalg.vector_norm(p.float())
                    update_norm = torch.linalg.vector_norm(update)
                    limit = max_unorm * param_norm
                    scale = torch.where(update_norm > limit, limit / update_norm, torch.ones_like(update_norm))
                p.copy_(p.float().sub_(update * scale * group["lr"]))
        return loss
