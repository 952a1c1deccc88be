"""Custom ops of the 4-bit family: NF4/FP4 quantize, dequantize, gemv and matmul.

Packed 4-bit data is a flat byte stream (two codes per byte, element ``2j`` in the high
nibble) stored as a ``(rows, 1)`` tensor of the storage dtype; see ``docs/quant4.md``.
The matmul ops take float32 per-block scales: a nested (compressed) absmax is expanded by
the caller first, so backends only ever see plain scales.

``gemv_4bit`` and ``matmul_4bit`` carry an autograd formula (gradients to ``A`` and the
optional bias): the packed weight is frozen and integer-typed, so it has no gradient to give.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._formats import num_blocks
from . import backend_for
from ._results import Out, checked, fake_from

Tensor = torch.Tensor


def packed_rows(numel: int, storage: torch.dtype) -> int:
    """Rows of the ``(rows, 1)`` packed tensor holding ``numel`` 4-bit codes as ``storage``.

    ``(numel + 1) // 2`` bytes, rounded UP to whole ``storage`` elements: when the byte
    count is not a multiple of the storage item size the last element is zero-padded
    instead of dropping bytes (the format's ``(n + 1) // (2 * itemsize)`` would lose them).
    """
    return -(-((numel + 1) // 2) // storage.itemsize)


def _quantize_4bit_out(A: Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype) -> tuple[Out, Out]:
    return (
        Out("packed", (packed_rows(A.numel(), quant_storage), 1), quant_storage, A.device),
        Out("absmax", (num_blocks(A.numel(), blocksize),), torch.float32, A.device),
    )


@torch.library.custom_op("kbit::quantize_4bit", mutates_args=())
def quantize_4bit(A: Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype) -> tuple[Tensor, Tensor]:
    """4-bit blockwise quantization; returns ``(packed (rows, 1) quant_storage, absmax float32)``."""
    backend = backend_for("quantize_4bit", A, blocksize=blocksize, quant_type=quant_type, quant_storage=quant_storage)
    result = backend.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, quant_storage=quant_storage)
    return checked("quantize_4bit", backend, result, _quantize_4bit_out(A, blocksize, quant_type, quant_storage))


quantize_4bit.register_fake(fake_from(_quantize_4bit_out))


def _dequantize_4bit_out(
    A: Tensor, absmax: Tensor, blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype
) -> Out:
    return Out("values", tuple(shape), dtype, A.device)


@torch.library.custom_op("kbit::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    A: Tensor, absmax: Tensor, blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype
) -> Tensor:
    """Unpack and dequantize 4-bit codes to a ``dtype`` tensor of ``shape``."""
    backend = backend_for(
        "dequantize_4bit", A, dtype, blocksize=blocksize, quant_type=quant_type, quant_storage=A.dtype
    )
    result = backend.dequantize_4bit(
        A, absmax=absmax, blocksize=blocksize, quant_type=quant_type, shape=shape, dtype=dtype
    )
    return checked("dequantize_4bit", backend, result, _dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype))


dequantize_4bit.register_fake(fake_from(_dequantize_4bit_out))


def _matmul_out(
    A: Tensor, B: Tensor, absmax: Tensor, blocksize: int, quant_type: str, shape: Sequence[int],
    bias: Optional[Tensor] = None,
) -> Out:  # fmt: skip
    return Out("out", (*A.shape[:-1], shape[0]), A.dtype, A.device)


@torch.library.custom_op("kbit::gemv_4bit", mutates_args=())
def gemv_4bit(
    A: Tensor, B: Tensor, absmax: Tensor, blocksize: int, quant_type: str, shape: Sequence[int],
    bias: Optional[Tensor] = None,
) -> Tensor:  # fmt: skip
    """``A @ dequant(B).T (+ bias)`` for a single row ``A`` (``B`` logically ``shape = [out, in]``)."""
    backend = backend_for("gemv_4bit", A, blocksize=blocksize, quant_type=quant_type, quant_storage=B.dtype)
    result = backend.gemv_4bit(
        A, B, shape=shape, absmax=absmax, blocksize=blocksize, quant_type=quant_type, bias=bias
    )
    return checked("gemv_4bit", backend, result, _matmul_out(A, B, absmax, blocksize, quant_type, shape))


@torch.library.custom_op("kbit::matmul_4bit", mutates_args=())
def matmul_4bit(
    A: Tensor, B: Tensor, absmax: Tensor, blocksize: int, quant_type: str, shape: Sequence[int],
    bias: Optional[Tensor] = None,
) -> Tensor:  # fmt: skip
    """``A @ dequant(B).T (+ bias)`` for any leading dimensions of ``A``; output in ``A``'s dtype.

    The bias is added inside the op, before the one rounding to ``A``'s dtype (as
    ``torch.nn.functional.linear`` does): added outside, eager mode would round twice and
    ``torch.compile``, fusing the add with what follows, once, and the two would differ.
    """
    backend = backend_for("matmul_4bit", A, blocksize=blocksize, quant_type=quant_type, quant_storage=B.dtype)
    result = backend.matmul_4bit(
        A, B, shape=shape, absmax=absmax, blocksize=blocksize, quant_type=quant_type, bias=bias
    )
    return checked("matmul_4bit", backend, result, _matmul_out(A, B, absmax, blocksize, quant_type, shape))


gemv_4bit.register_fake(fake_from(_matmul_out))
matmul_4bit.register_fake(fake_from(_matmul_out))


def _setup_matmul_context(ctx, inputs, output) -> None:
    _, B, absmax, blocksize, quant_type, shape, *rest = inputs
    bias = rest[0] if rest else None
    ctx.save_for_backward(B, absmax)
    ctx.blocksize, ctx.quant_type, ctx.shape = blocksize, quant_type, shape
    ctx.bias_dtype = None if bias is None else bias.dtype


def _matmul_backward(ctx, grad_output: Tensor):
    # d(A @ W.T)/dA = grad @ W, with W dequantized in the gradient's dtype. The packed
    # weight and its scales are constants: no gradient for them (or for the ints). The
    # bias gets the gradient summed over every leading dimension.
    B, absmax = ctx.saved_tensors
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = dequantize_4bit(B, absmax, ctx.blocksize, ctx.quant_type, ctx.shape, grad_output.dtype)
        grad_A = torch.matmul(grad_output, weight)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[6]:
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_A, None, None, None, None, None, grad_bias


gemv_4bit.register_autograd(_matmul_backward, setup_context=_setup_matmul_context)
matmul_4bit.register_autograd(_matmul_backward, setup_context=_setup_matmul_context)
