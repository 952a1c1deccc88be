"""The conformance suite itself: it must fail for wrong backends, and say why.

Each test writes a test file that subclasses ``BackendConformance`` for a deliberately
broken backend (the reference with one mistake) and runs it in a nested pytest session,
then reads the JSON report.
"""

import dataclasses
import json
import textwrap

import pytest
import torch

import kbit.functional as F
from kbit._formats import BLOCKSIZES_8BIT_ALL
from kbit.testing._cases import golden_checks, op_cases
from kbit.testing._goldens import find_goldens
from kbit.testing._plan import plan
from kbit.testing._report import ConformanceReport, Outcome
from kbit_reference._manifest import MANIFEST as REFERENCE_MANIFEST

# Wrong backends: the reference with one mistake each. The manifests are registered by the
# conformance classes (``manifest = ...``), the way an author tests a backend before
# packaging it.
BACKENDS = '''
import dataclasses

import torch
from kbit._opnames import OP_FAMILIES
from kbit.backend import API_VERSION, Backend, BackendManifest, OpSupport
from kbit.testing import BackendConformance, Tolerance
from kbit_reference.backend import ReferenceBackend
from kbit_reference._manifest import MANIFEST as REFERENCE

FLOATS = ("float16", "bfloat16", "float32")


# By default the reference's 8-bit ops: the other families' sweeps would only add time.
BLOCKWISE8 = {op: REFERENCE.ops[op] for op in OP_FAMILIES["blockwise8"]}


def manifest(name, factory, ops=None, **fields):
    return BackendManifest(name=name, api_version=API_VERSION, device_types=("cpu",),
                           factory=f"{__name__}:{factory}", ops=ops or BLOCKWISE8, **fields)


class OffByOne(ReferenceBackend):
    """Every quantize_blockwise code one step too high."""
    def quantize_blockwise(self, A, *, code, blocksize, **rand):
        codes, absmax = super().quantize_blockwise(A, code=code, blocksize=blocksize, **rand)
        return (codes.int() + 1).clamp(max=255).to(torch.uint8), absmax


class NearestForStochastic(ReferenceBackend):
    """Declares stochastic rounding but ignores rand: always the nearest code (biased)."""
    def quantize_blockwise(self, A, *, code, blocksize, rand=None):
        return super().quantize_blockwise(A, code=code, blocksize=blocksize)


class BiasedStochastic(ReferenceBackend):
    """Uses rand, but squared: rounds up too rarely (each value still goes to a neighbour)."""
    def quantize_blockwise(self, A, *, code, blocksize, rand=None):
        return super().quantize_blockwise(A, code=code, blocksize=blocksize, rand=None if rand is None else rand.sqrt())


class HalfForBfloat16(ReferenceBackend):
    """Claims bfloat16 but squeezes bfloat16 inputs through float16 (range lost)."""
    def quantize_blockwise(self, A, *, code, blocksize, **rand):
        if A.dtype == torch.bfloat16:
            A = A.to(torch.float16)
        return super().quantize_blockwise(A, code=code, blocksize=blocksize, **rand)


class TiesUp(ReferenceBackend):
    """Breaks ties towards the upper code."""
    def quantize_blockwise(self, A, *, code, blocksize, **rand):
        codes, absmax = super().quantize_blockwise(A, code=code, blocksize=blocksize, **rand)
        x = (A.reshape(-1).float() * (1 / absmax).repeat_interleave(blocksize)[: A.numel()]).nan_to_num()
        above = codes.reshape(-1).long().clamp(max=254) + 1
        tie = (code[above] - x) == (x - code[codes.reshape(-1).long()])
        return torch.where(tie, above, codes.reshape(-1).long()).to(torch.uint8).reshape(A.shape), absmax


class WideAbsmax(ReferenceBackend):
    """Returns float64 scales: values right, type wrong (the fake kernel says float32)."""
    def quantize(self, A, *, code):
        codes, absmax = super().quantize(A, code=code)
        return codes, absmax.double()


class NoDequantize(ReferenceBackend):
    """Declares dequantize_blockwise but never implemented it."""
    dequantize_blockwise = Backend.dequantize_blockwise


class Sloppy(ReferenceBackend):
    """Histogram updates off by 1e-3 (within loosened tolerance, not the shared one)."""
    def histogram_scatter_add_2d(self, histogram, *, index1, index2, source):
        super().histogram_scatter_add_2d(histogram, index1=index1, index2=index2, source=source * 1.0001)


class FloorInt8(ReferenceBackend):
    """Row-wise int8 codes rounded down instead of half-to-even."""
    def int8_vectorwise_quant(self, A, *, threshold):
        CA, stats, cols = super().int8_vectorwise_quant(A, threshold=threshold)
        rows = A.reshape(-1, A.shape[-1]).float()
        floor = torch.floor(rows * 127 / stats.clamp_min(1e-30)[:, None]).clamp(-127, 127).to(torch.int8)
        codes = CA.reshape(rows.shape)
        return torch.where(codes == 0, codes, floor).reshape(A.shape), stats, cols


class IntMmEverywhere(ReferenceBackend):
    """torch._int_mm for every shape, K == 1 included (where it returns garbage on CPU)."""
    def int8_linear_matmul(self, A, B):
        return torch._int_mm(A.reshape(-1, A.shape[-1]), B.t()).reshape(*A.shape[:-1], B.shape[0])


class SwappedBetas(ReferenceBackend):
    """Blockwise 8-bit optimizer with beta1 and beta2 exchanged."""
    def optimizer_update_8bit_blockwise(self, step, *args, **kwargs):
        swapped = dataclasses.replace(step, beta1=step.beta2, beta2=step.beta1)
        super().optimizer_update_8bit_blockwise(swapped, *args, **kwargs)


class LionUphill(ReferenceBackend):
    """32-bit Lion stepping along the sign of the momentum instead of against it."""
    def optimizer_update_32bit(self, step, *args, **kwargs):
        uphill = dataclasses.replace(step, lr=-step.lr) if step.kind.name == "lion" else step
        super().optimizer_update_32bit(uphill, *args, **kwargs)


def nibbles(packed):
    """The 4-bit codes of packed bytes, high nibble first."""
    data = packed.reshape(-1).view(torch.uint8)
    return torch.stack([data >> 4, data & 15], dim=1).reshape(-1)


def repack(codes, like):
    """``codes`` packed two per byte, viewed like the packed tensor ``like``."""
    pairs = codes.to(torch.uint8).view(-1, 2)
    return (pairs[:, 0] * 16 + pairs[:, 1]).to(torch.uint8).view(like.dtype).reshape(like.shape)


class SwappedNibbles(ReferenceBackend):
    """Packs element 2j into the low nibble instead of the high one."""
    def quantize_4bit(self, A, **kwargs):
        packed, absmax = super().quantize_4bit(A, **kwargs)
        return repack(nibbles(packed).view(-1, 2).flip(1).reshape(-1), packed), absmax


class HalfAbsmax(ReferenceBackend):
    """Keeps the 4-bit scales in float16 precision (returned as float32)."""
    def quantize_4bit(self, A, **kwargs):
        packed, absmax = super().quantize_4bit(A, **kwargs)
        return packed, absmax.half().float()


class ShiftedNF4(ReferenceBackend):
    """Dequantizes NF4 with the table shifted by one code (FP4 is right)."""
    def dequantize_4bit(self, A, *, quant_type, **kwargs):
        if quant_type == "nf4":
            A = repack((nibbles(A).int() + 1).clamp(max=15), A)
        return super().dequantize_4bit(A, quant_type=quant_type, **kwargs)


class FreeCodes(ReferenceBackend):
    """Uses the format's freedoms: FP4 -0 (code 8) for negatives that round to zero, and
    code 15 in all-zero blocks. Conformant."""
    def quantize_4bit(self, A, *, blocksize, quant_type, quant_storage):
        packed, absmax = super().quantize_4bit(A, blocksize=blocksize, quant_type=quant_type,
                                               quant_storage=quant_storage)
        codes, numel = nibbles(packed).clone(), A.numel()
        mine = codes[:numel]
        if quant_type == "fp4":
            mine[(mine == 0) & (A.reshape(-1) < 0)] = 8
        mine[(absmax == 0).repeat_interleave(blocksize)[:numel]] = 15
        return repack(codes, packed), absmax


class Missing(ReferenceBackend):
    def is_available(self):
        return "no Acme accelerator found"
'''

