"""Codebooks against the golden tables and their defining constructions."""

import math

import pytest
import torch

import kbit.functional as F


@pytest.mark.parametrize(
    "golden_name, build",
    [
        ("dynamic_signed", lambda: F.create_dynamic_map(signed=True)),
        ("dynamic_unsigned", lambda: F.create_dynamic_map(signed=False)),
        ("linear_signed_8", lambda: F.create_linear_map(signed=True, total_bits=8)),
        ("fp8_e4m3", lambda: F.create_fp8_map(signed=True, exponent_bits=4, precision_bits=3)),
        ("nf4", lambda: F.get_4bit_type("nf4")),
        ("fp4", lambda: F.get_4bit_type("fp4")),
    ],
)
def test_codebook_is_byte_exact(goldens, golden_name, build):
    table = build()
    golden = goldens["codes"][golden_name]
    assert table.dtype == torch.float32 and table.shape == golden.shape
    assert torch.equal(table.view(torch.int32), golden.view(torch.int32))


def test_dynamic_map_landmarks():
    signed = F.create_dynamic_map()
    assert (signed < 0).sum() == 127 and signed[127] == 0 and signed[255] == 1.0
    assert signed[0].item() == pytest.approx(-0.99296875)
    assert torch.all(signed[1:] >= signed[:-1])
    unsigned = F.create_dynamic_map(signed=False)
    assert unsigned[0] == 0 and (unsigned >= 0).all()


def test_nf4_is_the_normal_quantile_construction():
    # Independent derivation: 8 positive and 7 negative N(0,1) quantiles, plus 0, normalised.
    offset = 0.9677083

    def ppf(p: torch.Tensor) -> torch.Tensor:
        return math.sqrt(2.0) * torch.erfinv(2 * p - 1)

    positive = ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    derived = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    derived = derived / derived.max()
    table = F.get_4bit_type("nf4").double()
    # The published table was computed with scipy's ppf; erfinv agrees to one float32 ulp.
    assert torch.allclose(derived, table, rtol=0, atol=2.4e-7)
    # create_normal_map gives the same 16 values, padded with zeros to 256.
    normal_map = F.create_normal_map()
    assert normal_map.numel() == 256
    nonzero = normal_map[normal_map != 0]
    assert torch.allclose(nonzero.double(), table[table != 0], rtol=0, atol=2.4e-7)


def test_fp4_has_the_documented_magnitudes():
    fp4 = F.get_4bit_type("fp4")
    magnitudes = [0, 0.0625, 8, 12, 4, 6, 2, 3]
    assert torch.allclose(fp4[:8], torch.tensor(magnitudes) / 12)
    assert torch.equal(fp4[8:], -fp4[:8])  # -0.0 == 0.0 for code 8


def test_int4_table_order():
    # Code i stands for (7 - i) / 7 in the first half and -(i - 8) / 7 in the second,
    # the order the ecosystem's int4 table uses; its -0 is stored as +0.0.
    expected = [m / 7 for m in range(7, -1, -1)] + [-m / 7 for m in range(8)]
    table = F.get_4bit_type("int4")
    assert table.dtype == torch.float32 and torch.equal(table, torch.tensor(expected, dtype=torch.float32))
    assert math.copysign(1.0, table[8].item()) == 1.0


def test_linear_map_padding():
    four_bit = F.create_linear_map(signed=True, total_bits=4)
    assert four_bit.numel() == 256
    # 15 evenly spaced points (0 among them, up to float32 rounding), then 241 zeros.
    points = torch.cat([four_bit[:7], four_bit[-8:]])
    assert torch.allclose(points, torch.linspace(-1, 1, 15), atol=1e-7)
    assert torch.all(four_bit[7:-8] == 0)
    unsigned = F.create_linear_map(signed=False)
    assert torch.allclose(unsigned, torch.linspace(0, 1, 256))


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: F.get_4bit_type("nf5"), "typename"),
        (lambda: F.create_dynamic_map(total_bits=9), "total_bits"),
        (lambda: F.create_dynamic_map(max_exponent_bits=9), "max_exponent_bits"),
        (lambda: F.create_dynamic_map(signed=False, max_exponent_bits=8), "max_exponent_bits"),  # 257 values
        (lambda: F.create_fp8_map(exponent_bits=4, precision_bits=4), "exponent_bits"),
        (lambda: F.create_normal_map(offset=1.5), "offset"),
    ],
)
def test_bad_codebook_arguments_name_the_value(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_dynamic_map_with_as_many_exponent_bits_as_total_bits():
    # bitsandbytes' tests build this map: the smallest decade's 2**-1 + 1 points truncate to
    # one boundary (no value); the other decades hold 1, 2, ..., 64 magnitudes per sign.
    table = F.create_dynamic_map(signed=True, max_exponent_bits=8)
    assert table.shape == (256,) and table.dtype == torch.float32
    assert bool((table[1:] >= table[:-1]).all()) and table[127] == 0 and table[-1] == 1.0
    positive = table[table > 0]
    assert positive.numel() == 1 + sum(2**k for k in range(7))  # 1.0 plus 127 midpoints
    assert positive.min() < 1e-6 and torch.equal(table[table < 0].neg().sort().values, positive[:-1])
