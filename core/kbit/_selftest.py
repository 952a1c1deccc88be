"""A quick self-test of a backend against the reference backend (``kbit check``).

A backend is checked with its ops' conformance cases (``kbit.testing``): for each op, every
input set of one declared variant per distinct schema (dtype, storage or optimizer kind) is
run with the backend pinned and compared with the reference under the same comparator and
tolerance as the full suite. The reference itself is checked against the format's own
quality bars and against ``torch.optim.Adam``. This is a smoke test that takes seconds; the
full comparison is the conformance suite (``kbit conformance``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from .backend import OPTIMIZER_KINDS, Backend, OptimizerStep
from .functional._codebooks import cached_code
from .testing._cases import op_cases
from .testing._plan import declares, representatives
from .testing._runner import compare_with_reference
from .testing.tolerances import conformance_tolerance

__all__ = ["CheckResult", "CHECKS", "run_checks"]


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``status`` is ``passed``, ``failed`` or ``error``.

    ``compared`` counts the results compared numerically (input sets run against the
    reference, or the reference against a quality bar), so a summary can say how many
    numbers were actually checked, apart from how many checks ran.
    """

    backend: str
    op: str
    status: str
    detail: str = ""
    compared: int = 0


# A check gets (backend under test, reference backend, device) and returns None when it
# passes or a string describing the disagreement, with the number of results it compared.
Check = Callable[[Backend, Backend, torch.device], tuple[Optional[str], int]]


def _check_reference_blockwise(reference: Backend, device: torch.device) -> Optional[str]:
    """The reference against the format's quality bar (mean abs error < 0.011 on randn)."""
    code = cached_code("dynamic", device)
    A = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)).to(device)
    for blocksize in (64, 4096):
        codes, absmax = reference.quantize_blockwise(A, code=code, blocksize=blocksize)
        back = reference.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=blocksize, dtype=torch.float32)
        error = float((back - A).abs().mean())
        if not error < 0.011:
            return f"blocksize {blocksize}: mean abs round-trip error {error:.4f} >= 0.011"
    return None


def _check_reference_int8(reference: Backend, device: torch.device) -> Optional[str]:
    """The reference int8 matmul: exact against int64, and within int8 error on randn."""
    from .testing.tolerances import INT8_MATMUL_REL_ERR, relative_error

    generator = torch.Generator().manual_seed(80)
    x = torch.randn(16, 512, generator=generator).to(device)
    w = torch.randn(64, 512, generator=generator).to(device)
    (CA, SCA, _), (CB, SCB, _) = (reference.int8_vectorwise_quant(t, threshold=0.0) for t in (x, w))
    C = reference.int8_linear_matmul(CA, CB)
    if not torch.equal(C.cpu().long(), CA.cpu().long() @ CB.cpu().long().T):
        return "int8_linear_matmul differs from the exact int64 product"
    y = reference.int8_mm_dequant(C, row_stats=SCA, col_stats=SCB, bias=None, dtype=torch.float32)
    error = relative_error(y.cpu(), (x @ w.T).cpu())
    return None if error < INT8_MATMUL_REL_ERR else f"int8 matmul relative error {error:.4f} >= {INT8_MATMUL_REL_ERR}"


def _check_reference_quantize_4bit(reference: Backend, device: torch.device) -> Optional[str]:
    """The reference against the format's 4-bit quality bars (mean errors on randn)."""
    from .testing.tolerances import FOUR_BIT_RANDN, FOUR_BIT_SEED_SLACK, mean_errors

    A = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)).to(device)
    for quant_type in ("nf4", "fp4"):
        for blocksize in (64, 4096):
            kwargs = dict(blocksize=blocksize, quant_type=quant_type)
            packed, absmax = reference.quantize_4bit(A, quant_storage=torch.uint8, **kwargs)
            back = reference.dequantize_4bit(packed, absmax=absmax, shape=A.shape, dtype=torch.float32, **kwargs)
            errors, bar = mean_errors(A, back), FOUR_BIT_RANDN[(quant_type, blocksize)]
            if not errors.abs_err < bar.abs_err * FOUR_BIT_SEED_SLACK:
                return f"{quant_type}, blocksize {blocksize}: mean abs round-trip error {errors.abs_err:.4f} >= {bar.abs_err}"
    return None


def _check_reference_adam(reference: Backend, device: torch.device) -> Optional[str]:
    """The reference's 32-bit Adam against ``torch.optim.Adam`` over 10 steps."""
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(1000, generator=gen).to(device)
    mirror = torch.nn.Parameter(p.clone())
    adam = torch.optim.Adam([mirror], lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for step in range(1, 11):
        g = torch.randn(p.numel(), generator=gen).to(device)
        update = OptimizerStep(OPTIMIZER_KINDS["adam"], step, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8)
        reference.optimizer_update_32bit(update, g, p, m, v, None)
        mirror.grad = g.clone()
        adam.step()
        if not torch.allclose(p, mirror.detach(), rtol=1e-5, atol=1e-6):
            return f"step {step}: parameters differ from torch.optim.Adam by {float((p - mirror).abs().max()):.3g}"
    return None


def _case_check(op: str) -> Check:
    """A quick check derived from the conformance cases of ``op`` (``kbit.testing``).

    It runs every input set of one declared variant per distinct schema (the op's
    ``opcheck_axes``) against the reference, routed through kbit with the backend pinned,
    so the backend must be registered; the full sweep is ``kbit conformance``.
    """

    def check(backend: Backend, reference: Backend, device: torch.device) -> tuple[Optional[str], int]:
        cases = op_cases()[op]
        declared = [v for v in cases.variants() if declares(backend.manifest, op, v.dtype_name, v.params)]
        # float32 first where declared: its comparisons are the tightest (a 16-bit result
        # may round either way, which the tolerances must allow).
        declared.sort(key=lambda v: v.dtype_name != "float32")
        compared = 0
        for variant in representatives(cases, declared):
            problems = compare_with_reference(cases, variant, backend.name, device.type, conformance_tolerance(op))
            compared += len(cases.inputs(variant))
            if problems:
                return f"{variant.id}: {problems[0]}", compared
        return None, compared

    return check


#: Checks of the reference backend itself, by op name.
REFERENCE_CHECKS: dict[str, Callable[[Backend, torch.device], Optional[str]]] = {
    "quantize_blockwise": _check_reference_blockwise,
    "int8_linear_matmul": _check_reference_int8,
    "quantize_4bit": _check_reference_quantize_4bit,
    "optimizer_update_32bit": _check_reference_adam,
}

#: Backend-vs-reference checks by op name: one per op with conformance cases (every op);
#: an op the backend does not declare is skipped.
CHECKS: dict[str, Check] = {op: _case_check(op) for op in op_cases()}


def run_checks(backend: Backend, reference: Backend) -> list[CheckResult]:
    """Run every check that applies to ``backend``; never raises for a backend's failure."""
    device = torch.device(backend.manifest.device_types[0] if backend.manifest else "cpu")
    is_reference = backend is reference
    table = REFERENCE_CHECKS if is_reference else CHECKS
    declared = set(backend.manifest.ops) if backend.manifest else set()
    results = []
    for op, check in table.items():
        if op not in declared:
            continue
        try:
            if is_reference:  # one result against the format's own bar
                problem, compared = check(backend, device), 1
            else:
                problem, compared = check(backend, reference, device)
        except Exception as exc:  # a broken backend is reported, not propagated
            results.append(CheckResult(backend.name, op, "error", f"{type(exc).__name__}: {exc}"))
            continue
        results.append(CheckResult(backend.name, op, "failed" if problem else "passed", problem or "", compared))
    return results
