"""The native CPU backend (plugins/kbit-cpu), installed next to kbit as the README does.

The conformance suite runs once per instruction set the CPU supports (the default one in
the quick suite, the others marked slow), and the tests below go where its seeded cases do
not: every decision bound of the code tables and its float neighbours, both search
methods of the code lookup, large inputs split between threads, the activations' layouts
of the 4-bit matmul, and how the backend reports itself when its library cannot run.

Without the plugin installed these tests skip, saying why; with ``KBIT_CPU_REQUIRE_NATIVE=1``
(CI) a missing or unusable library fails them instead.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kbit
import kbit.functional as F
from kbit.functional import create_dynamic_map, create_fp8_map, create_linear_map
from kbit.functional._codebooks import cached_code
from kbit.testing import BackendConformance
from kbit.testing.tolerances import CONFORMANCE


def _native_problem() -> str | None:
    try:
        import kbit_cpu.backend
    except ImportError as exc:
        return f"kbit-cpu is not installed ({exc}); pip install ./plugins/kbit-cpu"
    answer = kbit_cpu.backend.CpuBackend().is_available()
    return None if answer is True else str(answer)


_PROBLEM = _native_problem()
if _PROBLEM is not None:
    if os.environ.get("KBIT_CPU_REQUIRE_NATIVE") == "1":
        raise RuntimeError(f"KBIT_CPU_REQUIRE_NATIVE=1 but the native CPU backend cannot run: {_PROBLEM}")
    pytest.skip(_PROBLEM, allow_module_level=True)

from kbit_cpu import _library  # noqa: E402
from kbit_cpu._manifest import MANIFEST  # noqa: E402
from kbit_cpu.backend import CpuBackend  # noqa: E402

LIBRARY = _library.load()
ISAS = LIBRARY.supported_isas.split(",")
DEFAULT_ISA = LIBRARY.isa


class TestCpuConformance(BackendConformance):
    """The conformance suite on the instruction set this CPU runs by default."""

    backend = "cpu"
    device = "cpu"
    manifest = MANIFEST


def _isa_class(isa: str) -> type:
    class Conformance(BackendConformance):
        backend = "cpu"
        device = "cpu"
        manifest = MANIFEST

        @pytest.fixture(autouse=True)
        def _instruction_set(self):
            with LIBRARY.use_isa(isa):
                yield

    Conformance.__name__ = Conformance.__qualname__ = f"TestCpuConformance_{isa}"
    return pytest.mark.slow(Conformance)


for _isa in ISAS:
    if _isa != DEFAULT_ISA:
        globals()[f"TestCpuConformance_{_isa}"] = _isa_class(_isa)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def cpu():
    """The plugin registered (installed plugins are disabled for every test by conftest)."""
    kbit.backends.register(MANIFEST, replace=True)
    return kbit.backends.get("cpu")


@pytest.fixture(params=ISAS)
def isa(request, cpu):
    """Each instruction set this CPU runs, in turn."""
    with LIBRARY.use_isa(request.param):
        yield request.param


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-for-bit equal values, NaN matching NaN (as the conformance suite compares)."""
    return got.dtype == want.dtype and got.shape == want.shape and bool(((got == want) | (got.isnan() & want.isnan())).all())


def _on(backend: str, fn, *args, **kwargs):
    with kbit.backends.use_backend(backend, fallback="error"):
        return fn(*args, **kwargs)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mixed_magnitudes(numel: int, seed: int) -> torch.Tensor:
    """randn scaled per element over twelve decades, so every code range is visited."""
    g = _generator(seed)
    return torch.randn(numel, generator=g) * torch.pow(10.0, torch.rand(numel, generator=g) * 12 - 9)


def _neighbours_of_bounds(code: torch.Tensor) -> torch.Tensor:
    """Every midpoint between neighbouring code values, each with its float32 neighbours
    on both sides, plus 1.0 so that a block containing them has absmax 1."""
    values = code.to(torch.float64).unique()
    mids = ((values[:-1] + values[1:]) / 2).to(torch.float32)
    up = torch.nextafter(mids, torch.full_like(mids, math.inf))
    down = torch.nextafter(mids, torch.full_like(mids, -math.inf))
    return torch.cat([torch.ones(1), mids, up, down, up.nextafter(torch.full_like(up, math.inf))])


#: Tables of every shape the code search meets: the default and optimizer maps, a short
#: linear map padded with zeros (duplicates, so codes are not positions), an FP8-style
#: map, and a table crowded into one float bucket (searched by bisection, not buckets).
TABLES = {
    "dynamic": create_dynamic_map(),
    "unsigned": create_dynamic_map(signed=False),
    "linear-padded": torch.sort(create_linear_map(signed=True, total_bits=7)).values,
    "fp8": create_fp8_map(),
    "crowded": torch.sort(1.0 + torch.arange(256, dtype=torch.float32) * 2.0**-22).values / (1.0 + 255 * 2.0**-22),
}


