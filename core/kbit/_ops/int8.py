"""Custom ops of the LLM.int8() family: row-wise int8 quantization and int8 matmuls.

Conventions shared by every op here (``docs/formats.md`` section 4):

- "rows" are all leading dimensions of ``A``: a ``(..., K)`` input has ``prod(...)`` rows
  and one float32 statistic per row.
- The dtype a backend is chosen by is the floating-point dtype of the call (the input of a
  quantize op or of the mixed matmul, the output of a dequantize op); ``int8_linear_matmul``
  has none and is matched as ``int8``.
- ``outlier_cols`` is always an int64 tensor, empty when there are no outliers (the
  bitsandbytes API may return ``None`` there; an empty tensor indexes the same way and keeps
  the schema free of optional outputs). Its length depends on the data, so the fake kernels
  give it an unbacked symbolic size under ``torch.compile``; with ``threshold == 0`` it is
  statically empty.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backend_for
from ._results import Out, UpTo, checked, fake_from

Tensor = torch.Tensor


def _rows(A: Tensor) -> int:
    """Number of rows of ``A`` when all leading dimensions count as rows."""
    rows = 1
    for size in A.shape[:-1]:
        rows = rows * size
    return rows


def _outlier_cols(A: Tensor, threshold: float) -> Out:
    """``outlier_cols``: empty without a threshold, a data-dependent length up to the columns otherwise."""
    columns = A.shape[-1]
    length = 0 if threshold <= 0.0 else UpTo(columns if isinstance(columns, int) else None)
    return Out("outlier_cols", (length,), torch.int64, A.device)


def _int8_vectorwise_quant_out(A: Tensor, threshold: float) -> tuple[Out, Out, Out]:
    return (
        Out("CA", A.shape, torch.int8, A.device),
        Out("row_stats", (_rows(A),), torch.float32, A.device),
        _outlier_cols(A, threshold),
    )


@torch.library.custom_op("kbit::int8_vectorwise_quant", mutates_args=())
def int8_vectorwise_quant(A: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Row-wise absmax int8 quantization; returns ``(CA int8 like A, row_stats, outlier_cols)``."""
    backend = backend_for("int8_vectorwise_quant", A)
    result = backend.int8_vectorwise_quant(A, threshold=threshold)
    return checked("int8_vectorwise_quant", backend, result, _int8_vectorwise_quant_out(A, threshold))


int8_vectorwise_quant.register_fake(fake_from(_int8_vectorwise_quant_out))


def _int8_vectorwise_dequant_out(A: Tensor, stats: Tensor) -> Out:
    return Out("values", A.shape, torch.float32, A.device)


@torch.library.custom_op("kbit::int8_vectorwise_dequant", mutates_args=())
def int8_vectorwise_dequant(A: Tensor, stats: Tensor) -> Tensor:
    """``A * stats[row] / 127`` as float32, shaped like ``A``."""
    backend = backend_for("int8_vectorwise_dequant", A, torch.float32)
    result = backend.int8_vectorwise_dequant(A, stats=stats)
    return checked("int8_vectorwise_dequant", backend, result, _int8_vectorwise_dequant_out(A, stats))


int8_vectorwise_dequant.register_fake(fake_from(_int8_vectorwise_dequant_out))


def _int8_linear_matmul_out(A: Tensor, B: Tensor) -> Out:
    return Out("out", (*A.shape[:-1], B.shape[0]), torch.int32, A.device)


@torch.library.custom_op("kbit::int8_linear_matmul", mutates_args=())
def int8_linear_matmul(A: Tensor, B: Tensor) -> Tensor:
    """Exact ``A @ B.T`` of int8 tensors (``B`` is ``[N, K]``), accumulated in int32."""
    backend = backend_for("int8_linear_matmul", A)
    return checked("int8_linear_matmul", backend, backend.int8_linear_matmul(A, B), _int8_linear_matmul_out(A, B))


int8_linear_matmul.register_fake(fake_from(_int8_linear_matmul_out))


def _int8_mm_dequant_out(
    A: Tensor, row_stats: Tensor, col_stats: Tensor, dtype: torch.dtype, bias: Optional[Tensor] = None
) -> Out:
    return Out("out", A.shape, dtype, A.device)


@torch.library.custom_op("kbit::int8_mm_dequant", mutates_args=())
def int8_mm_dequant(
    A: Tensor, row_stats: Tensor, col_stats: Tensor, dtype: torch.dtype, bias: Optional[Tensor] = None
) -> Tensor:
    """``A * row_stats[:, None] * col_stats[None, :] / 127**2 (+ bias)`` as ``dtype``."""
    backend = backend_for("int8_mm_dequant", A, dtype)
    result = backend.int8_mm_dequant(A, row_stats=row_stats, col_stats=col_stats, bias=bias, dtype=dtype)
    return checked("int8_mm_dequant", backend, result, _int8_mm_dequant_out(A, row_stats, col_stats, dtype, bias))


int8_mm_dequant.register_fake(fake_from(_int8_mm_dequant_out))


def _int8_double_quant_out(A: Tensor, threshold: float) -> tuple[Out, ...]:
    return (
        Out("CA", A.shape, torch.int8, A.device),
        Out("CAt", A.shape, torch.int8, A.device),
        Out("row_stats", (_rows(A),), torch.float32, A.device),
        Out("col_stats", (A.shape[-1],), torch.float32, A.device),
        _outlier_cols(A, threshold),
    )


@torch.library.custom_op("kbit::int8_double_quant", mutates_args=())
def int8_double_quant(A: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row- and column-wise int8 quantization: ``(CA, CAt, row_stats, col_stats, outlier_cols)``."""
    backend = backend_for("int8_double_quant", A)
    result = backend.int8_double_quant(A, threshold=threshold)
    return checked("int8_double_quant", backend, result, _int8_double_quant_out(A, threshold))


int8_double_quant.register_fake(fake_from(_int8_double_quant_out))


def _int8_mixed_scaled_mm_out(
    A: Tensor,
    CA: Tensor,
    CB: Tensor,
    SCA: Tensor,
    SCB: Tensor,
    outlier_cols: Tensor,
    bias: Optional[Tensor] = None,
) -> tuple[Out, Out]:
    return (
        Out("out", (*A.shape[:-1], CB.shape[0]), A.dtype, A.device),
        Out("subA", (_rows(A), outlier_cols.shape[0]), A.dtype, A.device),
    )


@torch.library.custom_op("kbit::int8_mixed_scaled_mm", mutates_args=())
def int8_mixed_scaled_mm(
    A: Tensor,
    CA: Tensor,
    CB: Tensor,
    SCA: Tensor,
    SCB: Tensor,
    outlier_cols: Tensor,
    bias: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """LLM.int8() matmul: int8 product of the regular columns plus the outlier columns of
    ``A`` against the dequantized weight columns; returns ``(out like A, A[:, outlier_cols])``."""
    backend = backend_for("int8_mixed_scaled_mm", A)
    result = backend.int8_mixed_scaled_mm(A, CA=CA, CB=CB, SCA=SCA, SCB=SCB, outlier_cols=outlier_cols, bias=bias)
    expected = _int8_mixed_scaled_mm_out(A, CA, CB, SCA, SCB, outlier_cols, bias)
    return checked("int8_mixed_scaled_mm", backend, result, expected)


int8_mixed_scaled_mm.register_fake(fake_from(_int8_mixed_scaled_mm_out))
