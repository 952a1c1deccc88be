"""Conformance cases of the optimizer family: multi-step trajectories and percentile clipping.

Each update op runs a short trajectory (:data:`STEPS` steps from zero states, a fresh
seeded gradient at every step) on the backend and on the reference, for every declared
dtype and optimizer kind, and compares the parameter, every state and every scale after
each step (``"p@1"``, ``"state1@1"``, ``"absmax1@1"``, ...). One step is not enough: with
zero states the first Adam step is the same whatever the betas (bias correction cancels
them), and a swapped beta or a state read at the wrong time only shows later.

What must agree, and why not bit-exactly:

- Float results (32-bit states, ``unorm_vec``, percentile clipping) under the op's row of
  ``tolerances.CONFORMANCE``: the rules leave the order of float32 operations free (a lerp
  or a multiply-add, fused ``addcdiv``, reductions for norms).
- Parameters within ``atol + rtol * (largest parameter movement of the reference)`` of
  the op's tolerance, plus one step of a 16-bit parameter dtype: the parameter is rounded
  to its dtype once per step, so a float32 result a few ulps away may round the other way.
  For float32 parameters the mean difference must also stay below
  ``OPTIMIZER_PARAM_MEAN_REL`` of the mean movement: flipped codes touch a few elements,
  a slightly wrong rule touches all of them.
- 8-bit states: a state value within an ulp of the midpoint between two codes goes to
  either code depending on that free float32 order, and the next steps start from the
  other code. So codes must be equal on at least ``OPTIMIZER_TRAJECTORY.min_equal_codes``
  of the elements and the scales (``absmax``, ``new_max``) within
  ``OPTIMIZER_TRAJECTORY.absmax_rtol``; the parameter then shows whether the rule is right.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Optional

import torch

from ..._formats import FLOAT_DTYPE_NAMES, GNORM_HISTORY, OPTIMIZER_BLOCKSIZE, num_blocks
from ...functional._codebooks import create_dynamic_map
from ..._optim_step import OPTIMIZER_KINDS, STATE_LAYOUTS, OptimizerKind, OptimizerStep
from ..tolerances import (
    EXACT,
    OPTIMIZER_GOLDEN_CODE_EXCEPTIONS,
    OPTIMIZER_PARAM_MEAN_REL,
    OPTIMIZER_TRAJECTORY,
    Tolerance,
)
from ._spec import GoldenCheck, GoldenContext, InputSet, OpCases, Variant, compare_tensor, seeded

Tensor = torch.Tensor

FAMILY = "optimizer"

#: Update steps per trajectory (step counts 1..STEPS, or from the input's step on).
STEPS = 3

_ALL_KINDS = tuple(OPTIMIZER_KINDS)

_QMAP_SIGNED = create_dynamic_map()
_QMAP_UNSIGNED = create_dynamic_map(signed=False)


# ------------------------------------------------------------------------ argument layout
#: The flat arguments an :class:`OptimizerStep` becomes at the op boundary, in order.
_STEP_ARGUMENTS = ("kind", "step", "scalars", "skip_zeros")


class _Layout:
    """Where an update op keeps its arguments, and which ones a trajectory records.

    ``positions`` maps argument names to positional indices of ``torch.ops.kbit.<op>``,
    read from the op's schema (so the layout cannot drift from the op); ``scales`` are the
    per-step scale tensors recorded after each step; ``swaps`` are the (old, new) scale
    pairs the caller exchanges between steps (whole-tensor 8-bit state).
    """

    def __init__(self, op: str, scales: tuple[str, ...], swaps: tuple[tuple[str, str], ...] = ()) -> None:
        self.op = op
        self.scales = scales
        self.swaps = swaps

    @property
    def names(self) -> tuple[str, ...]:
        schema = getattr(torch.ops.kbit, self.op).default._schema
        return tuple(argument.name for argument in schema.arguments)

    @property
    def positions(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.names)}

    def build(self, update: OptimizerStep, **tensors: Any) -> tuple:
        """The op's arguments: ``tensors`` by name, then the flat form of ``update``."""
        values = dict(zip(_STEP_ARGUMENTS, update.to_op_args(), strict=True))
        return tuple(tensors[name] if name in tensors else values[name] for name in self.names)