# ------------------------------------------------------------------ 8-bit exactness
@pytest.mark.parametrize("table", sorted(TABLES))
def test_code_search_is_exact_at_every_bound(isa, table):
    code = TABLES[table]
    values = _neighbours_of_bounds(code)
    got_codes, got_state = _on("cpu", F.quantize_blockwise, values, code=code, blocksize=4096)
    want_codes, want_state = _on("reference", F.quantize_blockwise, values, code=code, blocksize=4096)
    assert torch.equal(got_state.absmax, want_state.absmax)
    assert torch.equal(got_codes, want_codes), (got_codes != want_codes).nonzero()[:5]


def test_the_crowded_table_needs_bisection_and_the_others_do_not():
    from kbit_cpu._codebook import CodebookCache

    cache = CodebookCache(LIBRARY)
    steps = {name: LIBRARY.kb_codebook_steps(_address(cache.get("test", code))) for name, code in TABLES.items()}
    assert steps["crowded"] == -1 and all(0 <= steps[name] <= 2 for name in steps if name != "crowded"), steps


def _address(entry) -> int:
    import ctypes

    return ctypes.addressof(entry)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_quantize_blockwise_matches_the_reference_on_large_mixed_inputs(isa, dtype, blocksize):
    values = _mixed_magnitudes(200_003, seed=blocksize).to(dtype)
    values[7] = math.nan
    values[blocksize + 1] = -math.inf
    for code in (TABLES["dynamic"], TABLES["linear-padded"]):
        got = _on("cpu", F.quantize_blockwise, values, code=code, blocksize=blocksize)
        want = _on("reference", F.quantize_blockwise, values, code=code, blocksize=blocksize)
        assert _same(got[1].absmax, want[1].absmax)
        assert torch.equal(got[0], want[0])
        for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
            got[1].dtype = want[1].dtype = out_dtype
            assert _same(_on("cpu", F.dequantize_blockwise, *got), _on("reference", F.dequantize_blockwise, *want))


def test_whole_tensor_and_code_only_quantization_match_the_reference(isa):
    values = _mixed_magnitudes(100_000, seed=3)
    (codes, (absmax, _)), (want_codes, (want_absmax, _)) = _on("cpu", F.quantize, values), _on("reference", F.quantize, values)
    assert torch.equal(codes, want_codes) and torch.equal(absmax, want_absmax)
    normalised = values / values.abs().max() * 1.1  # a little beyond [-1, 1]: the end codes
    code = create_dynamic_map()
    assert torch.equal(_on("cpu", F.quantize_no_absmax, normalised, code), _on("reference", F.quantize_no_absmax, normalised, code))


def test_stochastic_rounding_matches_the_reference_for_a_given_rand(isa):
    values = _mixed_magnitudes(50_000, seed=4)
    for rand in (torch.rand(50_000, generator=_generator(5)), torch.rand(1024, generator=_generator(6))):
        got = _on("cpu", F.quantize_blockwise, values, blocksize=256, rand=rand)
        want = _on("reference", F.quantize_blockwise, values, blocksize=256, rand=rand)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1].absmax, want[1].absmax)


def test_a_code_table_made_in_inference_mode_serves_in_and_after_it(cpu):
    # Inference tensors have no version counter: the prepared-table cache looks them up by
    # content each time, so a table written in place in inference mode is seen at once.
    values = torch.randn(3000, generator=_generator(40))
    with torch.inference_mode():
        code = create_dynamic_map()
        first = _on("cpu", F.quantize_blockwise, values, code=code, blocksize=256)[0]
        assert torch.equal(first, _on("reference", F.quantize_blockwise, values, code=code, blocksize=256)[0])
        code.copy_(create_dynamic_map(signed=False))
        second = _on("cpu", F.quantize_blockwise, values, code=code, blocksize=256)[0]
        assert torch.equal(second, _on("reference", F.quantize_blockwise, values, code=code, blocksize=256)[0])
    assert not torch.equal(first, second)
    again = _on("cpu", F.quantize_blockwise, values, code=code, blocksize=256)[0]
    assert torch.equal(again, second)


# --------------------------------------------------------- 8-bit code search methods
def _prepared(code: torch.Tensor, *, compact: bool = True):
    """``code`` prepared by the library, with its compact index or made to do without it."""
    import ctypes

    entry = ctypes.create_string_buffer(LIBRARY.codebook_size)
    table = code.to(torch.float32).contiguous()
    assert LIBRARY.kb_codebook_init(ctypes.addressof(entry), table.data_ptr(), table.numel()) == 0
    if not compact:
        LIBRARY.kb_codebook_drop_compact(ctypes.addressof(entry))
    return entry


