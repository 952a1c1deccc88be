"""``kbit check`` for the optimizer ops: short trajectories of a backend against the reference.

Each check runs three update steps from the same seeded start on both backends, for every
optimizer kind and dtype the backend declares, and compares parameters and states under
``kbit.testing.tolerances.OPTIMIZER_TRAJECTORY`` (fused kernels may round differently, so
8-bit codes must agree on nearly all elements, not all). The reference itself is checked
against ``torch.optim.Adam``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ._formats import GNORM_HISTORY, OPTIMIZER_BLOCKSIZE, num_blocks
from .backend import Backend
from .functional._codebooks import cached_code
from .functional._optim import OPTIMIZER_KINDS
from .testing.tolerances import OPTIMIZER_TRAJECTORY as BAR

__all__ = ["OPTIMIZER_CHECKS", "OPTIMIZER_REFERENCE_CHECKS"]

_NUMEL = 3 * OPTIMIZER_BLOCKSIZE + 17  # a partial last block
_STEPS = 3
_LAYOUTS = {
    "optimizer_update_32bit": "32bit",
    "optimizer_update_8bit": "8bit",
    "optimizer_update_8bit_blockwise": "8bit_blockwise",
}


def _declared(backend: Backend, op: str, field: str) -> tuple:
    support = backend.manifest.ops.get(op) if backend.manifest else None
    values = getattr(support, field, None) if support else None
    return tuple(values) if values is not None else ()


def _hyper(kind_name: str, layout: str) -> dict:
    kind = OPTIMIZER_KINDS[kind_name]
    hyper = dict(beta1=0.9 if kind.uses_beta1 else 0.0, beta2=0.99 if kind.uses_beta2 else 0.0,
                 eps=1e-8 if kind.uses_eps else 0.0, weight_decay=0.01, lr=1e-2, gnorm_scale=0.9)  # fmt: skip
    if layout != "8bit":
        hyper.update(beta3=0.999 if kind.uses_beta3_alpha else 0.0, alpha=2.0 if kind.uses_beta3_alpha else 0.0)
        hyper["skip_zeros"] = False
    if layout != "8bit_blockwise":
        hyper["max_unorm"] = 0.05 if kind_name in ("lamb", "lars") else 0.0
    return hyper


def _start(kind_name: str, layout: str, dtype: torch.dtype, device: torch.device) -> dict:
    """Fresh parameter and states (zeros, as an optimizer allocates them)."""
    kind = OPTIMIZER_KINDS[kind_name]
    gen = torch.Generator().manual_seed(7)
    p = (torch.randn(_NUMEL, generator=gen) * 0.5).to(dtype).to(device)
    rows = (2,) if kind.stacked_state1 else ()
    state_dtype = torch.float32 if layout == "32bit" else torch.uint8
    start = {"p": p, "state1": torch.zeros(rows + (_NUMEL,), dtype=state_dtype, device=device)}
    if kind.num_states == 2:
        start["state2"] = torch.zeros(_NUMEL, dtype=state_dtype, device=device)
    nblocks = num_blocks(_NUMEL, OPTIMIZER_BLOCKSIZE)
    for which in range(1, kind.num_states + 1):
        if layout == "8bit_blockwise":
            start[f"absmax{which}"] = torch.zeros((rows if which == 1 else ()) + (nblocks,), device=device)
        elif layout == "8bit":
            start[f"max{which}"] = torch.zeros(1, device=device)
            start[f"new_max{which}"] = torch.zeros(1, device=device)
    return start


def _step(backend: Backend, op: str, kind_name: str, layout: str, t: dict, g: torch.Tensor, step: int) -> None:
    hyper = _hyper(kind_name, layout)
    two = "state2" in t
    device = t["p"].device
    if layout == "32bit":
        unorm = t.setdefault("unorm_vec", torch.zeros(1, device=device)) if hyper["max_unorm"] > 0 else None
        backend.optimizer_update_32bit(kind_name, g, t["p"], t["state1"], t.get("state2"), unorm, step=step, **hyper)
        return
    codes = dict(qmap1=cached_code("dynamic", device), qmap2=cached_code("dynamic_unsigned", device) if two else None)
    if layout == "8bit_blockwise":
        backend.optimizer_update_8bit_blockwise(
            kind_name, g, t["p"], t["state1"], t.get("state2"), step=step, absmax1=t["absmax1"],
            absmax2=t.get("absmax2"), **codes, **hyper,
        )  # fmt: skip
        return
    unorm = t.setdefault("unorm_vec", torch.zeros(1, device=device)) if hyper["max_unorm"] > 0 else None
    backend.optimizer_update_8bit(
        kind_name, g, t["p"], t["state1"], t.get("state2"), step=step, max1=t["max1"], max2=t.get("max2"),
        new_max1=t["new_max1"], new_max2=t.get("new_max2"), unorm_vec=unorm, **codes, **hyper,
    )  # fmt: skip
    for which in (1, 2):
        if f"max{which}" in t:
            t[f"max{which}"], t[f"new_max{which}"] = t[f"new_max{which}"], t[f"max{which}"]


def _disagreement(label: str, got: dict, want: dict, layout: str) -> Optional[str]:
    p, p_ref = got["p"].float().cpu(), want["p"].float().cpu()
    bar = BAR.param_rel_32bit if layout == "32bit" else BAR.param_rel_8bit
    error, scale = float((p - p_ref).abs().max()), float(p_ref.abs().max())
    if not error <= bar * scale:
        return f"{label}: parameters differ by {error:.3g} (> {bar:g} x max |p| = {bar * scale:.3g})"
    for key, ref in want.items():
        ours = got[key].cpu()
        ref = ref.cpu()
        if key.startswith("state") and ref.dtype == torch.uint8:
            equal = float((ours == ref).float().mean())
            if equal < BAR.min_equal_codes:
                return f"{label}: only {equal:.2%} of {key} codes equal the reference's"
        elif key.startswith("state") or key == "unorm_vec":
            tolerance = BAR.param_rel_32bit * float(ref.abs().max()) + 1e-12
            if float((ours - ref).abs().max()) > tolerance:
                return f"{label}: {key} differs from the reference beyond {tolerance:.3g}"
        elif key.startswith(("absmax", "max", "new_max")):
            if not torch.allclose(ours, ref, rtol=BAR.absmax_rtol, atol=0):
                return f"{label}: {key} differs from the reference beyond rtol {BAR.absmax_rtol:g}"
    return None


def _check_update(op: str) -> Callable[[Backend, Backend, torch.device], Optional[str]]:
    layout = _LAYOUTS[op]

    def check(backend: Backend, reference: Backend, device: torch.device) -> Optional[str]:
        kinds = [k for k in _declared(backend, op, "optimizers") if k in _declared(reference, op, "optimizers")]
        for kind_name in kinds:
            for dtype_name in _declared(backend, op, "dtypes") or ("float32",):
                dtype = getattr(torch, dtype_name)
                ours, theirs = _start(kind_name, layout, dtype, device), _start(kind_name, layout, dtype, device)
                gen = torch.Generator().manual_seed(11)
                for step in range(1, _STEPS + 1):
                    g = torch.randn(_NUMEL, generator=gen).to(dtype).to(device)
                    _step(backend, op, kind_name, layout, ours, g, step)
                    _step(reference, op, kind_name, layout, theirs, g, step)
                    problem = _disagreement(f"{kind_name}, {dtype_name}, step {step}", ours, theirs, layout)
                    if problem:
                        return problem
        return None

    return check


def _check_percentile_clipping(backend: Backend, reference: Backend, device: torch.device) -> Optional[str]:
    gen = torch.Generator().manual_seed(5)
    for dtype_name in _declared(backend, "percentile_clipping", "dtypes") or ("float32",):
        vectors = [torch.zeros(GNORM_HISTORY, device=device) for _ in range(2)]
        for step in range(1, 6):
            grad = (torch.randn(500, generator=gen) * step).to(getattr(torch, dtype_name)).to(device)
            got = backend.percentile_clipping(grad, vectors[0], step=step, percentile=5)
            want = reference.percentile_clipping(grad, vectors[1], step=step, percentile=5)
            for name, a, b in zip(("current_gnorm", "clip_value", "gnorm_scale", "gnorm_vec"),
                                  (*got, vectors[0]), (*want, vectors[1]), strict=True):  # fmt: skip
                if not torch.allclose(a.cpu().float(), b.cpu().float(), rtol=1e-5, atol=0):
                    return f"{dtype_name}, step {step}: {name} differs from the reference"
    return None


def _check_reference_adam(reference: Backend, device: torch.device) -> Optional[str]:
    """The reference's 32-bit Adam against ``torch.optim.Adam`` over 10 steps."""
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(_NUMEL, generator=gen).to(device)
    mirror = torch.nn.Parameter(p.clone())
    adam = torch.optim.Adam([mirror], lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for step in range(1, 11):
        g = torch.randn(_NUMEL, generator=gen).to(device)
        reference.optimizer_update_32bit(
            "adam", g, p, m, v, None, max_unorm=0.0, beta1=0.9, beta2=0.99, beta3=0.0, alpha=0.0, eps=1e-8,
            weight_decay=0.0, step=step, lr=1e-2, gnorm_scale=1.0, skip_zeros=False,
        )  # fmt: skip
        mirror.grad = g.clone()
        adam.step()
        if not torch.allclose(p, mirror.detach(), rtol=1e-5, atol=1e-6):
            return f"step {step}: parameters differ from torch.optim.Adam by {float((p - mirror).abs().max()):.3g}"
    return None


#: Backend-vs-reference checks of the optimizer family, by op name.
OPTIMIZER_CHECKS: dict[str, Callable[[Backend, Backend, torch.device], Optional[str]]] = {
    **{op: _check_update(op) for op in _LAYOUTS},
    "percentile_clipping": _check_percentile_clipping,
}

#: Checks of the reference backend's optimizer ops themselves, by op name.
OPTIMIZER_REFERENCE_CHECKS: dict[str, Callable[[Backend, torch.device], Optional[str]]] = {
    "optimizer_update_32bit": _check_reference_adam,
}
