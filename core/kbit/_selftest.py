"""A quick self-test of a backend against the reference backend (``kbit check``).

A backend is checked with its ops' conformance cases (``kbit.testing``): for each op, every
input set of one declared variant per distinct schema (dtype, storage or optimizer kind) is
run with the backend pinned and compared with the reference under the same comparator and
tolerance as the full suite. The reference itself, which cannot be compared with itself,
is checked op by op against the format's definition of the op (bit-exact where the format
is), its quality bars, ``torch.quantile`` and ``torch.optim.Adam``. This is a smoke test
that takes seconds; the full comparison is the conformance suite (``kbit conformance``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ._formats import num_blocks
from .backend import OPTIMIZER_KINDS, Backend, OptimizerStep
from .functional._codebooks import cached_code, get_4bit_type
from .testing._cases import op_cases
from .testing._plan import declares, representatives
from .testing._runner import compare_with_reference
from .testing.tolerances import EXACT, Tolerance, conformance_tolerance

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


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(seed: int, *shape: int, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, generator=_generator(seed)).to(device)


def _differs(label: str, got: torch.Tensor, want: torch.Tensor, tolerance: Tolerance = EXACT) -> Optional[str]:
    """How ``got`` differs from ``want`` (the op's definition) beyond ``tolerance``, or None."""
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{label}: got {tuple(got.shape)} {got.dtype}, the definition gives {tuple(want.shape)} {want.dtype}"
    g, w = got.double(), want.double()
    bad = ~((g == w) | ((g - w).abs() <= tolerance.atol + tolerance.rtol * w.abs()))
    if bool(bad.any()):
        largest = float((g - w).abs().max())
        return f"{label}: {int(bad.sum())} of {got.numel()} values differ from the definition (max |diff| {largest:.3g})"
    return None


def _not_nearest(label: str, indices: torch.Tensor, normalised: torch.Tensor, code: torch.Tensor) -> Optional[str]:
    """None when every index picks a code value nearest to its normalised element."""
    x, table = normalised.detach().cpu().double().reshape(-1, 1), code.detach().cpu().double().reshape(1, -1)
    picked = table[0, indices.detach().cpu().long().reshape(-1)]
    best = (x - table).abs().min(dim=1).values
    wrong = int(((picked - x[:, 0]).abs() > best).sum())
    return f"{label}: {wrong} of {x.shape[0]} codes are not the nearest" if wrong else None


def _first(*problems: Optional[str]) -> Optional[str]:
    return next((problem for problem in problems if problem), None)


# ------------------------------------------------------------------------ 8-bit blockwise
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


def _check_reference_dequantize_blockwise(reference: Backend, device: torch.device) -> Optional[str]:
    """``code[codes] * absmax[block]``, exactly (a partial last block included)."""
    code = cached_code("dynamic", device)
    codes = torch.randint(0, 256, (1000,), generator=_generator(1), dtype=torch.uint8).to(device)
    absmax = torch.rand(num_blocks(1000, 64), generator=_generator(2)).to(device)
    got = reference.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=64, dtype=torch.float32)
    return _differs("dequantize_blockwise", got, code[codes.long()] * absmax.repeat_interleave(64)[:1000])


def _check_reference_quantize(reference: Backend, device: torch.device) -> Optional[str]:
    """Whole-tensor: the absmax of all of ``A``, and the nearest code to ``A * (1 / absmax)``."""
    code = cached_code("dynamic", device)
    A = _randn(3, 1000, device=device)
    codes, absmax = reference.quantize(A, code=code)
    return _first(
        _differs("quantize absmax", absmax, A.abs().max().reshape(1)),
        _not_nearest("quantize", codes, A * (1 / absmax), code),
    )


def _check_reference_dequantize(reference: Backend, device: torch.device) -> Optional[str]:
    """Whole-tensor: ``code[codes] * absmax``, exactly."""
    code = cached_code("dynamic", device)
    codes = torch.randint(0, 256, (1000,), generator=_generator(4), dtype=torch.uint8).to(device)
    absmax = torch.tensor([2.5], device=device)
    got = reference.dequantize(codes, absmax=absmax, code=code, dtype=torch.float32)
    return _differs("dequantize", got, code[codes.long()] * absmax)


