"""A quick self-test of a backend against the reference backend (``kbit check``).

Each check exercises one op on small seeded inputs and compares the backend's answer with
the reference backend's, bit-exactly where the format demands it. The reference itself is
checked against the format's own quality bars. This is a smoke test that takes seconds;
the full comparison is the conformance suite (``kbit conformance``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ._formats import num_blocks
from ._selftest_optim import OPTIMIZER_CHECKS, OPTIMIZER_REFERENCE_CHECKS
from .backend import Backend
from .functional._codebooks import cached_code

__all__ = ["CheckResult", "CHECKS", "run_checks"]


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``status`` is ``passed``, ``failed`` or ``error``."""

    backend: str
    op: str
    status: str
    detail: str = ""


# A check gets (backend under test, reference backend, device) and returns None when it
# passes or a string describing the disagreement.
Check = Callable[[Backend, Backend, torch.device], Optional[str]]


def _sample(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    values = torch.randn(numel, generator=generator)
    values[:64] = 0.0  # an all-zero block at every blocksize up to 64
    values[100] = 40.0  # one large value
    return values.to(dtype).to(device)


def _compare(label: str, got: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    got, want = got.cpu(), want.cpu()
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{label}: got {tuple(got.shape)} {got.dtype}, reference gives {tuple(want.shape)} {want.dtype}"
    mismatched = (got != want) & ~(got.isnan() & want.isnan()) if got.is_floating_point() else got != want
    count = int(mismatched.sum())
    return f"{label}: {count} of {got.numel()} elements differ from the reference" if count else None


def _declared(backend: Backend, op: str, field: str, default: tuple) -> tuple:
    support = backend.manifest.ops.get(op) if backend.manifest else None
    values = getattr(support, field, None) if support else None
    return tuple(values) if values is not None else default


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


def _int8_sample(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Activations with two large-magnitude columns and an all-zero row."""
    values = torch.randn(24, 96, generator=torch.Generator().manual_seed(4321))
    values[:, [5, 70]] *= 40.0
    values[3] = 0.0
    return values.to(dtype).to(device)


def _close(label: str, got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> Optional[str]:
    got, want = got.cpu(), want.cpu()
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{label}: got {tuple(got.shape)} {got.dtype}, reference gives {tuple(want.shape)} {want.dtype}"
    if not torch.allclose(got.double(), want.double(), rtol=rtol, atol=rtol * float(want.abs().max().clamp_min(1))):
        return f"{label}: max difference {float((got.double() - want.double()).abs().max()):.3g} from the reference"
    return None


def _codes_close(label: str, got: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    """int8 codes may differ by one step at 1/500 of elements (float rounding near .5)."""
    from .testing.tolerances import INT8_CODE_MAX_STEP, INT8_CODE_MISMATCH_FRACTION

    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{label}: got {tuple(got.shape)} {got.dtype}, reference gives {tuple(want.shape)} {want.dtype}"
    step = (got.cpu().int() - want.cpu().int()).abs()
    if int(step.max()) > INT8_CODE_MAX_STEP or float((step != 0).float().mean()) > INT8_CODE_MISMATCH_FRACTION:
        return f"{label}: {int((step != 0).sum())} codes differ from the reference, by up to {int(step.max())}"
    return None


def _check_int8_quant(backend: Backend, reference: Backend, device: torch.device) -> Optional[str]:
    for dtype_name in _declared(backend, "int8_vectorwise_quant", "dtypes", ("float32",)):
        A = _int8_sample(device, getattr(torch, dtype_name))
        for threshold in (0.0, 6.0):
            label = f"{dtype_name}, threshold {threshold}"
            (CA, stats, cols), (ref_CA, ref_stats, ref_cols) = (
                b.int8_vectorwise_quant(A, threshold=threshold) for b in (backend, reference)
            )
            problem = (
                _codes_close(f"codes ({label})", CA, ref_CA)
                or _compare(f"row_stats ({label})", stats, ref_stats)
                or _compare(f"outlier_cols ({label})", cols, ref_cols)
            )
            if problem:
                return problem
    return None


def _check_int8_matmul(backend: Backend, reference: Backend, device: torch.device) -> Optional[str]:
    generator = torch.Generator().manual_seed(77)
    for M, K, N in ((1, 16, 8), (33, 1100, 24)):
        A = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=generator).to(device)
        B = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=generator).to(device)
        problem = _compare(f"{M}x{K} @ {N}x{K}.T", backend.int8_linear_matmul(A, B), reference.int8_linear_matmul(A, B))
        if problem:
            return problem
    return None


def _check_int8_mm_dequant(backend: Backend, reference: Backend, device: torch.device) -> Optional[str]:
    generator = torch.Generator().manual_seed(78)
    C = torch.randint(-(2**20), 2**20, (12, 20), dtype=torch.int32, generator=generator).to(device)
    rows, cols = torch.rand(12, generator=generator).to(device), torch.rand(20, generator=generator).to(device)
    bias = torch.randn(20, generator=generator).to(device)
    for dtype in (torch.float16, torch.float32):
        kwargs = dict(row_stats=rows, col_stats=cols, bias=bias, dtype=dtype)
        problem = _close(f"{dtype}", backend.int8_mm_dequant(C, **kwargs), reference.int8_mm_dequant(C, **kwargs), 1e-3)
        if problem:
            return problem
    return None


def _check_int8_mixed_scaled_mm(backend: Backend, reference: Backend, device: torch.device) -> Optional[str]:
    A = _int8_sample(device)
    CA, SCA, cols = reference.int8_vectorwise_quant(A, threshold=6.0)
    weight = torch.randn(16, A.shape[1], generator=torch.Generator().manual_seed(79)).to(device)
    CB, SCB, _ = reference.int8_vectorwise_quant(weight, threshold=0.0)
    kwargs = dict(CA=CA, CB=CB, SCA=SCA, SCB=SCB, outlier_cols=cols, bias=None)
    (out, subA), (ref_out, ref_subA) = (b.int8_mixed_scaled_mm(A, **kwargs) for b in (backend, reference))
    return _close("out", out, ref_out) or _compare("subA", subA, ref_subA)


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


def _check_quantize_4bit(backend: Backend, reference: Backend, device: torch.device) -> Optional[str]:
    """Packed bytes and absmax bit-exact with the reference (NF4 and FP4 codes alike)."""
    op = "quantize_4bit"
    for dtype_name in _declared(backend, op, "dtypes", ("float32",)):
        dtype = getattr(torch, dtype_name)
        for quant_type in _declared(backend, op, "quant_types", ("nf4", "fp4")):
            for storage_name in _declared(backend, op, "quant_storages", ("uint8",)):
                storage = getattr(torch, storage_name)
                for blocksize in _declared(backend, op, "blocksizes", (64,))[:2]:
                    A = _sample(3 * blocksize + 17, dtype, device)  # odd count, partial last block
                    kwargs = dict(blocksize=blocksize, quant_type=quant_type, quant_storage=storage)
                    packed, absmax = backend.quantize_4bit(A, **kwargs)
                    ref_packed, ref_absmax = reference.quantize_4bit(A, **kwargs)
                    label = f"{dtype_name}, {quant_type}, {storage_name}, blocksize {blocksize}"
                    problem = _compare(f"packed bytes ({label})", _bytes(packed), _bytes(ref_packed)) or _compare(
                        f"absmax ({label})", absmax, ref_absmax
                    )
                    if problem:
                        return problem
    return None


def _bytes(packed: torch.Tensor) -> torch.Tensor:
    return packed.reshape(-1).view(torch.uint8)


def _check_dequantize_4bit(backend: Backend, reference: Backend, device: torch.device) -> Optional[str]:
    """Dequantized values of random codes bit-exact with the reference."""
    op = "dequantize_4bit"
    generator = torch.Generator().manual_seed(77)
    for dtype_name in _declared(backend, op, "dtypes", ("float32",)):
        dtype = getattr(torch, dtype_name)
        for quant_type in _declared(backend, op, "quant_types", ("nf4", "fp4")):
            for blocksize in _declared(backend, op, "blocksizes", (64,))[:2]:
                shape = (3, blocksize + 3)  # odd count, rows that are not whole blocks
                numel = shape[0] * shape[1]
                A = torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8, generator=generator).to(device)
                absmax = (torch.rand(num_blocks(numel, blocksize), generator=generator) * 3).to(device)
                kwargs = dict(absmax=absmax, blocksize=blocksize, quant_type=quant_type, shape=shape, dtype=dtype)
                problem = _compare(
                    f"dequantize ({dtype_name}, {quant_type}, blocksize {blocksize})",
                    backend.dequantize_4bit(A, **kwargs),
                    reference.dequantize_4bit(A, **kwargs),
                )
                if problem:
                    return problem
    return None


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


#: Checks by op name; an op the backend does not declare is skipped.
CHECKS: dict[str, Check] = {
    "int8_vectorwise_quant": _check_int8_quant,
    "int8_linear_matmul": _check_int8_matmul,
    "int8_mm_dequant": _check_int8_mm_dequant,
    "int8_mixed_scaled_mm": _check_int8_mixed_scaled_mm,
    "quantize_4bit": _check_quantize_4bit,
    "dequantize_4bit": _check_dequantize_4bit,
}

#: Checks of the reference backend itself, by op name.
REFERENCE_CHECKS: dict[str, Callable[[Backend, torch.device], Optional[str]]] = {
    "quantize_blockwise": _check_reference_blockwise,
    "int8_linear_matmul": _check_reference_int8,
    "quantize_4bit": _check_reference_quantize_4bit,
}

CHECKS.update(OPTIMIZER_CHECKS)
REFERENCE_CHECKS.update(OPTIMIZER_REFERENCE_CHECKS)


def _case_check(op: str) -> Check:
    """A quick check derived from the conformance cases of ``op`` (``kbit.testing``).

    It runs every input set of one declared variant per dtype against the reference, routed
    through kbit with the backend pinned; the full sweep is ``kbit conformance``.
    """

    def check(backend: Backend, reference: Backend, device: torch.device) -> Optional[str]:
        from .testing._cases import op_cases
        from .testing._plan import declares, representatives
        from .testing._runner import compare_with_reference
        from .testing.tolerances import conformance_tolerance

        cases = op_cases()[op]
        declared = [v for v in cases.variants() if declares(backend.manifest, op, v.dtype_name, v.params)]
        for variant in representatives(cases, declared):
            problems = compare_with_reference(cases, variant, backend.name, device.type, conformance_tolerance(op))
            if problems:
                return f"{variant.id}: {problems[0]}"
        return None

    return check


def _add_case_checks() -> None:
    # Ops with conformance cases but no hand-written check above get a case-derived one,
    # so `kbit check` covers every op family that has cases.
    from .testing._cases import op_cases

    for op in op_cases():
        CHECKS.setdefault(op, _case_check(op))


_add_case_checks()


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
            problem = check(backend, device) if is_reference else check(backend, reference, device)
        except Exception as exc:  # a broken backend is reported, not propagated
            results.append(CheckResult(backend.name, op, "error", f"{type(exc).__name__}: {exc}"))
            continue
        results.append(CheckResult(backend.name, op, "failed" if problem else "passed", problem or ""))
    return results