# kbit is imported before the nested session loads its plugin: nothing to rewrite there.
QUIET = ("-W", "ignore::pytest.PytestAssertRewriteWarning")

# Nested sessions find the golden vectors the same way (next to the kbit checkout, or
# KBIT_GOLDENS); without them the golden checks skip and count for nothing.
GOLDEN_CHECKS_RUN = int(find_goldens()[0] is not None)

ONLY_QB = '{"quantize_blockwise": OpSupport(dtypes=FLOATS, blocksizes=(64, 256))}'
STOCHASTIC_QB = '{"quantize_blockwise": OpSupport(dtypes=FLOATS, blocksizes=(64,), roundings=("nearest", "stochastic"))}'
INT8_OPS = '{op: REFERENCE.ops[op] for op in REFERENCE.ops if op.startswith("int8_")}'
# The four 4-bit ops on a few variants: float32, blocksize 64, both types, two storages.
SOME_4BIT = """{op: OpSupport(dtypes=("float32",), blocksizes=(64,), quant_types=("nf4", "fp4"),
                           quant_storages=("uint8", "bfloat16")) for op in OP_FAMILIES["quant4"]}"""


@pytest.fixture(scope="module", autouse=True)
def torch_modules_loaded_once():
    """Run opcheck once out here, before any nested session.

    opcheck imports torch modules on first use that register global state (a torch
    library, cache factories); pytester forgets modules imported inside a nested session,
    and importing them again in the next one registers that state twice.
    """
    torch.library.opcheck(torch.ops.kbit.quantize.default, (torch.randn(8), F.create_dynamic_map()))


