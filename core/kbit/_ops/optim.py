"""Custom ops of the optimizer family: one fused update per state layout, plus clipping.

The updates mutate the parameter and its state tensors in place and return nothing, so
they are declared with ``mutates_args``; ``torch.compile`` and functionalization then know
exactly which inputs change. Optional state tensors (a second moment, a second qmap) are
``Optional[Tensor]`` in the schema. The optimizer kind is a capability parameter of the
registry, so a manifest can declare which kinds a backend serves.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backend_for

Tensor = torch.Tensor


@torch.library.custom_op(
    "kbit::optimizer_update_32bit", mutates_args=("p", "state1", "state2", "unorm_vec")
)
def optimizer_update_32bit(
    optimizer_name: str,
    g: Tensor,
    p: Tensor,
    state1: Tensor,
    state2: Optional[Tensor],
    unorm_vec: Optional[Tensor],
    max_unorm: float,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    step: int,
    lr: float,
    gnorm_scale: float,
    skip_zeros: bool,
) -> None:
    """One optimizer step with float32 state; updates ``p``, the states and ``unorm_vec``."""
    backend = backend_for("optimizer_update_32bit", p, p.dtype, optimizer=optimizer_name)
    backend.optimizer_update_32bit(
        optimizer_name, g, p, state1, state2, unorm_vec,
        max_unorm=max_unorm, beta1=beta1, beta2=beta2, beta3=beta3, alpha=alpha, eps=eps,
        weight_decay=weight_decay, step=step, lr=lr, gnorm_scale=gnorm_scale, skip_zeros=skip_zeros,
    )  # fmt: skip


@optimizer_update_32bit.register_fake
def _(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, beta1, beta2, beta3, alpha, eps,
      weight_decay, step, lr, gnorm_scale, skip_zeros) -> None:  # fmt: skip
    return None


@torch.library.custom_op(
    "kbit::optimizer_update_8bit",
    mutates_args=("p", "state1", "state2", "new_max1", "new_max2", "unorm_vec"),
)
def optimizer_update_8bit(
    optimizer_name: str,
    g: Tensor,
    p: Tensor,
    state1: Tensor,
    state2: Optional[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    lr: float,
    qmap1: Tensor,
    qmap2: Optional[Tensor],
    max1: Tensor,
    max2: Optional[Tensor],
    new_max1: Tensor,
    new_max2: Optional[Tensor],
    weight_decay: float,
    gnorm_scale: float,
    unorm_vec: Optional[Tensor],
    max_unorm: float,
) -> None:
    """One step with whole-tensor 8-bit state; writes the new scales to ``new_max1/2``."""
    backend = backend_for("optimizer_update_8bit", p, p.dtype, optimizer=optimizer_name)
    backend.optimizer_update_8bit(
        optimizer_name, g, p, state1, state2,
        beta1=beta1, beta2=beta2, eps=eps, step=step, lr=lr, qmap1=qmap1, qmap2=qmap2,
        max1=max1, max2=max2, new_max1=new_max1, new_max2=new_max2, weight_decay=weight_decay,
        gnorm_scale=gnorm_scale, unorm_vec=unorm_vec, max_unorm=max_unorm,
    )  # fmt: skip


@optimizer_update_8bit.register_fake
def _(optimizer_name, g, p, state1, state2, beta1, beta2, eps, step, lr, qmap1, qmap2, max1, max2,
      new_max1, new_max2, weight_decay, gnorm_scale, unorm_vec, max_unorm) -> None:  # fmt: skip
    return None


@torch.library.custom_op(
    "kbit::optimizer_update_8bit_blockwise",
    mutates_args=("p", "state1", "state2", "absmax1", "absmax2"),
)
def optimizer_update_8bit_blockwise(
    optimizer_name: str,
    g: Tensor,
    p: Tensor,
    state1: Tensor,
    state2: Optional[Tensor],
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    step: int,
    lr: float,
    qmap1: Tensor,
    qmap2: Optional[Tensor],
    absmax1: Tensor,
    absmax2: Optional[Tensor],
    weight_decay: float,
    gnorm_scale: float,
    skip_zeros: bool,
) -> None:
    """One step with blockwise 8-bit state (blocks of 256); rewrites ``absmax1/2``."""
    backend = backend_for("optimizer_update_8bit_blockwise", p, p.dtype, optimizer=optimizer_name)
    backend.optimizer_update_8bit_blockwise(
        optimizer_name, g, p, state1, state2,
        beta1=beta1, beta2=beta2, beta3=beta3, alpha=alpha, eps=eps, step=step, lr=lr,
        qmap1=qmap1, qmap2=qmap2, absmax1=absmax1, absmax2=absmax2, weight_decay=weight_decay,
        gnorm_scale=gnorm_scale, skip_zeros=skip_zeros,
    )  # fmt: skip


@optimizer_update_8bit_blockwise.register_fake
def _(optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2,
      absmax1, absmax2, weight_decay, gnorm_scale, skip_zeros) -> None:  # fmt: skip
    return None


@torch.library.custom_op("kbit::percentile_clipping", mutates_args=("gnorm_vec",))
def percentile_clipping(grad: Tensor, gnorm_vec: Tensor, step: int, percentile: int) -> tuple[Tensor, Tensor, Tensor]:
    """Record ``||grad||^2`` in ``gnorm_vec``; return ``(current_gnorm, clip_value, gnorm_scale)``."""
    backend = backend_for("percentile_clipping", grad)
    return backend.percentile_clipping(grad, gnorm_vec, step=step, percentile=percentile)


@percentile_clipping.register_fake
def _(grad: Tensor, gnorm_vec: Tensor, step: int, percentile: int) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(gnorm_vec.new_empty((), dtype=torch.float32) for _ in range(3))  # type: ignore[return-value]
