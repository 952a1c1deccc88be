"""Conformance cases of the 4-bit family: NF4/FP4 quantize, dequantize, gemv and matmul.

The format (``docs/formats.md``) leaves two freedoms in the packed codes, and the
comparator allows exactly those: any code inside an all-zero block (it dequantizes to zero
whatever it is), and FP4's two zero codes (0 and 8, +0 and -0) anywhere. Everything else
is bit-exact: absmax, every other nibble (including the pad nibble of an odd count, the
code of zero), the zero bytes that pad the tail to whole storage elements, and every
dequantized value. ``gemv_4bit`` and ``matmul_4bit`` sum products, whose order is free:
they are held to their row of ``kbit.testing.tolerances.CONFORMANCE``.
"""

from __future__ import annotations

import math

import torch

from ..._formats import BLOCKSIZES_4BIT, FLOAT_DTYPE_NAMES, QUANT_STORAGE_NAMES_4BIT, QUANT_TYPES_4BIT, num_blocks
from ..._ops.quant4 import packed_rows
from ...functional._codebooks import get_4bit_type
from ..tolerances import EXACT, Tolerance
from ._spec import (
    GoldenCheck,
    GoldenContext,
    InputSet,
    OpCases,
    Variant,
    compare_tensor,
    large_magnitude,
    randn,
    returns,
    seeded,
    tie_values,
    with_unit_absmax,
)

Tensor = torch.Tensor

FAMILY = "quant4"


_UNIVERSE = {
    "dtype": FLOAT_DTYPE_NAMES,
    "blocksize": BLOCKSIZES_4BIT,
    "quant_type": QUANT_TYPES_4BIT,
    "quant_storage": QUANT_STORAGE_NAMES_4BIT,
}

# Tables are built once; FP4's code 8 is -0.0, the twin of code 0.
_TABLES = {quant_type: get_4bit_type(quant_type) for quant_type in QUANT_TYPES_4BIT}
_FP4_NEGATIVE_ZERO, _FP4_ZERO = 8, 0


# --------------------------------------------------------------------------- input values
def _storage(variant: Variant) -> torch.dtype:
    return getattr(torch, variant["quant_storage"])


def _packed(variant: Variant, name: str, numel: int) -> Tensor:
    """Random bytes (every nibble a valid code) as a ``(rows, 1)`` tensor of the storage dtype.

    The bytes past ``(numel + 1) // 2`` are padding a reader must ignore: they are random too.
    """
    storage = _storage(variant)
    rows = packed_rows(numel, storage)
    itemsize = torch.empty((), dtype=storage).element_size()
    data = torch.randint(0, 256, (rows * itemsize,), dtype=torch.uint8, generator=seeded(variant, name))
    if storage.is_floating_point and rows:
        # No NaN bit patterns: opcheck compares inputs before and after the call, and NaN
        # never equals itself. Clearing the top exponent bit changes one nibble per element.
        high = data.view(-1, itemsize)[:, -1]
        high &= 0xBF
    return data.view(storage).reshape(rows, 1)


def _scales(variant: Variant, name: str, count: int, low: float = 0.05) -> Tensor:
    return torch.rand(count, generator=seeded(variant, name)) * (1 - low) + low