_LAYOUTS = {
    "optimizer_update_32bit": _Layout("optimizer_update_32bit", scales=()),
    "optimizer_update_8bit": _Layout(
        "optimizer_update_8bit",
        scales=("new_max1", "new_max2"),
        swaps=(("max1", "new_max1"), ("max2", "new_max2")),
    ),
    "optimizer_update_8bit_blockwise": _Layout("optimizer_update_8bit_blockwise", scales=("absmax1", "absmax2")),
}

#: What each update op's state layout can honour (``max_unorm`` / ``skip_zeros``).
_LAYOUT_OPTIONS = {layout.op: layout.options for layout in STATE_LAYOUTS.values()}


# ------------------------------------------------------------------------------ inputs
def _hyper(kind: OptimizerKind, **overrides: float) -> dict[str, float]:
    """Hyperparameters for ``kind``: the ones it does not read are 0 (the API demands it).

    beta1 and beta2 differ clearly, so a backend that swaps them is caught.
    """
    hyper = dict(
        beta1=0.9, beta2=0.99, beta3=0.999, alpha=2.0, eps=1e-8,
        weight_decay=0.0, lr=1e-2, gnorm_scale=1.0, max_unorm=0.0, skip_zeros=False,
    )  # fmt: skip
    hyper.update(overrides)
    return {name: value if kind.reads_param(name) else 0.0 for name, value in hyper.items()}


def _start(op: str, kind: OptimizerKind, p: Tensor, g: Tensor, **hyper: Any) -> tuple:
    """Step-1 arguments of ``op``: zero states and scales, as an optimizer allocates them."""
    n = p.numel()
    rows = (2,) if kind.stacked_state1 else ()
    two = kind.num_states == 2
    if op == "optimizer_update_32bit":
        state = {"state1": torch.zeros(rows + tuple(p.shape)), "state2": torch.zeros(p.shape) if two else None}
    else:
        state = {
            "state1": torch.zeros(rows + tuple(p.shape), dtype=torch.uint8),
            "state2": torch.zeros(p.shape, dtype=torch.uint8) if two else None,
            "qmap1": _QMAP_SIGNED.clone(),
            "qmap2": _QMAP_UNSIGNED.clone() if two else None,
        }
    if op == "optimizer_update_8bit_blockwise":
        nblocks = num_blocks(n, OPTIMIZER_BLOCKSIZE)
        state.update(absmax1=torch.zeros(rows + (nblocks,)), absmax2=torch.zeros(nblocks) if two else None)
    if op == "optimizer_update_8bit":
        for which in ("1", "2"):
            live = which == "1" or two
            state.update({f"max{which}": torch.zeros(1) if live else None,
                          f"new_max{which}": torch.zeros(1) if live else None})  # fmt: skip
    unorm_vec = torch.zeros(1) if hyper.get("max_unorm", 0.0) > 0 else None
    skip_zeros = bool(hyper.pop("skip_zeros", False))
    update = OptimizerStep(kind, 1, skip_zeros=skip_zeros, **hyper)
    return _LAYOUTS[op].build(update, g=g, p=p, unorm_vec=unorm_vec, **state)


def _update_inputs(op: str) -> Callable[[Variant], list[InputSet]]:
    has_unorm = "max_unorm" in _LAYOUT_OPTIONS[op]
    has_skip = "skip_zeros" in _LAYOUT_OPTIONS[op]

    def inputs(variant: Variant) -> list[InputSet]:
        kind, dtype = OPTIMIZER_KINDS[variant["optimizer"]], variant.dtype

        def entry(name: str, shape: tuple[int, ...], zeros: bool = False, **overrides: Any) -> InputSet:
            generator = seeded(variant, name)
            p = (torch.randn(shape, generator=generator) * 0.5).to(dtype)
            g = torch.randn(shape, generator=generator)
            if zeros:
                g[torch.rand(shape, generator=generator) < 0.25] = 0.0
            hyper = _hyper(kind, **overrides)
            if not has_unorm:
                hyper.pop("max_unorm")
            if not has_skip:
                hyper.pop("skip_zeros")
            return InputSet(name, _start(op, kind, p, g.to(dtype), **hyper))

        # Weight decay, gradient scaling, a visible eps and (where the op has it) the trust
        # ratio clipping of LAMB/LARS, which any kind may use, in one trajectory.
        extras = dict(weight_decay=0.05, gnorm_scale=0.7, eps=1e-3, lr=3e-2)
        if has_unorm:
            extras["max_unorm"] = 0.02
        sets = [entry("typical", (23, 23)), entry("decay_scale_clip", (529,), **extras), entry("one_element", (1,))]
        if has_skip:
            sets.append(entry("skip_zeros", (300,), zeros=True, skip_zeros=True, weight_decay=0.05))
        return sets  # 529 elements: two full blocks of 256 and a partial one

    return inputs