def run_suite(pytester, classes: str, *args: str) -> tuple[pytest.RunResult, dict]:
    pytester.makepyfile(test_wrong=BACKENDS + textwrap.dedent(classes))
    report = pytester.path / "report.json"
    result = pytester.runpytest("-q", "-p", "no:cacheprovider", "--kbit-report", str(report), *args, *QUIET)
    return result, json.loads(report.read_text())


def ops_of(payload: dict, backend: str) -> dict:
    (run,) = [run for run in payload["runs"] if run["backend"] == backend]
    return run


def test_off_by_one_quantize_fails_only_there(pytester):
    result, payload = run_suite(
        pytester,
        """
        class TestOffByOne(BackendConformance):
            backend = "offbyone"
            manifest = manifest("offbyone", "OffByOne")
        """,
    )
    run = ops_of(payload, "offbyone")
    assert result.ret == 1 and not run["conformant"]
    variants = len(op_cases()["quantize_blockwise"].variants())
    statistical = len([c for c in plan(REFERENCE_MANIFEST) if c.kind == "statistics" and c.op == "quantize_blockwise"])
    # Every declared variant (nearest and stochastic), the statistical checks of stochastic
    # rounding (codes outside the two neighbours) and the golden check fail; so does
    # whole-tensor quantize, which the reference (and so this subclass) builds on
    # quantize_blockwise; nothing else.
    assert statistical == 3  # one per dtype
    assert run["ops"]["quantize_blockwise"]["failed"] == variants + statistical + GOLDEN_CHECKS_RUN
    assert {op for op, counts in run["ops"].items() if counts["failed"]} == {"quantize_blockwise", "quantize"}
    assert run["ops"]["dequantize_blockwise"]["failed"] == 0 and run["ops"]["dequantize_blockwise"]["compared"] > 0
    messages = "\n".join(p["message"] for p in run["problems"])
    assert "codes (outside all-zero blocks)" in messages and "differ from the reference" in messages
    assert "farther from the value than the golden codes" in messages or not GOLDEN_CHECKS_RUN
    result.stdout.fnmatch_lines(["*backend 'offbyone' on cpu: NOT CONFORMANT*"])


def test_claimed_dtype_that_is_mishandled_fails_for_that_dtype(pytester):
    result, payload = run_suite(
        pytester,
        f"""
        class TestHalf(BackendConformance):
            backend = "half"
            manifest = manifest("half", "HalfForBfloat16", ops={ONLY_QB})
        """,
    )
    run = ops_of(payload, "half")
    failed = sorted(p["test"] for p in run["problems"] if p["status"] == "failed")
    assert failed == [
        "test_matches_reference[quantize_blockwise-bfloat16-256-nearest]",
        "test_matches_reference[quantize_blockwise-bfloat16-64-nearest]",
    ]
    # The large values are what betray it: float16 overflows where bfloat16 does not.
    assert all("large_values" in p["message"] for p in run["problems"] if p["status"] == "failed")
    # The undeclared blocksizes were refused, one test each, and so was every stochastic
    # variant: a manifest silent about roundings rounds to nearest only.
    blocksizes = len(BLOCKSIZES_8BIT_ALL)
    assert run["ops"]["quantize_blockwise"]["refused"] == 3 * (blocksizes - 2) + 3 * blocksizes
    assert run["ops"]["dequantize_blockwise"]["refused"] == 3 * len(BLOCKSIZES_8BIT_ALL)


