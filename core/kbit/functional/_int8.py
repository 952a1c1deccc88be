"""LLM.int8(): row-wise int8 quantization, exact int8 matmul and its dequantization.

Numerics (``docs/formats.md`` section 4): rows are all leading dimensions of ``A``; each row
is scaled by its absmax to ``round_half_even(A * 127 / row_stats)``. With ``threshold > 0``
elements with ``|a| >= threshold`` are outliers: they are left out of the row absmax,
every column holding one is listed in ``outlier_cols`` and zeroed in the int8 codes, so the
caller can multiply those columns in 16-bit instead.

Two differences from bitsandbytes, both harmless to existing code: ``outlier_cols`` is an
empty int64 tensor (never ``None``) when there are no outliers, and an all-zero row gets
statistic 0 and codes 0 (it dequantizes to zeros, never NaN).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._errors import KbitValueError
from .._formats import FLOAT_DTYPES
from .._ops import call_with_backend
from .._ops import int8 as ops
from ._validate import check_buffer, check_dtype, check_numel, check_real, check_tensor, store_into

__all__ = [
    "int8_vectorwise_quant",
    "int8_vectorwise_dequant",
    "int8_linear_matmul",
    "int8_mm_dequant",
    "int8_double_quant",
]

#: Default output dtype of :func:`int8_mm_dequant` (bitsandbytes returns float16 there).
MM_DEQUANT_DEFAULT_DTYPE = torch.float16


#: dtypes accepted for row/column statistics (``SCB``, ``row_stats``); they are used as float32.
STATS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_threshold(op: str, threshold: object) -> float:
    """Require a finite, non-negative outlier threshold (0 disables outlier handling)."""
    return check_real(op, "threshold", threshold, low=0.0)


def _check_rows(op: str, name: str, A: torch.Tensor) -> int:
    """Require at least one dimension and a non-empty last one; return the row count."""
    if A.dim() == 0:
        raise KbitValueError(op, f"{name}.dim()", 0, "expected at least one dimension (rows x columns)")
    if A.shape[-1] == 0:
        raise KbitValueError(op, f"{name}.shape", tuple(A.shape), "expected a non-empty last dimension")
    return A.numel() // A.shape[-1]


def _check_stats(op: str, name: str, stats: object, expected: int, device: torch.device) -> torch.Tensor:
    """Require one floating-point statistic per row/column; return it flat, float32, on ``device``."""
    stats = check_dtype(op, name, stats, STATS_DTYPES)
    check_numel(op, name, stats, expected)
    return stats.reshape(-1).to(device=device, dtype=torch.float32).contiguous()


def _check_weight(op: str, name: str, B: object, columns: int, device: torch.device) -> torch.Tensor:
    """Require a 2-D int8 weight ``[N, K]`` with K == ``columns`` on ``device``."""
    B = check_dtype(op, name, B, (torch.int8,))
    if B.dim() != 2:
        raise KbitValueError(op, f"{name}.shape", tuple(B.shape), "expected a 2-D weight [out_features, in_features]")
    if B.shape[1] != columns:
        raise KbitValueError(op, f"{name}.shape", tuple(B.shape), f"expected {columns} columns to match A's last dimension")
    if B.device != device:
        raise KbitValueError(op, f"{name}.device", str(B.device), f"expected A's device {device}")
    return B.contiguous()


def int8_vectorwise_quant(
    A: torch.Tensor, threshold: float = 0.0, *, backend: Optional[str] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row of ``A`` to int8 by its absolute maximum.

    Args:
        A: float16, bfloat16 or float32 tensor ``[..., K]``; all leading dims are rows.
        threshold: outlier threshold; 0 (the default) disables outlier handling.
        backend: name of a backend to prefer for this call.

    Returns:
        ``(CA, row_stats, outlier_cols)``: int8 codes shaped like ``A``, float32 row absmax
        ``(rows,)`` and the int64 indices of columns holding an outlier (empty when none).
    """
    op = "int8_vectorwise_quant"
    check_dtype(op, "A", A, FLOAT_DTYPES)
    _check_rows(op, "A", A)
    threshold = check_threshold(op, threshold)
    return call_with_backend(backend, ops.int8_vectorwise_quant, A.contiguous(), threshold)


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Inverse of :func:`int8_vectorwise_quant`: ``A * stats[:, None] / 127`` as float32."""
    op = "int8_vectorwise_dequant"
    check_dtype(op, "A", A, (torch.int8,))
    rows = _check_rows(op, "A", A)
    stats = _check_stats(op, "stats", stats, rows, A.device)
    return call_with_backend(backend, ops.int8_vectorwise_dequant, A.contiguous(), stats)


def int8_linear_matmul(
    A: torch.Tensor,
    B: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.int32,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Exact ``A @ B.T`` of int8 tensors with int32 accumulation.

    Args:
        A: int8 ``[..., K]``.
        B: int8 weight ``[N, K]`` (row-major, as stored by ``Linear8bitLt``).
        out: optional int32 buffer ``[..., N]`` to receive the result.
        dtype: accumulator/result dtype; only ``torch.int32`` is supported.
        backend: name of a backend to prefer for this call.
    """
    op = "int8_linear_matmul"
    check_dtype(op, "A", A, (torch.int8,))
    _check_rows(op, "A", A)
    B = _check_weight(op, "B", B, A.shape[-1], A.device)
    if dtype != torch.int32:
        raise KbitValueError(op, "dtype", dtype, "only torch.int32 accumulation is supported")
    result = call_with_backend(backend, ops.int8_linear_matmul, A.contiguous(), B)
    return store_into(op, "out", result, out)


