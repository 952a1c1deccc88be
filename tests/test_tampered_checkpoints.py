"""Thousands of tampered checkpoints: each loads to the original's outputs, or is refused.

A seeded generator corrupts real checkpoints the way truncated downloads and hostile files
do: dropped keys, wrong dtypes, wrong shapes, NaN / infinite / negative / huge values,
truncated or garbled JSON, JSON fields of the wrong type or range. The checkpoints are the
state dicts of ``Linear4bit`` (NF4 and FP4, nested and not), ``Linear8bitLt`` and of 8-bit
and 32-bit optimizers. Each tampered checkpoint is loaded into a target that differs from
the checkpoint's source, and one of two things must happen:

- the load succeeds and the target then computes exactly what the original checkpoint
  makes it compute (the forward output; for optimizers the parameter and state after one
  more step): the tampering changed nothing that matters, such as a reshaped ``SCB`` or a
  dropped optional ``weight_format``;
- the load raises a kbit error (``KbitError``) and the target is exactly as it was.

Value corruption is applied only where no valid save can produce the value (a NaN scale,
a negative second moment, any change to a code table), so that a successful load with
other outputs is always a bug and never a legitimately different checkpoint (rewrites
that mean the same checkpoint, such as the flat optimizer layout, are generated too, and
must load). One entry is torch's, not kbit's: the ``bias``, which kbit's modules hand to
``torch.nn.Module``. A bias of the wrong shape gets torch's own ``RuntimeError`` and the
module stays as it was, weight included; a missing one gets torch's "Missing key(s)" error
after the other entries were loaded, as for every torch module; torch casts its dtype, so
only floating-point dtypes (exact for the bias used here) are tried.

The originals are built once per subject, and a target that refused a checkpoint unchanged
(which is checked) takes the next one; the whole run takes seconds.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import math
import random
from typing import Any, Callable, Optional

import pytest
import torch

import kbit
import kbit.functional as F
from kbit import KbitError

SEED = 15
NESTED = "__bnb_optimizer_quant_state__"
DROP = object()  # a mutation result meaning "remove this key"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OTHER_DTYPES = (torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool)


# ------------------------------------------------------------------- tensor mutations
def _reshaped(rng: random.Random, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    flat = value.reshape(-1)
    choices = {
        "one element short": lambda: flat[:-1].clone(),
        "one element more": lambda: torch.cat([flat, flat[:1]]),
        "empty": lambda: flat[:0].clone(),
        "a row": lambda: flat.reshape(1, -1).clone(),
        "a column": lambda: flat.reshape(-1, 1).clone(),
        "0-d": lambda: flat[0].clone() if flat.numel() else torch.tensor(0, dtype=value.dtype),
        "doubled": lambda: torch.cat([flat, flat]).reshape(2, -1),
    }
    label = rng.choice(sorted(choices))
    return f"shape: {label}", choices[label]()


IMPOSSIBLE_VALUES = {
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
}


def _with_values(rng: random.Random, value: torch.Tensor, kinds: tuple[str, ...]) -> tuple[str, torch.Tensor]:
    """``value`` with some elements replaced by a value of one of ``kinds``."""
    kind = rng.choice(kinds)
    flat = value.clone().reshape(-1)
    count = rng.choice([1, 1, 2, max(1, flat.numel() // 3), flat.numel()])
    where = torch.tensor(rng.sample(range(flat.numel()), min(count, flat.numel())), dtype=torch.long)
    if kind in IMPOSSIBLE_VALUES:
        flat[where] = IMPOSSIBLE_VALUES[kind]
    elif kind == "negative":
        flat[where] = -(flat[where].abs() + 1)
    elif kind == "huge":
        flat[where] = 3e38
    elif kind == "perturbed":
        flat[where] = flat[where] + 1e-3
    else:
        raise AssertionError(kind)
    return f"values: {count} {kind}", flat.reshape(value.shape)


def mutate_tensor(
    rng: random.Random, value: torch.Tensor, value_kinds: tuple[str, ...], *, droppable: bool = True,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES + OTHER_DTYPES,
) -> tuple[str, Any]:  # fmt: skip
    """One corruption of ``value``: dropped, another dtype, another shape, or impossible values
    (``value_kinds``, for floating-point tensors: codes may hold any value)."""
    value_kinds = value_kinds if value.is_floating_point() else ()
    operations = ["dtype", "shape"] + (["drop"] if droppable else []) + (["values"] * 3 if value_kinds else [])
    operation = rng.choice(operations)
    if operation == "drop":
        return "dropped", DROP
    if operation == "dtype":
        dtype = rng.choice([d for d in dtypes if d != value.dtype])
        return f"dtype {dtype}", value.to(dtype)
    if operation == "shape":
        return _reshaped(rng, value)
    return _with_values(rng, value, value_kinds)


# --------------------------------------------------------------------- JSON mutations
# Values no JSON field of a 4-bit state can hold (checked per field below for the few
# that are valid somewhere: a finite number is a valid nested_offset).
HOSTILE_JSON = (None, "x", "", [], [1, 2], {}, True, math.nan, math.inf, -math.inf, 10**30, -1, -(2**70), 0.5, "float8")


def _json_field_value(field: str, value: Any) -> bool:
    """Whether ``value`` is certainly invalid (or certainly equivalent) for ``field``."""
    if field == "nested_offset":
        # Any finite number is a valid offset (it would load with other outputs).
        return not isinstance(value, (int, float)) or isinstance(value, bool) or not abs(value) < 3.4e38
    return True


def mutate_json(rng: random.Random, packed: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One corruption of a packed quant-state JSON tensor."""
    raw = bytes(packed.tolist())
    operation = rng.choice(["truncate", "garble", "field", "field", "field", "extra field"])
    if operation == "truncate":
        cut = rng.randrange(len(raw))
        return f"JSON truncated to {cut} bytes", torch.tensor(list(raw[:cut]), dtype=torch.uint8)
    if operation == "garble":
        # A byte >= 0x80 in ASCII JSON never forms valid UTF-8 on its own.
        position, byte = rng.randrange(len(raw)), rng.randrange(0x80, 0x100)
        garbled = raw[:position] + bytes([byte]) + raw[position + 1 :]
        return f"JSON byte {position} garbled", torch.tensor(list(garbled), dtype=torch.uint8)
    meta = json.loads(raw)
    if operation == "extra field":
        meta["kbit_fuzz_unknown_field"] = 1  # unknown fields are ignored
        return "JSON unknown field added", F.pack_dict_to_tensor(meta)
    field = rng.choice(sorted(meta))
    if rng.random() < 0.25:
        del meta[field]
        return f"JSON field {field} dropped", F.pack_dict_to_tensor(meta)
    value = rng.choice([v for v in HOSTILE_JSON if _json_field_value(field, v)])
    meta[field] = value
    return f"JSON field {field} = {value!r}", F.pack_dict_to_tensor(meta)


