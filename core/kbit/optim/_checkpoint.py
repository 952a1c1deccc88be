"""Optimizer checkpoints: the nested ``__bnb_optimizer_quant_state__`` layout and its checks.

``state_dict()`` moves the quantization tensors of each parameter's state (the states
themselves, code tables, scales, clipping history) under one nested key, so sharded
checkpoint tools that cast floating-point state to the model's dtype leave them alone.
Loading accepts that layout and the flat one, checks every state against the parameter it
belongs to before changing anything, and never casts a tensor: uint8 codes stay codes and
float32 states stay float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._errors import QuantStateError
from .._formats import CODE_TABLE_SIZE, GNORM_HISTORY, OPTIMIZER_BLOCKSIZE, num_blocks
from .._optim_step import OptimizerKind
from ..functional._codebooks import cached_code
from ..functional._validate import check_scales, check_stored_values

__all__ = [
    "QUANT_STATE_KEY", "QUANT_STATE_KEYS", "nest_quant_state", "flat_param_state", "checked_param_state",
    "check_state_layout", "state_layout",
]  # fmt: skip

#: The nested key of the format (kept byte-identical for interoperability).
QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"

#: Per-parameter state entries that live under :data:`QUANT_STATE_KEY` in a checkpoint.
QUANT_STATE_KEYS = frozenset(
    {"state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2", "max1", "max2", "new_max1", "new_max2",
     "gnorm_vec", "unorm_vec"}
)  # fmt: skip


#: The code table each 8-bit state indexes (``cached_code`` names), by state number: first
#: moments and the single state of one-state kinds are signed, second moments unsigned.
STATE_CODES = {1: "dynamic", 2: "dynamic_unsigned"}
STATE_CODE_NAMES = {1: "signed dynamic map", 2: "unsigned dynamic map"}

_NORMS = "squared gradient or update norms (finite, >= 0)"


def nest_quant_state(param_state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of one parameter's state with the quantization entries nested."""
    outer = {key: value for key, value in param_state.items() if key not in QUANT_STATE_KEYS}
    inner = {key: value for key, value in param_state.items() if key in QUANT_STATE_KEYS}
    if inner:
        outer[QUANT_STATE_KEY] = inner
    return outer


def flat_param_state(param_state: Mapping[str, Any], label: str = "state") -> dict[str, Any]:
    """One parameter's state in the flat form, from either the nested or the flat form."""
    if not isinstance(param_state, Mapping):
        raise QuantStateError(label, f"expected a dict of state entries, got {type(param_state).__name__}")
    flat = {key: value for key, value in param_state.items() if key != QUANT_STATE_KEY}
    nested = param_state.get(QUANT_STATE_KEY)
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise QuantStateError(QUANT_STATE_KEY, f"expected a dict, got {type(nested).__name__}")
        both = sorted(set(nested) & set(flat))
        if both:
            raise QuantStateError(both[0], "present both nested and at the top level; which one is meant?")
        flat.update(nested)
    return flat


