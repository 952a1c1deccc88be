"""LLM.int8() ops, their public wrappers and ``kbit.matmul`` on the reference backend."""

import pytest
import torch
from torch.library import opcheck

import kbit
import kbit.functional as F
from kbit._selftest import run_checks
from kbit.backend import API_VERSION, OP_FAMILIES, BackendManifest, OpSupport
from kbit.testing.tolerances import (
    INT8_CODE_MAX_STEP,
    INT8_CODE_MISMATCH_FRACTION,
    INT8_MATMUL_REL_ERR,
    relative_error,
)
from kbit_reference._int8 import EXACT_FLOAT32_CHUNK, exact_int8_matmul_float32
from kbit_reference.backend import ReferenceBackend

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=_gen(seed))


def _expected_quant(A: torch.Tensor, threshold: float):
    """Independent float64 statement of FORMATS.md section 4 (codes, stats, columns)."""
    rows = A.reshape(-1, A.shape[-1]).double()
    outliers = rows.abs() >= threshold if threshold > 0 else torch.zeros_like(rows, dtype=torch.bool)
    inliers = rows.masked_fill(outliers, 0)
    stats = inliers.abs().amax(dim=1)
    codes = torch.round(inliers * 127 / stats.clamp_min(1e-300)[:, None])
    cols = outliers.any(dim=0)
    codes[:, cols] = 0
    return codes.reshape(A.shape), stats, cols.nonzero().reshape(-1)


def _with_outlier_columns(rows: int, cols: int, columns: list[int], scale: float, seed: int) -> torch.Tensor:
    A = torch.randn(rows, cols, generator=_gen(seed))
    A[:, columns] *= scale
    return A


# ----------------------------------------------------------------------------- goldens
def test_int8_goldens(goldens):
    for entry in goldens["int8"]:
        CA, row_stats, outlier_cols = F.int8_vectorwise_quant(entry["A"], threshold=entry["threshold"])
        assert torch.equal(row_stats, entry["row_stats"])
        assert torch.equal(outlier_cols, entry["outlier_cols"])
        step = (CA.int() - entry["CA"].int()).abs()
        assert int(step.max()) <= INT8_CODE_MAX_STEP
        assert (step != 0).float().mean() <= INT8_CODE_MISMATCH_FRACTION


# ------------------------------------------------------------------- vectorwise quant
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [0.0, 2.5])
def test_vectorwise_quant_matches_the_format(dtype, threshold):
    A = _with_outlier_columns(40, 96, [3, 50], scale=4.0, seed=1).to(dtype)
    CA, row_stats, outlier_cols = F.int8_vectorwise_quant(A, threshold=threshold)
    codes, stats, cols = _expected_quant(A, threshold)
    assert CA.dtype == torch.int8 and CA.shape == A.shape
    assert row_stats.dtype == torch.float32 and outlier_cols.dtype == torch.int64
    assert torch.equal(row_stats.double(), stats)
    assert torch.equal(outlier_cols, cols)
    if threshold:
        assert 3 in outlier_cols.tolist() and 50 in outlier_cols.tolist()
    else:
        assert outlier_cols.numel() == 0
    # float32 vs float64 rounding may move a value sitting on .5 by one step.
    step = (CA.double() - codes).abs()
    assert step.max() <= 1 and (step != 0).float().mean() <= INT8_CODE_MISMATCH_FRACTION


def test_rows_are_all_leading_dims():
    A = torch.randn(2, 3, 16, generator=_gen(2))
    CA, row_stats, _ = F.int8_vectorwise_quant(A)
    CA2, row_stats2, _ = F.int8_vectorwise_quant(A.reshape(6, 16))
    assert CA.shape == A.shape and row_stats.shape == (6,)
    assert torch.equal(CA.reshape(6, 16), CA2) and torch.equal(row_stats, row_stats2)


def test_rounding_is_half_to_even():
    # Row absmax 127 makes the scaled value A itself, so .5 cases are exact.
    A = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.4999]])
    CA, _, _ = F.int8_vectorwise_quant(A)
    assert CA.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3]]