# -------------------------------------------------------------------------- subjects
@dataclasses.dataclass
class Subject:
    """A checkpoint, a way to corrupt it, and what loading it must lead to.

    ``new_target()`` builds something to load into (unlike the checkpoint's source);
    ``outcome(target)`` is what a successful load must reproduce; ``snapshot(target)`` is
    compared before and after a refused load.
    """

    name: str
    original: dict
    mutate: Callable[[random.Random, dict], tuple[str, dict]]
    new_target: Callable[[], Any]
    load: Callable[[Any, dict], None]
    outcome: Callable[[Any], Any]
    snapshot: Callable[[Any], Any]
    torch_owned: frozenset[str] = frozenset()
    expected: Any = dataclasses.field(init=False)  # the outcome of loading the original

    def __post_init__(self) -> None:
        target = self.new_target()
        self.load(target, copy.deepcopy(self.original))
        self.expected = self.outcome(target)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _cloned(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(item) for item in value)
    return value


# Modules --------------------------------------------------------------------------------
X = torch.randn(3, 64, generator=torch.Generator().manual_seed(SEED))

#: Module entries torch itself loads (kbit's modules hand them to ``torch.nn.Module``).
TORCH_OWNED = frozenset({"bias"})


def _bias_exact_in_16_bits(module: torch.nn.Module) -> torch.nn.Module:
    """Round the bias to multiples of 1/8: a dtype change of the bias then loses nothing, so
    torch's cast on load (its business, not kbit's) keeps the outputs identical."""
    with torch.no_grad():
        module.bias.copy_((module.bias * 8).round() / 8)
    return module