def _check_reference_quantize_no_absmax(reference: Backend, device: torch.device) -> Optional[str]:
    """The nearest code to each (already normalised) value."""
    code = cached_code("dynamic", device)
    A = torch.rand(1000, generator=_generator(5)).to(device) * 2 - 1
    return _not_nearest("quantize_no_absmax", reference.quantize_no_absmax(A, code=code), A, code)


def _check_reference_dequantize_no_absmax(reference: Backend, device: torch.device) -> Optional[str]:
    """``code[codes]``, exactly."""
    code = cached_code("dynamic_unsigned", device)
    codes = torch.randint(0, 256, (1000,), generator=_generator(6), dtype=torch.uint8).to(device)
    got = reference.dequantize_no_absmax(codes, code=code, dtype=torch.float32)
    return _differs("dequantize_no_absmax", got, code[codes.long()])


def _check_reference_estimate_quantiles(reference: Backend, device: torch.device) -> Optional[str]:
    """Linear interpolation between order statistics, as ``torch.quantile`` computes it."""
    A = _randn(7, 5000, device=device)
    got = reference.estimate_quantiles(A, offset=1 / 512, num_quantiles=256)
    points = torch.linspace(1 / 512, 1 - 1 / 512, 256, dtype=torch.float64)
    want = torch.quantile(A.cpu().double(), points).float()
    return _differs("estimate_quantiles", got, want, conformance_tolerance("estimate_quantiles"))


def _check_reference_histogram(reference: Backend, device: torch.device) -> Optional[str]:
    """``histogram[i, j] += source`` for every (repeated) index pair."""
    index1 = torch.randint(0, 16, (2000,), generator=_generator(8)).to(device)
    index2 = torch.randint(0, 8, (2000,), generator=_generator(9)).to(device)
    source = torch.rand(2000, generator=_generator(10)).to(device)
    histogram = torch.zeros(16, 8, device=device)
    reference.histogram_scatter_add_2d(histogram, index1=index1, index2=index2, source=source)
    want = torch.zeros(16, 8, dtype=torch.float64).index_put_(
        (index1.cpu(), index2.cpu()), source.cpu().double(), accumulate=True
    )
    op = "histogram_scatter_add_2d"
    return _differs(op, histogram, want.float(), conformance_tolerance(op))


# ------------------------------------------------------------------------------- 4-bit
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


def _check_reference_dequantize_4bit(reference: Backend, device: torch.device) -> Optional[str]:
    """``table[code] * absmax[block]`` with two codes per byte, the high nibble first."""
    A = _randn(11, 10, 100, device=device)
    for quant_type in ("nf4", "fp4"):
        kwargs = dict(blocksize=64, quant_type=quant_type)
        packed, absmax = reference.quantize_4bit(A, quant_storage=torch.uint8, **kwargs)
        got = reference.dequantize_4bit(packed, absmax=absmax, shape=A.shape, dtype=torch.float32, **kwargs)
        packed_bytes = packed.reshape(-1).long()
        codes = torch.stack([packed_bytes >> 4, packed_bytes & 15], dim=1).reshape(-1)[: A.numel()]
        table = get_4bit_type(quant_type, device=device)
        want = (table[codes] * absmax.repeat_interleave(64)[: A.numel()]).reshape(A.shape)
        problem = _differs(f"dequantize_4bit {quant_type}", got, want)
        if problem:
            return problem
    return None


def _product_check(op: str, rows: int) -> Callable[[Backend, torch.device], Optional[str]]:
    """``A @ dequantize_4bit(W).T`` for ``rows`` input rows (1: the gemv)."""

    def check(reference: Backend, device: torch.device) -> Optional[str]:
        W = _randn(12, 48, 256, device=device)
        A = _randn(13, rows, 256, device=device) / 16  # results of order one
        kwargs = dict(blocksize=64, quant_type="nf4")
        packed, absmax = reference.quantize_4bit(W, quant_storage=torch.uint8, **kwargs)
        dense = reference.dequantize_4bit(packed, absmax=absmax, shape=W.shape, dtype=torch.float32, **kwargs)
        got = getattr(reference, op)(A, packed, shape=W.shape, absmax=absmax, **kwargs)
        want = (A.double() @ dense.double().T).float()
        return _differs(op, got, want, conformance_tolerance(op))

    return check


