"""Quantization codebooks: the value tables that codes index into.

Every table is float32 and, except the 4-bit ones, sorted ascending with 256 entries, so the
8-bit quantizers can search it. The constructions are fixed by the on-disk format (see
``docs/formats.md``); changing one changes what every saved code means.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._errors import KbitValueError
from ._validate import check_int, check_real

__all__ = [
    "create_dynamic_map",
    "create_linear_map",
    "create_normal_map",
    "create_fp8_map",
    "get_4bit_type",
    "NF4_VALUES",
    "FP4_VALUES",
]

#: The 16 NF4 values in code order (code ``i`` means ``NF4_VALUES[i]``).
NF4_VALUES: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# FP4 (bitsandbytes' E2M1 flavour): bit 3 is the sign, bits 2..0 select a magnitude.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)

#: The 16 FP4 values in code order; codes 8..15 are the negatives of 0..7. Code 8 (sign
#: bit, zero magnitude) is stored as +0.0, byte-identical to the ecosystem's table.
FP4_VALUES: tuple[float, ...] = tuple(m / 12.0 for m in _FP4_MAGNITUDES) + tuple(
    -m / 12.0 if m else 0.0 for m in _FP4_MAGNITUDES
)

# int4: magnitudes 0..7 scaled to [-1, 1], in the ecosystem's order: codes 0..7 hold
# 7/7 down to 0, codes 8..15 hold -0 (stored as +0.0) down to -7/7.
_INT4_VALUES: tuple[float, ...] = tuple(m / 7.0 for m in range(7, -1, -1)) + tuple(-m / 7.0 if m else 0.0 for m in range(8))


def _pad_to_256(values: torch.Tensor) -> torch.Tensor:
    """Pad a short sorted table to 256 entries by inserting zeros in its middle."""
    gap = 256 - values.numel()
    if gap <= 0:
        return values
    half = values.numel() // 2
    return torch.cat([values[:half], torch.zeros(gap, dtype=values.dtype), values[half:]])


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic (tree) quantization map: 256 float32 values in [-1, 1], sorted.

    Values are spread over ``max_exponent_bits`` decades (``1e-6 .. 1`` by default) with
    more fraction points at larger magnitudes. This is the default 8-bit code and the
    optimizer state maps (signed for first moments, unsigned for second moments).

    ``max_exponent_bits`` may equal ``total_bits``: the smallest decade's point count
    ``2**-1 + 1`` is then truncated to 1, so that decade adds no value (the signed map
    still has 256). A combination giving more than 256 values (unsigned with
    ``max_exponent_bits == total_bits == 8``: 257) is refused.
    """
    op = "create_dynamic_map"
    check_int(op, "total_bits", total_bits, low=1, high=8)
    check_int(op, "max_exponent_bits", max_exponent_bits, low=1, high=total_bits)
    non_sign_bits = total_bits - 1
    values: list[float] = []

    def add_decade(points: int, decade: int) -> None:
        # Midpoints of a float32 linspace, scaled in float64: the format's exact recipe.
        # Everything in float32, the scaling included: the stored bytes depend on it.
        bounds = torch.linspace(0.1, 1.0, points, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scaled = (10.0 ** (decade - (max_exponent_bits - 1)) * means).tolist()
        values.extend(scaled)
        if signed:
            values.extend(-v for v in scaled)

    for i in range(max_exponent_bits):
        extra_bit = 0 if signed else 1
        # int(): a negative exponent (max_exponent_bits == total_bits) gives 1.5 points -> 1.
        add_decade(int(2.0 ** (i + non_sign_bits - max_exponent_bits + extra_bit) + 1), i)
    additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if additional > 0:
        add_decade(additional + 1, max_exponent_bits - 1)
    values += [0.0, 1.0]
    if len(values) > 256:
        raise KbitValueError(
            op, "max_exponent_bits", max_exponent_bits, f"at most {total_bits - 1} for this map ({len(values)} values > 256)"
        )
    table = torch.tensor(sorted(values), dtype=torch.float64).to(torch.float32)
    return _pad_to_256(table)


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> torch.Tensor:
    """Evenly spaced values in ``[-1, 1]`` (or ``[0, 1]``), zero-padded to 256 entries.

    With ``add_zero`` (or fewer than 8 bits) a signed map has an odd number of points, so
    that 0 is exactly representable.
    """
    check_int("create_linear_map", "total_bits", total_bits, low=1, high=8)
    count = 2**total_bits
    if signed and (add_zero or total_bits < 8):
        count -= 1
    values = torch.linspace(-1.0 if signed else 0.0, 1.0, count, dtype=torch.float32)
    return _pad_to_256(values)


def _normal_ppf(p: torch.Tensor) -> torch.Tensor:
    return math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> torch.Tensor:
    """The QLoRA normal-float map: quantiles of N(0, 1) normalised to [-1, 1].

    With ``use_extra_value`` there are 8 positive and 7 negative quantiles plus 0 (the NF4
    values); otherwise 7 of each. Returned sorted and zero-padded to 256 entries.
    """
    check_real("create_normal_map", "offset", offset, low=0.5, high=1.0, low_open=True, high_open=True)
    positive_count = 9 if use_extra_value else 8
    positive = _normal_ppf(torch.linspace(offset, 0.5, positive_count, dtype=torch.float64)[:-1])
    negative = -_normal_ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    values = values / values.max()
    return _pad_to_256(values.to(torch.float32))


def create_fp8_map(
    signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2, total_bits: int = 8
) -> torch.Tensor:
    """A minifloat table (e.g. E4M3 with ``exponent_bits=4, precision_bits=3``), normalised.

    Normal values are ``(1 + mantissa) * 2**(E - bias - 1)`` with
    ``bias = 2**(exponent_bits - 1)``; subnormals (``E == 0``) are
    ``mantissa * 2**(-bias - 2)``. The table is zero-padded to 256, sorted and divided by
    its largest value.
    """
    for name, value in (("exponent_bits", exponent_bits), ("precision_bits", precision_bits), ("total_bits", total_bits)):
        check_int("create_fp8_map", name, value)
    sign_bits = 1 if signed else 0
    if exponent_bits < 1 or precision_bits < 0 or exponent_bits + precision_bits + sign_bits != total_bits:
        raise KbitValueError(
            "create_fp8_map",
            "exponent_bits/precision_bits",
            (exponent_bits, precision_bits),
            f"exponent_bits + precision_bits + sign bit must equal total_bits={total_bits}",
        )
    bias = 2 ** (exponent_bits - 1)
    magnitudes = []
    for exponent in range(2**exponent_bits):
        for mantissa_code in range(2**precision_bits):
            mantissa = mantissa_code / 2**precision_bits
            if exponent == 0:
                # The ecosystem's tables put subnormals two binades lower than IEEE would
                # (they sit below a gap); the golden E4M3 table pins this down.
                magnitudes.append(mantissa * 2.0 ** (-bias - 2))
            else:
                magnitudes.append((1.0 + mantissa) * 2.0 ** (exponent - bias - 1))
    values = magnitudes + ([-m for m in magnitudes] if signed else [])
    values += [0.0] * (256 - len(values))
    table = torch.tensor(sorted(values), dtype=torch.float64)
    return (table / table.max()).to(torch.float32)


_FOUR_BIT_TYPES = {"nf4": NF4_VALUES, "fp4": FP4_VALUES, "int4": _INT4_VALUES}


def get_4bit_type(typename: str, device: Optional[torch.device | str] = None, blocksize: int = 64) -> torch.Tensor:
    """The 16-entry float32 table of a 4-bit type (``"nf4"``, ``"fp4"`` or ``"int4"``).

    Entry ``i`` is the value code ``i`` stands for. ``blocksize`` is accepted for API
    compatibility; the tables do not depend on it.
    """
    # An unhashable typename (a list) must not escape as a bare TypeError from the lookup.
    values = _FOUR_BIT_TYPES.get(typename) if isinstance(typename, str) else None
    if values is None:
        raise KbitValueError("get_4bit_type", "typename", typename, f"expected one of {sorted(_FOUR_BIT_TYPES)}")
    return torch.tensor(values, dtype=torch.float32, device=device)


_BUILDERS = {
    "dynamic": create_dynamic_map,
    "dynamic_unsigned": lambda: create_dynamic_map(signed=False),
    "nf4": lambda: get_4bit_type("nf4"),
    "fp4": lambda: get_4bit_type("fp4"),
}
_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def cached_code(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """A shared, read-only copy of a standard table on ``device``.

    ``name`` is ``"dynamic"``, ``"dynamic_unsigned"``, ``"nf4"`` or ``"fp4"``. The same
    tensor object is returned on every call, so callers must not modify it in place.
    """
    key = (name, str(device))
    table = _CACHE.get(key)
    if table is None:
        table = _CACHE[key] = _CACHE[(name, "cpu")].to(device)
    return table


# The CPU tables are built when this module loads (about 1.5 ms for all four), not on first
# use: a first use inside torch.compile would trace the builders, whose float tolist()
# dynamo cannot follow (a graph break, an error under fullgraph=True). Copies on other
# devices are a traceable .to(device) of these.
_CACHE.update({(name, "cpu"): build() for name, build in _BUILDERS.items()})
