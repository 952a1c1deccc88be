"""Which conformance tests a backend gets, derived from its manifest.

The plan is a pure function of the manifest and the case modules, so the pytest class,
the report and the expected-failure check all agree on the same test ids.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

from .._manifest import CAPABILITY_PARAMS, BackendManifest
from ._cases import golden_checks, op_cases
from ._cases._spec import OpCases, Variant
from .tolerances import Tolerance, conformance_tolerance

__all__ = [
    "KINDS",
    "NUMERICAL_KINDS",
    "PlannedCase",
    "plan",
    "declares",
    "representatives",
    "manifest_problems",
    "effective_tolerance",
]

#: Test kind -> the ``BackendConformance`` test function that runs it.
KINDS: dict[str, str] = {
    "compare": "test_matches_reference",
    "refuse": "test_refuses_undeclared",
    "opcheck": "test_opcheck",
    "goldens": "test_goldens",
    "statistics": "test_statistics",
    "uncovered": "test_has_cases",
}

#: Kinds whose passing test compared the backend's numbers (with the reference, the golden
#: vectors or a statistical bar); the others check machinery (the manifest, ``opcheck``) or
#: that an undeclared variant is refused.
NUMERICAL_KINDS = ("compare", "goldens", "statistics")


@dataclasses.dataclass(frozen=True)
class PlannedCase:
    """One generated conformance test: its kind, op, variant and pytest id."""

    kind: str
    op: str
    variant: Optional[Variant] = None

    @property
    def id(self) -> str:
        """The pytest parameter id (the variant id, or the op for per-op tests)."""
        return self.variant.id if self.variant is not None else self.op

    @property
    def test_name(self) -> str:
        """The full pytest test name, the key of ``expected_failures``."""
        return f"{KINDS[self.kind]}[{self.id}]"

    def __repr__(self) -> str:  # shows in pytest's output when a test fails
        return f"<{self.kind} {self.id}>"


def declares(manifest: BackendManifest, op: str, dtype: Optional[str], params: Mapping[str, object]) -> bool:
    """Whether ``manifest`` declares ``op`` for this dtype and these parameters."""
    support = manifest.ops.get(op)
    return support is not None and support.refusal(dtype, dict(params)) is None


def representatives(cases: OpCases, variants: list[Variant], axes: Optional[tuple[str, ...]] = None) -> list[Variant]:
    """The first of ``variants`` for each distinct combination of ``axes`` (default: ``cases.opcheck_axes``)."""
    seen: dict[tuple, Variant] = {}
    for variant in variants:
        key = tuple(dict(variant.values).get(axis) for axis in (axes or cases.opcheck_axes))
        seen.setdefault(key, variant)
    return list(seen.values())


def plan(manifest: BackendManifest) -> list[PlannedCase]:
    """Every conformance test ``manifest`` calls for, in a stable order."""
    planned: list[PlannedCase] = []
    covered = op_cases()
    for op, cases in covered.items():
        declared = []
        for variant in cases.variants():
            if declares(manifest, op, variant.dtype_name, variant.params):
                declared.append(variant)
                planned.append(PlannedCase("compare", op, variant))
            else:
                planned.append(PlannedCase("refuse", op, variant))
        planned += [PlannedCase("opcheck", op, v) for v in representatives(cases, declared)]
        if cases.statistics is not None:
            applicable = [v for v in declared if cases.statistics.applies(v)]
            planned += [PlannedCase("statistics", op, v) for v in representatives(cases, applicable, cases.statistics.axes)]
        if declared and op in golden_checks():
            planned.append(PlannedCase("goldens", op))
    planned += [PlannedCase("uncovered", op) for op in sorted(manifest.ops) if op not in covered]
    return planned


def _declared_axis_values(manifest: BackendManifest, op: str) -> dict[str, tuple]:
    support = manifest.ops[op]
    values = {"dtype": support.dtypes}
    values.update({param: getattr(support, field) for param, field in CAPABILITY_PARAMS.items()})
    return {axis: declared for axis, declared in values.items() if declared is not None}


def manifest_problems(
    manifest: Optional[BackendManifest],
    device: str,
    expected_failures: Mapping[str, str],
    extra_tolerances: Mapping[str, Tolerance],
) -> list[str]:
    """What is wrong with a manifest or with the conformance class's settings.

    A manifest may only declare values the public API can request: anything else is a
    claim no test (and no user) can ever exercise.
    """
    if manifest is None:
        return ["the backend's manifest could not be loaded (see `kbit info`)"]
    problems = []
    if device not in manifest.device_types:
        problems.append(f"device {device!r} is not among the manifest's device_types {list(manifest.device_types)}")
    covered = op_cases()
    for op in sorted(manifest.ops):
        if op not in covered:
            continue
        universe = covered[op].universe
        for axis, declared in _declared_axis_values(manifest, op).items():
            if axis not in universe:
                problems.append(f"{op}: declares {axis} values {list(declared)}, but the op has no such parameter")
                continue
            unreachable = [value for value in declared if value not in universe[axis]]
            if unreachable:
                problems.append(
                    f"{op}: declares {axis} {unreachable}, which the kbit API never requests "
                    f"(it accepts {list(universe[axis])})"
                )
    known = {case.test_name for case in plan(manifest)}
    unknown = sorted(set(expected_failures) - known)
    if unknown:
        problems.append(f"expected_failures names tests that do not exist: {unknown}")
    for op, tolerance in extra_tolerances.items():
        if op not in covered:
            problems.append(f"extra_tolerances: {op!r} is not an op with conformance cases")
        elif conformance_tolerance(op).exact:
            problems.append(
                f"extra_tolerances: {op} is bit-exact by the format contract and cannot be loosened (asked {tolerance})"
            )
    return problems


def effective_tolerance(op: str, extra_tolerances: Mapping[str, Tolerance]) -> Tolerance:
    """The shared tolerance of ``op``, loosened by the class's ``extra_tolerances`` where allowed."""
    shared = conformance_tolerance(op)
    if shared.exact or op not in extra_tolerances:
        return shared
    extra = extra_tolerances[op]
    return Tolerance(rtol=max(shared.rtol, extra.rtol), atol=max(shared.atol, extra.atol))