# ------------------------------------------------------------------------------- int8
def _check_reference_int8_quant(reference: Backend, device: torch.device) -> Optional[str]:
    """Row absmax, and ``round_half_even(A * 127 / row_absmax)``."""
    A = _randn(14, 32, 256, device=device)
    CA, row_stats, outlier_cols = reference.int8_vectorwise_quant(A, threshold=0.0)
    want = torch.round(A * 127 / A.abs().amax(dim=1, keepdim=True)).to(torch.int8)
    return _first(
        _differs("int8_vectorwise_quant row_stats", row_stats, A.abs().amax(dim=1)),
        _differs("int8_vectorwise_quant codes", CA, want),
        None if outlier_cols.numel() == 0 else "int8_vectorwise_quant: outlier columns without a threshold",
    )


def _check_reference_int8_dequant(reference: Backend, device: torch.device) -> Optional[str]:
    """``A * stats / 127``."""
    A = torch.randint(-127, 128, (32, 256), generator=_generator(15), dtype=torch.int8).to(device)
    stats = torch.rand(32, generator=_generator(16)).to(device) * 4
    got = reference.int8_vectorwise_dequant(A, stats=stats)
    op = "int8_vectorwise_dequant"
    return _differs(op, got, A.float() * stats[:, None] / 127, conformance_tolerance(op))


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


def _check_reference_int8_mm_dequant(reference: Backend, device: torch.device) -> Optional[str]:
    """``C * row * col / 127**2 + bias``."""
    C = torch.randint(-(2**20), 2**20, (16, 64), generator=_generator(17), dtype=torch.int32).to(device)
    row, col = (torch.rand(n, generator=_generator(18 + n)).to(device) for n in (16, 64))
    bias = _randn(19, 64, device=device)
    got = reference.int8_mm_dequant(C, row_stats=row, col_stats=col, bias=bias, dtype=torch.float32)
    want = C.double() * row.double()[:, None] * col.double()[None, :] / 127**2 + bias.double()
    return _differs("int8_mm_dequant", got, want.float(), conformance_tolerance("int8_mm_dequant"))


def _check_reference_int8_double_quant(reference: Backend, device: torch.device) -> Optional[str]:
    """Rows as ``int8_vectorwise_quant``; columns quantized by their own absmax."""
    A = _randn(20, 32, 256, device=device)
    CA, CAt, row_stats, col_stats, _ = reference.int8_double_quant(A, threshold=0.0)
    rows, stats, _ = reference.int8_vectorwise_quant(A, threshold=0.0)
    cols = A.abs().amax(dim=0)
    return _first(
        _differs("int8_double_quant rows", CA, rows),
        _differs("int8_double_quant row_stats", row_stats, stats),
        _differs("int8_double_quant col_stats", col_stats, cols),
        _differs("int8_double_quant column codes", CAt, torch.round(A * 127 / cols[None, :]).to(torch.int8)),
    )


def _check_reference_int8_mixed(reference: Backend, device: torch.device) -> Optional[str]:
    """Outlier columns in 16-bit plus the int8 rest: within int8 error of the float product."""
    from .testing.tolerances import INT8_MATMUL_REL_ERR, relative_error

    A = _randn(21, 16, 512, device=device)
    A[:, [3, 100]] *= 20  # two outlier columns
    W = _randn(22, 64, 512, device=device)
    CA, SCA, cols = reference.int8_vectorwise_quant(A, threshold=6.0)
    CB, SCB, _ = reference.int8_vectorwise_quant(W, threshold=0.0)
    out, sub_A = reference.int8_mixed_scaled_mm(A, CA=CA, CB=CB, SCA=SCA, SCB=SCB, outlier_cols=cols, bias=None)
    error = relative_error(out.cpu(), (A @ W.T).cpu())
    if cols.tolist() != [3, 100]:
        return f"int8_vectorwise_quant found outlier columns {cols.tolist()}, not [3, 100]"
    if not error < INT8_MATMUL_REL_ERR:
        return f"int8_mixed_scaled_mm relative error {error:.4f} >= {INT8_MATMUL_REL_ERR}"
    return _differs("int8_mixed_scaled_mm subA", sub_A, A[:, cols])


# -------------------------------------------------------------------------- optimizers
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