def test_stochastic_rounding_that_is_not_or_is_biased_fails(pytester):
    _, payload = run_suite(
        pytester,
        f"""
        class TestNearest(BackendConformance):
            backend = "nearest"
            manifest = manifest("nearest", "NearestForStochastic", ops={STOCHASTIC_QB})

        class TestBiased(BackendConformance):
            backend = "biased"
            manifest = manifest("biased", "BiasedStochastic", ops={STOCHASTIC_QB})
        """,
        "-k", "float32 and stochastic",
    )  # fmt: skip
    for backend in ("nearest", "biased"):
        run = ops_of(payload, backend)
        assert failed_tests(run) == {
            "test_matches_reference[quantize_blockwise-float32-64-stochastic]",
            "test_statistics[quantize_blockwise-float32-64-stochastic]",
        }, backend
        messages = "\n".join(p["message"] for p in run["problems"])
        assert "standard errors from the input" in messages and "the rounding is biased" in messages
        assert "other than their two neighbours" not in messages  # both stay within the neighbours


def test_ties_to_the_upper_index_are_caught(pytester):
    _, payload = run_suite(
        pytester,
        f"""
        class TestTiesUp(BackendConformance):
            backend = "tiesup"
            manifest = manifest("tiesup", "TiesUp", ops={ONLY_QB})
        """,
        "-k", "test_matches_reference and float32",
    )  # fmt: skip
    problems = ops_of(payload, "tiesup")["problems"]
    assert len(problems) == 2 and all(p["message"].count("ties:") == 1 for p in problems)
    assert all("partial_block" not in p["message"] for p in problems)


def test_wrong_output_dtype_fails_comparison_and_opcheck(pytester):
    _, payload = run_suite(
        pytester,
        """
        class TestWide(BackendConformance):
            backend = "wide"
            manifest = manifest("wide", "WideAbsmax", ops={"quantize": OpSupport(dtypes=("float32",))})
        """,
    )
    failed = {p["test"]: p["message"] for p in ops_of(payload, "wide")["problems"] if p["status"] == "failed"}
    assert set(failed) == {"test_matches_reference[quantize-float32]", "test_opcheck[quantize-float32]"}
    # The dispatch boundary catches it before any comparison: the op's fake says float32.
    assert "backend 'wide' returned a result that breaks the contract: absmax has dtype torch.float64, expected torch.float32" in failed["test_matches_reference[quantize-float32]"]


def test_declared_but_unimplemented_op_fails(pytester):
    _, payload = run_suite(
        pytester,
        """
        class TestNoDequantize(BackendConformance):
            backend = "nodeq"
            manifest = manifest("nodeq", "NoDequantize")
        """,
        "-k", "dequantize_blockwise-float32-64",
    )  # fmt: skip
    messages = [p["message"] for p in ops_of(payload, "nodeq")["problems"]]
    assert messages and all("UnsupportedOpError" in m for m in messages)