def _module_mutation(value_kinds: dict[str, tuple[str, ...]]) -> Callable[[random.Random, dict], tuple[str, dict]]:
    def mutate(rng: random.Random, original: dict) -> tuple[str, dict]:
        tampered = dict(original)
        key = rng.choice(list(original))
        if key.endswith(".quant_state.bitsandbytes__nf4") or key.endswith(".quant_state.bitsandbytes__fp4"):
            if rng.random() < 0.8:
                label, value = mutate_json(rng, original[key])
            elif rng.random() < 0.5:
                suffix = rng.choice(["fp4" if key.endswith("nf4") else "nf4", "int4", "xyz"])
                label, value = f"renamed to ...__{suffix}", DROP
                tampered[key[: -len("nf4")] + suffix] = original[key]
            else:
                label, value = mutate_tensor(rng, original[key], ())
        elif key in TORCH_OWNED:
            # torch loads these; only corruption whose effect torch defines (see the docstring).
            label, value = mutate_tensor(rng, original[key], (), dtypes=FLOAT_DTYPES)
        else:
            kinds = value_kinds.get(key.rpartition(".")[2] if key.startswith("weight.") else key, ())
            label, value = mutate_tensor(rng, original[key], kinds)
        if value is DROP:
            del tampered[key]
        else:
            tampered[key] = value
        return f"{key}: {label}", tampered

    return mutate


def _module_subject(name: str, make: Callable[[int], torch.nn.Module], value_kinds: dict) -> Subject:
    source = _bias_exact_in_16_bits(make(0))
    prototype = make(1)

    def snapshot(module: torch.nn.Module) -> dict:
        return _cloned(module.state_dict())

    return Subject(
        name=name,
        original=_cloned(source.state_dict()),
        mutate=_module_mutation(value_kinds),
        new_target=lambda: copy.deepcopy(prototype),
        load=lambda module, state: module.load_state_dict(state),
        outcome=lambda module: module(X).detach(),
        snapshot=snapshot,
        torch_owned=TORCH_OWNED,
    )


SCALES = ("nan", "inf", "-inf", "negative")
TABLES = ("nan", "inf", "negative", "huge", "perturbed")
FOUR_BIT_VALUES = {"absmax": SCALES, "nested_absmax": SCALES, "quant_map": TABLES, "nested_quant_map": TABLES}


