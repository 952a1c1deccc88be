"""LLM.int8() on the GPU: row/column-wise int8 quantization and dequantization kernels.

Kernels: ``kernels/int8.cu``. The exact int8 x int8 -> int32 product itself is not a kbit
kernel: ``int8_linear_matmul`` is left to the reference backend's ``torch._int_mm`` path
(the vendor's tensor-core GEMM), so it is not declared here.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._blockwise8 import SUFFIX, THREADS
from ._launch import Device, device_for, f32, grid_for, i32, i64

Tensor = torch.Tensor

FILE = "int8.cu"
#: Rows per block of the row-wise kernel (one warp each).
ROWS_PER_BLOCK = THREADS // 32


def _rows_and_k(A: Tensor) -> tuple[int, int]:
    K = A.shape[-1] if A.dim() else 1
    return (A.numel() // K if K else 0), K


def _outlier_mask(device: Device, A: Tensor, K: int, threshold: float) -> Optional[Tensor]:
    """int32 per column: 1 where the column holds an outlier; None without a threshold."""
    if threshold <= 0.0:
        return None
    mask = torch.zeros(K, dtype=torch.int32, device=A.device)
    if A.numel():
        grid = grid_for(A.numel(), THREADS, device.max_blocks)
        device.kernel(FILE, f"int8_outlier_columns_{SUFFIX[A.dtype]}")(
            (grid,), (THREADS,), (A, i64(A.numel()), i32(K), f32(threshold), mask)
        )
    return mask


def _outlier_cols(mask: Optional[Tensor], device: torch.device) -> Tensor:
    if mask is None:
        return torch.empty(0, dtype=torch.int64, device=device)
    return mask.nonzero().reshape(-1)


def _rowwise(device: Device, A: Tensor, rows: int, K: int, threshold: float,
             mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:  # fmt: skip
    CA = torch.empty(A.shape, dtype=torch.int8, device=A.device)
    row_stats = torch.empty(rows, dtype=torch.float32, device=A.device)
    if rows and K:
        grid = grid_for(rows, ROWS_PER_BLOCK, device.max_blocks)
        device.kernel(FILE, f"int8_rowwise_{SUFFIX[A.dtype]}")(
            (grid,), (THREADS,), (A, i32(rows), i32(K), f32(threshold), mask, CA, row_stats)
        )
    elif rows:
        row_stats.zero_()
    return CA, row_stats


class Int8Kernels:
    """The ``int8`` op family of :class:`kbit_cuda.backend.CudaBackend` (all but the int8 GEMMs)."""

    def int8_vectorwise_quant(self, A: Tensor, *, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
        rows, K = _rows_and_k(A)
        device = device_for(A)
        with device.launching():
            mask = _outlier_mask(device, A, K, threshold)
            CA, row_stats = _rowwise(device, A, rows, K, threshold, mask)
        return CA, row_stats, _outlier_cols(mask, A.device)

    def int8_vectorwise_dequant(self, A: Tensor, *, stats: Tensor) -> Tensor:
        out = torch.empty(A.shape, dtype=torch.float32, device=A.device)
        rows, K = _rows_and_k(A)
        if A.numel():
            device = device_for(A)
            with device.launching():
                grid = grid_for(A.numel(), THREADS, device.max_blocks)
                device.kernel(FILE, "int8_dequantize_rows")(
                    (grid,), (THREADS,), (A, stats.to(torch.float32).contiguous(), out, i64(A.numel()), i32(K))
                )
        return out

    def int8_mm_dequant(
        self, A: Tensor, *, row_stats: Tensor, col_stats: Tensor, bias: Optional[Tensor], dtype: torch.dtype
    ) -> Tensor:
        out = torch.empty(A.shape, dtype=dtype, device=A.device)
        _, N = _rows_and_k(A)
        if A.numel():
            device = device_for(A)
            with device.launching():
                grid = grid_for(A.numel(), THREADS, device.max_blocks)
                bias32 = None if bias is None else bias.to(torch.float32).contiguous()
                device.kernel(FILE, f"int8_mm_dequant_{SUFFIX[dtype]}")(
                    (grid,), (THREADS,),
                    (A, row_stats.to(torch.float32).contiguous(), col_stats.to(torch.float32).contiguous(), bias32,
                     out, i64(A.numel()), i32(N)),
                )  # fmt: skip
        return out

    def int8_double_quant(self, A: Tensor, *, threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        rows, K = _rows_and_k(A)
        device = device_for(A)
        CAt = torch.empty(A.shape, dtype=torch.int8, device=A.device)
        col_stats = torch.zeros(K, dtype=torch.float32, device=A.device)
        with device.launching():
            mask = _outlier_mask(device, A, K, threshold)
            CA, row_stats = _rowwise(device, A, rows, K, threshold, mask)
            if rows and K:
                suffix = SUFFIX[A.dtype]
                device.kernel(FILE, f"int8_column_stats_{suffix}")(
                    (grid_for(K, THREADS, device.max_blocks),), (THREADS,), (A, i32(rows), i32(K), f32(threshold), col_stats)
                )
                device.kernel(FILE, f"int8_columnwise_{suffix}")(
                    (grid_for(A.numel(), THREADS, device.max_blocks),), (THREADS,),
                    (A, i64(A.numel()), i32(K), f32(threshold), col_stats, CAt),
                )  # fmt: skip
        return CA, CAt, row_stats, col_stats, _outlier_cols(mask, A.device)