def int8_mm_dequant(
    A: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Scale the int32 result of :func:`int8_linear_matmul` back to floating point.

    Computes ``A * row_stats[:, None] * col_stats[None, :] / 127**2 (+ bias)`` in float32.
    The result has ``out``'s dtype when ``out`` is given, else ``dtype``, else float16 (the
    bitsandbytes default).

    Args:
        A: int32 ``[rows, N]`` (or ``[..., N]``).
        row_stats: one statistic per row of ``A`` (the activations' ``row_stats``).
        col_stats: one statistic per column of ``A`` (the weight's ``SCB``).
        out: optional buffer to receive the result.
        bias: optional floating-point ``(N,)`` bias, added in float32.
        dtype: result dtype when ``out`` is not given (kbit extension).
        backend: name of a backend to prefer for this call.
    """
    op = "int8_mm_dequant"
    check_dtype(op, "A", A, (torch.int32,))
    rows = _check_rows(op, "A", A)
    row_stats = _check_stats(op, "row_stats", row_stats, rows, A.device)
    col_stats = _check_stats(op, "col_stats", col_stats, A.shape[-1], A.device)
    if bias is not None:
        check_dtype(op, "bias", bias, FLOAT_DTYPES)
        check_numel(op, "bias", bias, A.shape[-1])
        bias = bias.reshape(-1).to(A.device).contiguous()
    if out is not None:
        check_tensor(op, "out", out)
        dtype = out.dtype
    dtype = dtype or MM_DEQUANT_DEFAULT_DTYPE
    if dtype not in FLOAT_DTYPES:
        raise KbitValueError(op, "dtype", dtype, "expected float16, bfloat16 or float32")
    result = call_with_backend(backend, ops.int8_mm_dequant, A.contiguous(), row_stats, col_stats, dtype, bias)
    return store_into(op, "out", result, out)


def int8_double_quant(
    A: torch.Tensor,
    col_stats: Optional[torch.Tensor] = None,
    row_stats: Optional[torch.Tensor] = None,
    out_col: Optional[torch.Tensor] = None,
    out_row: Optional[torch.Tensor] = None,
    threshold: float = 0.0,
    *,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``A`` to int8 both row-wise and column-wise.

    Args:
        A: float16, bfloat16 or float32 ``[..., K]``; all leading dims are rows.
        col_stats, row_stats, out_col, out_row: optional buffers to receive the results.
        threshold: outlier threshold (as in :func:`int8_vectorwise_quant`); outliers are
            also left out of the column statistics and zeroed in the column-wise codes.
        backend: name of a backend to prefer for this call.

    Returns:
        ``(out_row, out_col, row_stats, col_stats, outlier_cols)``: row-wise and column-wise
        int8 codes (both shaped like ``A``), float32 ``(rows,)`` and ``(K,)`` statistics and
        the int64 outlier column indices (empty when none).
    """
    op = "int8_double_quant"
    check_dtype(op, "A", A, FLOAT_DTYPES)
    rows = _check_rows(op, "A", A)
    threshold = check_threshold(op, threshold)
    # Check every buffer before computing, so a bad one leaves all of them untouched.
    codes, stats = (tuple(A.shape), torch.int8), torch.float32
    for name, buffer, (shape, dtype) in (
        ("out_row", out_row, codes),
        ("out_col", out_col, codes),
        ("row_stats", row_stats, ((rows,), stats)),
        ("col_stats", col_stats, ((A.shape[-1],), stats)),
    ):
        check_buffer(op, name, buffer, shape, dtype, A.device)
    CA, CAt, rows, cols, outlier_cols = call_with_backend(backend, ops.int8_double_quant, A.contiguous(), threshold)
    return (
        store_into(op, "out_row", CA, out_row),
        store_into(op, "out_col", CAt, out_col),
        store_into(op, "row_stats", rows, row_stats),
        store_into(op, "col_stats", cols, col_stats),
        outlier_cols,
    )