def test_4bit_mistakes_fail_the_op_that_makes_them(pytester):
    result, payload = run_suite(
        pytester,
        f"""
        class TestSwapped(BackendConformance):
            backend = "swapped"
            manifest = manifest("swapped", "SwappedNibbles", ops={SOME_4BIT})

        class TestHalfAbsmax(BackendConformance):
            backend = "halfabsmax"
            manifest = manifest("halfabsmax", "HalfAbsmax", ops={SOME_4BIT})

        class TestShifted(BackendConformance):
            backend = "shifted"
            manifest = manifest("shifted", "ShiftedNF4", ops={SOME_4BIT})
        """,
        "-k", "test_matches_reference or test_goldens",
    )  # fmt: skip
    assert result.ret == 1
    failed = {}
    for backend in ("swapped", "halfabsmax", "shifted"):
        run = ops_of(payload, backend)
        assert not run["conformant"]
        failed[backend] = sorted(p["test"] for p in run["problems"] if p["status"] == "failed")
    declared = [f"test_matches_reference[quantize_4bit-float32-64-{t}-{s}]" for t in ("nf4", "fp4")
                for s in ("uint8", "bfloat16")]  # fmt: skip
    goldens = ["test_goldens[quantize_4bit]"] * GOLDEN_CHECKS_RUN
    assert failed["swapped"] == sorted(declared + goldens)
    assert failed["halfabsmax"] == sorted(declared + goldens)
    # Dequantize fails for NF4 only; gemv and matmul, which the reference builds on its
    # dequantize, fail with it.
    assert failed["shifted"] == sorted(
        [f"test_matches_reference[{op}-float32-64-nf4-{s}]" for op in ("dequantize_4bit", "gemv_4bit", "matmul_4bit")
         for s in ("uint8", "bfloat16")] + ["test_goldens[dequantize_4bit]"] * GOLDEN_CHECKS_RUN
    )  # fmt: skip
    messages = {b: "\n".join(p["message"] for p in ops_of(payload, b)["problems"]) for b in failed}
    assert "packed nibbles (outside all-zero blocks)" in messages["swapped"]
    assert "absmax:" in messages["halfabsmax"] and "packed" not in messages["halfabsmax"]
    assert "out:" in messages["shifted"] and "within rtol=0.016" in messages["shifted"]


def test_4bit_format_freedoms_are_allowed(pytester):
    result, payload = run_suite(
        pytester,
        f"""
        class TestFreeCodes(BackendConformance):
            backend = "free"
            manifest = manifest("free", "FreeCodes", ops={SOME_4BIT})
        """,
        "-k", "quantize_4bit",
    )  # fmt: skip
    run = ops_of(payload, "free")
    assert result.ret == 0 and run["conformant"], run["problems"]
    assert run["ops"]["quantize_4bit"]["compared"] == 4 + GOLDEN_CHECKS_RUN  # compare, goldens
    assert run["ops"]["quantize_4bit"]["checked"] == 2  # opcheck


def test_free_codes_really_differ_from_the_reference_bytes():
    # The freedoms test above only means something if the inputs exercise them.
    from kbit.testing._cases.quant4 import _nibbles

    cases = op_cases()["quantize_4bit"]
    (variant,) = [v for v in cases.variants() if v.id == "quantize_4bit-float32-64-fp4-uint8"]
    inputs = {i.name: i.args for i in cases.inputs(variant)}
    packed, _ = torch.ops.kbit.quantize_4bit(*inputs["ties"])
    A = inputs["ties"][0].reshape(-1)
    # Negative values that round to FP4 zero: FreeCodes stores them as code 8.
    assert bool(((_nibbles(packed)[: A.numel()] == 0) & (A < 0)).any())
    packed, absmax = torch.ops.kbit.quantize_4bit(*inputs["all_zero_blocks"])
    assert bool((absmax == 0).any()) and bool((_nibbles(packed) != 15).any())


def test_expected_failures_are_strict_and_checked(pytester):
    result, payload = run_suite(
        pytester,
        """
        class TestKnownBugs(BackendConformance):
            backend = "offbyone"
            manifest = manifest("offbyone", "OffByOne")
            expected_failures = {
                "test_matches_reference[quantize_blockwise-float32-64-nearest]": "acme#1: codes off by one",
                "test_matches_reference[dequantize_blockwise-float32-64]": "wrongly listed: it passes",
                "test_matches_reference[quantize_4bit-nf4]": "no such test",
            }
        """,
        "-k", "blockwise-float32-64 or test_manifest",
    )  # fmt: skip
    outcomes = {p["test"]: p for p in ops_of(payload, "offbyone")["problems"]}
    assert outcomes["test_matches_reference[quantize_blockwise-float32-64-nearest]"]["status"] == "xfailed"
    assert "acme#1" in outcomes["test_matches_reference[quantize_blockwise-float32-64-nearest]"]["message"]
    xpass = outcomes["test_matches_reference[dequantize_blockwise-float32-64]"]
    assert xpass["status"] == "failed" and "XPASS(strict)" in xpass["message"]
    assert outcomes["test_manifest"]["status"] == "failed"
    assert "test_matches_reference[quantize_4bit-nf4]" in outcomes["test_manifest"]["message"]