def test_outliers_leave_the_row_absmax_and_zero_their_columns():
    A = torch.tensor([[1.0, 10.0, -2.0], [0.5, 0.25, 4.0], [-8.0, 1.0, 1.0]])
    CA, row_stats, cols = F.int8_vectorwise_quant(A, threshold=6.0)
    assert cols.tolist() == [0, 1]
    # Only the outlier elements leave the absmax; the whole outlier columns are zeroed.
    assert row_stats.tolist() == [2.0, 4.0, 1.0]
    assert CA[:, :2].eq(0).all()
    assert CA[:, 2].tolist() == [-127, 127, 127]


def test_single_row_zeroes_exactly_its_outliers():
    CA, row_stats, cols = F.int8_vectorwise_quant(torch.tensor([[7.0, -1.0, 0.5]]), threshold=6.0)
    assert cols.tolist() == [0] and row_stats.tolist() == [1.0] and CA.tolist() == [[0, -127, 64]]


def test_all_zero_row_gives_zero_stats_and_codes():
    A = torch.randn(4, 32, generator=_gen(3))
    A[1] = 0
    A[2] = torch.where(A[2].abs() > 0.1, 50.0, 0.0)  # only outliers survive in row 2
    CA, row_stats, _ = F.int8_vectorwise_quant(A, threshold=6.0)
    assert row_stats[1] == 0 and row_stats[2] == 0
    assert CA[1].eq(0).all() and CA[2].eq(0).all()
    back = F.int8_vectorwise_dequant(CA, row_stats)
    assert torch.isfinite(back).all() and back[1].eq(0).all()


def test_non_finite_value_poisons_only_its_row():
    A = torch.randn(3, 16, generator=_gen(4))
    A[1, 5] = float("nan")
    CA, row_stats, _ = F.int8_vectorwise_quant(A)
    assert row_stats[1].isnan() and torch.isfinite(row_stats[[0, 2]]).all()
    assert CA[1].eq(0).all()
    back = F.int8_vectorwise_dequant(CA, row_stats)
    assert back[1].isnan().all() and torch.isfinite(back[[0, 2]]).all()


def test_vectorwise_dequant_is_codes_times_stats_over_127():
    CA = _int8(5, 2, 9, seed=5)
    stats = torch.rand(10, generator=_gen(5)) * 4
    back = F.int8_vectorwise_dequant(CA, stats)
    expected = CA.reshape(10, 9).float() * stats[:, None] / 127
    assert back.dtype == torch.float32 and torch.equal(back, expected.reshape(CA.shape))


def test_round_trip_error_is_within_half_a_step():
    A = torch.randn(64, 256, generator=_gen(6))
    CA, row_stats, _ = F.int8_vectorwise_quant(A)
    error = (F.int8_vectorwise_dequant(CA, row_stats) - A).abs()
    assert torch.all(error <= row_stats[:, None] / 254 * (1 + 1e-5))


# ----------------------------------------------------------------------- double quant
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_double_quant_rows_and_columns(threshold):
    A = _with_outlier_columns(24, 40, [7], scale=5.0, seed=7)
    CA, CAt, row_stats, col_stats, cols = F.int8_double_quant(A, threshold=threshold)
    CA_v, row_v, cols_v = F.int8_vectorwise_quant(A, threshold=threshold)
    assert torch.equal(CA, CA_v) and torch.equal(row_stats, row_v) and torch.equal(cols, cols_v)
    inliers = A.masked_fill(A.abs() >= threshold, 0) if threshold else A
    expected_cols = inliers.abs().amax(dim=0)
    assert torch.equal(col_stats, expected_cols)
    expected_CAt = torch.round(inliers.double() * 127 / expected_cols.double())
    assert CAt.shape == A.shape and (CAt.double() - expected_CAt).abs().max() <= 1


def test_double_quant_fills_buffers():
    A = torch.randn(8, 16, generator=_gen(8))
    buffers = dict(
        out_row=torch.empty(8, 16, dtype=torch.int8),
        out_col=torch.empty(8, 16, dtype=torch.int8),
        row_stats=torch.empty(8),
        col_stats=torch.empty(16),
    )
    CA, CAt, rows, cols, _ = F.int8_double_quant(A, **buffers)
    assert CA is buffers["out_row"] and CAt is buffers["out_col"]
    assert rows is buffers["row_stats"] and cols is buffers["col_stats"]
    assert torch.equal(CA, F.int8_vectorwise_quant(A)[0])


