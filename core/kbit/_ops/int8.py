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

Tensor = torch.Tensor


def _rows(A: Tensor) -> int:
    """Number of rows of ``A`` when all leading dimensions count as rows."""
    rows = 1
    for size in A.shape[:-1]:
        rows = rows * size
    return rows


def _outlier_cols_like(A: Tensor, threshold: float) -> Tensor:
    """Fake ``outlier_cols``: empty without a threshold, data-dependent length otherwise."""
    if threshold <= 0.0:
        return A.new_empty((0,), dtype=torch.int64)
    columns = A.shape[-1]
    bound = columns if isinstance(columns, int) else None
    size = torch.library.get_ctx().new_dynamic_size(min=0, max=bound)
    return A.new_empty((size,), dtype=torch.int64)


@torch.library.custom_op("kbit::int8_vectorwise_quant", mutates_args=())
def int8_vectorwise_quant(A: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Row-wise absmax int8 quantization; returns ``(CA int8 like A, row_stats, outlier_cols)``."""
    backend = backend_for("int8_vectorwise_quant", A)
    return backend.int8_vectorwise_quant(A, threshold=threshold)


@int8_vectorwise_quant.register_fake
def _(A: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.empty(A.shape, dtype=torch.int8, device=A.device),
        A.new_empty((_rows(A),), dtype=torch.float32),
        _outlier_cols_like(A, threshold),
    )


@torch.library.custom_op("kbit::int8_vectorwise_dequant", mutates_args=())
def int8_vectorwise_dequant(A: Tensor, stats: Tensor) -> Tensor:
    """``A * stats[row] / 127`` as float32, shaped like ``A``."""
    backend = backend_for("int8_vectorwise_dequant", A, torch.float32)
    return backend.int8_vectorwise_dequant(A, stats=stats)


@int8_vectorwise_dequant.register_fake
def _(A: Tensor, stats: Tensor) -> Tensor:
    return torch.empty(A.shape, dtype=torch.float32, device=A.device)


@torch.library.custom_op("kbit::int8_linear_matmul", mutates_args=())
def int8_linear_matmul(A: Tensor, B: Tensor) -> Tensor:
    """Exact ``A @ B.T`` of int8 tensors (``B`` is ``[N, K]``), accumulated in int32."""
    return backend_for("int8_linear_matmul", A).int8_linear_matmul(A, B)


@int8_linear_matmul.register_fake
def _(A: Tensor, B: Tensor) -> Tensor:
    return A.new_empty((*A.shape[:-1], B.shape[0]), dtype=torch.int32)


@torch.library.custom_op("kbit::int8_mm_dequant", mutates_args=())
def int8_mm_dequant(
    A: Tensor, row_stats: Tensor, col_stats: Tensor, dtype: torch.dtype, bias: Optional[Tensor] = None
) -> Tensor:
    """``A * row_stats[:, None] * col_stats[None, :] / 127**2 (+ bias)`` as ``dtype``."""
    backend = backend_for("int8_mm_dequant", A, dtype)
    return backend.int8_mm_dequant(A, row_stats=row_stats, col_stats=col_stats, bias=bias, dtype=dtype)


@int8_mm_dequant.register_fake
def _(A: Tensor, row_stats: Tensor, col_stats: Tensor, dtype: torch.dtype, bias: Optional[Tensor] = None) -> Tensor:
    return torch.empty(A.shape, dtype=dtype, device=A.device)


@torch.library.custom_op("kbit::int8_double_quant", mutates_args=())
def int8_double_quant(A: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row- and column-wise int8 quantization: ``(CA, CAt, row_stats, col_stats, outlier_cols)``."""
    return backend_for("int8_double_quant", A).int8_double_quant(A, threshold=threshold)


@int8_double_quant.register_fake
def _(A: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return (
        torch.empty(A.shape, dtype=torch.int8, device=A.device),
        torch.empty(A.shape, dtype=torch.int8, device=A.device),
        A.new_empty((_rows(A),), dtype=torch.float32),
        A.new_empty((A.shape[-1],), dtype=torch.float32),
        _outlier_cols_like(A, threshold),
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
    return backend.int8_mixed_scaled_mm(
        A, CA=CA, CB=CB, SCA=SCA, SCB=SCB, outlier_cols=outlier_cols, bias=bias
    )


@int8_mixed_scaled_mm.register_fake
def _(
    A: Tensor,
    CA: Tensor,
    CB: Tensor,
    SCA: Tensor,
    SCB: Tensor,
    outlier_cols: Tensor,
    bias: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    return (
        A.new_empty((*A.shape[:-1], CB.shape[0])),
        A.new_empty((_rows(A), outlier_cols.shape[0])),
    )