def _search(entry, values: torch.Tensor, threads: int = 2) -> torch.Tensor:
    """The codes of float32 ``values`` as they are (quantize_no_absmax) with a prepared table."""
    import ctypes

    codes = torch.empty(values.shape, dtype=torch.uint8)
    LIBRARY.kb_quantize_no_absmax(values.data_ptr(), 0, values.numel(), ctypes.addressof(entry), codes.data_ptr(),
                                  threads)  # fmt: skip
    return codes


def _floats(bits: list[int]) -> torch.Tensor:
    """float32 values from their bit patterns (given as unsigned 32-bit integers)."""
    signed = [b - (1 << 32) if b >= 1 << 31 else b for b in bits]
    return torch.tensor(signed, dtype=torch.int64).to(torch.int32).view(torch.float32)


def _search_probes(code: torch.Tensor) -> torch.Tensor:
    """Values that every search method must get right: both sides of each bound (exact ties
    included), the edges of every 16-bit bucket of both signs (the compact index clamps
    and splits there), zeros, subnormals, infinities, NaNs of both signs, the largest
    floats, and a sweep over all float32 bit patterns."""
    edges = [key << 16 | low for key in range(0x8000) for low in (0, 1, 0xFFFE, 0xFFFF)]
    edges += [1 << 31 | bits for bits in edges]
    special = [0x0, 0x80000000, 0x1, 0x80000001, 0x7FFFFF, 0x807FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000,
               0xFFC00000, 0x7F800001, 0xFF812345, 0x7F7FFFFF, 0xFF7FFFFF]  # fmt: skip
    sweep = list(range(0, 1 << 32, 4099))
    bounds = _neighbours_of_bounds(code)
    return torch.cat([bounds, -bounds, _floats(edges + special + sweep)])


#: A table beyond the format's: 256 random values (sorted, as the API requires of a table).
SEARCH_TABLES = TABLES | {"random": torch.randn(256, generator=_generator(22)).sort().values}


@pytest.mark.parametrize("table", sorted(SEARCH_TABLES))
def test_every_search_method_matches_the_reference(isa, table):
    code = SEARCH_TABLES[table]
    values = _search_probes(code)
    want = _on("reference", F.quantize_no_absmax, values, code)
    compact = _prepared(code)
    assert torch.equal(_search(compact, values), want), table
    assert torch.equal(_search(_prepared(code, compact=False), values), want), table


def test_the_format_tables_get_a_compact_index_and_crowded_ones_do_not():
    import ctypes

    def compact_size(code: torch.Tensor) -> int:
        return LIBRARY.kb_codebook_compact_size(ctypes.addressof(_prepared(code)))

    for name in ("dynamic", "unsigned", "linear-padded", "fp8"):
        assert compact_size(SEARCH_TABLES[name]) > 0, name
    for quant_type in ("nf4", "fp4"):
        assert compact_size(cached_code(quant_type)) > 0, quant_type
    three_in_one_bucket = torch.tensor([1.0, 1.001, 1.002, 1.003])  # bounds 2^-7 apart at most
    with_infinity = torch.tensor([-1.0, 0.0, 1.0, math.inf])
    for code in (TABLES["crowded"], three_in_one_bucket, with_infinity, torch.zeros(256)):
        assert compact_size(code) == 0, code[:4]
    # (test_every_search_method_matches_the_reference searches the crowded table exactly)


def _odd_table() -> torch.Tensor:
    """256 finite float32 values of every kind a lookup must move unchanged (the API refuses
    infinities and NaN in a table): signed zeros, subnormals, the largest floats and random
    bit patterns."""
    values = torch.randint(-(1 << 31), 1 << 31, (256,), generator=_generator(23), dtype=torch.int64)
    table = values.to(torch.int32).view(torch.float32).clone()
    table[~table.isfinite()] = 0.5
    table[:8] = _floats([0x0, 0x80000000, 0x1, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x00800000, 0x3F800000])
    return table


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dequantize_blockwise_moves_any_table_value_exactly(isa, blocksize, dtype):
    # The byte-permute lookup (avx512vbmi) handles 64 codes at a time: lengths that are not
    # multiples of 64 and blocks of 64 exercise its edges; every code value occurs.
    codes = torch.randint(0, 256, (64 * 301 + 37,), generator=_generator(blocksize), dtype=torch.uint8)
    absmax = torch.rand(math.ceil(codes.numel() / blocksize), generator=_generator(24)) + 0.5
    for code in (_odd_table(), create_dynamic_map()):
        got, want = (
            _on(backend, F.dequantize_blockwise, codes, absmax=absmax, code=code, blocksize=blocksize,
                out=torch.empty(codes.shape, dtype=dtype))  # fmt: skip
            for backend in ("cpu", "reference")
        )
        assert _same(got, want)