def _require(prefix: str, state: Mapping[str, Any], key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if key not in state:
        raise QuantStateError(f"{prefix}{key}", "missing")
    value = state[key]
    if not isinstance(value, torch.Tensor):
        raise QuantStateError(f"{prefix}{key}", f"expected a tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise QuantStateError(f"{prefix}{key}", f"dtype {value.dtype}, expected {dtype} (states are never cast)")
    if tuple(value.shape) != shape:
        raise QuantStateError(f"{prefix}{key}", f"shape {tuple(value.shape)} does not fit this parameter: expected {shape}")


def _require_scales(prefix: str, state: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> None:
    _require(prefix, state, key, torch.float32, shape)
    check_scales(f"{prefix}{key}", state[key])


def _check_quantized(prefix: str, state: Mapping[str, Any], which: int, rows: int, numel: int) -> list[str]:
    """Check the code table and scales of uint8 state ``which``; return the keys used."""
    key = f"qmap{which}"
    _require(prefix, state, key, torch.float32, (CODE_TABLE_SIZE,))
    # Another table would decode every stored code to another value, silently.
    standard = cached_code(STATE_CODES[which])
    if state[key].device.type != "meta" and not torch.equal(state[key].cpu(), standard):
        what = f"is not the {STATE_CODE_NAMES[which]} (the table state{which} indexes)"
        raise QuantStateError(f"{prefix}{key}", what)
    nblocks = num_blocks(numel, OPTIMIZER_BLOCKSIZE)
    if f"absmax{which}" in state:
        _require_scales(prefix, state, f"absmax{which}", (rows, nblocks) if rows > 1 else (nblocks,))
        return [key, f"absmax{which}"]
    if f"max{which}" in state:
        for scale in (f"max{which}", f"new_max{which}"):
            _require_scales(prefix, state, scale, (1,))
        return [key, f"max{which}", f"new_max{which}"]
    raise QuantStateError(f"{prefix}absmax{which}", f"missing: uint8 state{which} needs absmax{which} or max{which}")


def _check_state_values(kind: OptimizerKind, prefix: str, state: Mapping[str, Any], which: int) -> None:
    """Refuse state ``which`` when it holds values no update can produce.

    32-bit states are finite; running sums and averages of squared gradients (their
    square roots divide the update) are never negative, in 32 bits or decoded from codes.
    """
    key = f"state{which}"
    values = state[key]
    squared = which in kind.squared_states  # sums of squares: never negative
    if values.dtype == torch.uint8:
        if not squared or values.device.type == "meta":
            return
        values = state[f"qmap{which}"][values.long()]  # the decoded values' signs
    meaning = "sums or averages of squared gradients (finite, >= 0)" if squared else "optimizer moments (finite)"
    check_stored_values(f"{prefix}{key}", values, nonnegative=squared, meaning=meaning)


def checked_param_state(kind: OptimizerKind, p: torch.Tensor, label: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one parameter's flat state against ``p``; return it with tensors on ``p``'s device.

    Tensors are copied (never cast), so the loaded optimizer shares no storage with the
    checkpoint it came from. ``label`` names the parameter in error messages.
    """
    prefix = f"{label}."
    if not state:
        return {}
    step = state.get("step")
    if isinstance(step, torch.Tensor) and step.numel() == 1 and step.dtype != torch.bool:
        # torch.optim stores the count as a float tensor: whole numbers only (NaN is not one).
        value = step.item()
        step = int(value) if isinstance(value, int) or float(value).is_integer() else value
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise QuantStateError(f"{prefix}step", f"expected a non-negative int, got {step!r}")
    rows = 2 if kind.stacked_state1 else 1
    shapes = {1: ((2,) if rows == 2 else ()) + tuple(p.shape), 2: tuple(p.shape)}
    if "state1" not in state:
        raise QuantStateError(f"{prefix}state1", f"missing (keys: {sorted(state)}); not a kbit/bitsandbytes state?")
    dtype = state["state1"].dtype if isinstance(state["state1"], torch.Tensor) else None
    if dtype not in (torch.float32, torch.uint8):
        raise QuantStateError(f"{prefix}state1", f"expected a float32 or uint8 tensor, got {dtype or type(state['state1']).__name__}")
    known = ["step"]
    for which in range(1, kind.num_states + 1):
        _require(prefix, state, f"state{which}", dtype, shapes[which])
        known.append(f"state{which}")
        if dtype == torch.uint8:
            known += _check_quantized(prefix, state, which, rows if which == 1 else 1, p.numel())
        _check_state_values(kind, prefix, state, which)
    if "gnorm_vec" in state:
        _require(prefix, state, "gnorm_vec", torch.float32, (GNORM_HISTORY,))
        check_stored_values(f"{prefix}gnorm_vec", state["gnorm_vec"], nonnegative=True, meaning=_NORMS)
        known.append("gnorm_vec")
    if "unorm_vec" in state:
        _require(prefix, state, "unorm_vec", torch.float32, tuple(state["unorm_vec"].shape))
        if state["unorm_vec"].numel() != 1:
            raise QuantStateError(f"{prefix}unorm_vec", "expected one element")
        check_stored_values(f"{prefix}unorm_vec", state["unorm_vec"], nonnegative=True, meaning=_NORMS)
        known.append("unorm_vec")
    # States first: an extra state2 says more about the mismatch than its extra absmax2.
    unknown = sorted(set(state) - set(known), key=lambda key: (not key.startswith("state"), key))
    if unknown:
        raise QuantStateError(f"{prefix}{unknown[0]}", f"not part of a {kind.name!r} optimizer state of this layout")
    loaded: dict[str, Any] = {"step": step}
    for key in known[1:]:
        loaded[key] = state[key].to(device=p.device, copy=True)
    return loaded


def state_layout(state: Mapping[str, Any]) -> tuple[bool, bool]:
    """``(eight_bit, block_wise)`` of an allocated (or loaded) parameter state.

    8-bit states are uint8; blockwise ones carry per-block scales (``absmax1``) where
    whole-tensor ones carry ``max1``/``new_max1``. 32-bit state is never blockwise.
    """
    eight_bit = state["state1"].dtype == torch.uint8
    return eight_bit, eight_bit and "absmax1" in state


def _describe(eight_bit: bool, block_wise: bool) -> str:
    if not eight_bit:
        return "32-bit (float32) state"
    return "blockwise 8-bit state (absmax1)" if block_wise else "whole-tensor 8-bit state (max1/new_max1)"


def check_state_layout(label: str, state: Mapping[str, Any], config: Mapping[str, Any], eight_bit: bool,
                       block_wise: bool) -> None:  # fmt: skip
    """Refuse a loaded state whose layout differs from the one this optimizer would allocate.

    ``eight_bit`` and ``block_wise`` describe the layout the optimizer's settings
    (``config``: ``optim_bits``, ``min_8bit_size``, ``block_wise`` after overrides) give the
    parameter. Stepping a checkpoint of another layout would silently keep the checkpoint's
    width or fail steps later, so the mismatch is reported now, naming the entry.
    """
    has_eight_bit, has_block_wise = state_layout(state)
    if (has_eight_bit, has_block_wise) == (eight_bit, eight_bit and block_wise):
        return
    if has_eight_bit != eight_bit:
        key = "state1"
    else:
        key = "absmax1" if has_block_wise else "max1"
    settings = f"optim_bits={config['optim_bits']}, min_8bit_size={config['min_8bit_size']}, "
    settings += f"block_wise={config['block_wise']}"
    raise QuantStateError(
        f"{label}.{key}",
        f"the checkpoint holds {_describe(has_eight_bit, has_block_wise)}, but this optimizer keeps "
        f"{_describe(eight_bit, block_wise)} for this parameter ({settings}); load it into an optimizer "
        "with the settings it was saved with",
    )
