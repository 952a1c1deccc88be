"""8-bit quantization through the public API on the reference backend."""

import pytest
import torch

import kbit
import kbit.functional as F
from kbit.testing.tolerances import BLOCKWISE8_RANDN, mean_errors

BLOCKSIZES = [64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _normalised(A: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    per_element = absmax.repeat_interleave(blocksize)[: A.numel()]
    return A.reshape(-1).float() * (1 / per_element)


# ----------------------------------------------------------------------------- goldens
def test_blockwise8_goldens(goldens):
    code = F.create_dynamic_map()
    for entry in goldens["blockwise8"]:
        A, blocksize = entry["A"], entry["blocksize"]
        codes, state = F.quantize_blockwise(A, blocksize=blocksize)
        assert torch.equal(state.absmax, entry["absmax"]), blocksize
        assert torch.equal(F.dequantize_blockwise(entry["codes"], state), entry["dequant"]), blocksize
        # kbit picks the exactly nearest code; the golden codes may be up to 3e-5 worse.
        x = _normalised(A, state.absmax, blocksize)
        ours = (code[codes.long()] - x).abs()
        theirs = (code[entry["codes"].long()] - x).abs()
        in_zero_block = state.absmax.repeat_interleave(blocksize)[: A.numel()] == 0
        differs = (codes != entry["codes"]) & ~in_zero_block
        assert torch.all(ours[~in_zero_block] <= theirs[~in_zero_block])
        assert torch.all(theirs[differs] - ours[differs] <= 3e-5)
        assert differs.float().mean() < 0.005


# ---------------------------------------------------------------------- quality bars
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blockwise8_error_bounds(blocksize, dtype):
    A = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(blocksize)).to(dtype)
    codes, state = F.quantize_blockwise(A, blocksize=blocksize)
    back = F.dequantize_blockwise(codes, state)
    assert back.dtype == dtype and back.shape == A.shape
    errors = mean_errors(A, back)
    assert errors.abs_err < BLOCKWISE8_RANDN.abs_err
    assert errors.rel_err < BLOCKWISE8_RANDN.rel_err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nested_absmax_round_trip(dtype):
    A = torch.randn(300, 1000, generator=torch.Generator().manual_seed(3)).to(dtype)
    codes, state = F.quantize_blockwise(A, blocksize=64, nested=True)
    assert state.nested and state.absmax.dtype == torch.uint8
    assert state.state2.blocksize == 256 and state.offset.shape == ()
    back = F.dequantize_blockwise(codes, state)
    errors = mean_errors(A, back)
    assert errors.abs_err < BLOCKWISE8_RANDN.abs_err * 1.1


# -------------------------------------------------------------------- exact numerics
def test_codes_are_the_nearest_with_ties_to_the_lower_index():
    code = F.create_dynamic_map()
    # Every exact midpoint between neighbouring codes (scaled by absmax = 1), plus randoms.
    midpoints = ((code[:-1].double() + code[1:].double()) / 2).float()
    exact = midpoints.double() == (code[:-1].double() + code[1:].double()) / 2
    values = torch.cat([midpoints[exact], torch.rand(5000) * 2 - 1, torch.tensor([1.0])])
    codes, _ = F.quantize_blockwise(values, blocksize=64)
    state = F.quantize_blockwise(values, blocksize=64)[1]
    x = _normalised(values, state.absmax, 64)
    distance = (code[None, :].double() - x[:, None].double()).abs()
    nearest = distance.argmin(dim=1)  # argmin returns the first (lowest) index on ties
    assert torch.equal(codes.long(), nearest)


def test_dequantize_is_code_times_absmax_in_float32():
    A = torch.randn(1000, dtype=torch.bfloat16)
    codes, state = F.quantize_blockwise(A, blocksize=128)
    expected = (F.create_dynamic_map()[codes.long()] * state.absmax.repeat_interleave(128)[:1000]).to(torch.bfloat16)
    assert torch.equal(F.dequantize_blockwise(codes, state), expected)


# ------------------------------------------------------------------------ edge cases
def test_empty_tensor():
    codes, state = F.quantize_blockwise(torch.empty(0, 5), blocksize=64)
    assert codes.shape == (0, 5) and state.absmax.shape == (0,)
    assert F.dequantize_blockwise(codes, state).shape == (0, 5)


def test_whole_tensor_quantize_of_an_empty_tensor_has_one_absmax():
    # Whole-tensor quantization always has exactly one scale (blockwise has one per block,
    # so none for an empty input); an empty tensor is an all-zero one: absmax 0. The
    # NumPy plugin's twin of this test is in test_numpy_plugin.py.
    codes, (absmax, code) = F.quantize(torch.empty(0, 3))
    assert codes.shape == (0, 3) and absmax.shape == (1,) and absmax.tolist() == [0.0]
    assert F.dequantize(codes, (absmax, code)).shape == (0, 3)


def test_single_element():
    codes, state = F.quantize_blockwise(torch.tensor([-2.5]), blocksize=64)
    assert state.absmax.tolist() == [2.5]
    assert F.dequantize_blockwise(codes, state).tolist() == [pytest.approx(-2.5 * 0.99296875)]


def test_partial_last_block_has_its_own_scale():
    A = torch.cat([torch.full((64,), 100.0), torch.tensor([0.5, -0.25])])
    codes, state = F.quantize_blockwise(A, blocksize=64)
    assert state.absmax.tolist() == [100.0, 0.5]
    assert F.dequantize_blockwise(codes, state)[64:].tolist() == [0.5, pytest.approx(-0.25, rel=1e-2)]


def test_all_zero_block_dequantizes_to_zero():
    A = torch.cat([torch.zeros(128), torch.randn(64)])
    codes, state = F.quantize_blockwise(A, blocksize=64)
    assert state.absmax[:2].tolist() == [0.0, 0.0]
    back = F.dequantize_blockwise(codes, state)
    assert torch.equal(back[:128], torch.zeros(128)) and torch.isfinite(back).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_poisons_only_its_block(bad):
    # Documented behaviour: the block's absmax is non-finite and every value of that
    # block dequantizes to a non-finite value; other blocks are unaffected.
    A = torch.randn(3 * 64)
    A[70] = bad
    codes, state = F.quantize_blockwise(A, blocksize=64)
    assert not torch.isfinite(state.absmax[1]) and torch.isfinite(state.absmax[[0, 2]]).all()
    back = F.dequantize_blockwise(codes, state)
    assert not torch.isfinite(back[64:128]).any()
    clean = torch.cat([A[:64], A[128:]])
    clean_back = torch.cat([back[:64], back[128:]])
    assert (clean - clean_back).abs().max() < 0.05


def test_non_finite_input_of_the_whole_tensor_and_code_only_variants():
    # Documented in docs/formats.md section 2: one block for the whole tensor, so every
    # value turns non-finite; without a scale, NaN takes the largest code and inf saturates.
    codes, state = F.quantize(torch.tensor([1.0, float("inf"), -2.0]))
    assert not torch.isfinite(F.dequantize(codes, state)).any()
    code = F.create_dynamic_map()
    values = torch.tensor([float("nan"), float("inf"), float("-inf"), 5.0, -5.0])
    assert F.quantize_no_absmax(values, code).tolist() == [255, 255, 0, 255, 0]


def test_non_contiguous_input_matches_contiguous():
    A = torch.randn(64, 200)
    codes_t, state_t = F.quantize_blockwise(A.t(), blocksize=128)
    codes_c, state_c = F.quantize_blockwise(A.t().contiguous(), blocksize=128)
    assert torch.equal(codes_t, codes_c) and state_t == state_c


def test_out_and_absmax_buffers_are_filled():
    A = torch.randn(1000)
    out = torch.empty(1000, dtype=torch.uint8)
    absmax = torch.empty(16)
    codes, state = F.quantize_blockwise(A, absmax=absmax, out=out, blocksize=64)
    assert codes is out and state.absmax is absmax
    assert torch.equal(out, F.quantize_blockwise(A, blocksize=64)[0])
    target = torch.empty(1000, dtype=torch.float16)
    assert F.dequantize_blockwise(out, state, out=target) is target
    assert torch.equal(target, F.dequantize_blockwise(out, state).half())


@pytest.mark.parametrize("bad", ["absmax_shape", "absmax_dtype", "out_dtype"])
def test_a_bad_buffer_is_rejected_before_any_buffer_is_written(bad):
    out = torch.full((1000,), 7, dtype=torch.uint8 if bad != "out_dtype" else torch.int8)
    absmax = torch.full((15 if bad == "absmax_shape" else 16,), 7.0, dtype=torch.float64 if bad == "absmax_dtype" else torch.float32)
    with pytest.raises(kbit.KbitValueError, match="out" if bad == "out_dtype" else "absmax"):
        F.quantize_blockwise(torch.randn(1000), absmax=absmax, out=out, blocksize=64)
    assert torch.all(out == 7) and torch.all(absmax == 7.0)


def test_dequantize_with_absmax_only():
    A = torch.randn(300)
    codes, state = F.quantize_blockwise(A, blocksize=256)
    back = F.dequantize_blockwise(codes, absmax=state.absmax, blocksize=256)
    assert torch.equal(back, F.dequantize_blockwise(codes, state))


# ----------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (lambda: F.quantize_blockwise(torch.ones(10, dtype=torch.int32)), kbit.KbitTypeError, "torch.int32"),
        (lambda: F.quantize_blockwise(torch.ones(10, dtype=torch.float64)), kbit.KbitTypeError, "float64"),
        (lambda: F.quantize_blockwise(torch.ones(10), blocksize=100), kbit.KbitValueError, "blocksize=100"),
        (lambda: F.quantize_blockwise(torch.ones(10), blocksize=32), kbit.KbitValueError, "blocksize=32"),
        (lambda: F.quantize_blockwise([1.0, 2.0]), kbit.KbitTypeError, "list"),
        (lambda: F.quantize_blockwise(torch.ones(10), code=torch.ones(300)), kbit.KbitValueError, "code.shape"),
        (lambda: F.quantize_blockwise(torch.ones(10), code=torch.ones(256).double()), kbit.KbitTypeError, "code"),
        (lambda: F.quantize_blockwise(torch.ones(10), out=torch.empty(9, dtype=torch.uint8)), kbit.KbitValueError, "out"),
        (lambda: F.dequantize_blockwise(torch.ones(10)), kbit.QuantStateError, "A: dtype torch.float32"),
        (lambda: F.dequantize_blockwise(torch.ones(10, dtype=torch.uint8)), kbit.KbitValueError, "quant_state"),
        (
            lambda: F.dequantize_blockwise(torch.ones(100, dtype=torch.uint8), absmax=torch.ones(3), blocksize=64),
            kbit.QuantStateError,
            "absmax: holds 3 values but blocksize 64 needs 2",
        ),
    ],
)
def test_bad_input_names_the_problem(call, error, fragment):
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        call()