# ------------------------------------------------------------- 8-bit optimizer steps
def _optimizer_hyper(kind: str, **overrides) -> dict:
    from kbit._optim_step import OPTIMIZER_KINDS
    from kbit.testing._cases.optimizer import _hyper

    return _hyper(OPTIMIZER_KINDS[kind], **overrides)


def _blockwise_states(n: int, rows: int, qmap: torch.Tensor, scale: float, seed: int, squared: bool = False):
    """8-bit states as an optimizer holds them (codes and one absmax per 256 elements), and
    their float32 values (never negative for a state of squares)."""
    values = torch.randn(rows, n, generator=_generator(seed)) * scale
    if squared or qmap.min() >= 0:
        values = values.abs()
    codes, absmax, floats = [], [], []
    for row in values:
        c, state = _on("reference", F.quantize_blockwise, row, code=qmap, blocksize=256)
        codes.append(c)
        absmax.append(state.absmax)
        floats.append(_on("reference", F.dequantize_blockwise, c, state))
    return torch.stack(codes).squeeze(0), torch.stack(absmax).squeeze(0), torch.stack(floats).squeeze(0)


def _optimizer_cases() -> list:
    from kbit._optim_step import OPTIMIZER_KINDS
    from kbit_cpu._manifest import KINDS

    cases = [(kind, "blockwise") for kind in KINDS]
    return cases + [(kind, "tensor") for kind in KINDS if OPTIMIZER_KINDS[kind].static_8bit]


