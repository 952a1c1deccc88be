"""Conformance cases of the 8-bit family: blockwise, whole-tensor and code-only quantization.

Every result of this family is bit-exact between kbit backends (codes, scales and
dequantized values: the nearest-code search is exact with ties to the lower index, and
dequantization is one float32 multiply), except where the format leaves freedom: the code
stored for an element of an all-zero block, and the two ops listed in the tolerance table
(``estimate_quantiles``, ``histogram_scatter_add_2d``).
"""

from __future__ import annotations

import torch

from ..._formats import BLOCKSIZES_8BIT_ALL, FLOAT_DTYPE_NAMES, num_blocks
from ..._manifest import ROUNDINGS
from ...functional._codebooks import create_dynamic_map, create_linear_map
from ..tolerances import EXACT, Tolerance
from ._spec import (
    GoldenCheck,
    GoldenContext,
    Caller,
    InputSet,
    OpCases,
    StatisticalCheck,
    Variant,
    compare_tensor,
    large_magnitude,
    mutates,
    randn,
    returns,
    seeded,
    tie_values,
    with_unit_absmax,
)

Tensor = torch.Tensor

FAMILY = "blockwise8"

_BLOCKWISE_UNIVERSE = {"dtype": FLOAT_DTYPE_NAMES, "blocksize": BLOCKSIZES_8BIT_ALL}
_QUANTIZE_BLOCKWISE_UNIVERSE = {**_BLOCKWISE_UNIVERSE, "rounding": ROUNDINGS}
_DTYPE_UNIVERSE = {"dtype": FLOAT_DTYPE_NAMES}

# Tables are built once; the inputs of every case are built from CPU copies of them.
_DYNAMIC = create_dynamic_map()
_UNSIGNED = create_dynamic_map(signed=False)
_LINEAR = create_linear_map()


# --------------------------------------------------------------------------- input values
def _large_values(variant: Variant, numel: int) -> Tensor:
    """randn with every seventh value, and the last, scaled towards the dtype's range."""
    large = large_magnitude(variant.dtype)
    values = randn(variant, "large", numel)
    values[::7] *= large / 8
    values[-1] = -large
    return values


def _codes(variant: Variant, name: str, shape: tuple[int, ...]) -> Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=seeded(variant, name))


def _scales(variant: Variant, name: str, count: int) -> Tensor:
    return torch.rand(count, generator=seeded(variant, name)) * 4 + 0.01