def test_errors_name_the_op():
    with pytest.raises(kbit.KbitValueError) as info:
        F.quantize_blockwise(torch.ones(10), blocksize=100)
    assert info.value.op == "quantize_blockwise" and info.value.argument == "blocksize" and info.value.value == 100


def test_unknown_backend_per_call():
    with pytest.raises(kbit.BackendNotFoundError, match="nosuch"):
        F.quantize_blockwise(torch.ones(10), backend="nosuch")


def test_explicit_reference_backend_per_call():
    codes, _ = F.quantize_blockwise(torch.arange(10.0), blocksize=64, backend="reference")
    assert torch.equal(codes, F.quantize_blockwise(torch.arange(10.0), blocksize=64)[0])


# ------------------------------------------------------- whole-tensor and code-only
def test_whole_tensor_quantize_round_trip():
    A = torch.randn(50, 60)
    codes, (absmax, code) = F.quantize(A)
    assert absmax.tolist() == [A.abs().max().item()]
    back = F.dequantize(codes, (absmax, code))
    assert back.dtype == torch.float32 and (back - A).abs().mean() < 0.02
    assert torch.equal(back, F.dequantize(codes, absmax=absmax))


def test_no_absmax_round_trip():
    code = F.create_linear_map()
    A = torch.rand(100) * 2 - 1
    codes = F.quantize_no_absmax(A, code)
    assert codes.dtype == torch.uint8
    back = F.dequantize_no_absmax(codes, code)
    assert (back - A).abs().max() <= (code[1:] - code[:-1]).max() / 2 + 1e-7