# ------------------------------------------------------------------------------ runner
def _fresh_gradient(first: Tensor, step: int) -> Tensor:
    """A new seeded gradient for ``step``, zero where the step-1 gradient is zero.

    Seeded from the first gradient's values, so every input set has its own stream and the
    backend and the reference see the same gradients.
    """
    cpu = first.detach().cpu()
    seed = zlib.crc32(cpu.float().numpy().tobytes()) + step
    fresh = torch.randn(cpu.shape, generator=torch.Generator().manual_seed(seed))
    fresh = fresh.masked_fill(cpu == 0, 0.0) * (1.0 + 0.5 * step)
    return fresh.to(dtype=first.dtype, device=first.device)


def _trajectory(op_name: str) -> Callable[[Callable[..., Any], tuple, Variant], dict[str, Tensor]]:
    """A runner doing :data:`STEPS` updates and naming the tensors after each one."""
    layout = _LAYOUTS[op_name]
    at = layout.positions
    recorded = ("p", "state1", "state2", "unorm_vec", *layout.scales)

    def run(op: Callable[..., Any], args: tuple, variant: Variant) -> dict[str, Tensor]:
        args = list(args)
        first = args[at["g"]]
        results: dict[str, Tensor] = {}
        for step in range(1, STEPS + 1):
            args[at["step"]] = step
            args[at["g"]] = first if step == 1 else _fresh_gradient(first, step)
            op(*args)
            for name in recorded:
                value = args[at[name]] if name in at else None
                if value is not None:
                    results[f"{name}@{step}"] = value.clone()
            for old, new in layout.swaps:  # the caller swaps the scales before the next step
                args[at[old]], args[at[new]] = args[at[new]], args[at[old]]
        return results

    return run