def _linear4bit(quant_type: str, nested: bool) -> Callable[[int], torch.nn.Module]:
    def make(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return kbit.nn.Linear4bit(64, 32, quant_type=quant_type, compress_statistics=nested).to("cpu")

    return make


def _linear8bit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return kbit.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to("cpu")


# Optimizers ------------------------------------------------------------------------------
PARAM_SIZE = 600  # three blocks of 8-bit state, the last one partial (min_8bit_size=256 below)
#: State entries a valid checkpoint may lack (an optimizer saved without clipping has no
#: history; loading starts one), so dropping them is not a corruption.
OPTIONAL_STATE = frozenset({"gnorm_vec", "unorm_vec"})


def _optimizer_outcome(target: tuple[torch.nn.Parameter, torch.optim.Optimizer]) -> Any:
    p, optimizer = target
    p.grad = torch.randn(PARAM_SIZE, generator=torch.Generator().manual_seed(SEED + 1))
    optimizer.step()
    return p.detach().clone(), _cloned(optimizer.state_dict())


def _optimizer_snapshot(target: tuple[torch.nn.Parameter, torch.optim.Optimizer]) -> Any:
    p, optimizer = target
    return p.detach().clone(), _cloned(optimizer.state_dict())


HYPERPARAMETER_VALUES = {
    "lr": (math.nan, math.inf, -1.0, "x", None, [0.1]),
    "eps": (math.nan, -1.0, "x", None),
    "weight_decay": (math.nan, -math.inf, -0.5, "x"),
    "betas": ((math.nan, 0.999), (1.0, 0.999), (0.9, -0.1), "x", (0.9,), None, 0.9),
    "alpha": (math.nan, -1.0, "x"),
}
STRUCTURE_CHANGES = (
    "drop params", "params index", "drop state", "drop param_groups", "state index", "state not a dict",
    "extra group", "drop group key", "state entry not a dict",
)  # fmt: skip
STEP_VALUES = (-1, 1.5, "3", None, torch.tensor([1, 2]), torch.tensor(math.nan), True)


def _optimizer_mutation(value_kinds: dict[str, tuple[str, ...]]) -> Callable[[random.Random, dict], tuple[str, dict]]:
    def mutate(rng: random.Random, original: dict) -> tuple[str, dict]:
        tampered = copy.deepcopy(original)
        where = rng.choices(["state", "step", "group", "structure", "equivalent"], weights=[8, 1, 2, 1, 1])[0]
        if where == "equivalent":
            return _equivalent_rewrite(rng, tampered)
        if where == "state":
            inner = tampered["state"][0][NESTED]
            key = rng.choice(sorted(inner))
            label, value = mutate_tensor(rng, inner[key], value_kinds.get(key, ()), droppable=key not in OPTIONAL_STATE)
            if value is DROP:
                del inner[key]
            else:
                inner[key] = value
            return f"{key}: {label}", tampered
        if where == "step":
            value = rng.choice(STEP_VALUES)
            tampered["state"][0]["step"] = value
            return f"step = {value!r}", tampered
        group = tampered["param_groups"][0]
        if where == "group":
            key = rng.choice(sorted(k for k in group if k in HYPERPARAMETER_VALUES))
            value = rng.choice(HYPERPARAMETER_VALUES[key])
            group[key] = value
            return f"param_groups[0][{key!r}] = {value!r}", tampered
        operation = rng.choice(STRUCTURE_CHANGES)
        if operation == "drop params":
            del group["params"]
        elif operation == "params index":
            group["params"] = [7]
        elif operation == "drop state":
            del tampered["state"]
        elif operation == "drop param_groups":
            del tampered["param_groups"]
        elif operation == "state index":
            tampered["state"] = {rng.choice([1, "0", -1]): tampered["state"][0]}
        elif operation == "state not a dict":
            tampered["state"] = [tampered["state"][0]]
        elif operation == "extra group":
            tampered["param_groups"].append(dict(group, params=[1]))
        elif operation == "drop group key":
            del group[rng.choice(sorted(k for k in group if k != "params"))]
        else:
            tampered["state"][0] = "not a state"
        return operation, tampered

    return mutate


def _equivalent_rewrite(rng: random.Random, tampered: dict) -> tuple[str, dict]:
    """A change that means the same checkpoint: it must load and behave like the original."""
    operation = rng.choice(["step as a tensor", "betas as a list", "flat layout"])
    if operation == "step as a tensor":
        tampered["state"][0]["step"] = torch.tensor(float(tampered["state"][0]["step"]))  # as torch.optim saves it
    elif operation == "betas as a list":
        tampered["param_groups"][0]["betas"] = list(tampered["param_groups"][0]["betas"])
    else:
        tampered["state"][0].update(tampered["state"][0].pop(NESTED))
    return f"equivalent: {operation}", tampered


def _optimizer_subject(name: str, make: Callable[[torch.nn.Parameter], torch.optim.Optimizer],
                       value_kinds: dict) -> Subject:  # fmt: skip
    def trained(seed: int) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
        generator = torch.Generator().manual_seed(seed)
        p = torch.nn.Parameter(torch.randn(PARAM_SIZE, generator=torch.Generator().manual_seed(SEED)))
        optimizer = make(p)
        for _ in range(2):
            p.grad = torch.randn(PARAM_SIZE, generator=generator)
            optimizer.step()
        return p, optimizer

    _, source = trained(0)
    return Subject(
        name=name,
        original=_cloned(source.state_dict()),
        mutate=_optimizer_mutation(value_kinds),
        new_target=lambda: trained(1),  # (an optimizer's deepcopy keeps only torch's attributes)
        load=lambda target, state: target[1].load_state_dict(state),
        outcome=_optimizer_outcome,
        snapshot=_optimizer_snapshot,
    )


EIGHT_BIT_STATE = {"qmap1": TABLES, "qmap2": TABLES, "absmax1": SCALES, "absmax2": SCALES, "max1": SCALES,
                   "max2": SCALES, "new_max1": SCALES, "new_max2": SCALES}  # fmt: skip
MOMENT = ("nan", "inf", "-inf")  # a first moment may hold any finite value
SQUARED = SCALES  # a second moment (mean of squares) is finite and >= 0


SUBJECTS: dict[str, Callable[[], Subject]] = {
    "Linear4bit-nf4-nested": lambda: _module_subject("nf4 nested", _linear4bit("nf4", True), FOUR_BIT_VALUES),
    "Linear4bit-nf4": lambda: _module_subject("nf4", _linear4bit("nf4", False), FOUR_BIT_VALUES),
    "Linear4bit-fp4-nested": lambda: _module_subject("fp4 nested", _linear4bit("fp4", True), FOUR_BIT_VALUES),
    "Linear4bit-fp4": lambda: _module_subject("fp4", _linear4bit("fp4", False), FOUR_BIT_VALUES),
    "Linear8bitLt": lambda: _module_subject("int8", _linear8bit, {"SCB": SCALES}),
    "Adam8bit-blockwise": lambda: _optimizer_subject(
        "Adam8bit", lambda p: kbit.optim.Adam8bit([p], lr=1e-2, min_8bit_size=256), EIGHT_BIT_STATE
    ),
    "Adam8bit-whole-tensor": lambda: _optimizer_subject(
        "Adam8bit block_wise=False", lambda p: kbit.optim.Adam8bit([p], lr=1e-2, block_wise=False, min_8bit_size=256),
        EIGHT_BIT_STATE,
    ),
    "RMSprop8bit": lambda: _optimizer_subject(
        "RMSprop8bit", lambda p: kbit.optim.RMSprop8bit([p], lr=1e-2, min_8bit_size=256), EIGHT_BIT_STATE
    ),
    "Adam-32bit": lambda: _optimizer_subject(
        "Adam 32-bit",
        lambda p: kbit.optim.Adam([p], lr=1e-2, percentile_clipping=95),
        {"state1": MOMENT, "state2": SQUARED, "gnorm_vec": SCALES},
    ),
}

CASES_PER_SUBJECT = 400


@dataclasses.dataclass
class Tally:
    """How the cases of one subject ended."""

    loaded: int = 0
    refused: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    problems: list[str] = dataclasses.field(default_factory=list)


def run_cases(subject: Subject, cases: int, seed: int) -> Tally:
    """Load ``cases`` tampered checkpoints of ``subject``; collect what went wrong."""
    rng = random.Random(seed)
    tally = Tally()
    target = before = None
    for case in range(cases):
        label, tampered = subject.mutate(rng, subject.original)
        if target is None:
            target = subject.new_target()
            before = subject.snapshot(target)
        problem, untouched = _load_case(subject, target, tampered, before, tally)
        if problem is not None:
            tally.problems.append(f"case {case} ({label}): {problem}")
        if not untouched:
            target = None  # a refused load left it as it was (checked): otherwise build a new one
    return tally


def _load_case(subject: Subject, target: Any, tampered: dict, before: Any, tally: Tally) -> tuple[Optional[str], bool]:
    """Load ``tampered`` into ``target``: ``(what went wrong or None, whether target is as before)``."""
    try:
        subject.load(target, tampered)
    except KbitError as exc:
        tally.refused[type(exc).__name__] += 1
        untouched = _equal(subject.snapshot(target), before)
        return (None if untouched else f"refused ({exc}) but the target changed"), untouched
    except RuntimeError as exc:
        # torch's strict loading of the entries it owns (see the module docstring).
        message = str(exc)
        owned = [key for key in subject.torch_owned if key in subject.original]
        if any(key not in tampered and f'Missing key(s) in state_dict: "{key}"' in message for key in owned):
            tally.refused["torch: missing key"] += 1
            return None, False  # torch loads the other entries first, as for any torch module
        if any(f"size mismatch for {key}:" in message for key in owned):
            tally.refused["torch: size mismatch"] += 1
            untouched = _equal(subject.snapshot(target), before)
            return (None if untouched else "torch refused, but the target changed"), untouched
        return f"raised RuntimeError: {exc}", False
    except Exception as exc:  # anything else is a bug: a raw error from a bad checkpoint
        return f"raised {type(exc).__name__}: {exc}", False
    try:
        outcome = subject.outcome(target)
    except Exception as exc:
        return f"loaded, then using it raised {type(exc).__name__}: {exc}", False
    if not _equal(outcome, subject.expected):
        return "loaded, but computes something else than the original", False
    tally.loaded += 1
    return None, False


@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_tampered_checkpoints_load_identically_or_are_refused_untouched(name):
    subject = SUBJECTS[name]()
    tally = run_cases(subject, CASES_PER_SUBJECT, seed=SEED + sorted(SUBJECTS).index(name))
    assert not tally.problems, f"{subject.name}: {len(tally.problems)} of {CASES_PER_SUBJECT} cases:\n" + "\n".join(
        tally.problems[:25]
    )
    # The generator reaches both outcomes: it is not refusing everything wholesale.
    assert tally.loaded > 0 and sum(tally.refused.values()) > CASES_PER_SUBJECT // 2, (tally.loaded, tally.refused)
