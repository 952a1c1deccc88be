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


def _check_blockwise(backend: Backend, reference: Backend, device: torch.device) -> Optional[str]:
    code = cached_code("dynamic", device)
    dtypes = _declared(backend, "quantize_blockwise", "dtypes", ("float32",))
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for blocksize in _declared(backend, "quantize_blockwise", "blocksizes", (64,))[:2]:
            A = _sample(3 * blocksize + 17, dtype, device)
            label = f"{dtype_name}, blocksize {blocksize}"
            codes, absmax = backend.quantize_blockwise(A, code=code, blocksize=blocksize)
            ref_codes, ref_absmax = reference.quantize_blockwise(A, code=code, blocksize=blocksize)
            problem = _compare(f"codes ({label})", codes, ref_codes) or _compare(
                f"absmax ({label})", absmax, ref_absmax
            )
            if problem:
                return problem
    return None


def _check_dequantize_blockwise(backend: Backend, reference: Backend, device: torch.device) -> Optional[str]:
    code = cached_code("dynamic", device)
    generator = torch.Generator().manual_seed(99)
    for dtype_name in _declared(backend, "dequantize_blockwise", "dtypes", ("float32",)):
        dtype = getattr(torch, dtype_name)
        for blocksize in _declared(backend, "dequantize_blockwise", "blocksizes", (64,))[:2]:
            numel = 2 * blocksize + 5
            A = torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=generator).to(device)
            absmax = (torch.rand(-(-numel // blocksize), generator=generator) * 3).to(device)
            kwargs = dict(absmax=absmax, code=code, blocksize=blocksize, dtype=dtype)
            problem = _compare(
                f"dequantize ({dtype_name}, blocksize {blocksize})",
                backend.dequantize_blockwise(A, **kwargs),
                reference.dequantize_blockwise(A, **kwargs),
            )
            if problem:
                return problem
    return None


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
                absmax = (torch.rand(-(-numel // blocksize), generator=generator) * 3).to(device)
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
    "quantize_blockwise": _check_blockwise,
    "dequantize_blockwise": _check_dequantize_blockwise,
    "quantize_4bit": _check_quantize_4bit,
    "dequantize_4bit": _check_dequantize_4bit,
}

#: Checks of the reference backend itself, by op name.
REFERENCE_CHECKS: dict[str, Callable[[Backend, torch.device], Optional[str]]] = {
    "quantize_blockwise": _check_reference_blockwise,
    "quantize_4bit": _check_reference_quantize_4bit,
}


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