def test_estimate_quantiles_are_exact():
    A = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    quantiles = F.estimate_quantiles(A)
    expected = torch.quantile(A.double(), torch.linspace(1 / 512, 1 - 1 / 512, 256, dtype=torch.float64))
    assert quantiles.shape == (256,) and torch.allclose(quantiles.double(), expected, atol=1e-5)
    assert F.estimate_quantiles(A.half(), num_quantiles=10).shape == (10,)
    with pytest.raises(kbit.KbitValueError, match="num_quantiles"):
        F.estimate_quantiles(A, num_quantiles=0)
    with pytest.raises(kbit.KbitValueError, match="empty"):
        F.estimate_quantiles(torch.empty(0))


def test_histogram_scatter_add_2d():
    histogram = torch.zeros(4, 5)
    index1 = torch.tensor([0, 1, 1, 3], dtype=torch.int32)
    index2 = torch.tensor([2, 3, 3, 4], dtype=torch.int32)
    source = torch.tensor([1.0, 2.0, 3.0, 4.0])
    F.histogram_scatter_add_2d(histogram, index1, index2, source)
    expected = torch.zeros(4, 5)
    expected[0, 2], expected[1, 3], expected[3, 4] = 1.0, 5.0, 4.0
    assert torch.equal(histogram, expected)
    with pytest.raises(kbit.KbitValueError, match="index2"):
        F.histogram_scatter_add_2d(histogram, index1, torch.tensor([0, 0, 0, 5]), source)
    assert torch.equal(histogram, expected)  # nothing written on bad input


def test_get_ptr_and_is_on_gpu():
    A = torch.arange(4.0)
    assert F.get_ptr(None) is None and F.get_ptr(A).value == A.data_ptr()
    assert F.is_on_gpu([A, None]) is False