def test_double_quant_bad_buffer_touches_no_buffer():
    A = torch.randn(8, 16, generator=_gen(9))
    out_row = torch.full((8, 16), 7, dtype=torch.int8)
    with pytest.raises(kbit.KbitValueError, match="col_stats"):
        F.int8_double_quant(A, out_row=out_row, col_stats=torch.empty(15))
    assert out_row.eq(7).all()


# ------------------------------------------------------------------------ int8 matmul
# K == 1 with N > 1: torch._int_mm on CPU returns uninitialised memory there.
@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 1, 3), (1, 1, 6), (7, 33, 5), (64, 512, 48), (3, 2500, 9)])
def test_int8_linear_matmul_is_exact(shape):
    M, K, N = shape
    A, B = _int8(M, K, seed=M), _int8(N, K, seed=K)
    C = F.int8_linear_matmul(A, B)
    assert C.dtype == torch.int32 and torch.equal(C.long(), A.long() @ B.long().T)


def test_int8_linear_matmul_extremes_and_batches():
    K = 5000  # |sum| up to 5000 * 128**2 = 8.2e7: past float32's 2**24, inside int32
    A = torch.full((3, K), -128, dtype=torch.int8)
    B = torch.cat([torch.full((1, K), -128, dtype=torch.int8), torch.full((1, K), 127, dtype=torch.int8)])
    assert F.int8_linear_matmul(A, B)[:, 0].tolist() == [K * 128 * 128] * 3
    batched = _int8(2, 3, 40, seed=10)
    B = _int8(6, 40, seed=11)
    C = F.int8_linear_matmul(batched, B)
    assert C.shape == (2, 3, 6) and torch.equal(C.long(), batched.long() @ B.long().T)


@pytest.mark.parametrize("K", [1, EXACT_FLOAT32_CHUNK - 1, EXACT_FLOAT32_CHUNK, 3 * EXACT_FLOAT32_CHUNK + 17])
def test_float32_fallback_is_exact(K):
    # The path used where torch._int_mm does not apply; the worst case for float32 is
    # every product at its maximum, 128**2, in one chunk.
    A, B = _int8(9, K, seed=K), _int8(5, K, seed=K + 1)
    A[0] = -128
    B[0] = -128
    expected = A.long() @ B.long().T
    assert expected[0, 0] == K * 128 * 128
    assert torch.equal(exact_int8_matmul_float32(A, B).long(), expected)


