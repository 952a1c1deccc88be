"""LLM.int8() matmul with autograd: ``kbit.matmul`` and its ``MatmulLtState``.

Forward: the activations are quantized row-wise to int8 (outlier columns, with
``threshold > 0``, go through a 16-bit matmul instead), the weight row-wise (once for a
frozen int8 weight, every call for a trainable float one), and the int8 product is scaled
back. Backward uses the straight-through estimator: the quantization is treated as the
identity, so ``grad_A = grad_out @ W`` and ``grad_W = grad_out.T @ A`` in floating point.
``W`` is the float weight when there is one, else the int8 weight dequantized.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .._errors import KbitTypeError, KbitValueError
from .._formats import FLOAT_DTYPES
from .._ops import int8 as ops
from ..functional._int8 import STATS_DTYPES, check_threshold
from ..functional._validate import check_bias, check_buffer, check_dtype, check_numel, check_tensor, store_into

__all__ = ["MatmulLtState", "matmul"]

Tensor = torch.Tensor


@dataclasses.dataclass(eq=False)  # identity comparison: fields hold tensors
class MatmulLtState:
    """What an LLM.int8() matmul keeps between calls (bitsandbytes' ``MatmulLtState``).

    Attributes read and written by kbit:
        CB: the weight's int8 codes ``[out, in]`` (row-major).
        SCB: the weight's float32 per-row absmax ``(out,)``.
        threshold: outlier threshold for the activations (0 disables the 16-bit path).
        has_fp16_weights: the weight is a trainable float tensor, re-quantized every call.
        idx: int64 indices of the outlier columns of the last forward (``threshold > 0``).
        is_training: mirrors the owning module's ``training`` flag.

    The remaining attributes exist because downstream code reads them; kbit keeps only the
    row-major format, so the tiled-layout ones (``CxB``, ``SB``, ``CxBt``, ``SBt``) stay
    ``None`` and ``formatB`` stays ``"row"``.
    """

    CB: Optional[Tensor] = None
    SCB: Optional[Tensor] = None
    threshold: float = 0.0
    has_fp16_weights: bool = True
    idx: Optional[Tensor] = None
    is_training: bool = True
    CBt: Optional[Tensor] = None
    subB: Optional[Tensor] = None
    CxB: Optional[Tensor] = None
    SB: Optional[Any] = None
    CxBt: Optional[Tensor] = None
    SBt: Optional[Any] = None
    outlier_pool: Optional[Any] = None
    has_accumulated_gradients: bool = False
    use_pool: bool = False
    force_no_igemmlt: bool = False
    formatB: str = "row"

    def reset_grads(self) -> None:
        """Forget the cached weight quantization (it is recomputed on the next call)."""
        self.CB = self.SCB = self.CBt = self.subB = None
        self.CxB = self.SB = self.CxBt = self.SBt = None


class _Int8Matmul(torch.autograd.Function):
    """``out = A @ W.T + bias`` through int8, with straight-through gradients.

    The activations' quantization (``CA``, ``SCA``, ``outlier_cols``) is computed by the
    caller and passed in: done inside ``forward`` its data-dependent outlier count would be
    a symbolic size private to the traced function, which ``torch.compile`` refuses.
    """

    @staticmethod
    def forward(ctx, A, weight, CB, SCB, bias, threshold, CA, SCA, outlier_cols):
        rows = A.reshape(-1, A.shape[-1])
        if threshold > 0.0:
            out, _ = ops.int8_mixed_scaled_mm(rows, CA, CB, SCA, SCB, outlier_cols, bias)
        else:
            out = ops.int8_mm_dequant(ops.int8_linear_matmul(CA, CB), SCA, SCB, A.dtype, bias)
        ctx.save_for_backward(A if ctx.needs_input_grad[1] else None, weight, CB, SCB)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out.reshape(*A.shape[:-1], CB.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        A, weight, CB, SCB = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_A = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            W = weight if weight is not None else ops.int8_vectorwise_dequant(CB, SCB)
            grad_A = (grad_rows @ W.to(grad_rows.dtype)).reshape(*grad_out.shape[:-1], W.shape[1])
        if ctx.needs_input_grad[1]:
            inputs = A.reshape(-1, A.shape[-1]).to(grad_rows.dtype)
            grad_weight = (grad_rows.t() @ inputs).to(weight.dtype)
        if ctx.needs_input_grad[4]:
            grad_bias = grad_rows.sum(dim=0).to(ctx.bias_dtype)
        return grad_A, grad_weight, None, None, grad_bias, None, None, None, None


def _uses_state_codes(state: MatmulLtState) -> bool:
    """Whether the call multiplies by ``state.CB`` and ignores ``B`` (a frozen int8 weight)."""
    return not state.has_fp16_weights and state.CB is not None


def _weight_codes(
    op: str, B: Tensor, state: MatmulLtState, scales_holder: Tensor
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(CB, SCB, float weight or None)`` for ``B``, quantizing a float ``B`` when needed.

    Scales of int8 codes come from ``state.SCB``, else from ``scales_holder.SCB`` (an
    :class:`kbit.nn.Int8Params` carries its own).
    """
    if B.dtype == torch.int8:
        name, SCB = (
            ("state.SCB", state.SCB) if state.SCB is not None else ("B.SCB", getattr(scales_holder, "SCB", None))
        )
        if SCB is None:
            raise KbitValueError(op, "state.SCB", None, "an int8 B needs its per-row absmax in state.SCB (or B.SCB)")
        # Integer scales are a caller's mix-up (codes passed as scales), not something to cast.
        check_dtype(op, name, SCB, STATS_DTYPES)
        check_numel(op, name, SCB, B.shape[0])
        return B, SCB.reshape(-1).to(device=B.device, dtype=torch.float32), None
    if state.has_fp16_weights or state.CB is None:
        # A trainable weight changes every step, so its codes are recomputed every call.
        state.CB, state.SCB, _ = ops.int8_vectorwise_quant(B.detach(), 0.0)
    return state.CB, state.SCB, B


def matmul(
    A: Tensor,
    B: Tensor,
    out: Optional[Tensor] = None,
    state: Optional[MatmulLtState] = None,
    threshold: float = 0.0,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """LLM.int8() ``A @ B.T (+ bias)`` with autograd.

    Args:
        A: float16, bfloat16 or float32 activations ``[..., K]``.
        B: the weight ``[N, K]``: a float tensor (quantized on the fly, and trainable when
            it requires grad), or int8 codes with their scales in ``state.SCB`` (or
            ``B.SCB``, as on :class:`kbit.nn.Int8Params`). When ``state`` holds a frozen
            weight (``state.has_fp16_weights`` False and ``state.CB`` set), ``state.CB``
            is the weight and ``B`` is not used, as in bitsandbytes.
        out: optional buffer ``[..., N]`` in ``A``'s dtype to receive the result.
        state: a :class:`MatmulLtState` carrying the weight's quantization between calls.
        threshold: when > 0 (or ``state.threshold`` > 0), activation columns holding a value
            with ``|a| >= threshold`` are multiplied in 16-bit instead of int8.
        bias: optional ``(N,)`` bias.

    Returns:
        ``[..., N]`` in ``A``'s dtype. Gradients flow to ``A``, to a float ``B`` that
        requires grad, and to ``bias``.
    """
    op = "matmul"
    if state is None:
        state = MatmulLtState()
    elif not isinstance(state, MatmulLtState):
        raise KbitTypeError(op, "state", f"type {type(state).__name__}", "a kbit.MatmulLtState (or None)")
    requested = check_threshold(op, threshold)
    threshold = requested if requested > 0.0 else check_threshold(op, state.threshold)
    check_dtype(op, "A", A, FLOAT_DTYPES)
    # A frozen weight in the state is what gets multiplied; B may then be anything (code
    # written for bitsandbytes passes CB.t() or a stale tensor there).
    name, W = ("state.CB", state.CB) if _uses_state_codes(state) else ("B", B)
    check_tensor(op, name, W)
    if W.dim() != 2:
        raise KbitValueError(op, f"{name}.shape", tuple(W.shape), "expected a 2-D weight [out_features, in_features]")
    if A.dim() == 0 or A.shape[-1] != W.shape[1]:
        raise KbitValueError(op, "A.shape", tuple(A.shape), f"expected a last dimension of {W.shape[1]} to match {name}")
    if A.device != W.device:
        raise KbitValueError(op, f"{name}.device", str(W.device), f"expected A's device {A.device}")
    if W.dtype != torch.int8 and (W is state.CB or W.dtype not in FLOAT_DTYPES):
        raise KbitTypeError(op, name, f"dtype {W.dtype}", "int8 codes or a float16, bfloat16 or float32 weight")
    if bias is not None:
        check_bias(op, bias, A.device)
        check_numel(op, "bias", bias, W.shape[0])
    check_buffer(op, "out", out, (*A.shape[:-1], W.shape[0]), A.dtype, A.device)
    # Only valid calls change the state: a rejected one must leave it as it was.
    if requested > 0.0:
        state.threshold = requested
    CB, SCB, weight = _weight_codes(op, W, state, scales_holder=B)
    CA, SCA, outlier_cols = ops.int8_vectorwise_quant(A.detach().reshape(-1, A.shape[-1]).contiguous(), threshold)
    if threshold > 0.0:
        state.idx = outlier_cols
    result = _Int8Matmul.apply(A, weight, CB, SCB, bias, threshold, CA, SCA, outlier_cols)
    return store_into(op, "out", result, out)
