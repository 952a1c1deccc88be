"""Validation of optimizer hyperparameters and state options, shared by every kbit optimizer.

Two kinds of settings exist: per-group hyperparameters (``lr``, ``betas``, ``eps``,
``weight_decay`` and AdEMAMix's ``alpha``, ``t_alpha``, ``t_beta3``), stored in each param
group like any ``torch.optim`` optimizer, and per-optimizer state options (``optim_bits``,
``min_8bit_size``, ``percentile_clipping``, ``block_wise``, ``max_unorm``, ``skip_zeros``),
stored in ``optimizer.args``. :class:`~kbit.optim.GlobalOptimManager` may override any of
them per parameter. Every check raises a typed error naming the optimizer, the setting and
the value, so a bad setting fails when it is made, not steps later.
"""

from __future__ import annotations

import ast
import types
from collections.abc import Mapping
from typing import Any, Optional

from .._errors import KbitTypeError, KbitValueError
from .._optim_step import OptimizerKind, layout_of
from ..functional._validate import check_choice, check_int, check_real

#: State options of an optimizer, in ``optimizer.args``.
STATE_OPTIONS = ("optim_bits", "min_8bit_size", "percentile_clipping", "block_wise", "max_unorm", "skip_zeros")

#: Per-group hyperparameters.
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "alpha", "t_alpha", "t_beta3")

#: Settings ``GlobalOptimManager`` may override per parameter.
OVERRIDABLE = frozenset(STATE_OPTIONS + HYPERPARAMETERS)


def state_options(owner: str, args: object, fixed_bits: Optional[int], **keywords: Any) -> types.SimpleNamespace:
    """The optimizer's state options: ``keywords``, overridden by the fields of ``args``.

    ``args`` is the seed API's options object (an ``argparse.Namespace`` or a mapping); its
    fields take precedence, fields it lacks come from the keywords. ``fixed_bits`` is the
    state width of a class that fixes it (``Adam8bit``); asking such a class for another
    width raises.
    """
    options = dict(keywords)
    if args is not None:
        fields = dict(args) if isinstance(args, Mapping) else vars(args)
        options.update({key: fields[key] for key in STATE_OPTIONS if key in fields})
    if fixed_bits is not None and options["optim_bits"] != fixed_bits:
        raise KbitValueError(
            owner, "optim_bits", options["optim_bits"], f"{owner} always keeps {fixed_bits}-bit state"
        )
    check_state_options(owner, options)
    return types.SimpleNamespace(**options)


def _check_bool(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise KbitTypeError(owner, name, f"type {type(value).__name__}", "a bool")


def check_state_options(owner: str, options: Mapping[str, Any]) -> None:
    """Validate the state options present in ``options``."""
    bits = options.get("optim_bits", 32)
    check_choice(owner, "optim_bits", bits, (8, 32))
    if "min_8bit_size" in options:
        check_int(owner, "min_8bit_size", options["min_8bit_size"], low=0, high=2**62)
    if "percentile_clipping" in options:
        check_int(owner, "percentile_clipping", options["percentile_clipping"], low=0, high=100)
    if "max_unorm" in options:
        check_real(owner, "max_unorm", options["max_unorm"], low=0.0)
    for name in ("block_wise", "skip_zeros"):
        if name in options:
            _check_bool(owner, name, options[name])


def normalise_betas(owner: str, kind: OptimizerKind, betas: object) -> tuple[float, ...]:
    """``betas`` as a tuple of floats in ``[0, 1)`` of the length ``kind`` needs.

    A string such as ``"(0.9, 0.995)"`` (command-line configs) is parsed as a literal.
    Betas the kind does not read must be 0.
    """
    if isinstance(betas, str):
        try:
            betas = ast.literal_eval(betas)
        except (ValueError, SyntaxError):
            raise KbitValueError(owner, "betas", betas, "a tuple of numbers such as (0.9, 0.999)") from None
    length = 3 if kind.reads_param("beta3") else 2
    if not isinstance(betas, (tuple, list)) or len(betas) != length:
        raise KbitValueError(owner, "betas", betas, f"a tuple of {length} numbers in [0, 1)")
    values = tuple(check_real(owner, f"betas[{i}]", b, low=0.0, high=1.0, high_open=True) for i, b in enumerate(betas))
    unused = [(0, kind.reads_param("beta1")), (1, kind.reads_param("beta2"))]
    for index, used in unused:
        if not used and values[index] != 0.0:
            raise KbitValueError(owner, f"betas[{index}]", values[index], f"optimizer {kind.name!r} does not use it; pass 0")
    return values


def check_group_hyperparameters(owner: str, kind: OptimizerKind, group: Mapping[str, Any]) -> dict[str, Any]:
    """Validated copy of the hyperparameters in ``group`` (betas normalised to a tuple)."""
    checked: dict[str, Any] = {}
    if "lr" in group:
        checked["lr"] = check_real(owner, "lr", group["lr"], low=0.0)
    if "betas" in group:
        checked["betas"] = normalise_betas(owner, kind, group["betas"])
    if "eps" in group:
        checked["eps"] = check_real(owner, "eps", group["eps"], low=0.0)
        if not kind.reads_param("eps") and checked["eps"] != 0.0:
            raise KbitValueError(owner, "eps", group["eps"], f"optimizer {kind.name!r} does not use eps; pass 0")
    if "weight_decay" in group:
        checked["weight_decay"] = check_real(owner, "weight_decay", group["weight_decay"], low=0.0)
    if kind.reads_param("alpha"):
        if "alpha" in group:
            checked["alpha"] = check_real(owner, "alpha", group["alpha"], low=0.0)
        for name in ("t_alpha", "t_beta3"):
            if group.get(name) is not None:
                check_int(owner, name, group[name], low=1, high=2**62)
            if name in group:
                checked[name] = group[name]
    else:
        for name, inert in (("alpha", 0.0), ("t_alpha", None), ("t_beta3", None)):
            if group.get(name, inert) != inert:
                raise KbitValueError(owner, name, group[name], f"only AdEMAMix uses {name}")
    return checked


def check_layout_options(owner: str, kind: OptimizerKind, options: Mapping[str, Any], *, eight_bit: bool,
                         block_wise: bool) -> None:  # fmt: skip
    """Refuse state options the chosen state layout cannot honour (instead of ignoring them).

    What each layout honours is data (:data:`kbit._optim_step.STATE_LAYOUTS`).
    """
    layout = layout_of(eight_bit, block_wise)
    if "max_unorm" not in layout.options and options["max_unorm"] > 0:
        raise KbitValueError(
            owner, "max_unorm", options["max_unorm"],
            f"{layout.name} state has no update-norm clipping; pass block_wise=False or optim_bits=32",
        )  # fmt: skip
    if "skip_zeros" not in layout.options and options["skip_zeros"]:
        raise KbitValueError(owner, "skip_zeros", True, f"{layout.name} state (block_wise=False) cannot skip zeros")
    if eight_bit and not block_wise and not kind.static_8bit:
        raise KbitValueError(owner, "block_wise", False, f"8-bit {kind.name!r} state is always blockwise")


def refuse_unsupported(owner: str, **arguments: tuple[Any, Any, str]) -> None:
    """Raise for an argument set to a value this optimizer cannot honour.

    Each keyword maps an argument name to ``(given, the only supported value, why)``; a
    torch-compatible argument the kernels cannot implement fails loudly instead of being
    silently ignored.
    """
    for name, (given, supported, why) in arguments.items():
        if given != supported:
            raise KbitValueError(owner, name, given, f"only {supported!r} is supported: {why}")