def test_int8_linear_matmul_out_buffer():
    A, B = _int8(4, 8, seed=12), _int8(3, 8, seed=13)
    out = torch.empty(4, 3, dtype=torch.int32)
    assert F.int8_linear_matmul(A, B, out=out) is out
    assert torch.equal(out.long(), A.long() @ B.long().T)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_mm_dequant_matches_float_math(dtype):
    C = torch.randint(-(2**20), 2**20, (16, 24), dtype=torch.int32, generator=_gen(14))
    row_stats = torch.rand(16, generator=_gen(15)) * 3
    col_stats = torch.rand(24, generator=_gen(16)) * 0.2
    bias = torch.randn(24, generator=_gen(17))
    expected = C.double() * row_stats.double()[:, None] * col_stats.double()[None, :] / 127**2
    out = F.int8_mm_dequant(C, row_stats, col_stats, dtype=dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected.to(dtype).double(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0)
    with_bias = F.int8_mm_dequant(C, row_stats, col_stats, bias=bias, dtype=torch.float32)
    torch.testing.assert_close(with_bias.double(), expected + bias.double(), rtol=1e-5, atol=1e-5)


def test_int8_mm_dequant_default_dtype_and_out():
    C = torch.randint(-1000, 1000, (4, 6), dtype=torch.int32, generator=_gen(18))
    rows, cols = torch.rand(4, generator=_gen(19)), torch.rand(6, generator=_gen(20))
    assert F.int8_mm_dequant(C, rows, cols).dtype == torch.float16  # bitsandbytes' default
    out = torch.empty(4, 6, dtype=torch.bfloat16)
    assert F.int8_mm_dequant(C, rows, cols, out=out) is out
    assert torch.equal(out, F.int8_mm_dequant(C, rows, cols, dtype=torch.bfloat16))


def test_quantized_matmul_within_int8_error():
    x = torch.randn(16, 512, generator=_gen(21))
    w = torch.randn(64, 512, generator=_gen(22))
    CA, SA, _ = F.int8_vectorwise_quant(x)
    CB, SB, _ = F.int8_vectorwise_quant(w)
    y = F.int8_mm_dequant(F.int8_linear_matmul(CA, CB), SA, SB, dtype=torch.float32)
    assert relative_error(y, x @ w.T) < INT8_MATMUL_REL_ERR


# ----------------------------------------------------------------- mixed decomposition
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_scaled_mm_is_int8_part_plus_outlier_columns(dtype):
    A = _with_outlier_columns(12, 64, [2, 9, 40], scale=30.0, seed=23).to(dtype)
    W = torch.randn(20, 64, generator=_gen(24))
    CB, SCB, _ = F.int8_vectorwise_quant(W)
    bias = torch.randn(20, generator=_gen(25))
    CA, SCA, cols = F.int8_vectorwise_quant(A, threshold=6.0)
    assert cols.tolist() == [2, 9, 40]
    out, subA = torch.ops.kbit.int8_mixed_scaled_mm(A, CA, CB, SCA, SCB, cols, bias)
    assert out.dtype == dtype and out.shape == (12, 20)
    assert torch.equal(subA, A[:, cols])
    W_deq = CB.double() * SCB.double()[:, None] / 127
    int8_part = CA.double() @ CB.double().T * SCA.double()[:, None] * SCB.double()[None, :] / 127**2
    expected = int8_part + A[:, cols].double() @ W_deq[:, cols].T + bias.double()
    torch.testing.assert_close(out.double(), expected.to(dtype).double(), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-3)


def test_outliers_matter():
    x = _with_outlier_columns(32, 512, [5, 100, 300, 411], scale=60.0, seed=26)
    w = torch.randn(256, 512, generator=_gen(27)) / 512**0.5
    reference = x @ w.T
    plain = relative_error(kbit.matmul(x, w, threshold=0.0), reference)
    mixed = relative_error(kbit.matmul(x, w, threshold=6.0), reference)
    assert mixed < INT8_MATMUL_REL_ERR
    assert plain > 4 * mixed, (plain, mixed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_outliers_both_paths_match_within_int8_error(dtype):
    x = torch.randn(32, 512, generator=_gen(28))
    w = torch.randn(128, 512, generator=_gen(29))
    reference = x @ w.T
    for threshold in (0.0, 6.0):
        state = kbit.MatmulLtState()
        y = kbit.matmul(x.to(dtype), w.to(dtype), state=state, threshold=threshold)
        assert y.dtype == dtype
        assert relative_error(y, reference) < INT8_MATMUL_REL_ERR
        if threshold:
            assert state.idx is not None and state.idx.numel() == 0


# ------------------------------------------------------------------------ kbit.matmul
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matmul_gradients_match_float_autograd(dtype):
    # With a fixed upstream gradient G, straight-through gradients equal float autograd's
    # (in half precision up to its rounding), and each has the dtype of its tensor.
    x = torch.randn(4, 8, 64, generator=_gen(30)).to(dtype).requires_grad_()
    w = torch.randn(32, 64, generator=_gen(31)).to(dtype).requires_grad_()
    b = torch.randn(32, generator=_gen(32)).to(dtype).requires_grad_()
    G = torch.randn(4, 8, 32, generator=_gen(33)).to(dtype)
    (kbit.matmul(x, w, bias=b) * G).sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    (torch.nn.functional.linear(x, w, b) * G).sum().backward()
    for got, want in zip(grads, (x.grad, w.grad, b.grad), strict=True):
        assert got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert relative_error(got, want) < 5e-3


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_matmul_gradients_of_a_loss_within_int8_tolerance(threshold):
    x = _with_outlier_columns(16, 128, [3], scale=20.0, seed=34).requires_grad_()
    w = torch.randn(48, 128, generator=_gen(35), requires_grad=True)
    target = torch.randn(16, 48, generator=_gen(36))
    ((kbit.matmul(x, w, threshold=threshold) - target) ** 2).mean().backward()
    got = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ((x @ w.T - target) ** 2).mean().backward()
    tolerance = INT8_MATMUL_REL_ERR if threshold else 4 * INT8_MATMUL_REL_ERR
    assert relative_error(got[0], x.grad) < tolerance
    assert relative_error(got[1], w.grad) < tolerance


def test_matmul_with_int8_weight_grads_to_input_only():
    w = torch.randn(24, 32, generator=_gen(37))
    CB, SCB, _ = F.int8_vectorwise_quant(w)
    state = kbit.MatmulLtState(SCB=SCB, has_fp16_weights=False)
    x = torch.randn(5, 32, generator=_gen(38), requires_grad=True)
    G = torch.randn(5, 24, generator=_gen(39))
    y = kbit.matmul(x, CB, state=state)
    assert relative_error(y, x @ w.T) < INT8_MATMUL_REL_ERR
    (y * G).sum().backward()
    # The gradient goes through the dequantized int8 weight.
    torch.testing.assert_close(x.grad, G @ F.int8_vectorwise_dequant(CB, SCB), rtol=1e-5, atol=1e-5)


def test_matmul_caches_a_frozen_float_weight_quantization():
    w = torch.randn(8, 16, generator=_gen(40))
    state = kbit.MatmulLtState(has_fp16_weights=False)
    x = torch.randn(3, 16, generator=_gen(41))
    first = kbit.matmul(x, w, state=state)
    assert state.CB is not None and state.SCB.shape == (8,)
    cached = state.CB
    assert torch.equal(kbit.matmul(x, w * 100, state=state), first)  # cached codes are used
    assert state.CB is cached


def test_matmul_with_frozen_codes_in_the_state_ignores_B():
    # bitsandbytes semantics: with has_fp16_weights=False and state.CB set, B is not used;
    # code written for it passes CB.t() (shape [K, N]) or a stale tensor there.
    w = torch.randn(48, 32, generator=_gen(60))
    CB, SCB, _ = F.int8_vectorwise_quant(w)
    x = torch.randn(64, 32, generator=_gen(61), requires_grad=True)
    expected = kbit.matmul(x, CB, state=kbit.MatmulLtState(SCB=SCB, has_fp16_weights=False))
    for B in (CB.t(), torch.zeros(3, 5)):
        state = kbit.MatmulLtState(CB=CB, SCB=SCB, has_fp16_weights=False)
        y = kbit.matmul(x, B, state=state)
        assert torch.equal(y, expected) and state.CB is CB
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, F.int8_vectorwise_dequant(CB, SCB).sum(0).expand(64, 32), rtol=1e-5, atol=1e-5)
    # The state's codes are then what is checked against A.
    with pytest.raises(kbit.KbitValueError, match="last dimension of 32 to match state.CB"):
        kbit.matmul(torch.randn(2, 48), CB.t(), state=kbit.MatmulLtState(CB=CB, SCB=SCB, has_fp16_weights=False))
    with pytest.raises(kbit.KbitTypeError, match="state.CB"):
        kbit.matmul(x, w, state=kbit.MatmulLtState(CB=w, SCB=SCB, has_fp16_weights=False))


def test_matmul_out_buffer():
    x, w = torch.randn(3, 16, generator=_gen(42)), torch.randn(8, 16, generator=_gen(43))
    out = torch.empty(3, 8)
    assert kbit.matmul(x, w, out=out) is out and torch.equal(out, kbit.matmul(x, w))


def test_matmul_is_exported_at_top_level():
    assert kbit.matmul is kbit.autograd.matmul and kbit.MatmulLtState is kbit.autograd.MatmulLtState
    state = kbit.MatmulLtState()
    # The attributes downstream code reads, with bitsandbytes' defaults.
    assert (state.CB, state.SCB, state.idx, state.CxB, state.SB, state.CBt, state.subB) == (None,) * 7
    assert state.threshold == 0.0 and state.has_fp16_weights and state.is_training
    assert state.formatB == "row" and not state.use_pool and not state.has_accumulated_gradients


def test_matmul_fills_the_state_it_is_given():
    w = torch.randn(12, 32, generator=_gen(57))
    x = _with_outlier_columns(6, 32, [4, 17], scale=30.0, seed=58)
    state = kbit.MatmulLtState(has_fp16_weights=False)
    kbit.matmul(x, w, state=state, threshold=6.0)
    CB, SCB, _ = F.int8_vectorwise_quant(w)
    assert torch.equal(state.CB, CB) and torch.equal(state.SCB, SCB)
    assert state.threshold == 6.0 and state.idx.tolist() == [4, 17]
    kbit.matmul(torch.randn(6, 32, generator=_gen(59)), w, state=state)  # the state's threshold applies
    assert state.idx.numel() == 0
    state.reset_grads()
    assert state.CB is None and state.SCB is None


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: F.int8_vectorwise_quant(torch.zeros(4, 4, dtype=torch.int8)), kbit.KbitTypeError, "A"),
        (lambda: F.int8_vectorwise_quant(torch.tensor(1.0)), kbit.KbitValueError, "A.dim"),
        (lambda: F.int8_vectorwise_quant(torch.zeros(4, 0)), kbit.KbitValueError, "A.shape"),
        (lambda: F.int8_vectorwise_quant(torch.zeros(4, 4), threshold=-1.0), kbit.KbitValueError, "threshold"),
        (lambda: F.int8_vectorwise_quant(torch.zeros(4, 4), threshold=float("nan")), kbit.KbitValueError, "threshold"),
        (lambda: F.int8_vectorwise_dequant(torch.zeros(4, 4), torch.ones(4)), kbit.KbitTypeError, "A"),
        (lambda: F.int8_vectorwise_dequant(torch.zeros(4, 4, dtype=torch.int8), torch.ones(3)), kbit.KbitValueError, "stats"),
        (
            lambda: F.int8_vectorwise_dequant(torch.zeros(4, 4, dtype=torch.int8), torch.ones(4, dtype=torch.int32)),
            kbit.KbitTypeError,
            "stats",
        ),
        (lambda: F.int8_linear_matmul(_int8(4, 8), _int8(2, 3, 8)), kbit.KbitValueError, "B.shape"),
        (lambda: F.int8_linear_matmul(_int8(4, 8), _int8(8)), kbit.KbitValueError, "B.shape"),
        (lambda: F.int8_linear_matmul(_int8(4, 8), _int8(3, 7)), kbit.KbitValueError, "B.shape"),
        (lambda: F.int8_linear_matmul(torch.zeros(4, 8), _int8(3, 8)), kbit.KbitTypeError, "A"),
        (lambda: F.int8_linear_matmul(_int8(4, 8), torch.zeros(3, 8)), kbit.KbitTypeError, "B"),
        (lambda: F.int8_linear_matmul(_int8(4, 8), _int8(3, 8), dtype=torch.int64), kbit.KbitValueError, "dtype"),
        (
            lambda: F.int8_mm_dequant(torch.zeros(4, 3, dtype=torch.int32), torch.ones(5), torch.ones(3)),
            kbit.KbitValueError,
            "row_stats",
        ),
        (
            lambda: F.int8_mm_dequant(torch.zeros(4, 3, dtype=torch.int32), torch.ones(4), torch.ones(4)),
            kbit.KbitValueError,
            "col_stats",
        ),
        (lambda: F.int8_mm_dequant(torch.zeros(4, 3), torch.ones(4), torch.ones(3)), kbit.KbitTypeError, "A"),
        (
            lambda: F.int8_mm_dequant(torch.zeros(4, 3, dtype=torch.int32), torch.ones(4), torch.ones(3), bias=torch.ones(4)),
            kbit.KbitValueError,
            "bias",
        ),
        (
            lambda: F.int8_mm_dequant(torch.zeros(4, 3, dtype=torch.int32), torch.ones(4), torch.ones(3), dtype=torch.int8),
            kbit.KbitValueError,
            "dtype",
        ),
        (lambda: F.int8_double_quant(torch.zeros(4, 4, dtype=torch.float64)), kbit.KbitTypeError, "A"),
        (lambda: kbit.matmul(torch.randn(2, 8), torch.randn(3, 4, 8)), kbit.KbitValueError, "B.shape"),
        (lambda: kbit.matmul(torch.randn(2, 8), torch.randn(3, 7)), kbit.KbitValueError, "A.shape"),
        (lambda: kbit.matmul(torch.randn(2, 8), torch.randn(3, 8).double()), kbit.KbitTypeError, "B"),
        (lambda: kbit.matmul(torch.randn(2, 8).long(), torch.randn(3, 8)), kbit.KbitTypeError, "A"),
        (lambda: kbit.matmul(torch.randn(2, 8), _int8(3, 8)), kbit.KbitValueError, "SCB"),
        (
            lambda: kbit.matmul(torch.randn(2, 8), _int8(3, 8), state=kbit.MatmulLtState(SCB=torch.ones(4))),
            kbit.KbitValueError,
            "state.SCB",
        ),
        (
            lambda: kbit.matmul(
                torch.randn(2, 8), _int8(3, 8), state=kbit.MatmulLtState(SCB=torch.ones(3, dtype=torch.int32))
            ),
            kbit.KbitTypeError,
            "state.SCB has dtype torch.int32",
        ),
        (lambda: kbit.matmul(torch.randn(2, 8), torch.randn(3, 8), state=5), kbit.KbitTypeError, "state has type int"),
        (
            lambda: kbit.matmul(torch.randn(2, 8), torch.randn(3, 8), out=torch.empty(2, 3, dtype=torch.float16)),
            kbit.KbitValueError,
            "out",
        ),
        (lambda: kbit.matmul(torch.randn(2, 8), torch.randn(3, 8), bias=torch.ones(4)), kbit.KbitValueError, "bias"),
        (lambda: kbit.matmul(torch.randn(2, 8), torch.randn(3, 8), threshold=-2.0), kbit.KbitValueError, "threshold"),
    ],
)
def test_bad_input_raises_typed_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -------------------------------------------------------------- custom ops and compile
def _op_samples():
    A = _with_outlier_columns(6, 32, [1, 20], scale=10.0, seed=50)
    CA, SCA, cols = F.int8_vectorwise_quant(A, threshold=6.0)
    CA0, SCA0, none = F.int8_vectorwise_quant(A)
    CB, SCB, _ = F.int8_vectorwise_quant(torch.randn(10, 32, generator=_gen(51)))
    C = F.int8_linear_matmul(CA0, CB)
    bias = torch.randn(10, generator=_gen(52))
    return {
        "int8_vectorwise_quant": [(A, 0.0), (A, 6.0), (A.half().reshape(2, 3, 32), 6.0)],
        "int8_vectorwise_dequant": [(CA0, SCA0)],
        "int8_linear_matmul": [(CA0, CB), (CA0.reshape(2, 3, 32), CB)],
        "int8_mm_dequant": [(C, SCA0, SCB, torch.float16, None), (C, SCA0, SCB, torch.float32, bias)],
        "int8_double_quant": [(A, 0.0), (A.bfloat16(), 6.0)],
        "int8_mixed_scaled_mm": [
            (A, CA, CB, SCA, SCB, cols, bias),
            (A, CA0, CB, SCA0, SCB, none, None),
            # Leading dims are rows; a 16-bit input with a 16-bit bias.
            (A.bfloat16().reshape(2, 3, 32), CA.reshape(2, 3, 32), CB, SCA, SCB, cols, bias.bfloat16()),
        ],
    }


