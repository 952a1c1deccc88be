"""Conformance cases of the LLM.int8() family (``docs/formats.md`` section 4).

Bit-exact between kbit backends: the int8 codes (``round_half_even(a * 127 / absmax)``
in float32), the row and column statistics, the outlier columns and the int32 matmul.
Float results built from several float32 operations in an order the format does not fix
(dequantization, the scaled matmul output, the mixed decomposition) are compared under
their rows of ``tolerances.CONFORMANCE``; a 16-bit output is rounded once from that
float32 result, so it may also land one step of its own dtype away.

Left out on purpose, because the format leaves it open: NaN and non-outlier infinities
in the input (the reference keeps them visible in their row, another backend may not).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._formats import FLOAT_DTYPE_NAMES
from ..tolerances import EXACT, INT8_CODE_MAX_STEP, INT8_CODE_MISMATCH_FRACTION, Tolerance
from ._spec import GoldenCheck, GoldenContext, InputSet, OpCases, Variant, compare_tensor, randn, returns, seeded

Tensor = torch.Tensor

FAMILY = "int8"

_THRESHOLD = 6.0


# --------------------------------------------------------------------------- input values
def _int8(variant: Variant, name: str, *shape: int) -> Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=seeded(variant, name))


def _stats(variant: Variant, name: str, count: int, scale: float = 3.0) -> Tensor:
    return torch.rand(count, generator=seeded(variant, name)) * scale + 0.01


def _large(dtype: torch.dtype) -> float:
    """A magnitude near the top of ``dtype``'s range; ``a * 127`` stays finite in float32."""
    return min(float(torch.finfo(dtype).max) / 2, 1e30)


