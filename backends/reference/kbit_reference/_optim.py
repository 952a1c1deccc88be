"""Reference optimizer updates: float32 state, whole-tensor 8-bit state, blockwise 8-bit state.

One set of update rules (``docs/formats.md`` section 5) serves all three state layouts: the
8-bit paths dequantize the states to float32, run the same rule as the 32-bit path, and
requantize to the nearest code with a fresh absmax (per block of 256, or per tensor).

Memory, per call (``n`` = parameter elements). Besides the states themselves:

- float32 working copies of ``p`` and ``g`` only when they are not float32 already (or when
  the gradient must be scaled / get L2 weight decay added: the caller's ``g`` is never
  modified);
- one float32 temporary of size ``n`` for the update denominator (``sqrt(v) + eps``) or the
  explicit update direction (Lion's sign, AdEMAMix's mixed momentum, LAMB/LARS which need
  the update's norm before applying it);
- 8-bit layouts: the dequantized float32 states (4 bytes per state element, the price of a
  readable reference) and an int32 index tensor while decoding / encoding one state.

Each rule reads the data once: the states are updated in place and ``p`` receives a single
fused ``addcdiv_`` / ``add_``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from kbit._formats import OPTIMIZER_BLOCKSIZE
from kbit.backend import OptimizerStep

from ._common import block_absmax, blockwise_apply, nearest_code_index, reciprocal_or_zero

Tensor = torch.Tensor


@dataclasses.dataclass
class _Direction:
    """The update ``factor * numerator / denominator`` (no denominator: ``factor * numerator``)."""

    numerator: Tensor
    denominator: Optional[Tensor] = None
    factor: float = 1.0
    #: True when ``numerator`` is a temporary of this step (not a state or the gradient).
    numerator_is_temporary: bool = False

    def materialise(self) -> Tensor:
        """The update as one tensor, reusing a temporary's storage where there is one."""
        if self.denominator is not None:
            out = torch.div(self.numerator, self.denominator, out=self.denominator)
        elif self.numerator_is_temporary:
            out = self.numerator
        else:
            out = self.numerator.clone()  # a live state (momentum) must not be scaled
        return out.mul_(self.factor) if self.factor != 1.0 else out


# ----------------------------------------------------------------------------- rules
def _working_grad(h: OptimizerStep, g: Tensor, p32: Tensor) -> Tensor:
    """``gnorm_scale * g`` (plus ``wd * p`` for L2-decay kinds) in float32, never aliasing a
    tensor the caller owns when it has to change."""
    l2 = h.l2_decay
    if g.dtype == torch.float32 and h.gnorm_scale == 1.0 and not l2:
        return g  # read only below
    g32 = g.to(torch.float32, copy=True)
    if h.gnorm_scale != 1.0:
        g32.mul_(h.gnorm_scale)
    if l2:
        g32.add_(p32, alpha=h.weight_decay)
    return g32


def _direction(h: OptimizerStep, g: Tensor, s1: Tensor, s2: Optional[Tensor]) -> _Direction:
    """Update the float32 states in place and return the parameter update direction."""
    kind, b1, b2, t = h.kind.name, h.beta1, h.beta2, h.step
    if kind in ("adam", "lamb"):
        assert s2 is not None
        s1.lerp_(g, 1.0 - b1)  # b1 m + (1 - b1) g in one pass
        s2.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        c1 = 1.0 - b1**t
        c2 = math.sqrt(1.0 - b2**t)
        return _Direction(s1, s2.sqrt().add_(h.eps * c2), c2 / c1)
    if kind in ("momentum", "lars"):
        if t == 1:
            s1.copy_(g)
        else:
            s1.mul_(b1).add_(g)
        return _Direction(s1)
    if kind == "lion":
        # The sign uses the momentum *before* this step's update of the state.
        sign = s1.mul(b1).add_(g, alpha=1.0 - b1).sign_()
        s1.lerp_(g, 1.0 - b2)
        return _Direction(sign, numerator_is_temporary=True)
    if kind == "rmsprop":
        s1.mul_(b1).addcmul_(g, g, value=1.0 - b1)
        return _Direction(g, s1.sqrt().add_(h.eps))
    if kind == "adagrad":
        s1.addcmul_(g, g)
        return _Direction(g, s1.sqrt().add_(h.eps))
    if kind == "ademamix":
        assert s2 is not None
        m1, m2 = s1[0], s1[1]
        m1.lerp_(g, 1.0 - b1)
        m2.lerp_(g, 1.0 - h.beta3)
        s2.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        c1 = 1.0 - b1**t
        c2 = math.sqrt(1.0 - b2**t)
        mixed = torch.mul(m2, h.alpha).add_(m1, alpha=1.0 / c1)
        return _Direction(mixed, s2.sqrt().div_(c2).add_(h.eps), numerator_is_temporary=True)
    raise AssertionError(f"unknown optimizer kind {kind!r}")  # the public API validated it


