"""Custom ops of the optimizer family: one fused update per state layout, plus clipping.

The updates mutate the parameter and its state tensors in place and return nothing, so
they are declared with ``mutates_args``; ``torch.compile`` and functionalization then know
exactly which inputs change. Optional state tensors (a second moment, a second qmap) are
``Optional[Tensor]`` in the schema.

The scalars of an update travel as one :class:`~kbit._optim_step.OptimizerStep`. A
``torch.library`` schema cannot hold such an object, so each op takes its flat form, the
four trailing arguments ``kind, step, scalars, skip_zeros``
(:meth:`OptimizerStep.to_op_args`), and rebuilds the step before calling the backend: the
backend only ever sees the object. The kind is a capability parameter of the registry, so
a manifest can declare which kinds a backend serves.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._optim_step import OptimizerStep
from . import backend_for
from ._results import Out, checked, fake_from

Tensor = torch.Tensor


def _in_place(*args: object) -> None:
    return None


@torch.library.custom_op(
    "kbit::optimizer_update_32bit", mutates_args=("p", "state1", "state2", "unorm_vec")
)
def optimizer_update_32bit(
    g: Tensor,
    p: Tensor,
    state1: Tensor,
    state2: Optional[Tensor],
    unorm_vec: Optional[Tensor],
    kind: str,
    step: int,
    scalars: Sequence[float],
    skip_zeros: bool,
) -> None:
    """One optimizer step with float32 state; updates ``p``, the states and ``unorm_vec``."""
    backend = backend_for("optimizer_update_32bit", p, optimizer=kind)
    update = OptimizerStep.from_op_args(kind, step, scalars, skip_zeros)
    checked("optimizer_update_32bit", backend, backend.optimizer_update_32bit(update, g, p, state1, state2, unorm_vec), None)


optimizer_update_32bit.register_fake(_in_place)


@torch.library.custom_op(
    "kbit::optimizer_update_8bit",
    mutates_args=("p", "state1", "state2", "new_max1", "new_max2", "unorm_vec"),
)
def optimizer_update_8bit(
    g: Tensor,
    p: Tensor,
    state1: Tensor,
    state2: Optional[Tensor],
    qmap1: Tensor,
    qmap2: Optional[Tensor],
    max1: Tensor,
    max2: Optional[Tensor],
    new_max1: Tensor,
    new_max2: Optional[Tensor],
    unorm_vec: Optional[Tensor],
    kind: str,
    step: int,
    scalars: Sequence[float],
    skip_zeros: bool,
) -> None:
    """One step with whole-tensor 8-bit state; writes the new scales to ``new_max1/2``."""
    backend = backend_for("optimizer_update_8bit", p, optimizer=kind)
    update = OptimizerStep.from_op_args(kind, step, scalars, skip_zeros)
    result = backend.optimizer_update_8bit(
        update, g, p, state1, state2, qmap1=qmap1, qmap2=qmap2, max1=max1, max2=max2,
        new_max1=new_max1, new_max2=new_max2, unorm_vec=unorm_vec,
    )  # fmt: skip
    checked("optimizer_update_8bit", backend, result, None)


optimizer_update_8bit.register_fake(_in_place)


@torch.library.custom_op(
    "kbit::optimizer_update_8bit_blockwise",
    mutates_args=("p", "state1", "state2", "absmax1", "absmax2"),
)
def optimizer_update_8bit_blockwise(
    g: Tensor,
    p: Tensor,
    state1: Tensor,
    state2: Optional[Tensor],
    qmap1: Tensor,
    qmap2: Optional[Tensor],
    absmax1: Tensor,
    absmax2: Optional[Tensor],
    kind: str,
    step: int,
    scalars: Sequence[float],
    skip_zeros: bool,
) -> None:
    """One step with blockwise 8-bit state (blocks of 256); rewrites ``absmax1/2``."""
    backend = backend_for("optimizer_update_8bit_blockwise", p, optimizer=kind)
    update = OptimizerStep.from_op_args(kind, step, scalars, skip_zeros)
    result = backend.optimizer_update_8bit_blockwise(
        update, g, p, state1, state2, qmap1=qmap1, qmap2=qmap2, absmax1=absmax1, absmax2=absmax2
    )
    checked("optimizer_update_8bit_blockwise", backend, result, None)


optimizer_update_8bit_blockwise.register_fake(_in_place)


def _percentile_clipping_out(grad: Tensor, gnorm_vec: Tensor, step: int, percentile: int) -> tuple[Out, Out, Out]:
    return tuple(Out(name, (), torch.float32, gnorm_vec.device) for name in ("current_gnorm", "clip_value", "gnorm_scale"))  # type: ignore[return-value]


@torch.library.custom_op("kbit::percentile_clipping", mutates_args=("gnorm_vec",))
def percentile_clipping(grad: Tensor, gnorm_vec: Tensor, step: int, percentile: int) -> tuple[Tensor, Tensor, Tensor]:
    """Record ``||grad||^2`` in ``gnorm_vec``; return ``(current_gnorm, clip_value, gnorm_scale)``."""
    backend = backend_for("percentile_clipping", grad)
    result = backend.percentile_clipping(grad, gnorm_vec, step=step, percentile=percentile)
    return checked("percentile_clipping", backend, result, _percentile_clipping_out(grad, gnorm_vec, step, percentile))


percentile_clipping.register_fake(fake_from(_percentile_clipping_out))
