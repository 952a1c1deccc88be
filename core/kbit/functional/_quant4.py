"""4-bit quantization (NF4 and FP4) with optional nested absmax, and the 4-bit gemv.

Numerics (``docs/quant4.md``): blocks of ``blocksize`` consecutive elements (row-major),
``absmax`` per block, each value normalised as ``x * (1 / absmax)`` and mapped to the
nearest of the 16 values of the type's table (ties to the lower index); two codes per
byte, element ``2j`` in the high nibble. Dequantization is ``table[code] * absmax`` in
float32, cast to the requested dtype.

Packed data is ``(rows, 1)`` of ``quant_storage``: ``(n + 1) // 2`` bytes, zero-padded to
whole storage elements when the byte count is not a multiple of the storage item size
(bytes are never dropped). Readers accept exactly that many elements, in either
orientation (``(rows, 1)`` or the transposed ``(1, rows)``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._errors import KbitTypeError, KbitValueError, QuantStateError
from .._formats import BLOCKSIZES_4BIT, FLOAT_DTYPES, QUANT_STORAGES_4BIT, QUANT_TYPES_4BIT, num_blocks
from .._ops import call_with_backend
from .._ops import quant4 as ops
from ._blockwise import _float_absmax, nest_absmax
from ._codebooks import get_4bit_type
from ._quant_state import QuantState
from ._validate import check_buffer, check_choice, check_codes, check_dtype, check_payload_numel, store_into

__all__ = [
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_nf4",
    "quantize_fp4",
    "dequantize_nf4",
    "dequantize_fp4",
    "gemv_4bit",
]


def packed_size_problem(packed: torch.Tensor, shape: torch.Size) -> Optional[str]:
    """Why ``packed`` cannot hold the codes of a tensor of ``shape``, or None if it can."""
    rows = ops.packed_rows(shape.numel(), packed.dtype)
    if packed.numel() == rows and (packed.dim() == 1 or (packed.dim() == 2 and 1 in packed.shape)):
        return None
    return (
        f"a {packed.dtype} tensor of shape {tuple(packed.shape)} cannot hold the 4-bit codes of shape "
        f"{tuple(shape)}: expected ({rows}, 1)"
    )


def checked_4bit_state(
    op: str, packed: torch.Tensor, quant_state: object, backend: Optional[str], name: str = "A"
) -> tuple[torch.Tensor, torch.Size]:
    """Validate a 4-bit ``quant_state`` against its packed tensor (the argument ``name``).

    Returns ``(absmax, shape)`` with the float32 per-block scales (a nested absmax
    expanded) on ``packed``'s device. Raises typed errors naming the mismatch.
    """
    if not isinstance(quant_state, QuantState):
        raise KbitTypeError(op, "quant_state", f"type {type(quant_state).__name__}", "a QuantState")
    check_choice(op, "quant_state.quant_type", quant_state.quant_type, QUANT_TYPES_4BIT)
    check_choice(op, "quant_state.blocksize", quant_state.blocksize, BLOCKSIZES_4BIT)
    if quant_state.shape is None:
        raise QuantStateError("quant_state.shape", "a 4-bit state must record the original shape", op=op)
    problem = packed_size_problem(packed, quant_state.shape)
    if problem:
        raise QuantStateError(name, problem, op=op)
    scales = _float_absmax(op, quant_state, backend)
    blocks = num_blocks(quant_state.shape.numel(), quant_state.blocksize)
    why = f"shape {tuple(quant_state.shape)} in blocks of {quant_state.blocksize}"
    check_payload_numel(op, "quant_state.absmax", scales, blocks, why)
    return scales.to(packed.device), quant_state.shape


def quantize_4bit(
    A: torch.Tensor,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
    *,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` to 4-bit NF4 or FP4 codes in blocks of ``blocksize`` elements.

    Args:
        A: float16, bfloat16 or float32 tensor of any shape (flattened row-major).
        absmax: optional float32 buffer of ``ceil(numel / blocksize)`` for the scales.
        out: optional buffer for the packed codes (shape and dtype as returned).
        blocksize: 32, 64, 128, 256, 512, 1024, 2048 or 4096.
        compress_statistics: quantize the absmax values too (8-bit, blocks of 256,
            mean-centred): about 0.4 bits per weight less at blocksize 64.
        quant_type: ``"nf4"`` or ``"fp4"``.
        quant_storage: dtype the packed bytes are viewed as: uint8, float16, bfloat16
            or float32 (for frameworks that need every parameter to share one dtype).
        backend: name of a backend to prefer for this call.

    Returns:
        ``(packed, quant_state)``: the ``(rows, 1)`` packed codes and the
        :class:`QuantState` that :func:`dequantize_4bit` needs.
    """
    op = "quantize_4bit"
    check_dtype(op, "A", A, FLOAT_DTYPES)
    check_choice(op, "blocksize", blocksize, BLOCKSIZES_4BIT)
    check_choice(op, "quant_type", quant_type, QUANT_TYPES_4BIT)
    check_choice(op, "quant_storage", quant_storage, QUANT_STORAGES_4BIT)
    check_buffer(op, "out", out, (ops.packed_rows(A.numel(), quant_storage), 1), quant_storage, A.device)
    check_buffer(op, "absmax", absmax, (num_blocks(A.numel(), blocksize),), torch.float32, A.device)
    packed, scales = call_with_backend(backend, ops.quantize_4bit, A.contiguous(), blocksize, quant_type, quant_storage)
    packed = store_into(op, "out", packed, out)
    scales = store_into(op, "absmax", scales, absmax)
    code = get_4bit_type(quant_type, device=A.device)
    state = QuantState(scales, shape=A.shape, code=code, blocksize=blocksize, quant_type=quant_type, dtype=A.dtype)
    if compress_statistics:
        state.absmax, state.offset, state.state2 = nest_absmax(scales, backend)
    return packed, state


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 64,
    quant_type: str = "fp4",
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Dequantize packed 4-bit codes.

    Pass the ``quant_state`` from :func:`quantize_4bit`, or ``absmax`` with ``out`` (whose
    shape and dtype describe the result) plus ``blocksize`` and ``quant_type``. The result
    has the state's shape and dtype (``out``'s dtype when given). As in bitsandbytes, a
    packed tensor passed as a row (``(1, rows)``, e.g. ``weight.t()``) returns the
    transposed 2-D result.
    """
    op = "dequantize_4bit"
    check_codes(op, "A", A, QUANT_STORAGES_4BIT)
    if quant_state is None:
        if absmax is None or out is None:
            raise KbitValueError(
                op, "quant_state", None, "pass quant_state, or absmax and out (whose shape and dtype give the result's)"
            )
        quant_state = QuantState(absmax, shape=out.shape, blocksize=blocksize, quant_type=quant_type, dtype=out.dtype)
    scales, shape = checked_4bit_state(op, A, quant_state, backend)
    dtype = out.dtype if out is not None else quant_state.dtype
    check_choice(op, "dtype", dtype, FLOAT_DTYPES)
    result = call_with_backend(
        backend, ops.dequantize_4bit, A.contiguous(), scales, quant_state.blocksize, quant_state.quant_type, shape, dtype
    )
    result = store_into(op, "out", result, out)
    is_row = A.dim() == 2 and A.shape[0] == 1 and A.shape[1] > 1
    return result.t() if is_row and result.dim() == 2 else result


def quantize_nf4(
    A: torch.Tensor,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
    *,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, QuantState]:
    """:func:`quantize_4bit` with ``quant_type="nf4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage, backend=backend)


