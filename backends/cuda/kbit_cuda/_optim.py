"""Fused optimizer steps on the GPU, and percentile clipping's gradient norm.

Kernels: ``kernels/optimizer.cu``. One launch per step (two with whole-tensor 8-bit state
or ``max_unorm``, whose first launch only measures), plus one tiny launch per 8-bit state
to prepare its code table for requantization.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from kbit.backend import OptimizerStep
from kbit_reference._optim import clip_by_history

from ._blockwise8 import SUFFIX, THREADS, prepare_table
from ._launch import Device, device_for, f32, grid_for, i32, i64

Tensor = torch.Tensor

FILE = "optimizer.cu"

#: kbit::Rule of each optimizer kind (LAMB and LARS are Adam and momentum; their trust
#: ratio is max_unorm, which any kind may use).
RULES = {"adam": 0, "lamb": 0, "ademamix": 1, "lion": 2, "momentum": 3, "lars": 3, "rmsprop": 4, "adagrad": 5}


def step_arguments(step: OptimizerStep) -> tuple:
    """The scalar arguments every optimizer kernel starts with (``KBIT_STEP_PARAMS``).

    Derived scalars (``1 - beta``, ``1 - lr * wd``, the bias corrections) are computed here
    in double precision and rounded once, like the reference backend's Python scalars.
    """
    rule = RULES[step.kind.name]
    correction1 = 1.0 - step.beta1**step.step
    correction2 = math.sqrt(1.0 - step.beta2**step.step)
    if rule == RULES["ademamix"]:
        bias1, bias2 = 1.0 / correction1, correction2
    elif rule == RULES["adam"]:
        bias1, bias2 = correction2 / correction1, step.eps * correction2
    else:
        bias1 = bias2 = 0.0  # unused by the other rules
    return (
        i32(rule), i32(int(step.step == 1)), i32(int(step.kind.decoupled_decay)), i32(int(step.skip_zeros)),
        f32(step.beta1), f32(step.beta2), f32(step.beta3), f32(step.alpha), f32(step.eps), f32(step.weight_decay),
        f32(step.lr), f32(step.gnorm_scale), f32(1.0 - step.beta1), f32(1.0 - step.beta2), f32(1.0 - step.beta3),
        f32(1.0 - step.lr * step.weight_decay), f32(bias1), f32(bias2),
    )  # fmt: skip


def _grid(device: Device, n: int) -> int:
    return grid_for(-(-n // 4), THREADS, device.max_blocks)


def step_32bit(step: OptimizerStep, g: Tensor, p: Tensor, state1: Tensor, state2: Optional[Tensor],
               unorm_vec: Optional[Tensor]) -> None:  # fmt: skip
    """One step with float32 states, in place."""
    n = p.numel()
    if n == 0:
        return
    device = device_for(p)
    kernel = device.kernel(FILE, f"optimizer_32bit_{SUFFIX[p.dtype]}")
    norms = torch.zeros(2, dtype=torch.float32, device=p.device)
    grid = _grid(device, n)
    with device.launching():
        for phase in (0, 1) if step.max_unorm > 0 else (1,):
            kernel((grid,), (THREADS,),
                   (*step_arguments(step), i32(phase), g, p, state1, state2, i64(n), f32(step.max_unorm), norms,
                    unorm_vec))  # fmt: skip


def step_8bit_blockwise(step: OptimizerStep, g: Tensor, p: Tensor, state1: Tensor, state2: Optional[Tensor],
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
            (*step_arguments(step), g, p, state1, state2, qmap1.contiguous(), None if qmap2 is None else qmap2.contiguous(),
             table1, table2, absmax1, absmax2, i64(n)),
        )  # fmt: skip


def step_8bit_tensor(step: OptimizerStep, g: Tensor, p: Tensor, state1: Tensor, state2: Optional[Tensor],
                     qmap1: Tensor, qmap2: Optional[Tensor], max1: Tensor, max2: Optional[Tensor], new_max1: Tensor,
                     new_max2: Optional[Tensor], unorm_vec: Optional[Tensor]) -> None:  # fmt: skip
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
                   (*step_arguments(step), i32(phase), g, p, state1, state2, qmap1.contiguous(),
                    None if qmap2 is None else qmap2.contiguous(), table1, table2, max1, max2, new_max1, new_max2,
                    i64(n), f32(step.max_unorm), norms, unorm_vec))  # fmt: skip


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
        step: OptimizerStep,
        g: Tensor,
        p: Tensor,
        state1: Tensor,
        state2: Optional[Tensor],
        unorm_vec: Optional[Tensor],
    ) -> None:
        step_32bit(step, g, p, state1, state2, unorm_vec)

    def optimizer_update_8bit(
        self,
        step: OptimizerStep,
        g: Tensor,
        p: Tensor,
        state1: Tensor,
        state2: Optional[Tensor],
        *,
        qmap1: Tensor,
        qmap2: Optional[Tensor],
        max1: Tensor,
        max2: Optional[Tensor],
        new_max1: Tensor,
        new_max2: Optional[Tensor],
        unorm_vec: Optional[Tensor],
    ) -> None:
        step_8bit_tensor(step, g, p, state1, state2, qmap1, qmap2, max1, max2, new_max1, new_max2, unorm_vec)

    def optimizer_update_8bit_blockwise(
        self,
        step: OptimizerStep,
        g: Tensor,
        p: Tensor,
        state1: Tensor,
        state2: Optional[Tensor],
        *,
        qmap1: Tensor,
        qmap2: Optional[Tensor],
        absmax1: Tensor,
        absmax2: Optional[Tensor],
    ) -> None:
        step_8bit_blockwise(step, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2)

    def percentile_clipping(
        self, grad: Tensor, gnorm_vec: Tensor, *, step: int, percentile: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        return clip_by_history(gradient_norm_squared(grad), gnorm_vec, step=step, percentile=percentile)