# ------------------------------------------------------------------ quantize_blockwise
def _quantize_blockwise_inputs(variant: Variant) -> list[InputSet]:
    if variant["rounding"] == "stochastic":
        return _stochastic_inputs(variant)
    bs, dtype = variant["blocksize"], variant.dtype

    def entry(name: str, values: Tensor, code: Tensor = _DYNAMIC) -> InputSet:
        return InputSet(name, (values.to(dtype), code.clone(), bs))

    return [
        entry("partial_block", randn(variant, "partial_block", 2 * bs + 3)),
        entry("one_element", randn(variant, "one_element", 1) * 3),
        entry("matrix", randn(variant, "matrix", 3 * (bs // 2 + 7)).view(3, -1)),
        entry("all_zero_block", torch.cat([torch.zeros(bs), randn(variant, "all_zero_block", bs // 2)])),
        entry("large_values", _large_values(variant, bs + 5)),
        entry("ties", with_unit_absmax(tie_values(_DYNAMIC), bs)),
        entry("linear_code", randn(variant, "linear_code", bs + 1), _LINEAR),
        entry("empty", torch.empty(0, 4)),
    ]


# ------------------------------------------------------------ stochastic rounding (rand=)
#: Shortest ``rand`` buffer read cyclically (``docs/formats.md`` section 2).
_MIN_CYCLIC_RAND = 1024


def _uniform(variant: Variant, name: str, count: int) -> Tensor:
    return torch.rand(count, generator=seeded(variant, f"{name}/rand"))


def _stochastic_inputs(variant: Variant) -> list[InputSet]:
    """Given ``rand``, stochastic rounding is deterministic: compared bit-exactly like nearest."""
    bs, dtype = variant["blocksize"], variant.dtype

    def entry(name: str, values: Tensor, rand: Tensor | None = None, code: Tensor = _DYNAMIC) -> InputSet:
        rand = _uniform(variant, name, values.numel()) if rand is None else rand
        return InputSet(name, (values.to(dtype), code.clone(), bs, rand))

    # rand exactly 0 takes the upper neighbour whenever x is above the lower one; the largest
    # float below 1 takes the lower neighbour unless x is within an ulp of the upper one.
    edges = torch.tensor([0.0, float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))]).repeat(bs + 1)
    on_codes = with_unit_absmax(_DYNAMIC, bs)  # exactly on a code: no rand may move it
    cyclic = randn(variant, "cyclic_rand", 3 * _MIN_CYCLIC_RAND + 5)
    return [
        entry("partial_block", randn(variant, "partial_block", 2 * bs + 3)),
        entry("matrix", randn(variant, "matrix", 3 * (bs // 2 + 7)).view(3, -1)),
        entry("cyclic_rand", cyclic, _uniform(variant, "cyclic_rand", _MIN_CYCLIC_RAND)),
        entry("rand_edges", randn(variant, "rand_edges", edges.numel()), edges),
        entry("on_codes", on_codes),
        entry("all_zero_block", torch.cat([torch.zeros(bs), randn(variant, "all_zero_block", bs // 2)])),
        entry("large_values", _large_values(variant, bs + 5)),
        entry("linear_code", randn(variant, "linear_code", bs + 1), code=_LINEAR),
        entry("empty", torch.empty(0, 4), _uniform(variant, "empty", _MIN_CYCLIC_RAND)),
    ]


#: Independent draws per element in the statistical check of stochastic rounding.
STOCHASTIC_DRAWS = 1000
#: Every element's mean dequantized value lies within this many standard errors of the input...
STOCHASTIC_MAX_SE = 5.0
#: ...and at least :data:`STOCHASTIC_SHARE_WITHIN` of the elements within this many.
STOCHASTIC_TYPICAL_SE = 3.0
STOCHASTIC_SHARE_WITHIN = 0.99


def _stochastic_statistics(call: Caller, variant: Variant) -> list[str]:
    """Over :data:`STOCHASTIC_DRAWS` draws: only the two neighbouring codes, and unbiased.

    The test tensor repeats 512 values (in chunks of 64 that each start with 1.0, so every
    block of every blocksize has absmax exactly 1) once per draw, with fresh uniform values
    for every copy: one call holds all the draws.
    """
    bs, dtype = variant["blocksize"], variant.dtype
    chunk = 64
    values = torch.rand(512, generator=seeded(variant, "statistics")) * 2 - 1
    values[::chunk] = 1.0
    values[1:chunk:9] = _DYNAMIC[100:107]  # exactly on codes: never moved
    base = values.to(dtype)
    A = base.repeat(STOCHASTIC_DRAWS)
    rand = _uniform(variant, "statistics", A.numel())
    codes, absmax = call("quantize_blockwise", A, _DYNAMIC.clone(), bs, rand)
    if not torch.equal(absmax, torch.ones_like(absmax)):
        return [f"absmax should be exactly 1 in every block, got values in [{float(absmax.min())}, {float(absmax.max())}]"]
    x = base.double()
    code = _DYNAMIC.double()
    above = torch.searchsorted(code, x, right=True)
    lo = (above - 1).clamp(0, 255)
    hi = torch.searchsorted(code, x).clamp(max=255)
    codes = codes.reshape(STOCHASTIC_DRAWS, -1).long()
    problems = []
    strays = ~((codes == lo) | (codes == hi))
    if bool(strays.any()):
        element = int(strays.any(0).nonzero()[0])
        problems.append(
            f"{int(strays.any(0).sum())} of {x.numel()} values were rounded to a code other than their two neighbours "
            f"(element {element}: x={float(x[element])!r} got codes {sorted(set(codes[:, element].tolist()))[:5]}, "
            f"neighbours {int(lo[element])} and {int(hi[element])})"
        )
    spread = code[hi] - code[lo]
    fraction = torch.where(spread > 0, (x - code[lo]) / torch.where(spread > 0, spread, 1.0), 0.0)
    stderr = spread * (fraction * (1 - fraction) / STOCHASTIC_DRAWS).sqrt()
    mean = code[codes].mean(0)
    deviation = (mean - x).abs()
    exact = stderr == 0  # on a code value, or outside the table: no draw may move it
    moved = (codes[:, exact] != lo[exact]).any(0)
    if bool(moved.any()):
        problems.append(f"{int(moved.sum())} values on a code (or outside the table) did not always keep it")
    z = deviation[~exact] / stderr[~exact]
    if z.numel() and float(z.max()) > STOCHASTIC_MAX_SE:
        problems.append(
            f"the mean of {STOCHASTIC_DRAWS} draws is {float(z.max()):.1f} standard errors from the input for some "
            f"element (at most {STOCHASTIC_MAX_SE:g} allowed): the rounding is biased"
        )
    within = float((z <= STOCHASTIC_TYPICAL_SE).double().mean()) if z.numel() else 1.0
    if within < STOCHASTIC_SHARE_WITHIN:
        problems.append(
            f"only {within:.1%} of the elements' means are within {STOCHASTIC_TYPICAL_SE:g} standard errors of the "
            f"input (at least {STOCHASTIC_SHARE_WITHIN:.0%} required)"
        )
    return problems


def _zero_block_mask(absmax: Tensor, numel: int, blocksize: int) -> Tensor:
    return (absmax == 0).repeat_interleave(blocksize)[:numel]


def _compare_codes_and_absmax(
    got: dict[str, Tensor], want: dict[str, Tensor], args: tuple, variant: Variant, tolerance: Tolerance
) -> list[str]:
    """Scales bit-exact; codes bit-exact except in all-zero blocks, where any code is allowed.

    An all-zero block dequantizes to zero whatever its codes, so the format leaves the
    stored index free there (zero's index is only a preference).
    """
    absmax_problem = compare_tensor("absmax", got.get("absmax"), want["absmax"], tolerance)
    if absmax_problem:
        return [absmax_problem]
    codes, expected = got.get("codes"), want["codes"]
    if not isinstance(codes, Tensor) or codes.shape != expected.shape or codes.dtype != expected.dtype:
        return [compare_tensor("codes", codes, expected, tolerance) or "codes: malformed"]
    blocksize = args[2] if len(args) > 2 else max(expected.numel(), 1)
    free = _zero_block_mask(want["absmax"], expected.numel(), blocksize).view(expected.shape)
    problem = compare_tensor(
        "codes (outside all-zero blocks)", codes.masked_fill(free, 0), expected.masked_fill(free, 0), tolerance
    )
    return [problem] if problem else []


# ---------------------------------------------------------------- dequantize_blockwise
def _dequantize_blockwise_inputs(variant: Variant) -> list[InputSet]:
    bs, dtype = variant["blocksize"], variant.dtype

    def entry(name: str, shape: tuple[int, ...], scales: Tensor | None = None, code: Tensor = _DYNAMIC) -> InputSet:
        numel = int(torch.Size(shape).numel())
        blocks = num_blocks(numel, bs)
        scales = _scales(variant, name, blocks) if scales is None else scales
        return InputSet(name, (_codes(variant, name, shape), scales, code.clone(), bs, dtype))

    blocks3 = num_blocks(2 * bs + 3, bs)
    zero_scales = _scales(variant, "all_zero_block", blocks3)
    zero_scales[0] = 0.0
    large_scales = _scales(variant, "large_values", blocks3) * (large_magnitude(dtype) / 4)
    if dtype == torch.float16:
        large_scales[-1] = 1e5  # beyond float16's range: the cast must overflow to inf
    return [
        entry("partial_block", (2 * bs + 3,)),
        entry("one_element", (1,)),
        entry("matrix", (3, bs // 2 + 7)),
        entry("all_zero_block", (2 * bs + 3,), zero_scales),
        entry("large_values", (2 * bs + 3,), large_scales),
        entry("linear_code", (bs + 1,), code=_LINEAR),
        entry("empty", (0, 3)),
    ]


# ------------------------------------------------------------------ quantize / dequantize
def _quantize_inputs(variant: Variant) -> list[InputSet]:
    dtype = variant.dtype

    def entry(name: str, values: Tensor, code: Tensor = _DYNAMIC) -> InputSet:
        return InputSet(name, (values.to(dtype), code.clone()))

    ties = tie_values(_DYNAMIC)
    return [
        entry("typical", randn(variant, "typical", 1000)),
        entry("one_element", randn(variant, "one_element", 1) * 3),
        entry("matrix", randn(variant, "matrix", 7 * 13).view(7, 13)),
        entry("all_zero", torch.zeros(300)),
        entry("large_values", _large_values(variant, 200)),
        entry("ties", torch.cat([torch.ones(1), ties])),
        entry("linear_code", randn(variant, "linear_code", 500), _LINEAR),
    ]


def _dequantize_inputs(variant: Variant) -> list[InputSet]:
    dtype = variant.dtype

    def entry(name: str, shape: tuple[int, ...], scale: float, code: Tensor = _DYNAMIC) -> InputSet:
        return InputSet(name, (_codes(variant, name, shape), torch.tensor([scale]), code.clone(), dtype))

    return [
        entry("typical", (1000,), 2.5),
        entry("one_element", (1,), 0.75),
        entry("matrix", (7, 13), 3.0),
        entry("zero_absmax", (100,), 0.0),
        entry("large_values", (300,), large_magnitude(dtype) / 4),
        entry("linear_code", (500,), 1.5, _LINEAR),
        entry("empty", (0,), 1.0),
    ]


# ------------------------------------------------------------------------- code-only
def _quantize_no_absmax_inputs(variant: Variant) -> list[InputSet]:
    dtype = variant.dtype

    def entry(name: str, values: Tensor, code: Tensor = _DYNAMIC) -> InputSet:
        return InputSet(name, (values.to(dtype), code.clone()))

    uniform = torch.rand(777, generator=seeded(variant, "typical"))
    return [
        # Slightly beyond [-1, 1]: out-of-range values map to the end codes.
        entry("typical", uniform * 2.4 - 1.2),
        entry("one_element", torch.tensor([0.3])),
        entry("matrix", (torch.rand(5, 31, generator=seeded(variant, "matrix")) * 2 - 1)),
        entry("ties", tie_values(_DYNAMIC)),
        entry("unsigned_code", torch.rand(500, generator=seeded(variant, "unsigned_code")), _UNSIGNED),
        entry("linear_code_ties", tie_values(_LINEAR), _LINEAR),
        entry("empty", torch.empty(0)),
    ]


def _dequantize_no_absmax_inputs(variant: Variant) -> list[InputSet]:
    dtype = variant.dtype

    def entry(name: str, shape: tuple[int, ...], code: Tensor = _DYNAMIC) -> InputSet:
        return InputSet(name, (_codes(variant, name, shape), code.clone(), dtype))

    return [
        entry("typical", (1000,)),
        entry("one_element", (1,)),
        entry("matrix", (6, 17)),
        entry("linear_code", (300,), _LINEAR),
        entry("empty", (0,)),
    ]


# --------------------------------------------------------------------------- statistics
def _estimate_quantiles_inputs(variant: Variant) -> list[InputSet]:
    dtype = variant.dtype

    def entry(name: str, values: Tensor, offset: float = 1 / 512, count: int = 256) -> InputSet:
        return InputSet(name, (values.to(dtype), offset, count))

    return [
        entry("typical", randn(variant, "typical", 1000)),
        entry("one_element", torch.tensor([1.25])),
        entry("two_elements", torch.tensor([-1.0, 3.0]), count=10),
        entry("duplicates", torch.randint(-3, 4, (500,), generator=seeded(variant, "duplicates")).float()),
        entry("zero_offset", randn(variant, "zero_offset", 300), offset=0.0, count=17),
        entry("single_quantile", randn(variant, "single_quantile", 300), offset=0.25, count=1),
        entry("large_values", _large_values(variant, 400)),
    ]


def _histogram_inputs(variant: Variant) -> list[InputSet]:
    def entry(name: str, shape: tuple[int, int], count: int, index_dtype: torch.dtype, start: Tensor | None = None):
        generator = seeded(variant, name)
        index1 = torch.randint(0, shape[0], (count,), generator=generator).to(index_dtype)
        index2 = torch.randint(0, shape[1], (count,), generator=generator).to(index_dtype)
        source = torch.randn(count, generator=generator)
        histogram = torch.zeros(shape) if start is None else start
        return InputSet(name, (histogram, index1, index2, source))

    return [
        entry("typical", (16, 8), 500, torch.int32),
        entry("one_element", (3, 3), 1, torch.int64),
        entry("int64_indices", (5, 40), 300, torch.int64),
        # Few cells, many updates: every cell is hit repeatedly.
        entry("duplicates", (2, 2), 1000, torch.int32),
        entry("nonzero_start", (4, 6), 50, torch.int32, torch.rand(4, 6, generator=seeded(variant, "start"))),
        entry("empty", (4, 4), 0, torch.int32),
    ]


CASES = (
    OpCases(
        "quantize_blockwise",
        _QUANTIZE_BLOCKWISE_UNIVERSE,
        _quantize_blockwise_inputs,
        returns("codes", "absmax"),
        _compare_codes_and_absmax,
        # rand changes the schema's optional argument, so opcheck runs for each rounding.
        opcheck_axes=("dtype", "rounding"),
        statistics=StatisticalCheck(lambda variant: variant["rounding"] == "stochastic", _stochastic_statistics),
    ),
    OpCases("dequantize_blockwise", _BLOCKWISE_UNIVERSE, _dequantize_blockwise_inputs, returns("out")),
    OpCases("quantize", _DTYPE_UNIVERSE, _quantize_inputs, returns("codes", "absmax"), _compare_codes_and_absmax),
    OpCases("dequantize", _DTYPE_UNIVERSE, _dequantize_inputs, returns("out")),
    OpCases("quantize_no_absmax", _DTYPE_UNIVERSE, _quantize_no_absmax_inputs, returns("codes")),
    OpCases("dequantize_no_absmax", _DTYPE_UNIVERSE, _dequantize_no_absmax_inputs, returns("out")),
    OpCases("estimate_quantiles", _DTYPE_UNIVERSE, _estimate_quantiles_inputs, returns("quantiles")),
    OpCases("histogram_scatter_add_2d", {"dtype": ("float32",)}, _histogram_inputs, mutates(histogram=0)),
)


# ----------------------------------------------------------------------------- goldens
#: The golden codes may pick a code this much worse (normalised units) than the nearest.
_GOLDEN_CODE_SLACK = 3e-5
#: ...at no more than this fraction of the elements.
_GOLDEN_CODE_MISMATCH_SHARE = 0.005


def _declared_entries(ctx: GoldenContext, op: str, dtype_key: str) -> list[dict]:
    """The ``blockwise8`` golden entries whose dtype and blocksize the backend declares for ``op``."""
    return [
        entry
        for entry in ctx.goldens["blockwise8"]
        if ctx.declares(op, entry[dtype_key].dtype, blocksize=entry["blocksize"])
    ]


def _golden_quantize_blockwise(ctx: GoldenContext) -> tuple[int, list[str]]:
    code = ctx.goldens["codes"]["dynamic_signed"]
    entries, problems = _declared_entries(ctx, "quantize_blockwise", "A"), []
    for entry in entries:
        A, bs = entry["A"], entry["blocksize"]
        label = f"blocksize {bs}, {A.numel()} elements"
        codes, absmax = ctx.call("quantize_blockwise", A, code, bs)
        if not torch.equal(absmax, entry["absmax"]):
            problems.append(f"{label}: absmax differs from the golden absmax")
            continue
        # The goldens' codes come from a search that is sometimes slightly off; ours must be
        # at least as near everywhere and differ from theirs only by that slack.
        scale = (1 / absmax).repeat_interleave(bs)[: A.numel()]
        x = A.reshape(-1) * torch.where(torch.isinf(scale), torch.zeros_like(scale), scale)
        ours = (code[codes.reshape(-1).long()] - x).abs()
        theirs = (code[entry["codes"].reshape(-1).long()] - x).abs()
        live = ~_zero_block_mask(absmax, A.numel(), bs)
        differs = (codes.reshape(-1) != entry["codes"].reshape(-1)) & live
        if bool((ours[live] > theirs[live]).any()):
            problems.append(f"{label}: some codes are farther from the value than the golden codes")
        if bool((theirs[differs] - ours[differs] > _GOLDEN_CODE_SLACK).any()):
            problems.append(f"{label}: codes differ from the goldens by more than {_GOLDEN_CODE_SLACK}")
        if float(differs.float().mean()) >= _GOLDEN_CODE_MISMATCH_SHARE:
            problems.append(f"{label}: {int(differs.sum())} codes differ from the goldens")
    return len(entries), problems


def _golden_dequantize_blockwise(ctx: GoldenContext) -> tuple[int, list[str]]:
    code = ctx.goldens["codes"]["dynamic_signed"]
    entries, problems = _declared_entries(ctx, "dequantize_blockwise", "dequant"), []
    for entry in entries:
        bs, expected = entry["blocksize"], entry["dequant"]
        out = ctx.call("dequantize_blockwise", entry["codes"], entry["absmax"], code, bs, expected.dtype)
        problem = compare_tensor(f"blocksize {bs}: dequantized golden codes", out, expected, EXACT)
        if problem:
            problems.append(problem)
    return len(entries), problems


GOLDENS = (
    GoldenCheck("quantize_blockwise", _golden_quantize_blockwise),
    GoldenCheck("dequantize_blockwise", _golden_dequantize_blockwise),
)
