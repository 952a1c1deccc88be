"""Optimizer kernels with the bitsandbytes ``functional`` API: one fused step per state layout.

Every update mutates ``p`` and its states in place. The scalars of an update are validated
once, into an :class:`~kbit._optim_step.OptimizerStep` (:func:`make_step`: typed errors
naming the op, the argument and the value), and the tensors by the ``apply_*`` function of
the state layout; nothing is written when a check fails. The seed API's functions
(``optimizer_update_32bit`` & co.) build the step from their scalar arguments;
``kbit.optim`` builds it from the param group and calls the ``apply_*`` functions directly.

What each kind reads (its states, decoupled or L2 weight decay, hyperparameters, options)
is the table :data:`kbit.backend.OPTIMIZER_KINDS`; update rules and state layouts are
``docs/formats.md`` section 5. A hyperparameter a kind does not read must be 0: a non-zero
value raises instead of being ignored. AdEMAMix's ``state1`` stacks its two first moments:
shape ``(2, *p.shape)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._errors import KbitTypeError, KbitValueError
from .._formats import FLOAT_DTYPES, GNORM_HISTORY, OPTIMIZER_BLOCKSIZE, num_blocks
from .._ops import call_with_backend
from .._ops import optim as ops
from .._optim_step import OPTIMIZER_KINDS, OptimizerKind, OptimizerStep, StateLayout, layout_of
from ._validate import check_dtype, check_int, check_real, check_tensor

__all__ = [
    "optimizer_update_32bit",
    "optimizer_update_8bit",
    "optimizer_update_8bit_blockwise",
    "percentile_clipping",
]


# ----------------------------------------------------------------------------- checks
def optimizer_kind(op: str, name: object, *, layout: Optional[StateLayout] = None) -> OptimizerKind:
    """The :class:`OptimizerKind` called ``name``; raises for unknown kinds and for kinds
    ``layout`` (whole-tensor 8-bit state) cannot serve."""
    kind = OPTIMIZER_KINDS.get(name) if isinstance(name, str) else None
    static = layout is not None and layout.eight_bit and not layout.block_wise
    if kind is None or (static and not kind.static_8bit):
        allowed = [n for n, k in OPTIMIZER_KINDS.items() if k.static_8bit or not static]
        raise KbitValueError(op, "optimizer_name", name, f"expected one of {allowed}")
    return kind


def check_hyperparameters(op: str, kind: OptimizerKind, **values: float) -> dict[str, float]:
    """Validate the scalar hyperparameters of one step for ``kind``.

    Betas lie in ``[0, 1)``; ``lr``, ``eps``, ``weight_decay``, ``alpha``, ``gnorm_scale``
    and ``max_unorm`` are finite and non-negative. A hyperparameter ``kind`` does not read
    must be 0.
    """
    checked = {}
    for name, value in values.items():
        is_beta = name.startswith("beta")
        checked[name] = check_real(op, name, value, low=0.0, high=1.0 if is_beta else math.inf, high_open=is_beta)
        if not kind.reads_param(name) and checked[name] != 0.0:
            raise KbitValueError(op, name, value, f"optimizer {kind.name!r} does not use {name}; pass 0")
    return checked


def make_step(op: str, kind: OptimizerKind, step: object, layout: StateLayout, *, skip_zeros: object = False,
              **hyper: float) -> OptimizerStep:  # fmt: skip
    """The validated :class:`OptimizerStep` of one update of ``kind`` with state of ``layout``.

    ``hyper`` holds the step's scalars by field name (``lr``, ``beta1``, ...); fields not
    given keep the dataclass defaults. Options the layout cannot honour (``max_unorm`` with
    blockwise 8-bit state, ``skip_zeros`` with whole-tensor 8-bit state) raise.
    """
    checked = check_hyperparameters(op, kind, **hyper)
    if not isinstance(skip_zeros, bool):
        raise KbitTypeError(op, "skip_zeros", f"type {type(skip_zeros).__name__}", "a bool")
    for option, active in (("max_unorm", checked.get("max_unorm", 0.0) > 0), ("skip_zeros", skip_zeros)):
        if active and option not in layout.options:
            raise KbitValueError(op, option, hyper.get(option, skip_zeros), f"{layout.name} state cannot honour it")
    return OptimizerStep(kind, check_step(op, step), skip_zeros=skip_zeros, **checked)


def check_step(op: str, step: object) -> int:
    """Require the 1-based step count (an int >= 1; the first update is step 1)."""
    return check_int(op, "step", step, low=1)


def _check_inplace(op: str, name: str, tensor: object, dtypes: tuple, shape: tuple, device: torch.device) -> torch.Tensor:
    """A tensor this op writes into: exact dtype, shape and device, and contiguous."""
    tensor = check_dtype(op, name, tensor, dtypes)
    if tuple(tensor.shape) != shape:
        raise KbitValueError(op, f"{name}.shape", tuple(tensor.shape), f"expected {shape}")
    if tensor.device != device:
        raise KbitValueError(op, f"{name}.device", str(tensor.device), f"expected {device} (the parameter's device)")
    if not tensor.is_contiguous():
        raise KbitValueError(op, name, "a non-contiguous tensor", "a contiguous tensor (it is updated in place)")
    return tensor


def _check_param_and_grad(op: str, g: object, p: object) -> tuple[torch.Tensor, torch.Tensor]:
    p = check_tensor(op, "p", p)
    p = _check_inplace(op, "p", p, FLOAT_DTYPES, tuple(p.shape), p.device)
    g = check_tensor(op, "g", g)
    if g.is_sparse:
        raise KbitTypeError(op, "g", "a sparse layout", "a dense gradient")
    if g.dtype != p.dtype:
        raise KbitTypeError(op, "g", f"dtype {g.dtype}", f"the parameter's dtype {p.dtype}")
    if g.shape != p.shape or g.device != p.device:
        raise KbitValueError(op, "g", f"tensor{tuple(g.shape)} on {g.device}", f"shape {tuple(p.shape)} on {p.device}")
    return g.contiguous(), p


def _state_shape(kind: OptimizerKind, which: int, p: torch.Tensor) -> tuple:
    shape = tuple(p.shape)
    return (2, *shape) if which == 1 and kind.stacked_state1 else shape


def _check_states(op: str, kind: OptimizerKind, p: torch.Tensor, state1: object, state2: object,
                  dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # fmt: skip
    state1 = _check_inplace(op, "state1", state1, (dtype,), _state_shape(kind, 1, p), p.device)
    if kind.num_states == 1:
        if state2 is not None:
            raise KbitValueError(op, "state2", "a tensor", f"None: optimizer {kind.name!r} keeps one state")
        return state1, None
    if state2 is None:
        raise KbitValueError(op, "state2", None, f"a tensor: optimizer {kind.name!r} keeps two states")
    return state1, _check_inplace(op, "state2", state2, (dtype,), _state_shape(kind, 2, p), p.device)


def _check_qmap(op: str, name: str, qmap: object, device: torch.device) -> torch.Tensor:
    qmap = check_dtype(op, name, qmap, (torch.float32,))
    if tuple(qmap.shape) != (256,):
        raise KbitValueError(op, f"{name}.shape", tuple(qmap.shape), "expected (256,): one value per 8-bit code")
    return qmap.to(device).contiguous()


def _check_unorm(op: str, unorm_vec: object, max_unorm: float, p: torch.Tensor) -> Optional[torch.Tensor]:
    if unorm_vec is None:
        if max_unorm > 0:
            raise KbitValueError(op, "unorm_vec", None, "a float32 buffer of one element when max_unorm > 0")
        return None
    shape = tuple(check_tensor(op, "unorm_vec", unorm_vec).shape)
    if math.prod(shape) != 1:
        raise KbitValueError(op, "unorm_vec.shape", shape, "expected one element")
    return _check_inplace(op, "unorm_vec", unorm_vec, (torch.float32,), shape, p.device)


# -------------------------------------------------------------- updates by layout
def apply_32bit(
    update: OptimizerStep,
    g: torch.Tensor,
    p: torch.Tensor,
    state1: torch.Tensor,
    state2: Optional[torch.Tensor] = None,
    unorm_vec: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> None:
    """Apply ``update`` to ``p`` with float32 state, in place (tensors checked first)."""
    op = "optimizer_update_32bit"
    g, p = _check_param_and_grad(op, g, p)
    state1, state2 = _check_states(op, update.kind, p, state1, state2, torch.float32)
    unorm_vec = _check_unorm(op, unorm_vec, update.max_unorm, p)
    call_with_backend(backend, ops.optimizer_update_32bit, g, p, state1, state2, unorm_vec, *update.to_op_args())


def apply_8bit(
    update: OptimizerStep,
    g: torch.Tensor,
    p: torch.Tensor,
    state1: torch.Tensor,
    state2: Optional[torch.Tensor],
    qmap1: torch.Tensor,
    qmap2: Optional[torch.Tensor],
    max1: torch.Tensor,
    max2: Optional[torch.Tensor],
    new_max1: torch.Tensor,
    new_max2: Optional[torch.Tensor],
    unorm_vec: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> None:
    """Apply ``update`` to ``p`` with whole-tensor 8-bit state, in place (tensors checked first)."""
    op = "optimizer_update_8bit"
    g, p = _check_param_and_grad(op, g, p)
    state1, state2 = _check_states(op, update.kind, p, state1, state2, torch.uint8)
    qmap1 = _check_qmap(op, "qmap1", qmap1, p.device)
    max1 = _check_inplace(op, "max1", max1, (torch.float32,), (1,), p.device)
    new_max1 = _check_inplace(op, "new_max1", new_max1, (torch.float32,), (1,), p.device)
    if state2 is not None:
        qmap2 = _check_qmap(op, "qmap2", qmap2, p.device)
        max2 = _check_inplace(op, "max2", max2, (torch.float32,), (1,), p.device)
        new_max2 = _check_inplace(op, "new_max2", new_max2, (torch.float32,), (1,), p.device)
    else:
        qmap2 = max2 = new_max2 = None
    unorm_vec = _check_unorm(op, unorm_vec, update.max_unorm, p)
    call_with_backend(
        backend, ops.optimizer_update_8bit, g, p, state1, state2, qmap1, qmap2, max1, max2, new_max1, new_max2,
        unorm_vec, *update.to_op_args(),
    )  # fmt: skip


def apply_8bit_blockwise(
    update: OptimizerStep,
    g: torch.Tensor,
    p: torch.Tensor,
    state1: torch.Tensor,
    state2: Optional[torch.Tensor],
    qmap1: torch.Tensor,
    qmap2: Optional[torch.Tensor],
    absmax1: torch.Tensor,
    absmax2: Optional[torch.Tensor],
    *,
    backend: Optional[str] = None,
) -> None:
    """Apply ``update`` to ``p`` with blockwise 8-bit state, in place (tensors checked first)."""
    op = "optimizer_update_8bit_blockwise"
    g, p = _check_param_and_grad(op, g, p)
    state1, state2 = _check_states(op, update.kind, p, state1, state2, torch.uint8)
    nblocks = num_blocks(p.numel(), OPTIMIZER_BLOCKSIZE)
    qmap1 = _check_qmap(op, "qmap1", qmap1, p.device)
    absmax1_shape = (2, nblocks) if update.kind.stacked_state1 else (nblocks,)
    absmax1 = _check_inplace(op, "absmax1", absmax1, (torch.float32,), absmax1_shape, p.device)
    if state2 is not None:
        qmap2 = _check_qmap(op, "qmap2", qmap2, p.device)
        absmax2 = _check_inplace(op, "absmax2", absmax2, (torch.float32,), (nblocks,), p.device)
    else:
        qmap2 = absmax2 = None
    call_with_backend(
        backend, ops.optimizer_update_8bit_blockwise, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2,
        *update.to_op_args(),
    )  # fmt: skip


# ------------------------------------------------------------------- seed API
def optimizer_update_32bit(
    optimizer_name: str,
    g: torch.Tensor,
    p: torch.Tensor,
    state1: torch.Tensor,
    beta1: float,
    eps: float,
    step: int,
    lr: float,
    state2: Optional[torch.Tensor] = None,
    beta2: float = 0.0,
    beta3: float = 0.0,
    alpha: float = 0.0,
    weight_decay: float = 0.0,
    gnorm_scale: float = 1.0,
    unorm_vec: Optional[torch.Tensor] = None,
    max_unorm: float = 0.0,
    skip_zeros: bool = False,
    *,
    backend: Optional[str] = None,
) -> None:
    """One optimizer step with float32 state, in place.

    Args:
        optimizer_name: the kind (a key of :data:`kbit.backend.OPTIMIZER_KINDS`).
        g, p: gradient and parameter (float16, bfloat16 or float32, same dtype and shape);
            ``p`` must be contiguous.
        state1, state2: float32 states shaped like ``p`` (``state1`` is ``(2, *p.shape)``
            for AdEMAMix); ``state2`` only for two-state kinds.
        beta1, beta2, beta3, alpha, eps, weight_decay, lr: hyperparameters.
        step: 1-based step count (bias corrections use it).
        gnorm_scale: factor applied to ``g`` first (percentile clipping).
        unorm_vec, max_unorm: with ``max_unorm > 0`` the update is scaled down to at most
            ``max_unorm * ||p||`` (LAMB/LARS) and its squared norm stored in ``unorm_vec``.
        skip_zeros: leave elements with an exactly zero gradient untouched.
        backend: name of a backend to prefer for this call.
    """
    op = "optimizer_update_32bit"
    layout = layout_of(False, False)
    update = make_step(
        op, optimizer_kind(op, optimizer_name), step, layout, skip_zeros=skip_zeros, lr=lr, beta1=beta1,
        beta2=beta2, beta3=beta3, alpha=alpha, eps=eps, weight_decay=weight_decay, gnorm_scale=gnorm_scale,
        max_unorm=max_unorm,
    )  # fmt: skip
    apply_32bit(update, g, p, state1, state2, unorm_vec, backend=backend)


def optimizer_update_8bit(
    optimizer_name: str,
    g: torch.Tensor,
    p: torch.Tensor,
    state1: torch.Tensor,
    state2: Optional[torch.Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    lr: float,
    qmap1: torch.Tensor,
    qmap2: Optional[torch.Tensor],
    max1: torch.Tensor,
    max2: Optional[torch.Tensor],
    new_max1: torch.Tensor,
    new_max2: Optional[torch.Tensor],
    weight_decay: float = 0.0,
    gnorm_scale: float = 1.0,
    unorm_vec: Optional[torch.Tensor] = None,
    max_unorm: float = 0.0,
    *,
    backend: Optional[str] = None,
) -> None:
    """One step with whole-tensor 8-bit state (the seed API), in place.

    ``state1``/``state2`` are uint8 codes into ``qmap1``/``qmap2`` scaled by the one-element
    float32 ``max1``/``max2``. The updated states' absmax is written to ``new_max1`` /
    ``new_max2`` and the states are requantized with it: swap ``max`` and ``new_max``
    before the next step. AdEMAMix needs blockwise state.
    """
    op = "optimizer_update_8bit"
    layout = layout_of(True, False)
    update = make_step(
        op, optimizer_kind(op, optimizer_name, layout=layout), step, layout, lr=lr, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, gnorm_scale=gnorm_scale, max_unorm=max_unorm,
    )  # fmt: skip
    apply_8bit(update, g, p, state1, state2, qmap1, qmap2, max1, max2, new_max1, new_max2, unorm_vec, backend=backend)


def optimizer_update_8bit_blockwise(
    optimizer_name: str,
    g: torch.Tensor,
    p: torch.Tensor,
    state1: torch.Tensor,
    state2: Optional[torch.Tensor],
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    step: int,
    lr: float,
    qmap1: torch.Tensor,
    qmap2: Optional[torch.Tensor],
    absmax1: torch.Tensor,
    absmax2: Optional[torch.Tensor],
    weight_decay: float = 0.0,
    gnorm_scale: float = 1.0,
    skip_zeros: bool = False,
    *,
    backend: Optional[str] = None,
) -> None:
    """One step with blockwise 8-bit state, in place.

    ``state1``/``state2`` are uint8 codes into ``qmap1``/``qmap2`` with one float32 absmax
    per 256 consecutive elements (``absmax1`` is ``(2, nblocks)`` for AdEMAMix). Each block
    is dequantized, updated in float32 and requantized to the nearest code with a fresh
    absmax, written back to ``absmax1``/``absmax2``.
    """
    op = "optimizer_update_8bit_blockwise"
    layout = layout_of(True, True)
    update = make_step(
        op, optimizer_kind(op, optimizer_name), step, layout, skip_zeros=skip_zeros, lr=lr, beta1=beta1,
        beta2=beta2, beta3=beta3, alpha=alpha, eps=eps, weight_decay=weight_decay, gnorm_scale=gnorm_scale,
    )  # fmt: skip
    apply_8bit_blockwise(update, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2, backend=backend)


def percentile_clipping(
    grad: torch.Tensor, gnorm_vec: torch.Tensor, step: int, percentile: int = 5, *, backend: Optional[str] = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Adaptive gradient clipping from the history of gradient norms.

    Records ``||grad||^2`` in the 100-slot float32 ``gnorm_vec`` (every slot at step 1,
    slot ``step % 100`` later), then returns ``(current_gnorm, clip_value, gnorm_scale)``:
    the current norm, the norm at the ``percentile``-th place of the sorted history, and
    ``clip_value / current_gnorm`` when the current norm exceeds it (else 1.0). Pass
    ``gnorm_scale`` to the optimizer update.
    """
    op = "percentile_clipping"
    grad = check_dtype(op, "grad", grad, FLOAT_DTYPES)
    if grad.is_sparse:
        raise KbitTypeError(op, "grad", "a sparse layout", "a dense gradient")
    gnorm_vec = _check_inplace(op, "gnorm_vec", gnorm_vec, (torch.float32,), (GNORM_HISTORY,), grad.device)
    check_int(op, "percentile", percentile, low=0, high=GNORM_HISTORY - 1)
    current, clip, scale = call_with_backend(
        backend, ops.percentile_clipping, grad.contiguous(), gnorm_vec, check_step(op, step), percentile
    )
    return current, clip, float(scale)
