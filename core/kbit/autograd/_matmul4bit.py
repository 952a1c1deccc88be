"""``matmul_4bit``: a product with a frozen 4-bit weight that gradients flow through.

The gradient reaches ``A`` (and ``bias``) through the dequantized weight; the packed
weight itself is a constant. That is the QLoRA setting: the 4-bit base model stays
frozen and small adapters on top of it are trained.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from .._errors import KbitValueError
from .._formats import FLOAT_DTYPES
from .._ops import call_with_backend
from .._ops import quant4 as ops
from ..functional._quant4 import check_4bit_matmul, dequantize_4bit
from ..functional._quant_state import QuantState
from ..functional._validate import check_bias, check_buffer, check_dtype, store_into

__all__ = ["matmul_4bit"]


def matmul_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    quant_state: QuantState,
    out: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``A @ W.T + bias`` where ``W`` is the 4-bit weight packed in ``B``.

    Args:
        A: float16, bfloat16 or float32 input of shape ``(..., in_features)``; any number
            of leading dimensions, including none and size 0.
        B: the packed weight as stored (``(rows, 1)``) or transposed (``weight.t()``, as
            ``Linear4bit`` in bitsandbytes passes it).
        quant_state: the weight's :class:`~kbit.functional.QuantState` (``W`` has
            ``quant_state.shape == [out_features, in_features]``).
        out: optional buffer for the result.
        bias: optional ``(out_features,)`` bias, added before the result is rounded to
            ``A``'s dtype (once, as ``torch.nn.functional.linear`` does).

    Returns:
        ``(..., out_features)`` in ``A``'s dtype, differentiable with respect to ``A``
        and ``bias``.

    A weight quantized in the old ``[in_features, out_features]`` orientation (so that
    ``A``'s last dimension matches ``quant_state.shape[0]`` but not ``shape[1]``) is still
    multiplied, as ``A @ W + bias``, with a ``DeprecationWarning``: quantize ``W.T`` instead.

    Raises:
        KbitValueError: if ``B`` requires a gradient: 4-bit weights are frozen; train an
            adapter (e.g. LoRA) on top of them instead.
    """
    op = "matmul_4bit"
    if B.requires_grad and torch.is_grad_enabled():
        raise KbitValueError(
            op, "B.requires_grad", True, "4-bit weights are frozen and get no gradient; train adapters (e.g. LoRA) instead"
        )
    if _in_out_orientation(A, quant_state):
        return _matmul_in_out(op, A, B, quant_state, out, bias)
    scales, shape = check_4bit_matmul(op, A, B, quant_state, None)
    bias = _checked_bias(op, bias, A, shape[0])
    check_buffer(op, "out", out, (*A.shape[:-1], shape[0]), A.dtype, A.device)
    # A single row takes the gemv op, which a backend may serve with a faster kernel.
    product = ops.gemv_4bit if A.numel() == A.shape[-1] else ops.matmul_4bit
    result = call_with_backend(
        None, product, A.contiguous(), B.contiguous(), scales, quant_state.blocksize, quant_state.quant_type, shape, bias
    )
    return store_into(op, "out", result, out)


def _checked_bias(op: str, bias: Optional[torch.Tensor], A: torch.Tensor, features: int) -> Optional[torch.Tensor]:
    """``bias`` validated and cast to ``A``'s dtype (the op adds it in that dtype), or None."""
    if bias is None:
        return None
    check_bias(op, bias, A.device)
    if bias.shape != (features,):
        raise KbitValueError(op, "bias.shape", tuple(bias.shape), f"expected ({features},)")
    return bias.to(A.dtype)


def _in_out_orientation(A: torch.Tensor, quant_state: object) -> bool:
    """Whether ``quant_state`` describes a weight stored as ``[in_features, out_features]``."""
    shape = getattr(quant_state, "shape", None) if isinstance(quant_state, QuantState) else None
    return (
        shape is not None
        and len(shape) == 2
        and A.dim() > 0
        and A.shape[-1] == shape[0]
        and A.shape[-1] != shape[1]
    )


def _matmul_in_out(
    op: str,
    A: torch.Tensor,
    B: torch.Tensor,
    quant_state: QuantState,
    out: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``A @ W + bias`` for a weight quantized as ``[in, out]`` (the pre-0.4x orientation)."""
    in_features, out_features = quant_state.shape
    warnings.warn(
        f"{op}: the weight was quantized with shape [{in_features}, {out_features}] = [in_features, out_features]; "
        "this orientation is deprecated and takes a slower path. Quantize W.T (the [out_features, in_features] "
        "layout of torch.nn.Linear) instead.",
        DeprecationWarning,
        stacklevel=3,
    )
    check_dtype(op, "A", A, FLOAT_DTYPES)
    weight = dequantize_4bit(B.reshape(-1, 1), quant_state).to(A.dtype)
    bias = _checked_bias(op, bias, A, out_features)
    check_buffer(op, "out", out, (*A.shape[:-1], out_features), A.dtype, A.device)
    result = torch.nn.functional.linear(A, weight.t(), bias)
    return store_into(op, "out", result, out)