@pytest.mark.parametrize("kind,layout", _optimizer_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_an_8bit_step_requantizes_exactly_what_the_32bit_step_computes(isa, kind, layout, dtype):
    # The 8-bit kernels decode the states (byte permutes or gathers), update them with the
    # same code as the 32-bit step, find the new scales while updating and search the
    # codes: their result must be the 32-bit step's on the decoded states, quantized.
    from kbit._optim_step import OPTIMIZER_KINDS

    spec = OPTIMIZER_KINDS[kind]
    two, rows = spec.num_states == 2, 2 if spec.stacked_state1 else 1
    n = 1000  # three blocks of 256 and a partial one; partial vectors at the end
    qmap1, qmap2 = create_dynamic_map(), create_dynamic_map(signed=False)
    g = torch.randn(n, generator=_generator(31)).to(dtype)
    g[::7] = 0.0
    p = (torch.randn(n, generator=_generator(32)) * 0.5).to(dtype)
    codes1, absmax1, floats1 = _blockwise_states(n, rows, qmap1, 1e-2, seed=33, squared=1 in spec.squared_states)
    codes2, absmax2, floats2 = _blockwise_states(n, 1, qmap2, 1e-4, seed=34) if two else (None, None, None)
    extras = dict(weight_decay=0.01, lr=1e-2)
    if layout == "tensor":  # one scale per state; the trust ratio exercises the measuring pass
        max1 = floats1.abs().max().reshape(1)
        codes1 = _on("reference", F.quantize_no_absmax, floats1 / max1, qmap1)
        floats1 = qmap1[codes1.long()] * max1
        if two:
            max2 = floats2.abs().max().reshape(1)
            codes2 = _on("reference", F.quantize_no_absmax, floats2 / max2, qmap2)
            floats2 = qmap2[codes2.long()] * max2
        extras["max_unorm"] = 0.02
    else:
        extras["skip_zeros"] = True
    hyper = _optimizer_hyper(kind, **extras)
    skip_zeros = bool(hyper.pop("skip_zeros"))
    max_unorm = hyper.pop("max_unorm")
    common = dict(beta1=hyper["beta1"], eps=hyper["eps"], step=3, lr=hyper["lr"], weight_decay=hyper["weight_decay"],
                  gnorm_scale=hyper["gnorm_scale"], backend="cpu")  # fmt: skip

    p32, s1, s2 = p.clone(), floats1.clone(), floats2.clone() if two else None
    unorm = torch.zeros(1) if max_unorm > 0 else None
    F.optimizer_update_32bit(kind, g, p32, s1, state2=s2, beta2=hyper["beta2"], beta3=hyper["beta3"],
                             alpha=hyper["alpha"], unorm_vec=unorm, max_unorm=max_unorm, skip_zeros=skip_zeros,
                             **common)  # fmt: skip
    p8, c1, c2 = p.clone(), codes1.clone(), codes2.clone() if two else None
    if layout == "blockwise":
        a1, a2 = absmax1.clone(), absmax2.clone() if two else None
        F.optimizer_update_8bit_blockwise(kind, g, p8, c1, c2, beta2=hyper["beta2"], beta3=hyper["beta3"],
                                          alpha=hyper["alpha"], qmap1=qmap1, qmap2=qmap2 if two else None, absmax1=a1,
                                          absmax2=a2, skip_zeros=skip_zeros, **common)  # fmt: skip
        for got_codes, got_absmax, new, qmap in ((c1, a1, s1, qmap1), (c2, a2, s2, qmap2))[: 1 + two]:
            for row in range(got_codes.shape[0] if got_codes.dim() == 2 else 1):
                want_codes, want = _on("reference", F.quantize_blockwise, new.reshape(-1, n)[row], code=qmap,
                                       blocksize=256)  # fmt: skip
                assert torch.equal(got_codes.reshape(-1, n)[row], want_codes)
                assert torch.equal(got_absmax.reshape(-1, want.absmax.numel())[row], want.absmax)
    else:
        new_max1, new_max2 = torch.zeros(1), torch.zeros(1) if two else None
        unorm8 = torch.zeros(1)
        F.optimizer_update_8bit(kind, g, p8, c1, c2, beta2=hyper["beta2"], qmap1=qmap1, qmap2=qmap2 if two else None,
                                max1=max1, max2=max2 if two else None, new_max1=new_max1, new_max2=new_max2,
                                unorm_vec=unorm8, max_unorm=max_unorm, **common)  # fmt: skip
        assert torch.equal(unorm8, unorm)
        for got_codes, got_max, new, qmap in ((c1, new_max1, s1, qmap1), (c2, new_max2, s2, qmap2))[: 1 + two]:
            assert torch.equal(got_max, new.abs().max().reshape(1))
            assert torch.equal(got_codes, _on("reference", F.quantize_no_absmax, new * (1 / got_max), qmap))
    assert _same(p8, p32)


# ------------------------------------------------------------------ 4-bit exactness
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("numel,blocksize", [(100_001, 64), (70_000, 32), (12_345, 4096)])
def test_4bit_quantization_matches_the_reference(isa, quant_type, dtype, numel, blocksize):
    values = _mixed_magnitudes(numel, seed=numel).to(dtype)
    values[11] = math.nan
    args = {"blocksize": blocksize, "quant_type": quant_type}
    packed, state = _on("cpu", F.quantize_4bit, values, **args)
    want_packed, want_state = _on("reference", F.quantize_4bit, values, **args)
    assert _same(state.absmax, want_state.absmax)
    # FP4's codes 0 and 8 both mean zero: compare what the bytes decode to, bit for bit.
    got_values = _on("reference", F.dequantize_4bit, packed, state)
    assert _same(got_values, _on("reference", F.dequantize_4bit, want_packed, want_state))
    if quant_type == "nf4":
        assert torch.equal(packed, want_packed)
    assert _same(_on("cpu", F.dequantize_4bit, packed, state), got_values)


# ------------------------------------------------------------------------ 4-bit matmul
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 33])
@pytest.mark.parametrize("K", [4096, 48, 100, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matmul_4bit_matches_the_reference(isa, rows, K, dtype):
    # K = 4096 and 48 take the vector path on some instruction sets, 100 and 33 the
    # element-by-element one; more than 32 rows dequantize row tiles and let torch multiply.
    N = 40
    weight = torch.randn(N, K, generator=_generator(K))
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", backend="reference")
    A = (torch.randn(rows, K, generator=_generator(rows)) / math.sqrt(K)).to(dtype)
    bias = torch.randn(N, generator=_generator(2)).to(dtype)
    tolerance = CONFORMANCE["matmul_4bit"]
    for b in (None, bias):
        got = _on("cpu", kbit.matmul_4bit, A, packed.t(), quant_state=state, bias=b)
        want = _on("reference", kbit.matmul_4bit, A, packed.t(), quant_state=state, bias=b)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance.rtol, atol=tolerance.atol)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_one_row_sums_each_block_before_scaling_it(isa, blocksize, dtype):
    # The single-row kernel scales whole blocks; odd row counts exercise the remainder rows.
    N, K = 37, 4096
    packed, state = F.quantize_4bit(torch.randn(N, K, generator=_generator(blocksize)), blocksize=blocksize,
                                    quant_type="fp4", backend="reference")  # fmt: skip
    A = (torch.randn(1, K, generator=_generator(1)) / 64).to(dtype)
    got = _on("cpu", kbit.matmul_4bit, A, packed.t(), quant_state=state)
    want = _on("reference", kbit.matmul_4bit, A, packed.t(), quant_state=state)
    tolerance = CONFORMANCE["gemv_4bit"]
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance.rtol, atol=tolerance.atol)