def _apply_rule(h: OptimizerStep, p32: Tensor, g: Tensor, s1: Tensor, s2: Optional[Tensor],
                unorm_vec: Optional[Tensor]) -> None:  # fmt: skip
    """One step on float32 flat views: states and ``p32`` are updated in place."""
    g = _working_grad(h, g, p32)
    param_norm = torch.linalg.vector_norm(p32) if h.max_unorm > 0 else None
    direction = _direction(h, g, s1, s2)
    if h.decoupled_decay:
        p32.mul_(1.0 - h.lr * h.weight_decay)
    if param_norm is None:
        if direction.denominator is None:
            p32.add_(direction.numerator, alpha=-h.lr * direction.factor)
        else:
            p32.addcdiv_(direction.numerator, direction.denominator, value=-h.lr * direction.factor)
        return
    # Trust-ratio clipping (LAMB, LARS): the update's norm is needed before it is applied,
    # so the update is materialised once.
    update = direction.materialise()
    unorm = torch.linalg.vector_norm(update)
    if unorm_vec is not None:
        unorm_vec.view(-1)[0] = unorm * unorm
    limit = h.max_unorm * param_norm
    scale = torch.where(unorm > limit, limit / unorm, torch.ones_like(unorm))
    p32.addcmul_(update, scale, value=-h.lr)


class _ZeroGradGuard:
    """Restores, after an update, every element whose gradient was exactly zero (``skip_zeros``).

    Only the values at those positions are saved, so the cost scales with the number of
    zero gradients. Tensors are viewed as ``(rows, n)`` so stacked states are covered.
    """

    def __init__(self, g: Tensor, tensors: list[Tensor]) -> None:
        self.index = (g.reshape(-1) == 0).nonzero().squeeze(1)
        n = g.numel()
        self.views = [t.view(-1, n) for t in tensors]
        self.saved = [v.index_select(1, self.index) for v in self.views]

    def restore(self) -> None:
        for view, saved in zip(self.views, self.saved, strict=True):
            view.index_copy_(1, self.index, saved)


def _run(h: OptimizerStep, g: Tensor, p: Tensor, s1: Tensor, s2: Optional[Tensor], unorm_vec: Optional[Tensor]) -> None:
    """Apply the rule to ``p`` (any float dtype) with float32 states ``s1`` / ``s2``.

    ``s1`` / ``s2`` are flat (``(2, n)`` for AdEMAMix's stacked first moments).
    """
    n = p.numel()
    p_flat = p.view(-1)
    p32 = p_flat if p.dtype == torch.float32 else p_flat.float()
    g_flat = g.reshape(-1)
    guard = _ZeroGradGuard(g_flat, [p32, s1] + ([s2] if s2 is not None else [])) if h.skip_zeros else None
    stacked = s1.view(-1, n)
    _apply_rule(h, p32, g_flat, stacked if h.kind.stacked_state1 else stacked[0],
                None if s2 is None else s2.view(-1), unorm_vec)
    if guard is not None:
        guard.restore()
    if p32 is not p_flat:
        p_flat.copy_(p32)  # round to the parameter's dtype once, at the end


# ------------------------------------------------------------------- 8-bit encoding
def _rows(t: Tensor, rows: int) -> Tensor:
    return t.view(rows, -1)