@pytest.mark.parametrize("op_name", sorted(_op_samples()))
def test_opcheck(op_name):
    op = getattr(torch.ops.kbit, op_name).default
    for args in _op_samples()[op_name]:
        opcheck(op, args)


def test_every_int8_op_has_an_opcheck():
    assert set(_op_samples()) == set(kbit.backend.OP_FAMILIES["int8"])


def test_outlier_columns_compile_with_a_data_dependent_size():
    def quantize(x):
        return F.int8_vectorwise_quant(x, threshold=6.0)

    compiled = torch.compile(quantize, fullgraph=True)
    for columns in ([4, 9], []):
        x = _with_outlier_columns(8, 16, columns, scale=50.0, seed=53)
        for got, want in zip(compiled(x), quantize(x), strict=True):
            assert torch.equal(got, want)


def test_data_dependent_outlier_columns_feed_later_ops_under_compile():
    # The outlier count is an unbacked size: indexing with it, counting it and the double
    # quantization's column output must all trace, also with dynamic shapes.
    def pipeline(x):
        CA, CAt, rows, cols, outlier_cols = F.int8_double_quant(x, threshold=6.0)
        outliers = x.index_select(1, outlier_cols)
        return CA, CAt, rows, cols, outliers * 2, outlier_cols.numel() + torch.zeros(())

    compiled = torch.compile(pipeline, fullgraph=True, dynamic=True)
    for shape, columns in (((8, 16), [4, 9]), ((5, 24), []), ((3, 40), [0, 1, 39])):
        x = _with_outlier_columns(*shape, columns, scale=50.0, seed=56)
        got, want = compiled(x), pipeline(x)
        assert got[-1] == len(columns) and got[-2].shape == (shape[0], len(columns))
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


