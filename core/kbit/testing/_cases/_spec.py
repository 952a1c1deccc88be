"""The vocabulary of conformance cases: variants, input sets, per-op case specs, comparisons.

A family's case module (``kbit/testing/_cases/<family>.py``) describes each of its ops with
an :class:`OpCases`: the variants the public API accepts (its *universe*), seeded inputs for
a variant, how to call the op and what to compare. The harness does the rest: it runs each
declared variant on the backend under test and on the reference backend, expects every
undeclared one to be refused, and runs ``torch.library.opcheck``. Nothing here imports
pytest, so ``kbit check`` can reuse it.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..._manifest import CAPABILITY_PARAMS
from ..tolerances import Tolerance

Tensor = torch.Tensor

#: Axes a variant can have, in id order: the dtype the registry matches, then the
#: capability parameters of ``kbit.backend.OpSupport``.
AXES: tuple[str, ...] = ("dtype", *CAPABILITY_PARAMS)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One point of an op's variant space: a dtype and capability parameter values.

    ``values`` holds ``(axis, value)`` pairs in :data:`AXES` order. The dtype is the one
    the registry matches for this op (input dtype of a quantize op, output dtype of a
    dequantize op).
    """

    op: str
    values: tuple[tuple[str, Any], ...]

    def __getitem__(self, axis: str) -> Any:
        return dict(self.values)[axis]

    @property
    def dtype_name(self) -> Optional[str]:
        """The dtype axis as a manifest name (``"float16"``), or None."""
        return dict(self.values).get("dtype")

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The dtype axis as a ``torch.dtype``, or None."""
        name = self.dtype_name
        return getattr(torch, name) if name else None

    @property
    def params(self) -> dict[str, Any]:
        """The capability parameters (everything but the dtype), as the registry takes them."""
        return {axis: value for axis, value in self.values if axis != "dtype"}

    @property
    def id(self) -> str:
        """Stable test id: the op, then each axis value (``quantize_blockwise-float16-64``)."""
        return "-".join([self.op, *(str(value) for _, value in self.values)])


@dataclasses.dataclass(frozen=True)
class InputSet:
    """Named positional arguments for one call of ``torch.ops.kbit.<op>``, built on CPU."""

    name: str
    args: tuple


#: Calls the op (``torch.ops.kbit.<op>``) on ``args`` and names its results.
Runner = Callable[[Callable[..., Any], tuple, Variant], dict[str, Tensor]]

#: Compares a backend's named results with the reference's; returns problem descriptions.
Comparator = Callable[[dict[str, Tensor], dict[str, Tensor], tuple, Variant, Tolerance], list[str]]


def returns(*names: str) -> Runner:
    """A runner for an op returning one tensor or a tuple of tensors, named ``names``."""

    def run(op: Callable[..., Any], args: tuple, variant: Variant) -> dict[str, Tensor]:
        result = op(*args)
        results = result if isinstance(result, (tuple, list)) else (result,)
        if len(results) != len(names):
            raise AssertionError(f"expected {len(names)} results {names}, got {len(results)}")
        return dict(zip(names, results, strict=True))

    return run


def mutates(**positions: int) -> Runner:
    """A runner for an in-place op: results are the arguments at ``positions`` after the call."""

    def run(op: Callable[..., Any], args: tuple, variant: Variant) -> dict[str, Tensor]:
        op(*args)
        return {name: args[index] for name, index in positions.items()}

    return run


def compare_tensor(label: str, got: Tensor, want: Tensor, tolerance: Tolerance) -> Optional[str]:
    """Describe how ``got`` differs from ``want`` beyond ``tolerance``, or return None.

    Shape and dtype must match exactly. Floating-point values match when equal, both NaN,
    or (for a non-exact tolerance) within ``atol + rtol * |want|``; infinities must match.
    """
    if not isinstance(got, torch.Tensor):
        return f"{label}: got {type(got).__name__}, expected a tensor"
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{label}: got shape {tuple(got.shape)} {got.dtype}, reference gives {tuple(want.shape)} {want.dtype}"
    if got.is_floating_point():
        g, w = got.double(), want.double()
        same = (g == w) | (g.isnan() & w.isnan())
        if not tolerance.exact:
            same |= (g - w).abs() <= tolerance.atol + tolerance.rtol * w.abs()
    else:
        same = got == want
    bad = (~same).reshape(-1).nonzero().reshape(-1)
    if bad.numel() == 0:
        return None
    shown = ", ".join(
        f"[{i}] {got.reshape(-1)[i].item()!r} vs {want.reshape(-1)[i].item()!r}" for i in bad[:3].tolist()
    )
    how = "bit-exactly" if tolerance.exact else f"within rtol={tolerance.rtol}, atol={tolerance.atol}"
    return f"{label}: {bad.numel()} of {got.numel()} elements differ from the reference ({how}): {shown}"


def compare_outputs(
    got: dict[str, Tensor], want: dict[str, Tensor], args: tuple, variant: Variant, tolerance: Tolerance
) -> list[str]:
    """The default comparator: every named result against the reference's, under ``tolerance``."""
    problems = []
    for name, expected in want.items():
        if name not in got:
            problems.append(f"{name}: missing from the backend's results")
            continue
        problem = compare_tensor(name, got[name], expected, tolerance)
        if problem:
            problems.append(problem)
    return problems