def failed_tests(run: dict) -> set[str]:
    return {p["test"] for p in run["problems"] if p["status"] == "failed"}


def test_int8_rounding_down_fails_the_quantizer_only(pytester):
    _, payload = run_suite(
        pytester,
        f"""
        class TestFloor(BackendConformance):
            backend = "floor"
            manifest = manifest("floor", "FloorInt8", ops={INT8_OPS})
        """,
        "-k", "not test_opcheck",
    )  # fmt: skip
    run = ops_of(payload, "floor")
    compared = {f"test_matches_reference[int8_vectorwise_quant-{dtype}]" for dtype in ("float16", "bfloat16", "float32")}
    golden = {"test_goldens[int8_vectorwise_quant]"} if GOLDEN_CHECKS_RUN else set()
    assert failed_tests(run) == compared | golden
    assert run["ops"]["int8_double_quant"]["compared"] > 0 and run["ops"]["int8_double_quant"]["failed"] == 0
    messages = "\n".join(p["message"] for p in run["problems"])
    assert "ties: CA:" in messages
    assert "codes differ from the goldens" in messages or not GOLDEN_CHECKS_RUN


def test_int8_matmul_at_k_one_is_checked(pytester):
    _, payload = run_suite(
        pytester,
        """
        class TestIntMm(BackendConformance):
            backend = "intmm"
            manifest = manifest("intmm", "IntMmEverywhere", ops={"int8_linear_matmul": OpSupport(dtypes=("int8",))})
        """,
        "-k", "test_matches_reference",
    )  # fmt: skip
    (problem,) = ops_of(payload, "intmm")["problems"]
    assert problem["test"] == "test_matches_reference[int8_linear_matmul-int8]"
    assert "k_one: out:" in problem["message"] and "typical" not in problem["message"]


def test_swapped_optimizer_betas_fail_every_kind_that_reads_beta1(pytester):
    from kbit.functional._optim import OPTIMIZER_KINDS

    _, payload = run_suite(
        pytester,
        """
        class TestSwapped(BackendConformance):
            backend = "swapped"
            manifest = manifest("swapped", "SwappedBetas", ops={
                "optimizer_update_8bit_blockwise": OpSupport(dtypes=("float32",), optimizers=tuple(REFERENCE.ops[
                    "optimizer_update_8bit_blockwise"].optimizers)),
                "optimizer_update_32bit": OpSupport(dtypes=("float32",), optimizers=("adam", "lion")),
            })
        """,
        "-k", "test_matches_reference or test_goldens",
    )  # fmt: skip
    run = ops_of(payload, "swapped")
    wrong = {f"test_matches_reference[optimizer_update_8bit_blockwise-float32-{kind}]"
             for kind, spec in OPTIMIZER_KINDS.items() if spec.reads_param("beta1")}  # fmt: skip
    golden = {"test_goldens[optimizer_update_8bit_blockwise]"} if GOLDEN_CHECKS_RUN else set()
    assert failed_tests(run) == wrong | golden
    assert run["ops"]["optimizer_update_32bit"]["compared"] == 2 + GOLDEN_CHECKS_RUN
    assert run["ops"]["optimizer_update_8bit_blockwise"]["compared"] == 1  # adagrad reads no beta


def test_lion_with_the_wrong_sign_fails_lion_only(pytester):
    _, payload = run_suite(
        pytester,
        """
        class TestUphill(BackendConformance):
            backend = "uphill"
            manifest = manifest("uphill", "LionUphill", ops={
                "optimizer_update_32bit": OpSupport(dtypes=FLOATS, optimizers=("adam", "lion", "momentum")),
            })
        """,
        "-k", "test_matches_reference",
    )  # fmt: skip
    run = ops_of(payload, "uphill")
    assert failed_tests(run) == {f"test_matches_reference[optimizer_update_32bit-{dtype}-lion]" for dtype in
                                 ("float16", "bfloat16", "float32")}  # fmt: skip
    assert "p@1:" in run["problems"][0]["message"]


