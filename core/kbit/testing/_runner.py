"""Running conformance cases: the backend under test against the reference, pinned.

Every call goes through the public dispatch path (``torch.ops.kbit.<op>`` and the
registry) with the backend *pinned*: preferred alone, with fallback off, so a call
the backend does not serve raises instead of quietly running on the reference. The oracle
is the reference backend, pinned the same way, on CPU copies of the same inputs.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch

from .._errors import UnsupportedOpError
from .._formats import dtype_name
from .._manifest import BackendManifest
from ..backends._registry import REFERENCE, REGISTRY, use_backend
from ._cases._spec import GoldenCheck, GoldenContext, InputSet, OpCases, Variant
from ._plan import declares
from .tolerances import Tolerance

__all__ = [
    "pinned",
    "run_case",
    "routing_problem",
    "compare_with_reference",
    "refusal_problem",
    "opcheck_case",
    "golden_problems",
    "statistics_problems",
    "caller",
]


def pinned(name: str) -> use_backend:
    """Inside the block, kbit routes every call to backend ``name`` or raises: no fallback.

    The policy is set for the block's thread or task only (``use_backend(fallback=...)``),
    never through the process-wide ``KBIT_FALLBACK`` variable.
    """
    return use_backend(name, fallback="error")


def _to(value: Any, device: str | torch.device) -> Any:
    # Always a fresh copy: in-place ops mutate their arguments, and the two sides of a
    # comparison must start from identical inputs.
    if isinstance(value, torch.Tensor):
        return value.to(device, copy=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(item, device) for item in value)
    return value


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def run_case(cases: OpCases, variant: Variant, inputs: InputSet, backend: str, device: str) -> dict[str, torch.Tensor]:
    """Run one input set on ``backend`` (pinned) on ``device``; named results on the CPU."""
    op = getattr(torch.ops.kbit, cases.op)
    args = _to(inputs.args, device)
    with pinned(backend):
        results = cases.run(op, args, variant)
    return {name: _to_cpu(tensor) for name, tensor in results.items()}


def routing_problem(op: str, variant: Variant, backend: str, device: str) -> Optional[str]:
    """Why kbit would not route this variant to ``backend`` on ``device`` (None if it would)."""
    with pinned(backend):
        try:
            resolution = REGISTRY.resolve(op, device, variant.dtype_name, **variant.params)
        except UnsupportedOpError as exc:
            return f"kbit does not route {variant.id} on {device} to {backend!r}: {exc}"
    if resolution.name != backend:
        return f"kbit routes {variant.id} on {device} to {resolution.name!r}, not {backend!r}"
    return None


def compare_with_reference(
    cases: OpCases, variant: Variant, backend: str, device: str, tolerance: Tolerance
) -> list[str]:
    """Every input set of ``variant`` on ``backend`` against the reference; the problems found."""
    problems = []
    for inputs in cases.inputs(variant):
        try:
            want = run_case(cases, variant, inputs, REFERENCE, "cpu")
        except Exception as exc:  # the oracle must answer, or the case is not a test
            problems.append(f"{inputs.name}: the reference backend raised {type(exc).__name__}: {exc}")
            continue
        try:
            got = run_case(cases, variant, inputs, backend, device)
        except Exception as exc:  # a backend that raises on a declared variant fails the case
            problems.append(f"{inputs.name}: raised {type(exc).__name__}: {exc}")
            continue
        problems += [
            f"{inputs.name}: {problem}" for problem in cases.compare(got, want, inputs.args, variant, tolerance)
        ]
    return problems


def refusal_problem(cases: OpCases, variant: Variant, backend: str, device: str) -> Optional[str]:
    """None when calling an undeclared variant raises ``UnsupportedOpError``, else what happened."""
    inputs = cases.inputs(variant)[0]
    try:
        run_case(cases, variant, inputs, backend, device)
    except UnsupportedOpError:
        return None
    except Exception as exc:  # any other error breaks the contract
        return f"raised {type(exc).__name__} instead of UnsupportedOpError: {exc}"
    return f"{variant.id} is not declared, yet the call was served instead of raising UnsupportedOpError"


def opcheck_case(cases: OpCases, variant: Variant, backend: str, device: str) -> None:
    """``torch.library.opcheck`` of the op on the variant's first input set, routed to ``backend``.

    Raises ``torch.testing._internal.optests.OpCheckError`` (an ``Exception``) on failure.
    """
    op = getattr(torch.ops.kbit, cases.op).default
    args = _to(cases.inputs(variant)[0].args, device)
    with pinned(backend):
        torch.library.opcheck(op, args)


def caller(backend: str, device: str) -> Callable[..., Any]:
    """``call(op, *args)``: ``torch.ops.kbit.<op>`` on ``backend`` (pinned) on ``device``, results on the CPU."""

    def call(op: str, *args: Any) -> Any:
        with pinned(backend):
            return _to_cpu(getattr(torch.ops.kbit, op)(*_to(args, device)))

    return call


def statistics_problems(cases: OpCases, variant: Variant, backend: str, device: str) -> list[str]:
    """Run the op's statistical check (``cases.statistics``) on ``backend``; the problems found."""
    assert cases.statistics is not None
    return cases.statistics.check(caller(backend, device), variant)


def golden_problems(
    check: GoldenCheck, goldens: Mapping[str, Any], manifest: BackendManifest, backend: str, device: str
) -> tuple[int, list[str]]:
    """Run a golden check on ``backend``: ``(entries checked, problems)``."""

    def declared(op: str, dtype: torch.dtype | str | None, **params: Any) -> bool:
        return declares(manifest, op, None if dtype is None else dtype_name(dtype), params)

    call = caller(backend, device)

    def mutate(op: str, *args: Any) -> tuple:
        moved = _to(args, device)
        with pinned(backend):
            getattr(torch.ops.kbit, op)(*moved)
        return _to_cpu(moved)

    return check.check(GoldenContext(goldens, declared, call, mutate))