def test_matmul_with_threshold_compiles():
    w = torch.randn(12, 32, generator=_gen(54))

    def forward(x):
        return kbit.matmul(x, w, threshold=6.0)

    x = _with_outlier_columns(5, 32, [3], scale=30.0, seed=55)
    torch.testing.assert_close(torch.compile(forward, fullgraph=True)(x), forward(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- kbit check
class _ShiftedMatmul(ReferenceBackend):
    """A deliberately wrong backend: int8 products off by one, row stats 1% high."""

    def int8_linear_matmul(self, A, B):
        return super().int8_linear_matmul(A, B) + 1

    def int8_vectorwise_quant(self, A, *, threshold):
        CA, stats, cols = super().int8_vectorwise_quant(A, threshold=threshold)
        return CA, stats * 1.01, cols


def _register(factory: str, name: str):
    kbit.backends.register(
        BackendManifest(
            name=name, api_version=API_VERSION, device_types=("cpu",), factory=factory,
            ops={op: kbit.backends.get("reference").manifest.ops[op] for op in OP_FAMILIES["int8"]},
        )
    )  # fmt: skip
    return kbit.backends.get(name)


def test_kbit_check_runs_the_int8_conformance_cases():
    reference = kbit.backends.get("reference")
    agreeing = run_checks(_register("kbit_reference.backend:ReferenceBackend", "twin"), reference)
    assert {r.op for r in agreeing} == set(OP_FAMILIES["int8"])
    assert all(r.status == "passed" for r in agreeing), agreeing
    broken = {r.op: r for r in run_checks(_register(f"{__name__}:_ShiftedMatmul", "shifted"), reference)}
    assert broken["int8_linear_matmul"].status == "failed"
    assert broken["int8_vectorwise_quant"].status == "failed" and "stats" in broken["int8_vectorwise_quant"].detail
    assert broken["int8_mm_dequant"].status == "passed"
    own = run_checks(reference, reference)
    assert {r.op: r.status for r in own}["int8_linear_matmul"] == "passed"


class _Recording(ReferenceBackend):
    """The reference, counting the mm_dequant calls it serves."""

    calls = 0

    def int8_mm_dequant(self, A, **kwargs):
        type(self).calls += 1
        return super().int8_mm_dequant(A, **kwargs)


def test_mm_dequant_is_dispatched_by_its_output_dtype():
    kbit.backends.register(
        BackendManifest(
            name="halfonly",
            api_version=API_VERSION,
            priority=10,
            device_types=("cpu",),
            factory="tests.test_int8:_Recording",
            ops={"int8_mm_dequant": OpSupport(dtypes=("float16",))},
        )
    )
    _Recording.calls = 0
    C = torch.randint(-100, 100, (3, 4), dtype=torch.int32, generator=_gen(60))
    F.int8_mm_dequant(C, torch.ones(3), torch.ones(4), dtype=torch.float16)
    assert _Recording.calls == 1
    F.int8_mm_dequant(C, torch.ones(3), torch.ones(4), dtype=torch.float32)
    assert _Recording.calls == 1  # float32 output goes to the reference


def test_bad_input_leaves_the_state_untouched():
    state = kbit.MatmulLtState()
    B = torch.randn(8, 16)
    with pytest.raises(kbit.KbitValueError, match="A.shape"):
        kbit.matmul(torch.randn(4, 15), B, state=state, threshold=3.0)
    with pytest.raises(kbit.KbitTypeError, match="A has dtype"):
        kbit.matmul(torch.ones(4, 16, dtype=torch.long), B, state=state, threshold=3.0)
    assert state.threshold == 0.0 and state.CB is None
    kbit.matmul(torch.randn(4, 16), B, state=state, threshold=3.0)
    assert state.threshold == 3.0