def test_manifest_claims_beyond_the_api_and_bad_tolerances_fail(pytester):
    _, payload = run_suite(
        pytester,
        """
        class TestOddManifest(BackendConformance):
            backend = "odd"
            device = "cuda"
            manifest = manifest("odd", "Sloppy", ops={
                "quantize_blockwise": OpSupport(dtypes=("float32", "float64"), blocksizes=(32, 64), quant_types=("nf4",)),
            })
            extra_tolerances = {"quantize_blockwise": Tolerance(rtol=0.1, atol=0.1)}
        """,
        "-k", "test_manifest",
    )  # fmt: skip
    (problem,) = ops_of(payload, "odd")["problems"]
    message = problem["message"]
    assert "device 'cuda' is not among the manifest's device_types ['cpu']" in message
    assert "declares dtype ['float64']" in message and "declares blocksize [32]" in message
    assert "declares quant_type values ['nf4'], but the op has no such parameter" in message
    assert "quantize_blockwise is bit-exact by the format contract and cannot be loosened" in message


def test_extra_tolerances_loosen_only_non_exact_ops(pytester):
    classes = """
        class TestSloppy(BackendConformance):
            backend = "sloppy"
            manifest = manifest("sloppy", "Sloppy", ops={"histogram_scatter_add_2d": OpSupport(dtypes=("float32",))})

        class TestSloppyAllowed(BackendConformance):
            backend = "sloppy"
            manifest = manifest("sloppy", "Sloppy", ops={"histogram_scatter_add_2d": OpSupport(dtypes=("float32",))})
            extra_tolerances = {"histogram_scatter_add_2d": Tolerance(rtol=1e-3, atol=1e-3)}
    """
    result, _ = run_suite(pytester, classes, "-k", "test_matches_reference")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*elements differ from the reference (within rtol=1e-05, atol=1e-05)*"])
    result.stdout.fnmatch_lines(["FAILED test_wrong.py::TestSloppy::test_matches_reference*"])


def test_unavailable_backend_is_skipped_and_not_conformant(pytester):
    result, payload = run_suite(
        pytester,
        """
        class TestMissing(BackendConformance):
            backend = "missing"
            manifest = manifest("missing", "Missing", ops={"quantize": OpSupport(dtypes=("float32",))})
        """,
    )
    run = ops_of(payload, "missing")
    assert run["totals"]["failed"] == 0 and run["totals"]["skipped"] > 0 and not run["conformant"]
    assert "no Acme accelerator found" in run["problems"][0]["message"]


def test_uninstalled_backend_fails_the_manifest_test(pytester):
    result, payload = run_suite(pytester, "class TestGhost(BackendConformance):\n    backend = 'ghost'\n")
    assert result.ret == 1
    (problem,) = ops_of(payload, "ghost")["problems"]
    assert "no backend named 'ghost' is installed" in problem["message"]


def test_plugin_is_silent_in_sessions_without_conformance_tests(pytester):
    pytester.makepyfile(test_plain="def test_one():\n    assert 1 + 1 == 2\n")
    result = pytester.runpytest("-q", "-p", "no:cacheprovider", *QUIET)
    result.assert_outcomes(passed=1)
    assert "kbit conformance" not in result.stdout.str()


# ------------------------------------------------------------------------- units
def test_plan_covers_every_variant_exactly_once():
    from kbit_reference._manifest import MANIFEST

    planned = plan(MANIFEST)
    names = [case.test_name for case in planned]
    assert len(names) == len(set(names))
    for op, cases in op_cases().items():
        compared = {c.variant for c in planned if c.op == op and c.kind in ("compare", "refuse")}
        assert compared == set(cases.variants())


def test_report_counts_and_verdict():
    report = ConformanceReport()
    report.add(Outcome("b", "cpu", "t1", "quantize", "compare", "compared"))
    report.add(Outcome("b", "cpu", "t1b", "quantize", "opcheck", "checked"))
    report.add(Outcome("b", "cpu", "t2", "quantize", "refuse", "refused"))
    report.add(Outcome("b", "cpu", "t3", "dequantize", "goldens", "skipped", "no goldens"))
    payload = report.to_json()
    (run,) = payload["runs"]
    assert run["conformant"] and run["ops"]["quantize"]["refused"] == 1 and run["totals"]["skipped"] == 1
    assert run["ops"]["quantize"]["compared"] == 1 and run["ops"]["quantize"]["checked"] == 1
    assert "COMPARED" in report.render() and "CHECKED" in report.render()
    report.add(Outcome("b", "cpu", "t4", "dequantize", "compare", "skipped", "unavailable"))
    assert not report.to_json()["runs"][0]["conformant"]
    assert "NOT CONFORMANT" in report.render() and "t4: unavailable" in report.render()