def _with_outliers(variant: Variant, name: str, rows: int, cols: int, columns: list[int]) -> Tensor:
    """randn with ``columns`` scaled past the threshold, and values exactly at +-threshold.

    An element equal to the threshold is an outlier (``|a| >= threshold``); the one just
    below it is not.
    """
    A = randn(variant, name, rows, cols)
    A[:, columns] *= 3 * _THRESHOLD
    A[0, cols - 1] = _THRESHOLD
    A[-1, cols - 2] = -_THRESHOLD
    A[rows // 2, cols - 3] = _THRESHOLD - 2**-5  # one bfloat16 step below: exact in every dtype
    return A


def _ties(rows: int) -> Tensor:
    """Rows whose absmax is 127, so ``a * 127 / absmax == a``: half-integers are exact ties.

    Every value is representable in float16 and bfloat16, so the ties survive the dtype.
    """
    halves = torch.arange(-20, 20, dtype=torch.float32) + 0.5
    halves = torch.cat([halves, torch.tensor([126.5, -126.5, 99.5, 64.5])])
    row = torch.cat([torch.tensor([127.0]), halves])
    return row.repeat(rows, 1)


def _quant_inputs(variant: Variant) -> list[InputSet]:
    """Inputs shared by ``int8_vectorwise_quant`` and ``int8_double_quant``: ``(A, threshold)``."""
    dtype = variant.dtype

    def entry(name: str, A: Tensor, threshold: float = 0.0) -> InputSet:
        return InputSet(name, (A.to(dtype), threshold))

    zero_rows = randn(variant, "zero_rows", 5, 24)
    zero_rows[1] = 0
    zero_rows[4] = 0
    zero_rows[:, 7] = 0  # an all-zero column as well (column statistics)
    only_outliers = _with_outliers(variant, "only_outliers", 4, 16, [2, 9])
    only_outliers[1] = 0
    only_outliers[1, [2, 9]] = 10 * _THRESHOLD  # a row with nothing but outliers: statistic 0
    large = randn(variant, "large_values", 4, 20)
    large[::2] *= _large(dtype) / 4
    large[1, 3] = -_large(dtype)
    return [
        entry("outliers", _with_outliers(variant, "outliers", 8, 32, [3, 17]), _THRESHOLD),
        entry("typical", randn(variant, "typical", 6, 40)),
        entry("one_row", randn(variant, "one_row", 1, 24)),
        entry("one_row_outliers", _with_outliers(variant, "one_row_outliers", 1, 16, [5]), _THRESHOLD),
        entry("k_one", randn(variant, "k_one", 5, 1)),
        entry("k_one_outliers", randn(variant, "k_one_outliers", 5, 1).index_fill(0, torch.tensor([2]), 5.0), 4.0),
        entry("zero_rows", zero_rows),
        entry("zero_rows_threshold", zero_rows.clone(), 1.5),
        entry("only_outliers", only_outliers, _THRESHOLD),
        entry("batched", _with_outliers(variant, "batched", 6, 24, [0, 11]).view(2, 3, 24), _THRESHOLD),
        entry("no_outlier_found", randn(variant, "no_outlier_found", 6, 16), 1000.0),
        entry("ties", _ties(3)),
        entry("large_values", large),
    ]


# --------------------------------------------------------------------------- dequantize
def _dequant_inputs(variant: Variant) -> list[InputSet]:
    def entry(name: str, shape: tuple[int, ...], stats: Optional[Tensor] = None) -> InputSet:
        rows = int(torch.Size(shape[:-1]).numel())
        return InputSet(name, (_int8(variant, name, *shape), _stats(variant, name, rows) if stats is None else stats))

    zero = _stats(variant, "zero_stats", 4)
    zero[2] = 0.0
    return [
        entry("typical", (6, 40)),
        entry("one_row", (1, 24)),
        entry("k_one", (5, 1)),
        entry("batched", (2, 3, 8)),
        entry("zero_stats", (4, 16), zero),
        entry("large_stats", (3, 16), _stats(variant, "large_stats", 3) * 1e30),
    ]


# ------------------------------------------------------------------------- int8 matmul
def _matmul_inputs(variant: Variant) -> list[InputSet]:
    def entry(name: str, A_shape: tuple[int, ...], N: int) -> InputSet:
        return InputSet(name, (_int8(variant, f"{name}/A", *A_shape), _int8(variant, f"{name}/B", N, A_shape[-1])))

    # |sum| = 3000 * 128**2 = 4.9e7: past float32's exact integers (2**24), inside int32.
    K = 3000
    extremes = (torch.full((3, K), -128, dtype=torch.int8), torch.full((2, K), -128, dtype=torch.int8))
    extremes[1][1] = 127
    return [
        entry("typical", (7, 33), 5),
        entry("one_row", (1, 16), 6),
        entry("k_one", (4, 1), 3),
        entry("one_by_one", (1, 1), 1),
        entry("batched", (2, 3, 40), 6),
        entry("long_k", (5, 1500), 4),
        InputSet("extremes", extremes),
    ]


# ----------------------------------------------------------------------- mm dequantize
def _mm_dequant_inputs(variant: Variant) -> list[InputSet]:
    dtype = variant.dtype

    def entry(name: str, shape: tuple[int, ...], bias: bool = False, row_stats: Optional[Tensor] = None) -> InputSet:
        generator = seeded(variant, name)
        rows, N = int(torch.Size(shape[:-1]).numel()), shape[-1]
        C = torch.randint(-(2**16), 2**16, shape, dtype=torch.int32, generator=generator)
        rows_stats = torch.rand(rows, generator=generator) * 3 + 0.01 if row_stats is None else row_stats
        cols_stats = torch.rand(N, generator=generator) * 0.5 + 0.01
        b = torch.randn(N, generator=generator).to(dtype) if bias else None
        return InputSet(name, (C, rows_stats, cols_stats, dtype, b))

    zero = torch.rand(4, generator=seeded(variant, "zero_row_stats")) * 3
    zero[1] = 0.0
    return [
        entry("typical", (16, 24)),
        entry("bias", (16, 24), bias=True),
        entry("one_row", (1, 12), bias=True),
        entry("one_column", (5, 1)),
        entry("batched", (2, 3, 10), bias=True),
        entry("zero_row_stats", (4, 8), bias=True, row_stats=zero),
    ]


# ------------------------------------------------------------------------ mixed matmul
def _rowwise(A: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Plain-torch row-wise int8 codes, statistics and outlier columns of ``A`` (the inputs
    of the mixed matmul; the op itself does not require them to be consistent with ``A``)."""
    rows = A.reshape(-1, A.shape[-1]).float()
    outliers = rows.abs() >= threshold if threshold > 0 else torch.zeros_like(rows, dtype=torch.bool)
    inliers = rows.masked_fill(outliers, 0)
    stats = inliers.abs().amax(dim=1)
    codes = (inliers * 127 / stats.clamp_min(1e-30)[:, None]).round().to(torch.int8)
    columns = outliers.any(dim=0)
    codes[:, columns] = 0
    return codes.reshape(A.shape), stats, columns.nonzero().reshape(-1)


def _mixed_inputs(variant: Variant) -> list[InputSet]:
    dtype = variant.dtype

    def entry(name: str, A: Tensor, N: int, threshold: float, bias: bool) -> InputSet:
        A = A.to(dtype)
        CA, SCA, cols = _rowwise(A, threshold)
        CB = _int8(variant, f"{name}/CB", N, A.shape[-1])
        SCB = _stats(variant, f"{name}/SCB", N, scale=1.0)
        b = torch.randn(N, generator=seeded(variant, f"{name}/bias")).to(dtype) if bias else None
        return InputSet(name, (A, CA, CB, SCA, SCB, cols, b))

    return [
        entry("outliers", _with_outliers(variant, "outliers", 6, 32, [1, 20]), 10, _THRESHOLD, True),
        entry("no_outliers", randn(variant, "no_outliers", 6, 32), 10, 0.0, False),
        entry("one_row", _with_outliers(variant, "one_row", 1, 16, [4]), 5, _THRESHOLD, True),
        entry("k_one", randn(variant, "k_one", 4, 1) * 8, 3, _THRESHOLD, False),
        entry("k_one_inliers", randn(variant, "k_one_inliers", 4, 1), 3, 0.0, True),
        entry("all_outlier_columns", randn(variant, "all_outlier_columns", 3, 4) + 20, 6, _THRESHOLD, True),
        entry("batched", _with_outliers(variant, "batched", 6, 24, [7]).view(2, 3, 24), 8, _THRESHOLD, True),
    ]


# ------------------------------------------------------------------------- comparisons
def _rounded_once(tolerance: Tolerance, dtype: torch.dtype) -> Tolerance:
    """``tolerance`` widened by one step of ``dtype`` when a float32 result is rounded to it.

    Two float32 results within ``tolerance`` may round to neighbouring 16-bit values.
    """
    if tolerance.exact or dtype == torch.float32:
        return tolerance
    return Tolerance(rtol=tolerance.rtol + torch.finfo(dtype).eps, atol=tolerance.atol)


def _compare_float_output(
    got: dict[str, Tensor], want: dict[str, Tensor], args: tuple, variant: Variant, tolerance: Tolerance
) -> list[str]:
    """``out`` under the tolerance (widened for a 16-bit output); any other result exactly."""
    problems = []
    for name, expected in want.items():
        allowed = _rounded_once(tolerance, expected.dtype) if name == "out" else EXACT
        problem = compare_tensor(name, got.get(name), expected, allowed)
        if problem:
            problems.append(problem)
    return problems


_QUANT_UNIVERSE = {"dtype": FLOAT_DTYPE_NAMES}

CASES = (
    OpCases("int8_vectorwise_quant", _QUANT_UNIVERSE, _quant_inputs, returns("CA", "row_stats", "outlier_cols")),
    # The public API always dequantizes to float32.
    OpCases("int8_vectorwise_dequant", {"dtype": ("float32",)}, _dequant_inputs, returns("out")),
    # No floating-point dtype: the registry matches the call as int8.
    OpCases("int8_linear_matmul", {"dtype": ("int8",)}, _matmul_inputs, returns("out")),
    OpCases("int8_mm_dequant", _QUANT_UNIVERSE, _mm_dequant_inputs, returns("out"), _compare_float_output),
    OpCases(
        "int8_double_quant",
        _QUANT_UNIVERSE,
        _quant_inputs,
        returns("CA", "CAt", "row_stats", "col_stats", "outlier_cols"),
    ),
    OpCases("int8_mixed_scaled_mm", _QUANT_UNIVERSE, _mixed_inputs, returns("out", "subA"), _compare_float_output),
)


# ----------------------------------------------------------------------------- goldens
def _golden_row_quant(op: str):
    """A golden check of the row-wise part of ``op`` (``int8_vectorwise_quant`` or
    ``int8_double_quant``) against the ``int8`` golden entries.

    Statistics and outlier columns must be exact. The golden codes come from another
    float pipeline: they may differ by ``INT8_CODE_MAX_STEP`` at no more than
    ``INT8_CODE_MISMATCH_FRACTION`` of the elements (a product landing next to .5).
    """

    def check(ctx: GoldenContext) -> tuple[int, list[str]]:
        entries = [entry for entry in ctx.goldens["int8"] if ctx.declares(op, entry["A"].dtype)]
        problems = []
        for entry in entries:
            A, threshold = entry["A"], entry["threshold"]
            label = f"{tuple(A.shape)} {A.dtype}, threshold {threshold}"
            results = ctx.call(op, A, threshold)
            # (CA, row_stats, cols) or (CA, CAt, row_stats, col_stats, cols)
            CA, row_stats, outlier_cols = results[0], results[len(results) // 2], results[-1]
            for name, value in (("row_stats", row_stats), ("outlier_cols", outlier_cols)):
                problem = compare_tensor(f"{label}: {name}", value, entry[name], EXACT)
                if problem:
                    problems.append(problem)
            if CA.shape != entry["CA"].shape or CA.dtype != torch.int8:
                problems.append(f"{label}: codes are {tuple(CA.shape)} {CA.dtype}, goldens {tuple(entry['CA'].shape)}")
                continue
            step = (CA.int() - entry["CA"].int()).abs()
            if int(step.max()) > INT8_CODE_MAX_STEP:
                problems.append(f"{label}: a code is {int(step.max())} steps from the golden code")
            share = float((step != 0).float().mean())
            if share > INT8_CODE_MISMATCH_FRACTION:
                problems.append(f"{label}: {int((step != 0).sum())} codes differ from the goldens ({share:.2%})")
        return len(entries), problems

    return check


GOLDENS = (
    GoldenCheck("int8_vectorwise_quant", _golden_row_quant("int8_vectorwise_quant")),
    GoldenCheck("int8_double_quant", _golden_row_quant("int8_double_quant")),
)
