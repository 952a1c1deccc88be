"""``matmul_4bit``: a product with a frozen 4-bit weight that gradients flow through.

The gradient reaches ``A`` (and ``bias``) through the dequantized weight; the packed
weight itself is a constant. That is the QLoRA setting: the 4-bit base model stays
frozen and small adapters on top of it are trained.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._errors import KbitValueError
from .._ops import call_with_backend
from .._ops import quant4 as ops
from ..functional._quant4 import check_4bit_matmul
from ..functional._quant_state import QuantState
from ..functional._validate import check_bias, check_buffer, store_into

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
        bias: optional ``(out_features,)`` bias, added in ``A``'s dtype.

    Returns:
        ``(..., out_features)`` in ``A``'s dtype, differentiable with respect to ``A``
        and ``bias``.

    Raises:
        KbitValueError: if ``B`` requires a gradient: 4-bit weights are frozen; train an
            adapter (e.g. LoRA) on top of them instead.
    """
    op = "matmul_4bit"
    if B.requires_grad and torch.is_grad_enabled():
        raise KbitValueError(
            op, "B.requires_grad", True, "4-bit weights are frozen and get no gradient; train adapters (e.g. LoRA) instead"
        )
    scales, shape = check_4bit_matmul(op, A, B, quant_state, None)
    if bias is not None:
        check_bias(op, bias, A.device)
        if bias.shape != (shape[0],):
            raise KbitValueError(op, "bias.shape", tuple(bias.shape), f"expected ({shape[0]},)")
    check_buffer(op, "out", out, (*A.shape[:-1], shape[0]), A.dtype, A.device)
    # A single row takes the gemv op, which a backend may serve with a faster kernel.
    product = ops.gemv_4bit if A.numel() == A.shape[-1] else ops.matmul_4bit
    result = call_with_backend(
        None, product, A.contiguous(), B.contiguous(), scales, quant_state.blocksize, quant_state.quant_type, shape
    )
    if bias is not None:
        result = result + bias.to(result.dtype)
    return store_into(op, "out", result, out)