REFERENCE_CLASS = """
class TestRef(BackendConformance):
    backend = "reference"
"""


def test_missing_goldens_skip_with_the_reason_and_do_not_block(pytester, tmp_path, monkeypatch):
    monkeypatch.delenv("KBIT_REQUIRE_GOLDENS", raising=False)
    missing = tmp_path / "nowhere"
    result, payload = run_suite(pytester, REFERENCE_CLASS, "-k", "test_goldens", "--kbit-goldens", str(missing))
    (run,) = payload["runs"]
    assert run["totals"]["skipped"] == len(run["ops"]) == len(golden_checks()) and run["conformant"]
    assert all(f"golden vectors not found at {missing}" in p["message"] for p in run["problems"])


def test_required_goldens_that_are_missing_fail_and_block(pytester, tmp_path, monkeypatch):
    """CI sets KBIT_REQUIRE_GOLDENS=1: a missing golden file must fail the run, not skip 35 tests."""
    monkeypatch.setenv("KBIT_REQUIRE_GOLDENS", "1")
    missing = tmp_path / "nowhere"
    result, payload = run_suite(pytester, REFERENCE_CLASS, "-k", "test_goldens", "--kbit-goldens", str(missing))
    (run,) = payload["runs"]
    assert result.ret == 1 and not run["conformant"]
    assert run["totals"]["failed"] == len(golden_checks()) and run["totals"]["skipped"] == 0
    assert all("KBIT_REQUIRE_GOLDENS is set" in p["message"] for p in run["problems"])


@pytest.mark.parametrize(("value", "outcome"), [("1", "fail"), ("0", "skip"), (None, "skip")])
def test_missing_goldens_fail_only_when_required(monkeypatch, value, outcome):
    """The helper behind both golden fixtures (this project's and the conformance suite's)."""
    from kbit.testing._goldens import missing_goldens

    if value is None:
        monkeypatch.delenv("KBIT_REQUIRE_GOLDENS", raising=False)
    else:
        monkeypatch.setenv("KBIT_REQUIRE_GOLDENS", value)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match="not found here"):
        missing_goldens("golden vectors not found here")


def test_goldens_path_from_the_environment(pytester, monkeypatch, goldens):
    path, _ = find_goldens()  # the `goldens` fixture has skipped if there is none
    monkeypatch.setenv("KBIT_GOLDENS", str(path.parent))  # a directory works as well as the file
    _, payload = run_suite(pytester, REFERENCE_CLASS, "-k", "test_goldens")
    assert payload["runs"][0]["totals"]["compared"] == len(golden_checks())


def test_suite_runs_without_the_plugin(pytester):
    # Without kbit's pytest plugin there is no report, but the class still generates and runs.
    pytester.makepyfile(test_wrong=BACKENDS + REFERENCE_CLASS)
    result = pytester.runpytest("-q", "-p", "no:cacheprovider", "-p", "no:kbit", "-k", "blockwise-float32-64", *QUIET)
    # quantize_blockwise: compare and opcheck of each rounding, the statistics of stochastic
    # rounding; dequantize_blockwise: compare and opcheck.
    result.assert_outcomes(passed=7)
    assert "kbit conformance" not in result.stdout.str()


def test_declared_op_without_cases_is_skipped_and_blocks_the_verdict(pytester):
    from kbit._opnames import ALL_OPS

    uncovered = sorted(ALL_OPS - set(op_cases()))
    if not uncovered:
        pytest.skip("every op has conformance cases")
    _, payload = run_suite(
        pytester,
        f"""
        class TestAhead(BackendConformance):
            backend = "ahead"
            manifest = manifest("ahead", "OffByOne", ops={{{uncovered[0]!r}: OpSupport()}})
        """,
        "-k", "test_has_cases",
    )  # fmt: skip
    run = ops_of(payload, "ahead")
    (problem,) = run["problems"]
    assert problem["test"] == f"test_has_cases[{uncovered[0]}]" and problem["status"] == "skipped"
    assert "has no conformance cases" in problem["message"] and not run["conformant"]
