"""Stochastic rounding of 8-bit blockwise quantization (``quantize_blockwise(..., rand=)``).

The rule (docs/formats.md section 2): with ``lo <= x <= hi`` the neighbouring code values,
an element takes ``hi`` when ``rand < (x - lo) / (hi - lo)`` (float32), else ``lo``.
"""

import pytest
import torch

import kbit
import kbit.functional as F
from kbit import KbitTypeError, KbitValueError, UnsupportedOpError
from kbit.backend import API_VERSION, BackendManifest, OpSupport

CODE = F.create_dynamic_map()


def _unit_block(values):
    """One block of 64 starting with 1.0, so absmax is exactly 1 and x is the value itself."""
    block = torch.zeros(64)
    block[0] = 1.0
    block[1 : 1 + len(values)] = torch.tensor(values)
    return block


def test_the_rule_picks_the_upper_code_exactly_below_the_fraction():
    lo, hi = float(CODE[200]), float(CODE[201])
    x = torch.tensor(lo + 0.25 * (hi - lo), dtype=torch.float32)
    fraction = float((x - lo) / (hi - lo))  # in float32, as the rule says
    A = _unit_block([float(x)] * 3)
    below, at, above = float(torch.nextafter(torch.tensor(fraction), torch.tensor(0.0))), fraction, 0.9
    rand = torch.full((64,), 0.5)
    rand[1:4] = torch.tensor([below, at, above])
    codes, _ = F.quantize_blockwise(A, blocksize=64, rand=rand)
    assert codes[1:4].tolist() == [201, 200, 200]  # rand < fraction takes hi; equal or above takes lo


def test_codes_values_and_the_table_ends_never_move():
    A = _unit_block([float(CODE[10]), float(CODE[127]), -1.0, 0.0])
    for r in (0.0, 0.5, float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))):
        codes, _ = F.quantize_blockwise(A, blocksize=64, rand=torch.full((64,), r))
        assert codes[1:4].tolist() == [10, 127, 0]  # -1.0 lies below the table's end (-0.99297): clamps
        assert codes[0] == 255  # 1.0 is the last code


def test_a_short_rand_is_read_cyclically():
    A = torch.randn(3000)
    rand = torch.rand(1024, generator=torch.Generator().manual_seed(1))
    cyclic, _ = F.quantize_blockwise(A, blocksize=256, rand=rand)
    explicit, _ = F.quantize_blockwise(A, blocksize=256, rand=rand.repeat(3)[:3000])
    assert torch.equal(cyclic, explicit)


def test_a_generator_gives_reproducible_draws_and_absmax_is_unchanged():
    A = torch.randn(5000, dtype=torch.bfloat16)
    first, s1 = F.quantize_blockwise(A, blocksize=128, rand=torch.Generator().manual_seed(7))
    again, s2 = F.quantize_blockwise(A, blocksize=128, rand=torch.Generator().manual_seed(7))
    nearest, s3 = F.quantize_blockwise(A, blocksize=128)
    assert torch.equal(first, again) and torch.equal(s1.absmax, s3.absmax)
    assert not torch.equal(first, nearest)  # some values rounded the other way
    assert int((first.int() - nearest.int()).abs().max()) <= 1  # but only ever to a neighbour


def test_the_mean_of_many_draws_is_the_input():
    A = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(4)
    total = torch.zeros_like(A)
    draws = 400
    for _ in range(draws):
        codes, state = F.quantize_blockwise(A, blocksize=256, rand=generator)
        total += F.dequantize_blockwise(codes, state)
    stochastic_bias = float((total / draws - A).mean())
    codes, state = F.quantize_blockwise(A, blocksize=256)
    assert abs(stochastic_bias) < 2e-4
    assert float((total / draws - A).abs().mean()) < 0.5 * float((F.dequantize_blockwise(codes, state) - A).abs().mean())


def test_nested_absmax_is_rounded_to_nearest():
    A = torch.randn(70000)
    _, stochastic = F.quantize_blockwise(A, blocksize=256, nested=True, rand=torch.Generator().manual_seed(0))
    _, nearest = F.quantize_blockwise(A, blocksize=256, nested=True)
    assert torch.equal(stochastic.absmax, nearest.absmax)


@pytest.mark.parametrize(
    ("rand", "error", "fragment"),
    [
        (torch.rand(100), KbitValueError, "rand.numel()=100"),
        (torch.rand(300, dtype=torch.float64), KbitTypeError, "rand has dtype torch.float64"),
        (torch.full((300,), 1.0), KbitValueError, "uniform values in [0, 1)"),
        (torch.full((300,), -0.5), KbitValueError, "a value -0.5"),
        (torch.full((300,), float("nan")), KbitValueError, "uniform values in [0, 1)"),
        ([0.5] * 300, KbitTypeError, "rand has type list"),
    ],
)
def test_bad_rand_is_refused(rand, error, fragment):
    with pytest.raises(error, match=r"quantize_blockwise") as caught:
        F.quantize_blockwise(torch.randn(300), blocksize=64, rand=rand)
    assert fragment in str(caught.value)


def test_an_unsorted_code_is_refused_for_stochastic_rounding():
    with pytest.raises(KbitValueError, match="sorted ascending"):
        F.quantize_blockwise(torch.randn(300), code=CODE.flip(0), blocksize=64, rand=torch.rand(300))


class NearestOnly(kbit.backend.Backend):
    """A backend without stochastic rounding: its method does not even take ``rand``."""

    def is_available(self):
        return True

    def quantize_blockwise(self, A, *, code, blocksize):
        return kbit.backends.get("reference").quantize_blockwise(A, code=code, blocksize=blocksize)


def test_a_backend_without_stochastic_rounding_is_never_handed_rand():
    kbit.backends.register(
        BackendManifest(name="nearestonly", api_version=API_VERSION, priority=50, device_types=("cpu",),
                        factory=f"{__name__}:NearestOnly",
                        ops={"quantize_blockwise": OpSupport(dtypes=("float32",))})  # fmt: skip
    )
    A = torch.randn(500)
    assert kbit.backends.resolve("quantize_blockwise", "cpu", "float32", rounding="nearest").name == "nearestonly"
    choice = kbit.backends.resolve("quantize_blockwise", "cpu", "float32", rounding="stochastic")
    assert choice.name == "reference" and "rounding='stochastic' not in declared ['nearest']" in choice.explain()
    with kbit.backends.use_backend("nearestonly"):
        F.quantize_blockwise(A, blocksize=64)  # served
        with pytest.warns(kbit.KbitFallbackWarning):
            F.quantize_blockwise(A, blocksize=64, rand=torch.rand(500))  # the reference serves it
    with kbit.backends.use_backend("nearestonly", fallback="error"), pytest.raises(UnsupportedOpError):
        F.quantize_blockwise(A, blocksize=64, rand=torch.rand(500))


def test_manifests_may_only_declare_known_roundings():
    with pytest.raises(ValueError, match="unknown rounding mode"):
        OpSupport(roundings=("nearest", "dithered"))