# ----------------------------------------------------------------------- quantize_4bit
def _quantize_inputs(variant: Variant) -> list[InputSet]:
    bs, dtype, storage = variant["blocksize"], variant.dtype, _storage(variant)
    quant_type = variant["quant_type"]

    def entry(name: str, values: Tensor) -> InputSet:
        return InputSet(name, (values.to(dtype), bs, quant_type, storage))

    large = large_magnitude(dtype)
    large_values = randn(variant, "large_values", bs + 5)
    large_values[::7] *= large / 8
    large_values[-1] = -large
    zeros_around = torch.cat([torch.zeros(bs), randn(variant, "all_zero_blocks", bs), torch.zeros(3)])
    return [
        # Odd count: the last byte holds one code and the pad nibble.
        entry("partial_block", randn(variant, "partial_block", 2 * bs + 3)),
        entry("one_element", randn(variant, "one_element", 1) * 3),
        entry("matrix", randn(variant, "matrix", 3, bs // 2 + 5)),
        # First and (partial) last block all zero.
        entry("all_zero_blocks", zeros_around),
        entry("large_values", large_values),
        entry("ties", with_unit_absmax(tie_values(_TABLES[quant_type]), bs)),
        entry("empty", torch.empty(0, 4)),
    ]


def _nibbles(packed: Tensor) -> Tensor:
    """Every nibble of the packed bytes, high nibble first, as int64."""
    data = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([data // 16, data % 16], dim=1).reshape(-1)


def _compare_packed(
    got: dict[str, Tensor], want: dict[str, Tensor], args: tuple, variant: Variant, tolerance: Tolerance
) -> list[str]:
    """absmax bit-exact; packed nibbles exact up to the format's two freedoms.

    Free: the codes of elements in all-zero blocks, and (FP4) code 8 for code 0, the two
    encodings of zero. The pad nibble and the padding bytes are compared like the rest.
    """
    absmax_problem = compare_tensor("absmax", got.get("absmax"), want["absmax"], tolerance)
    if absmax_problem:
        return [absmax_problem]
    packed, expected = got.get("packed"), want["packed"]
    if not isinstance(packed, Tensor) or packed.shape != expected.shape or packed.dtype != expected.dtype:
        return [compare_tensor("packed", packed, expected, tolerance) or "packed: malformed"]
    mine, theirs = _nibbles(packed), _nibbles(expected)
    if variant["quant_type"] == "fp4":
        mine = mine.masked_fill(mine == _FP4_NEGATIVE_ZERO, _FP4_ZERO)
        theirs = theirs.masked_fill(theirs == _FP4_NEGATIVE_ZERO, _FP4_ZERO)
    numel, blocksize = args[0].numel(), args[1]
    free = torch.zeros_like(mine, dtype=torch.bool)
    free[:numel] = (want["absmax"] == 0).repeat_interleave(blocksize)[:numel]
    problem = compare_tensor("packed nibbles (outside all-zero blocks)", mine[~free], theirs[~free], EXACT)
    return [problem] if problem else []


# --------------------------------------------------------------------- dequantize_4bit
def _dequantize_inputs(variant: Variant) -> list[InputSet]:
    bs, dtype, quant_type = variant["blocksize"], variant.dtype, variant["quant_type"]

    def entry(name: str, shape: tuple[int, ...], scales: Tensor | None = None) -> InputSet:
        numel = math.prod(shape)
        scales = _scales(variant, name, num_blocks(numel, bs)) * 3 if scales is None else scales
        return InputSet(name, (_packed(variant, name, numel), scales, bs, quant_type, list(shape), dtype))

    numel3 = 2 * bs + 3
    zero_scales = _scales(variant, "all_zero_block", num_blocks(numel3, bs))
    zero_scales[0] = 0.0
    large_scales = _scales(variant, "large_values", num_blocks(numel3, bs)) * (large_magnitude(dtype) / 4)
    if dtype == torch.float16:
        large_scales[-1] = 1e5  # beyond float16's range: the cast must overflow to inf
    return [
        entry("partial_block", (numel3,)),
        entry("one_element", (1,)),
        entry("matrix", (3, bs // 2 + 5)),
        entry("all_zero_block", (numel3,), zero_scales),
        entry("large_values", (numel3,), large_scales),
        entry("empty", (0, 3)),
    ]


# ------------------------------------------------------------------ gemv_4bit, matmul_4bit
def _product_inputs(variant: Variant, shapes: dict[str, tuple[tuple[int, ...], int, int]]) -> list[InputSet]:
    """Inputs ``(A, B, absmax, blocksize, quant_type, [out, in])`` for each named shape
    (and a ``bias`` for the shape named ``with_bias``).

    ``shapes`` maps a name to ``(A's leading dimensions, out_features, in_features)``;
    ``B`` holds random codes. ``A`` is scaled
    by ``1 / sqrt(in_features)`` so results are of order one whatever the size: the shared
    tolerance then means the same thing for every case.
    """
    bs, dtype, quant_type = variant["blocksize"], variant.dtype, variant["quant_type"]
    cases = []
    for name, (leading, out_features, in_features) in shapes.items():
        numel = out_features * in_features
        scales = _scales(variant, f"{name}/absmax", num_blocks(numel, bs))
        if name == "all_zero_block":
            scales[0] = 0.0
        A = randn(variant, name, *leading, in_features) * (2 / math.sqrt(in_features))
        args = (A.to(dtype), _packed(variant, name, numel), scales, bs, quant_type, [out_features, in_features])
        if name == "with_bias":  # added inside the op, before its one rounding to A's dtype
            args = (*args, randn(variant, f"{name}/bias", out_features).to(dtype))
        cases.append(InputSet(name, args))
    return cases


def _gemv_inputs(variant: Variant) -> list[InputSet]:
    bs = variant["blocksize"]
    return _product_inputs(
        variant,
        {
            # An odd weight (7 x odd): its last byte holds the pad nibble.
            "typical": ((1,), 7, bs // 2 + 5),
            "one_element": ((1,), 1, 1),
            "vector_input": ((), 5, 33),  # A without a leading dimension
            "rows_across_blocks": ((1, 1), 3, bs + 3),
            "all_zero_block": ((1,), 4, bs // 2 + 5),
            "with_bias": ((1,), 6, bs + 1),
            # A multiple of 128 inputs and an odd number of outputs: the shape native
            # kernels vectorise (blocks of 4096 then straddle weight rows), remainder rows included.
            "vector_width": ((1,), 9, 256),
        },
    )


def _matmul_inputs(variant: Variant) -> list[InputSet]:
    bs = variant["blocksize"]
    return _product_inputs(
        variant,
        {
            "typical": ((4,), 7, bs // 2 + 5),
            "one_element": ((1,), 1, 1),
            "batched": ((2, 3), 5, 33),
            "rows_across_blocks": ((3,), 3, bs + 3),
            "all_zero_block": ((2,), 4, bs // 2 + 5),
            "empty_batch": ((0,), 6, 40),
            "with_bias": ((3,), 6, bs + 1),
            "vector_width": ((5,), 9, 256),  # as in gemv_4bit, with a remainder of rows of A
        },
    )


CASES = (
    OpCases(
        "quantize_4bit",
        _UNIVERSE,
        _quantize_inputs,
        returns("packed", "absmax"),
        _compare_packed,
        # The fake kernel's output dtype and row count depend on the storage.
        opcheck_axes=("dtype", "quant_storage"),
    ),
    OpCases("dequantize_4bit", _UNIVERSE, _dequantize_inputs, returns("out"), opcheck_axes=("dtype", "quant_storage")),
    # The products' fake kernel depends on A only; B's storage changes nothing there.
    OpCases("gemv_4bit", _UNIVERSE, _gemv_inputs, returns("out")),
    OpCases("matmul_4bit", _UNIVERSE, _matmul_inputs, returns("out")),
)


# ----------------------------------------------------------------------------- goldens
#: FP4 golden codes differ from the nearest code at exact ties (the incumbent rounds the
#: ratio in bf16, kbit in float32): about 1 element in 1,600; allow at most this share...
_GOLDEN_FP4_TIE_SHARE = 1 / 500
#: ...and only where the value is that close to the midpoint of the two choices.
_GOLDEN_FP4_TIE_GAP = 1e-6


def _declared_entries(ctx: GoldenContext, op: str) -> list[dict]:
    """The ``quant4`` golden entries (uint8 storage) whose variant the backend declares."""
    return [
        entry
        for entry in ctx.goldens["quant4"]
        if ctx.declares(
            op, entry["A"].dtype, blocksize=entry["blocksize"], quant_type=entry["quant_type"], quant_storage="uint8"
        )
    ]


def _label(entry: dict) -> str:
    nested = ", nested" if entry["nested"] else ""
    return f"{entry['quant_type']} blocksize {entry['blocksize']} {entry['A'].dtype} {tuple(entry['A'].shape)}{nested}"


def _fp4_code_problem(entry: dict, packed: Tensor, absmax: Tensor, table: Tensor) -> str | None:
    """Why FP4 codes are not value-exact with the goldens up to exact ties, or None."""
    A, blocksize = entry["A"].reshape(-1), entry["blocksize"]
    table = table.double()
    mine = table[_nibbles(packed)[: A.numel()]]
    golden = table[_nibbles(entry["packed"])[: A.numel()]]
    differs = mine != golden  # a value comparison: +0 and -0 agree
    scale = absmax.double().repeat_interleave(blocksize)[: A.numel()]
    x = torch.where(scale == 0, torch.zeros_like(scale), A.double() / scale)
    gap = ((x - mine).abs() - (x - golden).abs()).abs()
    if bool((gap[differs] >= _GOLDEN_FP4_TIE_GAP).any()):
        return "some FP4 codes differ from the goldens' where the value is not an exact tie"
    if int(differs.sum()) > A.numel() * _GOLDEN_FP4_TIE_SHARE:
        return f"{int(differs.sum())} of {A.numel()} FP4 codes differ from the goldens' (ties allow 1/500)"
    return None


def _golden_quantize_4bit(ctx: GoldenContext) -> tuple[int, list[str]]:
    """NF4 packed bytes exact, FP4 values exact up to exact ties; absmax exact (plain entries)."""
    entries, problems = _declared_entries(ctx, "quantize_4bit"), []
    for entry in entries:
        label = _label(entry)
        packed, absmax = ctx.call("quantize_4bit", entry["A"], entry["blocksize"], entry["quant_type"], torch.uint8)
        if not entry["nested"] and not torch.equal(absmax, entry["quant_state_packed"]["absmax"]):
            problems.append(f"{label}: absmax differs from the golden absmax")
            continue
        if packed.shape != entry["packed"].shape or packed.dtype != entry["packed"].dtype:
            problems.append(
                f"{label}: packed is {tuple(packed.shape)} {packed.dtype}, goldens {tuple(entry['packed'].shape)}"
            )
        elif entry["quant_type"] == "nf4":
            if not torch.equal(packed, entry["packed"]):
                problems.append(f"{label}: NF4 packed bytes differ from the goldens")
        else:
            problem = _fp4_code_problem(entry, packed, absmax, ctx.goldens["codes"]["fp4"])
            if problem:
                problems.append(f"{label}: {problem}")
    return len(entries), problems


def _golden_dequantize_4bit(ctx: GoldenContext) -> tuple[int, list[str]]:
    """Golden codes and absmax dequantize to ``table[code] * absmax`` exactly.

    The goldens' own 2-D ``dequant`` tensors index absmax per row (their maker's CPU path)
    where the format has one absmax per consecutive block, so only the 1-D ones are
    compared directly; every entry is compared with the format's formula.
    """
    entries = [entry for entry in _declared_entries(ctx, "dequantize_4bit") if not entry["nested"]]
    problems = []
    for entry in entries:
        A, blocksize, quant_type = entry["A"], entry["blocksize"], entry["quant_type"]
        absmax = entry["quant_state_packed"]["absmax"]
        out = ctx.call("dequantize_4bit", entry["packed"], absmax, blocksize, quant_type, list(A.shape), A.dtype)
        table = ctx.goldens["codes"][quant_type].float()
        per_element = absmax.repeat_interleave(blocksize)[: A.numel()]
        formula = (table[_nibbles(entry["packed"])[: A.numel()]] * per_element).to(A.dtype).reshape(A.shape)
        expected = [("the format's table[code] * absmax", formula)]
        if A.dim() == 1:
            expected.append(("the golden dequant", entry["dequant"]))
        for what, tensor in expected:
            problem = compare_tensor(f"{_label(entry)}: against {what}", out, tensor, EXACT)
            if problem:
                problems.append(problem)
    return len(entries), problems


GOLDENS = (
    GoldenCheck("quantize_4bit", _golden_quantize_4bit),
    GoldenCheck("dequantize_4bit", _golden_dequantize_4bit),
)
