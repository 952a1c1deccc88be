"""Fused optimizer steps on the GPU, and percentile clipping's gradient norm.

Kernels: ``kernels/optimizer.cu``. One launch per step (two with whole-tensor 8-bit state
or ``max_unorm``, whose first launch only measures), plus one tiny launch per 8-bit state
to prepare its code table for requantization.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from kbit_reference._optim import clip_by_history

from ._blockwise8 import SUFFIX, THREADS, prepare_table
from ._launch import Device, device_for, f32, grid_for, i32, i64

Tensor = torch.Tensor

FILE = "optimizer.cu"

#: kbit::Rule of each optimizer kind (LAMB and LARS are Adam and momentum plus the trust
#: ratio, which max_unorm switches on).
RULES = {"adam": 0, "lamb": 0, "ademamix": 1, "lion": 2, "momentum": 3, "lars": 3, "rmsprop": 4, "adagrad": 5}
#: Kinds whose weight decay multiplies the parameter (AdamW style) instead of adding to g.
DECOUPLED = frozenset({"adam", "lamb", "lion", "ademamix"})


@dataclasses.dataclass(frozen=True)
class StepScalars:
    """The scalar arguments every optimizer kernel starts with (``KBIT_STEP_PARAMS``)."""

    kind: str
    step: int
    lr: float
    beta1: float = 0.0
    beta2: float = 0.0
    beta3: float = 0.0
    alpha: float = 0.0
    eps: float = 0.0
    weight_decay: float = 0.0
    gnorm_scale: float = 1.0
    skip_zeros: bool = False

    def args(self) -> tuple:
        """The kernel arguments (``kbit::Step``): every derived scalar is computed here in
        double precision and rounded once, like the reference backend's Python scalars."""
        correction1 = 1.0 - self.beta1**self.step
        correction2 = math.sqrt(1.0 - self.beta2**self.step)
        if self.kind == "ademamix":
            bias1, bias2 = 1.0 / correction1, correction2
        elif RULES[self.kind] == RULES["adam"]:
            bias1, bias2 = correction2 / correction1, self.eps * correction2
        else:
            bias1 = bias2 = 0.0  # unused
        return (
            i32(RULES[self.kind]), i32(int(self.step == 1)), i32(int(self.kind in DECOUPLED)),
            i32(int(self.skip_zeros)), f32(self.beta1), f32(self.beta2), f32(self.beta3), f32(self.alpha),
            f32(self.eps), f32(self.weight_decay), f32(self.lr), f32(self.gnorm_scale), f32(1.0 - self.beta1),
            f32(1.0 - self.beta2), f32(1.0 - self.beta3), f32(1.0 - self.lr * self.weight_decay), f32(bias1), f32(bias2),
        )  # fmt: skip