def _eight_bit_adam_check(block_wise: bool) -> Callable[[Backend, torch.device], Optional[str]]:
    """``kbit.optim.Adam8bit`` on this backend against ``torch.optim.Adam`` over 10 steps:
    the parameters stay within the format's 8-bit-vs-32-bit bar."""

    def check(reference: Backend, device: torch.device) -> Optional[str]:
        from . import optim
        from .backends import use_backend
        from .testing.tolerances import OPTIMIZER_8BIT_VS_32BIT

        start = _randn(23, 5000, device=device)
        p8, p32 = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        eight_bit = optim.Adam8bit([p8], lr=1e-3, block_wise=block_wise)
        adam = torch.optim.Adam([p32], lr=1e-3)
        with use_backend(reference.name, fallback="error"):
            for step in range(10):
                g = _randn(24 + step, 5000, device=device)
                p8.grad, p32.grad = g.clone(), g.clone()
                eight_bit.step()
                adam.step()
        error = float((p8 - p32).detach().abs().mean())
        bar = OPTIMIZER_8BIT_VS_32BIT.param_mean_abs_err
        return None if error < bar else f"8-bit Adam's parameters are {error:.3g} from torch.optim.Adam's (bar {bar})"

    return check


def _check_reference_percentile_clipping(reference: Backend, device: torch.device) -> Optional[str]:
    """The norm history, the clip value at the percentile and the scale, per the format."""
    gnorm_vec = torch.zeros(100, device=device)
    history: list[float] = []
    # A large first norm fills the history; the smaller ones after it sort below it, so
    # the percentile's place in the sorted history decides the clip value.
    for step, size in enumerate((8.0, 0.5, 1.0, 2.0, 3.0, 4.0), start=1):
        grad = _randn(30 + step, 1000, device=device) * size
        current, clip, scale = reference.percentile_clipping(grad, gnorm_vec, step=step, percentile=2)
        norm_sq = float(grad.double().square().sum())
        history = [norm_sq] * 100 if step == 1 else history[:step] + [norm_sq] + history[step + 1 :]
        want_clip = sorted(history)[2] ** 0.5
        want_scale = want_clip / norm_sq**0.5 if norm_sq**0.5 > want_clip else 1.0
        tolerance = conformance_tolerance("percentile_clipping")
        problem = _first(
            _differs(f"step {step}: gnorm_vec", gnorm_vec, torch.tensor(history, dtype=torch.float32), tolerance),
            _differs(f"step {step}: clip value", clip.reshape(1), torch.tensor([want_clip]), tolerance),
            _differs(f"step {step}: gnorm_scale", scale.reshape(1).float(), torch.tensor([want_scale]), tolerance),
        )
        if problem:
            return problem
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


#: Checks of the reference backend itself, one per op it declares: against the format's
#: definition of the op (exactly where it is exact), its quality bars, or torch's own
#: implementation (``torch.quantile``, ``torch.optim.Adam``).
REFERENCE_CHECKS: dict[str, Callable[[Backend, torch.device], Optional[str]]] = {
    "quantize_blockwise": _check_reference_blockwise,
    "dequantize_blockwise": _check_reference_dequantize_blockwise,
    "quantize": _check_reference_quantize,
    "dequantize": _check_reference_dequantize,
    "quantize_no_absmax": _check_reference_quantize_no_absmax,
    "dequantize_no_absmax": _check_reference_dequantize_no_absmax,
    "estimate_quantiles": _check_reference_estimate_quantiles,
    "histogram_scatter_add_2d": _check_reference_histogram,
    "quantize_4bit": _check_reference_quantize_4bit,
    "dequantize_4bit": _check_reference_dequantize_4bit,
    "gemv_4bit": _product_check("gemv_4bit", 1),
    "matmul_4bit": _product_check("matmul_4bit", 8),
    "int8_vectorwise_quant": _check_reference_int8_quant,
    "int8_vectorwise_dequant": _check_reference_int8_dequant,
    "int8_linear_matmul": _check_reference_int8,
    "int8_mm_dequant": _check_reference_int8_mm_dequant,
    "int8_double_quant": _check_reference_int8_double_quant,
    "int8_mixed_scaled_mm": _check_reference_int8_mixed,
    "optimizer_update_32bit": _check_reference_adam,
    "optimizer_update_8bit": _eight_bit_adam_check(block_wise=False),
    "optimizer_update_8bit_blockwise": _eight_bit_adam_check(block_wise=True),
    "percentile_clipping": _check_reference_percentile_clipping,
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