#: Runs ``torch.ops.kbit.<op>`` on the backend under test: ``call(op, *args)``, arguments
#: moved to the backend's device, results back on the CPU.
Caller = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class StatisticalCheck:
    """A property of the backend's own results that no single comparison shows.

    Stochastic rounding, for instance, must be unbiased over many draws. ``check(call,
    variant)`` runs the op through ``call`` (see :data:`Caller`) and returns problem
    descriptions. It runs for the declared variants ``applies`` accepts, once per distinct
    combination of ``axes`` (like ``opcheck``).
    """

    applies: Callable[[Variant], bool]
    check: Callable[[Caller, Variant], list[str]]
    axes: tuple[str, ...] = ("dtype",)


@dataclasses.dataclass(frozen=True)
class OpCases:
    """How the conformance suite exercises one op.

    Attributes:
        op: the op name (``kbit._opnames``), also the ``torch.ops.kbit`` op called.
        universe: per axis (see :data:`AXES`), every value the public API accepts. The
            product is the op's variant space: declared variants are compared with the
            reference, undeclared ones must be refused.
        inputs: seeded input sets for a variant, built on CPU. The first one is small and
            typical; it is also used for ``opcheck`` and for refusal checks.
        run: calls the op and names its results (see :func:`returns`, :func:`mutates`;
            a multi-step op such as an optimizer passes its own runner).
        compare: compares named results with the reference's (:func:`compare_outputs`
            unless the format allows freedom, such as the code stored in an all-zero block).
        opcheck_axes: ``opcheck`` runs once per distinct combination of these axes among
            the declared variants (the other axes do not change schema or fake kernels).
        statistics: an optional :class:`StatisticalCheck` of the backend's own results.
    """

    op: str
    universe: Mapping[str, tuple]
    inputs: Callable[[Variant], Sequence[InputSet]]
    run: Runner
    compare: Comparator = compare_outputs
    opcheck_axes: tuple[str, ...] = ("dtype",)
    statistics: Optional[StatisticalCheck] = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.universe) - set(AXES))
        if unknown:
            raise ValueError(f"{self.op}: unknown axes {unknown}; known: {list(AXES)}")

    def variants(self) -> list[Variant]:
        """Every variant the public API accepts, in a stable order."""
        axes = [axis for axis in AXES if axis in self.universe]
        return [
            Variant(self.op, tuple(zip(axes, values, strict=True)))
            for values in itertools.product(*(self.universe[axis] for axis in axes))
        ]


@dataclasses.dataclass(frozen=True)
class GoldenContext:
    """What a golden check gets: the vectors and a way to run ops on the backend under test.

    ``declares(op, dtype, **params)`` says whether the backend's manifest covers a variant
    (a check only uses entries the backend declares); ``call(op, *args)`` runs
    ``torch.ops.kbit.<op>`` on the backend (arguments moved to its device, results back on
    the CPU); ``mutate(op, *args)`` runs an in-place op the same way and returns its
    arguments after the call, on the CPU (an optimizer step).
    """

    goldens: Mapping[str, Any]
    declares: Callable[..., bool]
    call: Callable[..., Any]
    mutate: Optional[Callable[..., tuple]] = None


@dataclasses.dataclass(frozen=True)
class GoldenCheck:
    """A check of one op against the golden vectors.

    ``check`` returns ``(entries checked, problems)``; zero entries checked means no golden
    entry matches what the backend declares, and the test is skipped.
    """

    op: str
    check: Callable[[GoldenContext], tuple[int, list[str]]]


def seeded(variant: Variant, name: str) -> torch.Generator:
    """A CPU generator seeded from the variant and input-set name (stable across runs)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{variant.id}/{name}".encode()))


# ------------------------------------------------------------------- shared input builders
def randn(variant: Variant, name: str, *shape: int) -> Tensor:
    """Seeded standard-normal float32 values of ``shape`` (see :func:`seeded`)."""
    return torch.randn(*shape, generator=seeded(variant, name))


def large_magnitude(dtype: torch.dtype) -> float:
    """A magnitude near the top of ``dtype``'s range whose reciprocal is still normal."""
    return min(float(torch.finfo(dtype).max) / 16, 1e30)


def tie_values(table: Tensor) -> Tensor:
    """Exact midpoints between neighbouring table values, and the floats one ulp either side.

    A midpoint that float32 represents exactly is a tie: it must go to the lower *index*
    (for an unsorted table such as FP4's, not always the lower value); its neighbours must
    go to the nearer value. Together they catch a search that rounds the wrong way or
    compares distances in too little precision.
    """
    values = torch.unique(table.double())  # sorted; repeated values (FP4's two zeros) collapse
    mids = (values[:-1] + values[1:]) / 2
    mids32 = mids.float()
    exact = mids32[mids32.double() == mids]
    up = torch.nextafter(exact, torch.full_like(exact, torch.inf))
    down = torch.nextafter(exact, torch.full_like(exact, -torch.inf))
    return torch.cat([exact, up, down])


def with_unit_absmax(values: Tensor, blocksize: int) -> Tensor:
    """Lay ``values`` (within [-1, 1]) out in blocks that each start with 1.0.

    Every block's absmax is then exactly 1, so normalisation leaves the values, and their
    ties, unchanged.
    """
    per_block = blocksize - 1
    pad = (-values.numel()) % per_block
    body = torch.cat([values, torch.zeros(pad)]).view(-1, per_block)
    blocks = torch.cat([torch.ones(body.shape[0], 1), body], dim=1).reshape(-1)
    return blocks[: blocks.numel() - pad]