def _grid(device: Device, n: int) -> int:
    return grid_for(-(-n // 4), THREADS, device.max_blocks)


def step_32bit(step: StepScalars, g: Tensor, p: Tensor, state1: Tensor, state2: Optional[Tensor],
               unorm_vec: Optional[Tensor], max_unorm: float) -> None:  # fmt: skip
    """One step with float32 states, in place."""
    n = p.numel()
    if n == 0:
        return
    device = device_for(p)
    kernel = device.kernel(FILE, f"optimizer_32bit_{SUFFIX[p.dtype]}")
    norms = torch.zeros(2, dtype=torch.float32, device=p.device)
    grid = _grid(device, n)
    with device.launching():
        for phase in (0, 1) if max_unorm > 0 else (1,):
            kernel((grid,), (THREADS,),
                   (*step.args(), i32(phase), g, p, state1, state2, i64(n), f32(max_unorm), norms, unorm_vec))  # fmt: skip


def step_8bit_blockwise(step: StepScalars, g: Tensor, p: Tensor, state1: Tensor, state2: Optional[Tensor],
                        qmap1: Tensor, qmap2: Optional[Tensor], absmax1: Tensor, absmax2: Optional[Tensor]) -> None:  # fmt: skip
    """One step with blockwise 8-bit states (absmax per 256 elements), in place."""
    n = p.numel()
    if n == 0:
        return
    device = device_for(p)
    with device.launching():
        table1 = prepare_table(device, qmap1)
        table2 = prepare_table(device, qmap2) if qmap2 is not None else None
        grid = grid_for(n, 4 * THREADS, device.max_blocks)
        device.kernel(FILE, f"optimizer_8bit_blockwise_{SUFFIX[p.dtype]}")(
            (grid,), (THREADS,),
            (*step.args(), g, p, state1, state2, qmap1.contiguous(), None if qmap2 is None else qmap2.contiguous(),
             table1, table2, absmax1, absmax2, i64(n)),
        )  # fmt: skip


def step_8bit_tensor(step: StepScalars, g: Tensor, p: Tensor, state1: Tensor, state2: Optional[Tensor],
                     qmap1: Tensor, qmap2: Optional[Tensor], max1: Tensor, max2: Optional[Tensor], new_max1: Tensor,
                     new_max2: Optional[Tensor], unorm_vec: Optional[Tensor], max_unorm: float) -> None:  # fmt: skip
    """One step with whole-tensor 8-bit states: read with ``max*``, rescaled to ``new_max*``."""
    n = p.numel()
    if n == 0:
        return
    device = device_for(p)
    norms = torch.zeros(2, dtype=torch.float32, device=p.device)
    with device.launching():
        new_max1.zero_()  # the measuring pass takes atomicMax on the bits, starting from 0
        if new_max2 is not None:
            new_max2.zero_()
        table1 = prepare_table(device, qmap1)
        table2 = prepare_table(device, qmap2) if qmap2 is not None else None
        kernel = device.kernel(FILE, f"optimizer_8bit_tensor_{SUFFIX[p.dtype]}")
        grid = grid_for(n, THREADS, device.max_blocks)  # one element per thread per step
        for phase in (0, 1):
            kernel((grid,), (THREADS,),
                   (*step.args(), i32(phase), g, p, state1, state2, qmap1.contiguous(),
                    None if qmap2 is None else qmap2.contiguous(), table1, table2, max1, max2, new_max1, new_max2,
                    i64(n), f32(max_unorm), norms, unorm_vec))  # fmt: skip


def gradient_norm_squared(grad: Tensor) -> Tensor:
    """``sum(grad ** 2)`` accumulated in float32, as a 0-d tensor on ``grad``'s device."""
    n = grad.numel()
    device = device_for(grad)
    grid = _grid(device, n) if n else 1
    partial = torch.zeros(grid, dtype=torch.float32, device=grad.device)
    if n:
        with device.launching():
            device.kernel(FILE, f"sum_of_squares_{SUFFIX[grad.dtype]}")((grid,), (THREADS,), (grad, i64(n), partial))
    return partial.sum()


class OptimizerKernels:
    """The ``optimizer`` op family of :class:`kbit_cuda.backend.CudaBackend`."""

    def optimizer_update_32bit(
        self,
        optimizer_name: str,
        g: Tensor,
        p: Tensor,
        state1: Tensor,
        state2: Optional[Tensor],
        unorm_vec: Optional[Tensor],
        *,
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
        scalars = StepScalars(optimizer_name, step, lr, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale,
                              skip_zeros)  # fmt: skip
        step_32bit(scalars, g, p, state1, state2, unorm_vec, max_unorm)

    def optimizer_update_8bit(
        self,
        optimizer_name: str,
        g: Tensor,
        p: Tensor,
        state1: Tensor,
        state2: Optional[Tensor],
        *,
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
        scalars = StepScalars(optimizer_name, step, lr, beta1, beta2, eps=eps, weight_decay=weight_decay,
                              gnorm_scale=gnorm_scale)  # fmt: skip
        step_8bit_tensor(scalars, g, p, state1, state2, qmap1, qmap2, max1, max2, new_max1, new_max2, unorm_vec,
                         max_unorm)  # fmt: skip

    def optimizer_update_8bit_blockwise(
        self,
        optimizer_name: str,
        g: Tensor,
        p: Tensor,
        state1: Tensor,
        state2: Optional[Tensor],
        *,
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
        scalars = StepScalars(optimizer_name, step, lr, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale,
                              skip_zeros)  # fmt: skip
        step_8bit_blockwise(scalars, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2)

    def percentile_clipping(
        self, grad: Tensor, gnorm_vec: Tensor, *, step: int, percentile: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        return clip_by_history(gradient_norm_squared(grad), gnorm_vec, step=step, percentile=percentile)