def _decode(codes: Tensor, qmap: Tensor, scales: Tensor, blocksize: int) -> Tensor:
    """float32 values ``qmap[code] * scale`` of an 8-bit state, as a ``(rows, n)`` tensor.

    ``scales`` is ``(nblocks,)`` or ``(rows, nblocks)``; each row is blocked on its own.
    """
    rows = scales.shape[0] if scales.dim() == 2 else 1
    codes2 = _rows(codes, rows)
    values = qmap[codes2.to(torch.int32)]  # the dequantized state: a deliberate float32 temporary
    for r in range(rows):  # at most two rows (AdEMAMix), never a loop over blocks
        blockwise_apply(values[r], _rows(scales, rows)[r], blocksize, values[r])
    return values


def _encode(values: Tensor, qmap: Tensor, codes: Tensor, scales: Tensor, blocksize: int) -> None:
    """Requantize ``(rows, n)`` float32 ``values`` into ``codes`` with a fresh absmax per block.

    ``values`` is consumed (normalised in place).
    """
    rows = values.shape[0]
    codes2, scales2 = _rows(codes, rows), _rows(scales, rows)
    for r in range(rows):
        absmax = block_absmax(values[r], blocksize)
        scales2[r].copy_(absmax)
        normalised = blockwise_apply(values[r], reciprocal_or_zero(absmax), blocksize, values[r])
        codes2[r].copy_(nearest_code_index(normalised, qmap))


class OptimizerOps:
    """The ``optimizer`` op family of :class:`kbit_reference.ReferenceBackend`."""

    def optimizer_update_32bit(
        self,
        step: OptimizerStep,
        g: Tensor,
        p: Tensor,
        state1: Tensor,
        state2: Optional[Tensor],
        unorm_vec: Optional[Tensor],
    ) -> None:
        s2 = None if state2 is None else state2.view(-1)
        _run(step, g, p, state1.view(-1), s2, unorm_vec)

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
        # The format's two passes (new absmax first, then update + requantize with it) give
        # the same numbers as computing the new float32 states once and reusing them.
        n = p.numel()
        s1 = _decode(state1, qmap1, max1.view(1), n)
        s2 = None if state2 is None else _decode(state2, qmap2, max2.view(1), n)  # type: ignore[arg-type]
        _run(step, g, p, s1.view(-1), None if s2 is None else s2.view(-1), unorm_vec)
        _encode(s1, qmap1, state1, new_max1.view(1), n)
        if s2 is not None:
            _encode(s2, qmap2, state2, new_max2.view(1), n)  # type: ignore[arg-type]

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
        bs = OPTIMIZER_BLOCKSIZE
        s1 = _decode(state1, qmap1, absmax1, bs)
        s2 = None if state2 is None else _decode(state2, qmap2, absmax2, bs)  # type: ignore[arg-type]
        _run(step, g, p, s1.view(-1), None if s2 is None else s2.view(-1), None)
        _encode(s1, qmap1, state1, absmax1, bs)
        if s2 is not None:
            _encode(s2, qmap2, state2, absmax2, bs)  # type: ignore[arg-type]

    def percentile_clipping(
        self, grad: Tensor, gnorm_vec: Tensor, *, step: int, percentile: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        norm_sq = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        return clip_by_history(norm_sq, gnorm_vec, step=step, percentile=percentile)


def clip_by_history(norm_sq: Tensor, gnorm_vec: Tensor, *, step: int, percentile: int) -> tuple[Tensor, Tensor, Tensor]:
    """Percentile clipping once ``||grad||^2`` is known (any backend computes that part):
    record it in ``gnorm_vec`` (in place) and return ``(current_gnorm, clip_value, gnorm_scale)``."""
    slot = step % gnorm_vec.numel()
    if step == 1:
        gnorm_vec.copy_(norm_sq.expand_as(gnorm_vec))  # no history yet: every slot
    else:
        gnorm_vec[slot] = norm_sq
    current = gnorm_vec[slot].sqrt()
    clip = torch.sort(gnorm_vec).values[percentile].sqrt()
    scale = torch.where(current > clip, clip / current, torch.ones_like(current))
    return current, clip, scale