#: Shapes that reach every layout of the fused kernel (kernels.c, gemm4_layout): K a
#: multiple of 128 (one-row 128-element chunks: blocks of 4096 straddle weight rows at
#: K = 384), of 64 but not 128 (bfloat16 pairs; blocks of 128 then start mid-row), and of
#: neither (element by element).
LAYOUT_KS = [384, 192, 100]


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("K", LAYOUT_KS)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
def test_every_matmul_layout_matches_the_reference(isa, rows, K, blocksize, dtype):
    N = 37  # not a multiple of the 4- and 8-row tiles: the remainder rows run too
    packed, state = F.quantize_4bit(torch.randn(N, K, generator=_generator(K + blocksize)), blocksize=blocksize,
                                    quant_type="nf4", backend="reference")  # fmt: skip
    A = (torch.randn(rows, K, generator=_generator(rows)) / math.sqrt(K)).to(dtype)
    bias = torch.randn(N, generator=_generator(3)).to(dtype)
    tolerance = CONFORMANCE["matmul_4bit"]
    for b in (None, bias):
        got = _on("cpu", kbit.matmul_4bit, A, packed.t(), quant_state=state, bias=b)
        want = _on("reference", kbit.matmul_4bit, A, packed.t(), quant_state=state, bias=b)
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance.rtol, atol=tolerance.atol)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_non_finite_activations_and_scales_reach_the_same_outputs(isa, rows, dtype):
    # An inf or NaN activation spoils every output of its row; a NaN or inf block scale the
    # outputs of its weight row; a zero scale leaves its block out. (Whether a spoiled
    # output is inf or NaN depends on the order of the sums: an inf scale times a block's
    # sum is inf where the reference, adding +inf and -inf weights, gets NaN.)
    N, K = 9, 256
    packed, state = F.quantize_4bit(torch.randn(N, K, generator=_generator(5)), blocksize=64, quant_type="nf4",
                                    backend="reference")  # fmt: skip
    state.absmax[1 * K // 64] = math.nan  # weight row 1
    state.absmax[3 * K // 64 + 2] = math.inf  # weight row 3
    state.absmax[5 * K // 64] = 0.0
    A = (torch.randn(rows, K, generator=_generator(6)) / 16).to(dtype)
    A[0, 7] = math.inf
    if rows > 1:
        A[1, 100] = math.nan
    got = _on("cpu", kbit.matmul_4bit, A, packed.t(), quant_state=state).float()
    want = _on("reference", kbit.matmul_4bit, A, packed.t(), quant_state=state).float()
    finite = want.isfinite()
    assert torch.equal(got.isfinite(), finite) and bool(got[:, 1].isnan().all())  # row 1: a NaN scale
    tolerance = CONFORMANCE["matmul_4bit"]
    torch.testing.assert_close(got[finite], want[finite], rtol=tolerance.rtol, atol=tolerance.atol)


def _relative_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    return float((got.double() - truth).norm() / truth.norm())


@pytest.fixture
def realistic_layer():
    """A 4096-wide NF4 weight like a trained layer's (normal, std 0.02) and activations with
    a few outlier features, as in transformer hidden states, plus the exact product of the
    dequantized weight in float64."""
    K = N = 1024
    packed, state = F.quantize_4bit(torch.randn(N, K, generator=_generator(21)) * 0.02, blocksize=64,
                                    quant_type="nf4", backend="reference")  # fmt: skip
    A = torch.randn(4, K, generator=_generator(22))
    A[:, torch.randperm(K, generator=_generator(23))[:8]] *= 30
    weight = _on("reference", F.dequantize_4bit, packed, state).double()
    return packed, state, A, weight


def test_bfloat16_products_are_as_accurate_as_the_reference(isa, realistic_layer):
    # The bfloat16 dot-product kernels round the weights to bfloat16 as the reference does
    # (the batch kernel to the same values, the one-row kernel the table before scaling):
    # their error from the exact product of the same inputs stays at the reference's.
    packed, state, A, weight = realistic_layer
    A = A.bfloat16()
    truth = A.double() @ weight.T
    reference = _relative_error(_on("reference", kbit.matmul_4bit, A, packed.t(), quant_state=state), truth)
    for rows in (1, 4):  # the one-row kernel, then the batch kernel
        got = torch.cat([_on("cpu", kbit.matmul_4bit, A[i : i + rows], packed.t(), quant_state=state)
                         for i in range(0, 4, rows)])  # fmt: skip
        assert _relative_error(got, truth) < 1.25 * reference, (rows, _relative_error(got, truth), reference)


def test_float32_products_stay_float32_unless_torch_allows_bfloat16(isa, realistic_layer):
    packed, state, A, weight = realistic_layer
    truth = A.double() @ weight.T
    previous = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(precision)
            for rows in (1, 4):
                got = torch.cat([_on("cpu", kbit.matmul_4bit, A[i : i + rows], packed.t(), quant_state=state)
                                 for i in range(0, 4, rows)])  # fmt: skip
                assert got.dtype == torch.float32
                error = _relative_error(got, truth)
                if precision == "medium" and LIBRARY.bf16_dot:
                    # A rounded to bfloat16: the bfloat16 class (about 2e-3), not float32's.
                    assert 1e-5 < error < 5e-3, (precision, rows, error)
                else:
                    assert error < 1e-5, (precision, rows, error)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_the_bfloat16_dot_product_instruction_set_is_offered_where_the_cpu_has_it():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    # The tier holds AVX-512 with VBMI and BF16 (the CPUs that have one have both but Cooper Lake).
    has_bf16 = all(f" {flag} " in flags.replace("\n", " ") for flag in ("avx512_bf16", "avx512bw", "avx512vbmi"))
    built = "avx512bf16" in json.loads((Path(_library.__file__).parent / "_native_build.json").read_text())["isas"]
    assert ("avx512bf16" in ISAS) == (has_bf16 and built)
    if "avx512bf16" in ISAS:
        assert ISAS[:3] == ["avx512bf16", "avx512vbmi", "avx512"]
        assert LIBRARY.bf16_dot == (LIBRARY.isa == "avx512bf16")
        describe = "import kbit; print(kbit.backends.get('cpu').describe())"
        assert _in_subprocess(describe).startswith("avx512bf16 kernels")
        assert _in_subprocess(describe, KBIT_CPU_ISA="avx512vbmi").startswith("avx512vbmi kernels")


# ------------------------------------------------------------------------------ int8
@pytest.mark.parametrize("threshold", [0.0, 2.5])
def test_int8_vectorwise_quant_matches_the_reference(isa, threshold):
    A = torch.randn(130, 257, generator=_generator(9))
    A[3, :] = 0.0
    A[5, 7] = math.nan
    got = _on("cpu", F.int8_vectorwise_quant, A, threshold=threshold)
    want = _on("reference", F.int8_vectorwise_quant, A, threshold=threshold)
    for g, w in zip(got, want):
        assert _same(g, w) if isinstance(w, torch.Tensor) else g == w


# -------------------------------------------------------------------------- threads
def test_results_do_not_depend_on_the_thread_count(cpu):
    values = _mixed_magnitudes(1_000_000, seed=12)
    # a weight large enough for the 4-bit products to split its rows between threads
    weight, weight_state = F.quantize_4bit(torch.randn(1000, 1024, generator=_generator(13)), quant_type="nf4")
    activations = [torch.randn(rows, 1024, generator=_generator(rows)).to(dtype)
                   for rows in (1, 5) for dtype in (torch.float32, torch.bfloat16)]  # fmt: skip
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            codes, state = _on("cpu", F.quantize_blockwise, values, blocksize=256)
            packed, state4 = _on("cpu", F.quantize_4bit, values)
            products = [_on("cpu", kbit.matmul_4bit, A, weight.t(), quant_state=weight_state) for A in activations]
            results.append((codes, state.absmax, packed, _on("cpu", F.dequantize_4bit, packed, state4), *products))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_the_process_keeps_one_openmp_runtime(cpu):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _on("cpu", F.quantize_blockwise, torch.randn(1_000_000), blocksize=256)
    finally:
        torch.set_num_threads(previous)
    runtimes = _library._openmp_runtimes()
    assert runtimes is None or len(runtimes) == 1, runtimes
    assert LIBRARY.thread_note is None


# ---------------------------------------------------------------------- availability
def test_a_library_that_cannot_load_makes_the_backend_unavailable_with_the_reason(monkeypatch):
    import kbit_cpu.backend as module

    def refuse():
        raise _library.LibraryUnavailable("native library not built when kbit-cpu was installed: no compiler")

    monkeypatch.setattr(module, "load", refuse)
    assert CpuBackend().is_available() == "native library not built when kbit-cpu was installed: no compiler"
    kbit.backends.register(MANIFEST, replace=True)
    record = next(r for r in kbit.backends.list() if r.name == "cpu")
    assert record.state == "unavailable" and "no compiler" in record.reason
    assert kbit.backends.resolve("quantize_blockwise", "cpu", torch.float32, blocksize=64).name == "reference"


def test_the_build_note_says_why_the_library_is_missing(tmp_path, monkeypatch):
    (tmp_path / "_native_build.json").write_text(json.dumps({"built": False, "error": "CompileError: cc not found"}))
    monkeypatch.setattr(_library, "_PACKAGE_DIR", tmp_path)
    with pytest.raises(_library.LibraryUnavailable, match="cc not found"):
        _library._find_library()
    (tmp_path / "_native_build.json").unlink()
    with pytest.raises(_library.LibraryUnavailable, match="reinstall kbit-cpu with a C compiler"):
        _library._find_library()


def test_a_file_that_is_not_the_library_is_reported(tmp_path):
    fake = tmp_path / "libkbit_cpu.so"
    fake.write_text("not a shared object")
    with pytest.raises(_library.LibraryUnavailable, match="cannot open libkbit_cpu.so"):
        _library.NativeLibrary(fake)


def _in_subprocess(code: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KBIT_")} | env
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_kbit_cpu_isa_chooses_the_instruction_set_and_a_bad_one_is_reported():
    describe = "import kbit; print(kbit.backends.get('cpu').describe())"
    assert _in_subprocess(describe, KBIT_CPU_ISA="portable").startswith("portable kernels")
    assert _in_subprocess(describe).startswith(f"{ISAS[0]} kernels")  # the best set by default
    if "avx512vbmi" in ISAS:  # and AVX-512 without VBMI on request
        assert _in_subprocess(describe, KBIT_CPU_ISA="avx512").startswith("avx512 kernels")
    reason = _in_subprocess("from kbit_cpu.backend import CpuBackend; print(CpuBackend().is_available())",
                            KBIT_CPU_ISA="sse9")  # fmt: skip
    assert "KBIT_CPU_ISA='sse9' is not supported here" in reason


def test_the_plugin_is_the_default_cpu_backend_once_installed():
    served = _in_subprocess(
        "import torch, kbit\n"
        "print(kbit.backends.resolve('quantize_4bit', 'cpu', torch.bfloat16, blocksize=64, quant_type='nf4',"
        " quant_storage=torch.uint8).name)"
    )
    assert served == "cpu"


# ------------------------------------------------------------------------ code tables
def test_a_table_changed_in_place_is_prepared_again(cpu):
    code = create_dynamic_map()
    values = torch.linspace(-1, 1, 999)
    before = _on("cpu", F.quantize_blockwise, values, code=code, blocksize=4096)[0]
    code.mul_(0.5)  # a new table (sorted still): the cached preparation must not be reused
    after = _on("cpu", F.quantize_blockwise, values, code=code, blocksize=4096)[0]
    want = _on("reference", F.quantize_blockwise, values, code=code, blocksize=4096)[0]
    assert torch.equal(after, want) and not torch.equal(before, after)


def test_a_table_holding_nan_is_refused_with_a_typed_error(cpu):
    code = create_dynamic_map()
    code[10] = math.nan
    with pytest.raises(kbit.KbitValueError, match="quantize_blockwise: code="):
        _on("cpu", F.quantize_blockwise, torch.randn(100), code=code, blocksize=64)


def test_codes_past_a_short_table_dequantize_to_nan_instead_of_reading_past_it(cpu):
    # The public API requires 256 values; a backend called directly must still not read
    # past a shorter table.
    short = torch.tensor([-1.0, 0.0, 1.0])
    codes = torch.tensor([0, 1, 2, 200], dtype=torch.uint8)
    out = cpu.dequantize_blockwise(codes, absmax=torch.ones(1), code=short, blocksize=64, dtype=torch.float32)
    assert out[:3].tolist() == [-1.0, 0.0, 1.0] and math.isnan(out[3])


def test_the_optimizer_maps_are_cached_tables(cpu):
    assert torch.equal(cached_code("dynamic"), create_dynamic_map())


# -------------------------------------------------------------------------- the wheel
PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "kbit-cpu"


@pytest.mark.slow
def test_without_a_c_compiler_the_plugin_installs_and_the_reference_serves(tmp_path):
    from tests.test_plugin_e2e import _IGNORE, _build_wheel

    import shutil

    source = shutil.copytree(PLUGIN, tmp_path / "kbit-cpu", ignore=_IGNORE)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBIT_")}
    env["CC"] = str(tmp_path / "no-such-compiler")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w",
         str(wheels), str(source)], capture_output=True, text=True, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = wheels.glob("*.whl")
    assert wheel.name.endswith("-py3-none-linux_x86_64.whl") or "py3-none" in wheel.name
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    assert not list((target / "kbit_cpu").glob("libkbit_cpu.*"))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import kbit_cpu, torch\n"
        "from kbit_cpu.backend import CpuBackend\n"
        "assert kbit_cpu.__file__.startswith(sys.argv[1])\n"
        "print(CpuBackend().is_available())"
    )
    reason = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, env=env)
    assert reason.returncode == 0, reason.stderr
    assert "native library not built when kbit-cpu was installed" in reason.stdout