# --------------------------------------------------------------------------- comparison
def _param_problem(label: str, got: Tensor, want: Tensor, start: Tensor, tolerance: Tolerance) -> Optional[str]:
    """``got`` within ``atol + rtol * max |want - start|`` (+ one step of a 16-bit dtype)."""
    if not isinstance(got, Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        return compare_tensor(label, got, want, EXACT)
    movement = float((want.double() - start.double()).abs().max())
    allowed = tolerance.atol + tolerance.rtol * movement
    if want.dtype != torch.float32:
        allowed = allowed + torch.finfo(want.dtype).eps * want.double().abs()
    error = (got.double() - want.double()).abs()
    bad = ~(error <= allowed)
    if bool(bad.any()):
        return (
            f"{label}: {int(bad.sum())} of {want.numel()} elements differ from the reference by up to "
            f"{float(error.max()):.3g} (parameters moved by {movement:.3g}; allowed atol={tolerance.atol} + "
            f"rtol={tolerance.rtol} x movement)"
        )
    # The elementwise bound leaves room for a few flipped codes; a rule that is slightly off
    # everywhere (a step size 1% too large) stays inside it but moves the mean error.
    mean_movement = float((want.double() - start.double()).abs().mean())
    mean_error = float(error.mean()) if error.numel() else 0.0
    bar = OPTIMIZER_PARAM_MEAN_REL * mean_movement + tolerance.atol
    if want.dtype == torch.float32 and mean_error > bar:
        return (
            f"{label}: mean difference from the reference {mean_error:.3g} exceeds "
            f"{OPTIMIZER_PARAM_MEAN_REL:g} x the mean parameter movement {mean_movement:.3g}"
        )
    return None


def _codes_problem(label: str, got: Tensor, want: Tensor) -> Optional[str]:
    if not isinstance(got, Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        return compare_tensor(label, got, want, EXACT)
    equal = float((got == want).double().mean()) if want.numel() else 1.0
    if equal >= OPTIMIZER_TRAJECTORY.min_equal_codes:
        return None
    return f"{label}: only {equal:.2%} of the codes equal the reference's (at least {OPTIMIZER_TRAJECTORY.min_equal_codes:.0%})"


def _compare_trajectory(
    got: dict[str, Tensor], want: dict[str, Tensor], args: tuple, variant: Variant, tolerance: Tolerance
) -> list[str]:
    start = args[2]  # p, in every update layout
    scale_tolerance = Tolerance(rtol=OPTIMIZER_TRAJECTORY.absmax_rtol, atol=0.0)
    problems = []
    for name, expected in want.items():
        base = name.split("@")[0]
        if name not in got:
            problem = f"{name}: missing from the backend's results"
        elif base == "p":
            problem = _param_problem(name, got[name], expected, start, tolerance)
        elif expected.dtype == torch.uint8:
            problem = _codes_problem(name, got[name], expected)
        elif base.startswith(("absmax", "new_max")):
            problem = compare_tensor(name, got[name], expected, scale_tolerance)
        else:
            problem = compare_tensor(name, got[name], expected, tolerance)
        if problem:
            problems.append(problem)
    return problems[:6]  # the first few tell the story; later steps inherit earlier errors


# ------------------------------------------------------------------ percentile clipping
def _clipping_inputs(variant: Variant) -> list[InputSet]:
    dtype = variant.dtype

    def entry(name: str, numel: int, step: int, percentile: int, history: bool = False) -> InputSet:
        generator = seeded(variant, name)
        grad = torch.randn(numel, generator=generator).to(dtype)
        gnorm_vec = torch.rand(GNORM_HISTORY, generator=generator) * 4 * numel if history else torch.zeros(GNORM_HISTORY)
        return InputSet(name, (grad, gnorm_vec, step, percentile))

    return [
        entry("first_steps", 500, 1, 5),
        # A full history and a step count past the history's length: the slot wraps.
        entry("history", 300, 250, 5, history=True),
        entry("percentile_0", 200, 7, 0, history=True),
        entry("percentile_99", 200, 3, GNORM_HISTORY - 1, history=True),
        entry("one_element", 1, 1, 50),
    ]


def _clipping_run(op: Callable[..., Any], args: tuple, variant: Variant) -> dict[str, Tensor]:
    """:data:`STEPS` calls from the input's step on, with growing fresh gradients (so some are clipped)."""
    grad, gnorm_vec, first_step, percentile = args
    results: dict[str, Tensor] = {}
    for offset in range(STEPS):
        step_grad = grad if offset == 0 else _fresh_gradient(grad, offset) * (1 + offset)
        current, clip, scale = op(step_grad, gnorm_vec, first_step + offset, percentile)
        for name, value in (("current_gnorm", current), ("clip_value", clip), ("gnorm_scale", scale)):
            results[f"{name}@{first_step + offset}"] = value.clone()
    results["gnorm_vec"] = gnorm_vec.clone()
    return results


def _update_cases(op: str, kinds: tuple[str, ...]) -> OpCases:
    # opcheck per kind: kinds differ in which optional states are None and in state
    # shapes (AdEMAMix stacks two); the dtype changes neither schema nor fake kernel.
    return OpCases(
        op,
        {"dtype": FLOAT_DTYPE_NAMES, "optimizer": kinds},
        _update_inputs(op),
        _trajectory(op),
        _compare_trajectory,
        opcheck_axes=("optimizer",),
    )


CASES = (
    _update_cases("optimizer_update_32bit", _ALL_KINDS),
    # Whole-tensor 8-bit state has no slot for AdEMAMix's third moment: the API refuses it.
    _update_cases("optimizer_update_8bit", tuple(name for name, kind in OPTIMIZER_KINDS.items() if kind.static_8bit)),
    _update_cases("optimizer_update_8bit_blockwise", _ALL_KINDS),
    OpCases("percentile_clipping", {"dtype": FLOAT_DTYPE_NAMES}, _clipping_inputs, _clipping_run),
)


# ----------------------------------------------------------------------------- goldens
#: How each golden trajectory (recorded with the optimizer classes' defaults) maps to an op.
_GOLDEN_RUNS = {
    "Adam8bit": ("optimizer_update_8bit_blockwise", "adam", dict(beta1=0.9, beta2=0.999, eps=1e-8)),
    "Adam32bit": ("optimizer_update_32bit", "adam", dict(beta1=0.9, beta2=0.999, eps=1e-8)),
    "Lion8bit": ("optimizer_update_8bit_blockwise", "lion", dict(beta1=0.9, beta2=0.99)),
    "SGD8bit": ("optimizer_update_8bit_blockwise", "momentum", dict(beta1=0.9)),
}


def _golden_args(op: str, kind: OptimizerKind, entry: dict, hyper: dict) -> tuple:
    p = entry["p0"].clone()
    args = list(_start(op, kind, p, entry["grads"][0], **_hyper(kind, lr=entry["kwargs"]["lr"], **hyper)))
    first = entry["states"][0]
    at = _LAYOUTS[op].positions
    for key in ("qmap1", "qmap2"):  # the goldens' own code tables
        if key in first and key in at:
            args[at[key]] = first[key].clone()
    return tuple(args)


def _golden_problems(name: str, got: dict[str, Tensor], want_p: Tensor, want: dict, step: int) -> list[str]:
    bar = OPTIMIZER_TRAJECTORY
    eight_bit = name.endswith("8bit")
    problems = []
    rel = bar.param_rel_8bit if eight_bit else bar.param_rel_32bit
    error, scale = float((got["p"].float() - want_p.float()).abs().max()), float(want_p.abs().max())
    if not error <= rel * scale:
        problems.append(f"{name} step {step}: parameters differ by {error:.3g} (> {rel:g} x max |p|)")
    for key, expected in want.items():
        if not key.startswith(("state", "absmax")):
            continue  # the code tables are inputs, the step counter is the class's
        ours = got[key]
        if key.startswith("absmax"):
            problem = compare_tensor(f"{name} step {step}: {key}", ours, expected, Tolerance(bar.absmax_rtol, 0.0))
        elif eight_bit:
            floor = OPTIMIZER_GOLDEN_CODE_EXCEPTIONS.get((name, step, key), bar.min_equal_codes)
            equal = float((ours == expected).double().mean())
            problem = None if equal >= floor else f"{name} step {step}: only {equal:.2%} of {key} codes equal the goldens"
        else:
            atol = 1e-6 * float(expected.abs().max())
            problem = compare_tensor(f"{name} step {step}: {key}", ours, expected, Tolerance(1e-5, atol))
        if problem:
            problems.append(problem)
    return problems


def _golden_check(op: str) -> Callable[[GoldenContext], tuple[int, list[str]]]:
    """Replays the ``optim`` golden trajectories that run on ``op`` through the backend."""

    def check(ctx: GoldenContext) -> tuple[int, list[str]]:
        checked, problems = 0, []
        at = _LAYOUTS[op].positions
        for name, (golden_op, kind_name, hyper) in _GOLDEN_RUNS.items():
            entry = ctx.goldens["optim"].get(name)
            if golden_op != op or entry is None or not ctx.declares(op, entry["p0"].dtype, optimizer=kind_name):
                continue
            checked += 1
            args = _golden_args(op, OPTIMIZER_KINDS[kind_name], entry, hyper)
            for step, (grad, want_p, want) in enumerate(
                zip(entry["grads"], entry["params"], entry["states"], strict=True), 1
            ):
                args = list(args)
                args[at["step"]], args[at["g"]] = step, grad
                args = ctx.mutate(op, *args)
                got = {key: args[index] for key, index in at.items() if isinstance(args[index], Tensor)}
                step_problems = _golden_problems(name, got, want_p, want, step)
                if step_problems:
                    problems += step_problems
                    break  # later steps only repeat the divergence
        return checked, problems

    return check


GOLDENS = tuple(
    GoldenCheck(op, _golden_check(op)) for op in ("optimizer_update_32bit", "optimizer_update_8bit_blockwise")
)
