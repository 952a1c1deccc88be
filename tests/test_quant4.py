"""4-bit NF4/FP4 quantization through the public API on the reference backend."""

import copy

import pytest
import torch
from torch.library import opcheck

import kbit
import kbit.functional as F
from kbit import KbitTypeError, KbitValueError, QuantStateError
from kbit._selftest import run_checks
from kbit.backend import API_VERSION, BackendManifest, OpSupport
from kbit.testing.tolerances import (
    FOUR_BIT_RANDN,
    FOUR_BIT_SEED_SLACK,
    NESTED_4BIT_COST,
    NESTED_4BIT_RANDN,
    mean_errors,
)
from kbit_reference.backend import ReferenceBackend

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
STORAGES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32]


def _seeded(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit codes of a packed tensor, element 2j from the high nibble (test's own decoder)."""
    data = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([data // 16, data % 16], dim=1).reshape(-1)[:numel]


def _expected_dequant(packed, state) -> torch.Tensor:
    """``table[code] * absmax[block]`` in float32, straight from the format description."""
    numel = state.shape.numel()
    table = F.get_4bit_type(state.quant_type)
    absmax = state.absmax if not state.nested else F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    per_element = absmax.repeat_interleave(state.blocksize)[:numel]
    return (table[_unpack(packed, numel)] * per_element).to(state.dtype).reshape(state.shape)


def _golden_entries(goldens, quant_type):
    return [e for e in goldens["quant4"] if e["quant_type"] == quant_type]


# ----------------------------------------------------------------------------- goldens
def test_nf4_goldens_are_byte_exact(goldens):
    entries = _golden_entries(goldens, "nf4")
    assert entries
    for entry in entries:
        label = (entry["blocksize"], entry["dtype"], entry["nested"], tuple(entry["A"].shape))
        packed, state = F.quantize_4bit(
            entry["A"], blocksize=entry["blocksize"], quant_type="nf4", compress_statistics=entry["nested"]
        )
        assert packed.dtype == torch.uint8 and torch.equal(packed, entry["packed"]), label
        ours, theirs = state.as_dict(packed=True), entry["quant_state_packed"]
        assert list(ours) == list(theirs), label
        for key, value in theirs.items():
            assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), (label, key)


def test_fp4_goldens_are_value_exact_up_to_exact_ties(goldens):
    entries = _golden_entries(goldens, "fp4")
    assert entries
    table = F.get_4bit_type("fp4").double()
    for entry in entries:
        A, blocksize = entry["A"], entry["blocksize"]
        label = (blocksize, entry["dtype"], entry["nested"])
        packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type="fp4", compress_statistics=entry["nested"])
        # absmax (and the nested fields) and the JSON are exact.
        ours, theirs = state.as_dict(packed=True), entry["quant_state_packed"]
        assert all(torch.equal(ours[k], v) for k, v in theirs.items()), label
        mine = table[_unpack(packed, A.numel())]
        golden = table[_unpack(entry["packed"], A.numel())]
        differs = mine != golden  # value comparison: the codes of +0 and -0 agree
        # Where the value differs, x / absmax is an exact midpoint of the two choices in
        # real arithmetic (5/6 between 2/3 and 1, ...): kbit normalises as x * (1/absmax)
        # in float32, bitsandbytes' CPU path rounds the ratio in the input dtype.
        absmax = A.reshape(-1).double().abs().split(blocksize)
        scale = torch.cat([b.max().expand(b.numel()) for b in absmax])
        x = A.reshape(-1).double() / scale
        gap = ((x - mine).abs() - (x - golden).abs()).abs()
        assert torch.all(gap[differs] < 1e-6), label
        assert differs.sum() <= A.numel() // 500, label


def test_golden_states_dequantize_by_the_format(goldens):
    for entry in goldens["quant4"]:
        state = F.QuantState.from_dict(entry["quant_state_packed"])
        result = F.dequantize_4bit(entry["packed"], state)
        assert result.dtype == entry["A"].dtype and result.shape == entry["A"].shape
        expected = _expected_dequant(entry["packed"], state)
        assert torch.equal(result, expected)
        if entry["A"].dim() == 1:
            # bitsandbytes' CPU dequantize indexes absmax per row for 2-D tensors whose rows
            # are not whole blocks, so only its 1-D golden dequant follows the format.
            assert torch.equal(result, entry["dequant"])


def test_golden_packed_state_round_trips_byte_for_byte(goldens):
    for entry in goldens["quant4"]:
        packed_dict = entry["quant_state_packed"]
        again = F.QuantState.from_dict(packed_dict).as_dict(packed=True)
        assert list(again) == list(packed_dict)
        assert all(torch.equal(again[k], v) and again[k].dtype == v.dtype for k, v in packed_dict.items())


# ---------------------------------------------------------------------- quality bars
def _round_trip_errors(A, **kwargs):
    packed, state = F.quantize_4bit(A, **kwargs)
    return mean_errors(A, F.dequantize_4bit(packed, state)), state


@pytest.mark.parametrize(("quant_type", "blocksize"), sorted(FOUR_BIT_RANDN))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_error_bounds(quant_type, blocksize, dtype):
    A = _seeded(1024, 1024, seed=blocksize, dtype=dtype)
    errors, _ = _round_trip_errors(A, blocksize=blocksize, quant_type=quant_type)
    bar = FOUR_BIT_RANDN[(quant_type, blocksize)]
    assert errors.abs_err < bar.abs_err * FOUR_BIT_SEED_SLACK
    assert errors.rel_err < bar.rel_err * FOUR_BIT_SEED_SLACK


@pytest.mark.parametrize(("quant_type", "blocksize"), sorted(FOUR_BIT_RANDN))
def test_nested_error_bounds(quant_type, blocksize):
    A = _seeded(1024, 1024, seed=blocksize + 1)
    plain, _ = _round_trip_errors(A, blocksize=blocksize, quant_type=quant_type)
    nested, state = _round_trip_errors(A, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2.blocksize == 256
    assert nested.abs_err <= plain.abs_err * NESTED_4BIT_COST and nested.rel_err <= plain.rel_err * NESTED_4BIT_COST
    bar = FOUR_BIT_RANDN[(quant_type, blocksize)]
    if bar.abs_err < NESTED_4BIT_RANDN.abs_err and bar.rel_err < NESTED_4BIT_RANDN.rel_err:
        assert nested.abs_err < NESTED_4BIT_RANDN.abs_err and nested.rel_err < NESTED_4BIT_RANDN.rel_err
    else:
        assert nested.abs_err < bar.abs_err * FOUR_BIT_SEED_SLACK and nested.rel_err < bar.rel_err * FOUR_BIT_SEED_SLACK


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_in_every_dtype(dtype, quant_type):
    A = _seeded(300, 257, seed=5, dtype=dtype)
    packed, state = F.quantize_4bit(A, blocksize=64, quant_type=quant_type, compress_statistics=True)
    back = F.dequantize_4bit(packed, state)
    assert back.dtype == dtype and back.shape == A.shape
    assert torch.equal(back, _expected_dequant(packed, state))
    bar = FOUR_BIT_RANDN[(quant_type, 64)]
    assert mean_errors(A, back).abs_err < bar.abs_err * FOUR_BIT_SEED_SLACK


@pytest.mark.parametrize("source", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_into_another_dtype_casts_the_float32_product(source, quant_type):
    A = _seeded(33, 64, seed=15, dtype=source)
    packed, state = F.quantize_4bit(A, quant_type=quant_type, compress_statistics=True)
    as_float32 = copy.copy(state)
    as_float32.dtype = torch.float32
    product = _expected_dequant(packed, as_float32)  # table[code] * absmax, in float32
    for target in DTYPES:
        out = torch.empty(33, 64, dtype=target)
        assert F.dequantize_4bit(packed, state, out=out) is out
        assert torch.equal(out, product.to(target)), target  # one rounding, from float32


# -------------------------------------------------------------------- exact numerics
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_are_the_nearest_with_ties_to_the_lower_index(quant_type):
    table = F.get_4bit_type(quant_type)
    ordered = table.double().unique()
    midpoints = ((ordered[:-1] + ordered[1:]) / 2).float()
    exact = midpoints.double() == (ordered[:-1] + ordered[1:]) / 2
    # One block per value, each block scaled by a max of exactly 1.0, so x / absmax == x.
    values = torch.cat([midpoints[exact], torch.rand(3000, generator=torch.Generator().manual_seed(1)) * 2 - 1, table])
    A = torch.stack([values, torch.ones_like(values)], dim=1)
    packed, _ = F.quantize_4bit(A, blocksize=32, quant_type=quant_type)
    codes = _unpack(packed, A.numel()).view(-1, 2)[:, 0]
    nearest = (table[None, :].double() - values[:, None].double()).abs().argmin(dim=1)  # first index on ties
    assert torch.equal(codes, nearest)


def test_packing_layout_high_nibble_first_and_odd_padding():
    nf4 = F.get_4bit_type("nf4")
    # Values exactly on table entries with absmax 1: codes 15, 0, 7, 8, 3.
    A = nf4[[15, 0, 7, 8, 3]]
    packed, state = F.quantize_4bit(A, blocksize=64, quant_type="nf4")
    assert packed.shape == (3, 1) and packed.dtype == torch.uint8
    assert packed.view(-1).tolist() == [0xF0, 0x78, 0x37]  # last low nibble: the code of 0.0 (7)
    fp4_packed, _ = F.quantize_4bit(torch.tensor([1.0, -1.0, 0.5]), blocksize=64, quant_type="fp4")
    assert fp4_packed.view(-1).tolist() == [0x3B, 0x50]  # fp4 pads with code 0 (+0)
    assert torch.equal(F.dequantize_4bit(packed, state), A)


@pytest.mark.parametrize("storage", STORAGES, ids=str)
@pytest.mark.parametrize("numel", [4096, 1001, 10, 1])
def test_quant_storage_views_the_same_bytes(storage, numel):
    A = _seeded(numel, seed=numel)
    reference, _ = F.quantize_4bit(A, blocksize=64, quant_type="nf4")
    packed, state = F.quantize_4bit(A, blocksize=64, quant_type="nf4", quant_storage=storage)
    itemsize = packed.element_size()
    nbytes = (numel + 1) // 2
    assert packed.dtype == storage and packed.shape == (-(-nbytes // itemsize), 1)
    raw = packed.reshape(-1).view(torch.uint8)
    # The same bytes, zero-padded to whole storage elements: nothing is dropped.
    assert torch.equal(raw[:nbytes], reference.view(-1))
    assert not raw[nbytes:].any()
    assert torch.equal(F.dequantize_4bit(packed, state), F.dequantize_4bit(reference, state))


def test_shapes_partial_blocks_and_empty():
    for shape in [(3, 5, 7), (1,), (2, 63), (0, 4)]:
        A = _seeded(*shape, seed=2)
        packed, state = F.quantize_4bit(A, blocksize=32, quant_type="nf4", compress_statistics=True)
        assert state.shape == A.shape and state.absmax.numel() == -(-A.numel() // 32)
        back = F.dequantize_4bit(packed, state)
        assert back.shape == A.shape and torch.equal(back, _expected_dequant(packed, state))


def test_zero_block_is_zero_and_non_finite_stays_in_its_block():
    A = _seeded(4, 64, seed=3)
    A[0] = 0.0
    A[2, 5] = float("nan")
    A[3, 9] = float("inf")
    for quant_type in ("nf4", "fp4"):
        packed, state = F.quantize_4bit(A, blocksize=64, quant_type=quant_type)
        back = F.dequantize_4bit(packed, state)
        assert torch.equal(back[0], torch.zeros(64))
        assert torch.isfinite(back[1]).all()
        assert not torch.isfinite(back[2]).all() and not torch.isfinite(back[3]).all()


def test_dequantize_without_state_aliases_and_buffers():
    A = _seeded(10, 64, seed=4)
    packed, state = F.quantize_nf4(A, blocksize=128)
    assert state.quant_type == "nf4"
    out = torch.empty(10, 64)
    result = F.dequantize_4bit(packed, absmax=state.absmax, out=out, blocksize=128, quant_type="nf4")
    assert result is out and torch.equal(out, F.dequantize_nf4(packed, state))
    assert torch.equal(F.dequantize_nf4(packed, absmax=state.absmax, out=torch.empty(10, 64), blocksize=128), out)
    fp4_packed, fp4_state = F.quantize_fp4(A)
    assert fp4_state.quant_type == "fp4" and fp4_state.blocksize == 64
    assert torch.equal(F.dequantize_fp4(fp4_packed, fp4_state), F.dequantize_4bit(fp4_packed, fp4_state))
    # Caller-provided buffers receive the results.
    packed_buffer, absmax_buffer = torch.empty_like(packed), torch.empty(5)
    got, got_state = F.quantize_4bit(A, absmax=absmax_buffer, out=packed_buffer, blocksize=128, quant_type="nf4")
    assert got is packed_buffer and torch.equal(got, packed) and torch.equal(absmax_buffer, state.absmax)


@pytest.mark.parametrize("storage", [torch.uint8, torch.float32], ids=str)
def test_a_bad_absmax_buffer_leaves_the_out_buffer_untouched(storage):
    A = _seeded(10, 64, seed=7)
    good_out = F.quantize_4bit(A, blocksize=128, quant_storage=storage)[0].fill_(7)
    bad_absmax = torch.full((4,), 7.0)  # 5 blocks of 128
    with pytest.raises(KbitValueError, match="absmax"):
        F.quantize_4bit(A, absmax=bad_absmax, out=good_out, blocksize=128, quant_storage=storage)
    assert torch.all(good_out == 7) and torch.all(bad_absmax == 7.0)


def test_row_oriented_packed_input_gives_the_transposed_result():
    W = _seeded(16, 64, seed=6)
    packed, state = F.quantize_4bit(W, quant_type="nf4")
    assert torch.equal(F.dequantize_4bit(packed.t(), state), F.dequantize_4bit(packed, state).t())


# -------------------------------------------------------------------------- gemv
def test_gemv_4bit_matches_the_dequantized_product():
    W = _seeded(48, 128, seed=7, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    weight = F.dequantize_4bit(packed, state)
    for shape in [(128,), (1, 128), (1, 1, 128)]:
        x = _seeded(*shape, seed=8, dtype=torch.bfloat16)
        got = F.gemv_4bit(x, packed.t(), state=state)
        assert got.shape == (*shape[:-1], 48) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight))
    with pytest.raises(KbitValueError, match="single row"):
        F.gemv_4bit(_seeded(2, 128), packed, state=state)
    with pytest.raises(KbitValueError, match="state"):
        F.gemv_4bit(_seeded(128), packed)
    with pytest.raises(KbitValueError, match="in_features=128"):
        F.gemv_4bit(_seeded(64), packed, state=state)


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "argument", "error"),
    [
        ({"A": torch.zeros(64, dtype=torch.float64)}, "A", KbitTypeError),
        ({"A": torch.zeros(64, dtype=torch.int32)}, "A", KbitTypeError),
        ({"blocksize": 16}, "blocksize", KbitValueError),
        ({"blocksize": 100}, "blocksize", KbitValueError),
        ({"blocksize": 8192}, "blocksize", KbitValueError),
        ({"quant_type": "int4"}, "quant_type", KbitValueError),
        ({"quant_storage": torch.int8}, "quant_storage", KbitValueError),
        ({"out": torch.empty(3, 1, dtype=torch.uint8)}, "out", KbitValueError),
    ],
)
def test_quantize_rejects_bad_arguments(kwargs, argument, error):
    arguments = {"A": torch.randn(64)} | kwargs
    with pytest.raises(error, match=f"quantize_4bit: {argument}"):
        F.quantize_4bit(**arguments)


def test_dequantize_rejects_mismatched_states():
    A = _seeded(8, 64, seed=9)
    packed, state = F.quantize_4bit(A, quant_type="nf4")
    other_packed, other_state = F.quantize_4bit(_seeded(8, 32), quant_type="nf4")
    with pytest.raises(QuantStateError, match="dequantize_4bit: A: .* cannot hold the 4-bit codes"):
        F.dequantize_4bit(packed, other_state)
    with pytest.raises(QuantStateError, match="cannot hold the 4-bit codes"):
        F.dequantize_4bit(other_packed, state)
    with pytest.raises(QuantStateError, match="A: dtype torch.int8"):
        F.dequantize_4bit(packed.view(torch.int8), state)
    codes8, state8 = F.quantize_blockwise(A)
    with pytest.raises(KbitValueError, match="quant_state.quant_type=None"):
        F.dequantize_4bit(packed, state8)
    with pytest.raises(KbitTypeError, match="quant_state"):
        F.dequantize_4bit(packed, (state.absmax, state.code))
    with pytest.raises(KbitValueError, match="quant_state"):
        F.dequantize_4bit(packed)  # neither a state nor absmax + out
    truncated = F.QuantState(state.absmax[:-1], shape=state.shape, blocksize=64, quant_type="nf4", dtype=torch.float32)
    with pytest.raises(QuantStateError, match="quant_state.absmax: holds 7 values"):
        F.dequantize_4bit(packed, truncated)
    out = torch.full((8, 32), 7.0)
    with pytest.raises(KbitValueError, match="out"):
        F.dequantize_4bit(packed, state, out=out)
    assert torch.all(out == 7.0)  # a rejected buffer is not written


# ----------------------------------------------------------------- ops and compile
def _op_samples():
    A = _seeded(33, 64, seed=10)
    packed, state = F.quantize_4bit(A, quant_type="nf4")
    packed16, state16 = F.quantize_4bit(A, blocksize=32, quant_type="fp4", quant_storage=torch.bfloat16)
    x = _seeded(5, 64, seed=11)
    return {
        "quantize_4bit": [
            (A, 64, "nf4", torch.uint8),
            (_seeded(7, 9, dtype=torch.bfloat16), 32, "fp4", torch.float32),
            (_seeded(5, dtype=torch.float16), 128, "nf4", torch.float16),
        ],
        "dequantize_4bit": [
            (packed, state.absmax, 64, "nf4", [33, 64], torch.float32),
            (packed16, state16.absmax, 32, "fp4", [33, 64], torch.bfloat16),
        ],
        "gemv_4bit": [(_seeded(1, 64, seed=12), packed, state.absmax, 64, "nf4", [33, 64])],
        "matmul_4bit": [
            (x, packed, state.absmax, 64, "nf4", [33, 64]),
            (_seeded(2, 3, 64, seed=13, dtype=torch.bfloat16), packed16, state16.absmax, 32, "fp4", [33, 64]),
        ],
    }


@pytest.mark.parametrize("op_name", ["quantize_4bit", "dequantize_4bit", "gemv_4bit", "matmul_4bit"])
def test_opcheck(op_name):
    op = getattr(torch.ops.kbit, op_name).default
    for args in _op_samples()[op_name]:
        if op_name in ("gemv_4bit", "matmul_4bit"):
            args = (args[0].clone().requires_grad_(), *args[1:])  # exercises the autograd formula
        opcheck(op, args)


@pytest.mark.slow
def test_quantize_round_trip_compiles_without_graph_breaks():
    def round_trip(x):
        packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
        return F.dequantize_4bit(packed, state)

    x = _seeded(16, 256, seed=14)
    compiled = torch.compile(round_trip, fullgraph=True)
    # Inductor may sum the absmax mean in another order: the offset can move by an ulp.
    torch.testing.assert_close(compiled(x), round_trip(x), rtol=1e-5, atol=1e-6)


def test_every_quant4_op_is_served_by_the_reference():
    for op in ("quantize_4bit", "dequantize_4bit", "gemv_4bit", "matmul_4bit"):
        resolution = kbit.backends.resolve(op, "cpu", dtype=torch.bfloat16, blocksize=4096, quant_type="fp4")
        assert resolution.name == "reference" and not resolution.fallback


# ------------------------------------------------------------------------ self-test


class SwappedNibbles(ReferenceBackend):
    """A deliberately wrong backend: nibbles swapped, and dequantization one ulp off."""

    def quantize_4bit(self, A, **kwargs):
        packed, absmax = super().quantize_4bit(A, **kwargs)
        raw = packed.reshape(-1).view(torch.uint8)
        return (raw % 16 * 16 + raw // 16).view(packed.dtype).reshape(packed.shape), absmax

    def dequantize_4bit(self, A, **kwargs):
        out = super().dequantize_4bit(A, **kwargs)
        return torch.nextafter(out, torch.full_like(out, float("inf")))


@pytest.mark.parametrize(("factory", "status"), [("SwappedNibbles", "failed"), ("ReferenceBackend", "passed")])
def test_kbit_check_compares_4bit_ops_with_the_reference(factory, status):
    module = "tests.test_quant4" if factory == "SwappedNibbles" else "kbit_reference.backend"
    support = OpSupport(dtypes=("float32", "bfloat16"), quant_storages=("uint8", "float32"))
    kbit.backends.register(
        BackendManifest(
            name="candidate",
            api_version=API_VERSION,
            device_types=("cpu",),
            factory=f"{module}:{factory}",
            ops={"quantize_4bit": support, "dequantize_4bit": support},
        )
    )
    results = run_checks(kbit.backends.get("candidate"), kbit.backends.get("reference"))
    assert {r.op: r.status for r in results} == {"quantize_4bit": status, "dequantize_4bit": status}


@pytest.mark.parametrize("poison", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("nested_8bit", [False, True], ids=["4bit", "8bit"])
def test_nested_absmax_confines_non_finite_values_to_their_nested_block(poison, nested_8bit):
    # 2 nested blocks of 256 scales (blocksize 64): poison one value in the first.
    A = _seeded(2 * 256 * 64, seed=40)
    A[100] = poison
    if nested_8bit:
        codes, state = F.quantize_blockwise(A, blocksize=64, nested=True)
        back = F.dequantize_blockwise(codes, state)
        plain = F.dequantize_blockwise(*F.quantize_blockwise(A, blocksize=64))
    else:
        codes, state = F.quantize_4bit(A, blocksize=64, compress_statistics=True, quant_type="nf4")
        back = F.dequantize_4bit(codes, state)
        plain = F.dequantize_4bit(*F.quantize_4bit(A, blocksize=64, quant_type="nf4"))
    assert torch.isfinite(state.offset)  # the mean is over finite scales only
    assert not torch.isfinite(back[64:128]).all()  # the poisoned block stays visibly poisoned
    second = slice(256 * 64, None)
    assert torch.isfinite(back[second]).all()
    assert (back[second] - plain[second]).abs().mean() < 0.01 * plain[second].abs().mean()


# ---------------------------------------------------------------- expanded nested absmax
def _scales_used(state) -> torch.Tensor:
    """The float32 scales a 4-bit op is given for ``state`` (expanded once, then cached)."""
    from kbit.functional._blockwise import _float_absmax

    return _float_absmax("test", state, None)


def _expanded_now(state) -> torch.Tensor:
    """The nested absmax expanded from scratch (``state2`` itself is never nested)."""
    return F.dequantize_blockwise(state.absmax, state.state2) + state.offset


def _nested_state(seed: int = 50):
    return F.quantize_4bit(_seeded(96, 256, seed=seed), blocksize=64, quant_type="nf4", compress_statistics=True)


def test_a_nested_absmax_is_expanded_once_per_state():
    packed, state = _nested_state()
    first = _scales_used(state)
    assert _scales_used(state) is first and torch.equal(first, _expanded_now(state))
    _, other = _nested_state(seed=51)
    assert not torch.equal(_scales_used(other), first)


def _write_codes_in_place(state):
    state.absmax.copy_(state.absmax.flip(0))


def _replace_codes(state):
    state.absmax = state.absmax.flip(0)


def _reassign_codes_data(state):
    state.absmax.data = state.absmax.flip(0)


def _write_nested_absmax_in_place(state):
    state.state2.absmax.mul_(2)


def _replace_nested_absmax(state):
    state.state2.absmax = state.state2.absmax * 2


def _write_offset_in_place(state):
    state.offset.add_(1)


def _replace_offset(state):
    state.offset = state.offset + 1


def _write_nested_code_in_place(state):
    with torch.no_grad():
        state.state2.code[200:] = state.state2.code[200:] * 0.5


def _replace_nested_state(state):
    state.state2 = copy.deepcopy(state.state2)
    state.state2.absmax.mul_(3)


@pytest.mark.parametrize(
    "change",
    [_write_codes_in_place, _replace_codes, _reassign_codes_data, _write_nested_absmax_in_place,
     _replace_nested_absmax, _write_offset_in_place, _replace_offset, _write_nested_code_in_place,
     _replace_nested_state],
)  # fmt: skip
def test_a_changed_nested_state_is_expanded_again(change):
    packed, state = _nested_state()
    # The state's own copy of the nested code table: the one quantize_4bit put there is
    # kbit's shared, cached dynamic map, which an in-place write would change for everyone.
    state.state2.code = state.state2.code.clone()
    A = _seeded(2, 256, seed=52)
    before = _scales_used(state).clone()
    kbit.matmul_4bit(A, packed.t(), state)  # the product fills the cache too
    change(state)
    now = _expanded_now(state)
    assert not torch.equal(now, before)
    assert torch.equal(_scales_used(state), now)
    # and the products use the new scales: the same as a state that never had a cache
    fresh = copy.deepcopy(state)
    assert torch.equal(kbit.matmul_4bit(A, packed.t(), state), kbit.matmul_4bit(A, packed.t(), fresh))
    assert torch.equal(F.dequantize_4bit(packed, state), F.dequantize_4bit(packed, fresh))


def test_the_expanded_absmax_is_never_part_of_the_state():
    import pickle

    from kbit.functional._quant_state import EXPANDED_ABSMAX

    packed, state = _nested_state()
    _scales_used(state)
    assert EXPANDED_ABSMAX in state.__dict__
    assert EXPANDED_ABSMAX not in copy.deepcopy(state).__dict__
    assert EXPANDED_ABSMAX not in pickle.loads(pickle.dumps(state)).__dict__
    assert set(state.as_dict()) == set(copy.deepcopy(state).as_dict()) and state == copy.deepcopy(state)
    state.to("cpu")  # a move drops it (the tensors are others now)
    assert EXPANDED_ABSMAX not in state.__dict__


def test_scales_cached_in_inference_mode_serve_a_training_step():
    # Inference tensors cannot be saved for backward: the cache holds a normal tensor.
    packed, state = _nested_state()
    A = _seeded(3, 256, seed=53)
    with torch.inference_mode():
        kbit.matmul_4bit(A, packed.t(), state)
    assert not _scales_used(state).is_inference()
    A.requires_grad_(True)
    kbit.matmul_4bit(A, packed.t(), state).square().sum().backward()
    weight = F.dequantize_4bit(packed, state)
    torch.testing.assert_close(A.grad, 2 * (A.detach() @ weight.T) @ weight)


def test_no_cache_while_tracing_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kbit.functional._quant_state import EXPANDED_ABSMAX

    packed, state = _nested_state()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_packed = mode.from_tensor(packed)
        fake_state = F.QuantState(mode.from_tensor(state.absmax), shape=state.shape, code=mode.from_tensor(state.code),
                                  blocksize=64, quant_type="nf4", dtype=torch.float32,
                                  offset=mode.from_tensor(state.offset), state2=copy.copy(state.state2))  # fmt: skip
        fake_state.state2.absmax = mode.from_tensor(state.state2.absmax)
        fake_state.state2.code = mode.from_tensor(state.state2.code)
        out = kbit.matmul_4bit(mode.from_tensor(_seeded(2, 256)), fake_packed.t(), fake_state)
    assert out.shape == (2, 96) and EXPANDED_ABSMAX not in fake_state.__dict__


def test_a_state_quantized_in_inference_mode_is_expanded_on_every_call():
    # Inference tensors have no version counter to key a cache on: such a state is used
    # uncached, in inference mode and after it, and an in-place write there is seen.
    from kbit.functional._quant_state import EXPANDED_ABSMAX

    with torch.inference_mode():
        packed, state = _nested_state()
        state.state2.code = state.state2.code.clone()  # its own table, written below
        A = _seeded(2, 256, seed=54)
        first = kbit.matmul_4bit(A, packed.t(), state)
        state.state2.code[200:] *= 0.5
        assert not torch.equal(kbit.matmul_4bit(A, packed.t(), state), first)
    assert EXPANDED_ABSMAX not in state.__dict__
    with torch.no_grad():
        assert torch.equal(kbit.matmul_4bit(A, packed.t(), state), kbit.matmul_4bit(A, packed.t(), copy.deepcopy(state)))
    assert EXPANDED_ABSMAX not in state.__dict__