def quantize_fp4(
    A: torch.Tensor,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
    *,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, QuantState]:
    """:func:`quantize_4bit` with ``quant_type="fp4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage, backend=backend)


def dequantize_nf4(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 64,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """:func:`dequantize_4bit` with ``quant_type="nf4"`` (used when no state is given)."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4", backend=backend)


def dequantize_fp4(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 64,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """:func:`dequantize_4bit` with ``quant_type="fp4"`` (used when no state is given)."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4", backend=backend)


def check_4bit_matmul(op: str, A: torch.Tensor, B: torch.Tensor, quant_state: object, backend: Optional[str]):
    """Shared checks of the 4-bit products; returns ``(absmax, shape)`` as the op takes them."""
    check_dtype(op, "A", A, FLOAT_DTYPES)
    check_codes(op, "B", B, QUANT_STORAGES_4BIT)
    scales, shape = checked_4bit_state(op, B, quant_state, backend, name="B")
    if len(shape) != 2:
        raise KbitValueError(op, "quant_state.shape", tuple(shape), "a 4-bit weight must be 2-D [out_features, in_features]")
    if A.dim() == 0 or A.shape[-1] != shape[1]:
        raise KbitValueError(op, "A.shape", tuple(A.shape), f"the last dimension must be in_features={shape[1]}")
    return scales, shape


def gemv_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    transposed_A: bool = False,
    transposed_B: bool = False,
    state: Optional[QuantState] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``A @ W.T`` for a single input row, with ``W`` the 4-bit weight ``B`` described by ``state``.

    ``A`` holds one row (shape ``(..., in_features)`` with every leading size 1); the result
    is ``(..., out_features)`` in ``A``'s dtype. ``B`` may be passed packed as stored or
    transposed (``weight.t()``). ``transposed_A`` / ``transposed_B`` are accepted for API
    compatibility; the packed layout already fixes the orientation.
    """
    op = "gemv_4bit"
    if state is None:
        raise KbitValueError(op, "state", None, "gemv_4bit needs the QuantState from quantize_4bit")
    scales, shape = check_4bit_matmul(op, A, B, state, backend)
    if A.numel() != A.shape[-1]:
        raise KbitValueError(op, "A.shape", tuple(A.shape), "gemv_4bit takes a single row; use matmul_4bit for more")
    result = call_with_backend(
        backend, ops.gemv_4bit, A.contiguous(), B.contiguous(), scales, state.blocksize, state.quant_type, shape
    )
    return store_into(op, "out", result, out)
