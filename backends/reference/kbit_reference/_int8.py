"""Reference LLM.int8(): row/column-wise int8 quantization and exact int8 matmuls.

Numerics follow ``docs/formats.md`` section 4. Two choices the format leaves open:

- A row (or column) whose statistic is 0 (all zeros, or only outliers) quantizes to zeros
  and keeps the statistic 0, so it dequantizes to exact zeros instead of NaN.
- A row holding NaN (or +-inf that is not an outlier) gets a non-finite statistic and codes
  0, so it dequantizes to non-finite values: the damage stays visible and in its row.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._common import block_absmax

Tensor = torch.Tensor

#: Largest K whose int8 x int8 dot products stay exact in float32: every partial sum is an
#: integer of magnitude <= K * 128**2 <= 2**24, which float32 represents exactly.
EXACT_FLOAT32_CHUNK = 1024


def _as_rows(A: Tensor) -> Tensor:
    """``A`` as a ``[rows, K]`` matrix (all leading dimensions are rows)."""
    return A.reshape(-1, A.shape[-1])


def _safe_stats(stats: Tensor) -> Tensor:
    """Statistics with zeros replaced by ones: a zero statistic only occurs for an all-zero
    vector, which then divides to zeros instead of NaN."""
    return torch.where(stats == 0, torch.ones_like(stats), stats)


def _quantize_scaled(values: Tensor, stats: Tensor, dim: int) -> Tensor:
    """``round_half_even(values * 127 / stats)`` along ``dim`` as int8 (NaN -> 0)."""
    # One temporary, updated in place: this runs on whole weights at every training step.
    scaled = values * 127
    scaled.div_(_safe_stats(stats).unsqueeze(dim)).round_()
    return scaled.nan_to_num_(nan=0.0).to(torch.int8)


def _split_outliers(A: Tensor, threshold: float) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """``(inliers float32 [rows, K], outlier column mask or None, outlier_cols int64)``.

    Inliers are ``A`` with every element ``|a| >= threshold`` set to zero (only when
    ``threshold > 0``).
    """
    values = _as_rows(A).to(torch.float32)
    if threshold <= 0.0:
        return values, None, torch.empty(0, dtype=torch.int64, device=A.device)
    outliers = values.abs() >= threshold
    column_mask = outliers.any(dim=0)
    return values.masked_fill(outliers, 0.0), column_mask, column_mask.nonzero().reshape(-1)


def _row_quantize(inliers: Tensor, column_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    # Rows are consecutive runs of K elements: the blockwise absmax with blocksize K.
    row_stats = block_absmax(inliers.reshape(-1), inliers.shape[1])
    CA = _quantize_scaled(inliers, row_stats, dim=1)
    if column_mask is not None:
        # Whole outlier columns go through the 16-bit path, so their int8 part is zero.
        CA.masked_fill_(column_mask.unsqueeze(0), 0)
    return CA, row_stats


def exact_int8_matmul_float32(A: Tensor, B: Tensor) -> Tensor:
    """Exact ``A @ B.T`` of int8 ``[M, K]`` and ``[N, K]`` matrices on any device.

    K is cut into chunks of :data:`EXACT_FLOAT32_CHUNK`, each multiplied in float32 (exact,
    see the constant), and the chunk results are summed in int64, then wrapped to int32
    like an int32 accumulator would.
    """
    M, K = A.shape
    N = B.shape[0]
    chunks = -(-K // EXACT_FLOAT32_CHUNK)
    padded = chunks * EXACT_FLOAT32_CHUNK
    A32 = torch.nn.functional.pad(A.to(torch.float32), (0, padded - K))
    B32 = torch.nn.functional.pad(B.to(torch.float32), (0, padded - K))
    partial = torch.bmm(
        A32.view(M, chunks, EXACT_FLOAT32_CHUNK).transpose(0, 1),
        B32.view(N, chunks, EXACT_FLOAT32_CHUNK).permute(1, 2, 0),
    )
    return partial.to(torch.int64).sum(dim=0).to(torch.int32)


def _int_mm_applies(A: Tensor, B: Tensor) -> bool:
    """Whether ``torch._int_mm`` takes these shapes on this device.

    On CPU it takes any shape but K == 1, where (torch 2.13) it returns uninitialised memory
    as soon as B has more than one row. On CUDA it needs more than 16 rows and K, N
    multiples of 8 (K at least 16); elsewhere it is not implemented.
    """
    if A.device.type == "cpu":
        return A.shape[1] > 1
    if A.device.type == "cuda":
        M, K = A.shape
        return M > 16 and K >= 16 and K % 8 == 0 and B.shape[0] % 8 == 0
    return False


def exact_int8_matmul(A: Tensor, B: Tensor) -> Tensor:
    """Exact int32 ``A @ B.T`` of int8 ``[M, K]`` and ``[N, K]`` matrices."""
    if _int_mm_applies(A, B):
        # B.T of a row-major [N, K] is the column-major layout _int_mm is fastest with.
        return torch._int_mm(A, B.t())
    return exact_int8_matmul_float32(A, B)


def _scale_product(C: Tensor, row_stats: Tensor, col_stats: Tensor) -> Tensor:
    """``C * row[:, None] * col[None, :] / 127**2`` in float32 for an int32 ``[rows, N]``."""
    scale = torch.outer(row_stats.to(torch.float32), col_stats.to(torch.float32)).div_(127 * 127)
    return scale.mul_(C)


class Int8Ops:
    """The ``int8`` op family of :class:`kbit_reference.ReferenceBackend`."""

    def int8_vectorwise_quant(self, A: Tensor, *, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
        inliers, column_mask, outlier_cols = _split_outliers(A, threshold)
        CA, row_stats = _row_quantize(inliers, column_mask)
        return CA.reshape(A.shape), row_stats, outlier_cols

    def int8_vectorwise_dequant(self, A: Tensor, *, stats: Tensor) -> Tensor:
        rows = _as_rows(A).to(torch.float32)
        return (rows * stats.to(torch.float32).unsqueeze(1) / 127).reshape(A.shape)

    def int8_linear_matmul(self, A: Tensor, B: Tensor) -> Tensor:
        return exact_int8_matmul(_as_rows(A), B).reshape(*A.shape[:-1], B.shape[0])

    def int8_mm_dequant(
        self, A: Tensor, *, row_stats: Tensor, col_stats: Tensor, bias: Optional[Tensor], dtype: torch.dtype
    ) -> Tensor:
        out = _scale_product(_as_rows(A), row_stats, col_stats)
        if bias is not None:
            out += bias.to(torch.float32)
        return out.to(dtype).reshape(A.shape)

    def int8_double_quant(self, A: Tensor, *, threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        inliers, column_mask, outlier_cols = _split_outliers(A, threshold)
        CA, row_stats = _row_quantize(inliers, column_mask)
        col_stats = inliers.abs().amax(dim=0)
        CAt = _quantize_scaled(inliers, col_stats, dim=0)
        return CA.reshape(A.shape), CAt.reshape(A.shape), row_stats, col_stats, outlier_cols

    def int8_mixed_scaled_mm(
        self,
        A: Tensor,
        *,
        CA: Tensor,
        CB: Tensor,
        SCA: Tensor,
        SCB: Tensor,
        outlier_cols: Tensor,
        bias: Optional[Tensor],
    ) -> tuple[Tensor, Tensor]:
        rows = _as_rows(A)
        out = _scale_product(exact_int8_matmul(_as_rows(CA), CB), SCA, SCB)
        subA = rows.index_select(1, outlier_cols)
        if outlier_cols.numel():
            # The outlier columns meet the matching weight columns dequantized from int8;
            # accumulating in float32 keeps the 16-bit part as accurate as it can be.
            subB = CB.index_select(1, outlier_cols).to(torch.float32) * (SCB.to(torch.float32) / 127).unsqueeze(1)
            out.addmm_(subA.to(torch.float32), subB.t())
        if bias is not None:
            out += bias.to(torch.float32)
        return out.to(A.dtype).reshape(*A.shape[:-1], CB.shape[0]), subA
