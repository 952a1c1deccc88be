"""``QuantState``: everything needed to dequantize a quantized tensor, and its serialized form.

A 4-bit state serializes (``as_dict(packed=True)``) to the tensors ``absmax``,
``quant_map`` and, when nested, ``nested_absmax`` and ``nested_quant_map``, plus one uint8
tensor ``quant_state.bitsandbytes__<quant_type>`` holding the other fields as UTF-8 JSON.
That is the layout of hub checkpoints (``docs/quant4.md``).

:meth:`QuantState.from_dict` reads it back. Those bytes usually come from a file somebody
downloaded, so the reader trusts nothing: every field is checked for type, range and
agreement with the tensors, and every problem raises :class:`~kbit.QuantStateError`
naming the offending key. A state that loads is one that dequantizes.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch

from .._errors import KbitValueError, QuantStateError
from .._formats import (
    BLOCKSIZES_4BIT,
    BLOCKSIZES_8BIT_ALL,
    CODE_TABLE_SIZE,
    FLOAT_DTYPES,
    QUANT_TYPES_4BIT,
    dtype_name,
    num_blocks,
)
from ._codebooks import cached_code, get_4bit_type
from ._utils import pack_dict_to_tensor, unpack_tensor_to_dict
from ._validate import check_scales, stored_values_problem

__all__ = ["QuantState"]

#: Name of the JSON tensor, after the prefix, is this plus the quant type.
PACKED_KEY = "quant_state.bitsandbytes__"

# A state claiming more elements than this is corrupt, not big: 2**48 4-bit codes would
# be 128 TiB. Checking it keeps absurd sizes from turning into huge allocations.
_MAX_NUMEL = 2**48
_MAX_RANK = 16
_DTYPES_BY_NAME = {dtype_name(d): d for d in FLOAT_DTYPES}
_FIELDS = (
    "quant_type",
    "absmax",
    "blocksize",
    "quant_map",
    "dtype",
    "shape",
    "nested_absmax",
    "nested_blocksize",
    "nested_quant_map",
    "nested_dtype",
    "nested_offset",
)


#: Attribute under which a nested state keeps its float32 scales, expanded once by
#: ``kbit.functional._blockwise._expanded_absmax``: derived data, never serialized or compared.
EXPANDED_ABSMAX = "_expanded_absmax"


def _tensors_equal(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


class QuantState:
    """The side information of a quantized tensor.

    Attributes:
        absmax: per-block scale, float32; uint8 codes when nested (then ``offset`` and
            ``state2`` describe how to recover the float32 values).
        shape: the original tensor's shape.
        code: the value table codes index into (256 entries for 8-bit, 16 for 4-bit).
        blocksize: elements per block.
        quant_type: ``"nf4"`` / ``"fp4"`` for 4-bit, ``None`` for 8-bit.
        dtype: the original tensor's dtype (what dequantization returns).
        offset: 0-d float32 mean subtracted from absmax before nesting.
        state2: the ``QuantState`` of the nested absmax quantization.
    """

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: Optional[torch.Size | tuple[int, ...]] = None,
        code: Optional[torch.Tensor] = None,
        blocksize: Optional[int] = None,
        quant_type: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        offset: Optional[torch.Tensor] = None,
        state2: Optional["QuantState"] = None,
    ) -> None:
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.blocksize = blocksize
        self._quant_type = quant_type  # not through the setter: nothing to contradict yet
        self.dtype = dtype
        self.offset = offset
        self.state2 = state2

    @property
    def quant_type(self) -> Optional[str]:
        """``"nf4"`` / ``"fp4"`` for 4-bit states, ``None`` for 8-bit ones.

        It picks the table codes decode with, so once the state holds a code table it can
        only change to a type whose table that is: relabelling NF4 codes as FP4 would
        decode every weight to a wrong value without any error.
        """
        return self._quant_type

    @quant_type.setter
    def quant_type(self, value: Optional[str]) -> None:
        current, code = self._quant_type, self.code
        if value != current and code is not None and code.device.type != "meta":
            table = get_4bit_type(value) if value in QUANT_TYPES_4BIT else None
            if table is None or code.shape != table.shape or not bool((code.cpu() == table).all()):
                held = f"the {current} table" if current is not None else f"a table of {code.numel()} values"
                raise QuantStateError(
                    "quant_state.quant_type",
                    f"{value!r} contradicts the state's code table ({held}): its codes would decode to wrong "
                    f"values; quantize again with quant_type={value!r} instead",
                )
        self._quant_type = value

    @property
    def nested(self) -> bool:
        """True when ``absmax`` is itself quantized (``compress_statistics`` / ``nested``)."""
        return self.state2 is not None

    def to(self, device: torch.device | str) -> "QuantState":
        """Move every tensor to ``device`` (in place, like ``Module.to``) and return self."""
        self.__dict__.pop(EXPANDED_ABSMAX, None)  # expanded again, on the new device, when needed
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.offset is not None:
            self.offset = self.offset.to(device)
        if self.state2 is not None:
            self.state2.to(device)
        return self

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as a flat dict, the form checkpoints store.

        Unpacked: ``quant_type``, ``absmax``, ``blocksize``, ``quant_map``, ``dtype`` (a
        name such as ``"bfloat16"``), ``shape`` (a tuple) and, when nested,
        ``nested_absmax``, ``nested_blocksize``, ``nested_quant_map``, ``nested_dtype`` and
        ``nested_offset`` (a float). Packed (``packed=True``, 4-bit only): only tensors,
        the non-tensor fields moving into one uint8 tensor of UTF-8 JSON under
        ``quant_state.bitsandbytes__<quant_type>``. Code tables are copies, so editing the
        result never changes this state.
        """
        if packed and self.quant_type not in QUANT_TYPES_4BIT:
            raise KbitValueError(
                "QuantState.as_dict", "quant_type", self.quant_type, "only 4-bit (nf4/fp4) states have a packed form"
            )
        # Insertion order fixes both the tensor order and the JSON key order of the
        # packed form; checkpoints written elsewhere have exactly this order.
        fields: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": None if self.code is None else self.code.clone(),
            "dtype": None if self.dtype is None else dtype_name(self.dtype),
            "shape": None if self.shape is None else tuple(self.shape),
        }
        if self.nested:
            fields.update(
                nested_absmax=self.state2.absmax,
                nested_blocksize=self.state2.blocksize,
                nested_quant_map=self.state2.code.clone(),
                nested_dtype=dtype_name(self.state2.dtype),
                nested_offset=float(self.offset),
            )
        if not packed:
            return fields
        result = {key: value for key, value in fields.items() if isinstance(value, torch.Tensor)}
        meta = {key: value for key, value in fields.items() if not isinstance(value, torch.Tensor)}
        result[PACKED_KEY + self.quant_type] = pack_dict_to_tensor(meta)
        return result

    @classmethod
    def from_dict(cls, qs_dict: Mapping[str, Any], device: Optional[torch.device | str] = None) -> "QuantState":
        """Rebuild a state from :meth:`as_dict` output: 4-bit packed or not, 8-bit unpacked.

        Keys may carry any prefix (everything up to the last ``.`` is ignored, and the
        JSON tensor is found by its ``quant_state.bitsandbytes__<type>`` ending), so a
        module's slice of a state dict (``weight.absmax``, ...) can be passed directly.
        Keys that are not quant-state fields are ignored. Tensors are moved to ``device``.

        Raises:
            QuantStateError: naming the key, for anything malformed: bytes that are not
                UTF-8 JSON, an unknown quant type, a missing field, a wrong type, a
                negative or absurd size, tensors that disagree with the shape, or one
                field given twice (two states in one dict).
        """
        fields, origin, prefix = _collect_fields(qs_dict)
        return _StateReader(fields, origin, prefix, device).read()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and self.dtype == other.dtype
            and _tensors_equal(self.absmax, other.absmax)
            and _tensors_equal(self.code, other.code)
            and _tensors_equal(self.offset, other.offset)
            and self.state2 == other.state2
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __getstate__(self) -> dict[str, Any]:
        # Pickles (and deep copies) carry the state's fields, not the derived cache.
        state = dict(self.__dict__)
        state.pop(EXPANDED_ABSMAX, None)
        return state

    def __repr__(self) -> str:
        nested = ", nested" if self.nested else ""
        shape = tuple(self.shape) if self.shape is not None else None
        return (
            f"QuantState(shape={shape}, dtype={self.dtype}, blocksize={self.blocksize}, "
            f"quant_type={self.quant_type!r}{nested})"
        )


def packed_json_type(key: str) -> Optional[str]:
    """The quant type named by a ``...quant_state.bitsandbytes__<type>`` key, else None.

    The type is returned as written (possibly unknown); the caller validates it.
    """
    head, _, last = key.rpartition(".")
    marker = PACKED_KEY.split(".")[1]
    if not last.startswith(marker) or not (head == "quant_state" or head.endswith(".quant_state")):
        return None
    return last[len(marker) :]


def _collect_fields(qs_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str], str]:
    """Gather the quant-state fields of ``qs_dict`` with prefixes stripped.

    Returns ``(fields, origin, prefix)``: the field values by bare name, the key each one
    came from (for error messages), and the prefix of the state's keys.
    """
    if not isinstance(qs_dict, Mapping):
        raise QuantStateError("<quant state>", f"expected a dict of tensors, got {type(qs_dict).__name__}")
    fields: dict[str, Any] = {}
    origin: dict[str, str] = {}
    prefix: Optional[str] = None

    def put(name: str, value: Any, source: str) -> None:
        if name in fields:
            raise QuantStateError(source, f"field {name!r} is also given by {origin[name]!r} (several states in one dict?)")
        fields[name], origin[name] = value, source

    packed_key = None
    for key, value in qs_dict.items():
        if not isinstance(key, str):
            raise QuantStateError(repr(key), "keys must be strings")
        quant_type = packed_json_type(key)
        if quant_type is None:
            name = key.rpartition(".")[2]
            if name in _FIELDS:
                put(name, value, key)
                prefix = key[: len(key) - len(name)] if prefix is None else prefix
            continue
        if packed_key is not None:
            raise QuantStateError(key, f"a second packed quant state besides {packed_key!r}")
        packed_key = key
        prefix = key[: len(key) - len(PACKED_KEY) - len(quant_type)]
        if quant_type not in QUANT_TYPES_4BIT:
            raise QuantStateError(key, f"unknown quant type {quant_type!r} (expected one of {list(QUANT_TYPES_4BIT)})")
        for name, item in unpack_tensor_to_dict(value, key).items():
            if name in _FIELDS:
                put(name, item, f"{key}:{name}")
        if fields.get("quant_type", quant_type) != quant_type:
            raise QuantStateError(
                origin["quant_type"], f"quant_type {fields['quant_type']!r} contradicts the key's {quant_type!r}"
            )
    if packed_key is None and "quant_type" not in fields:
        raise QuantStateError(
            "quant_state", f"found neither a packed '{PACKED_KEY}<type>' tensor nor an unpacked 'quant_type' field"
        )
    return fields, origin, prefix or ""


class _StateReader:
    """Validates collected fields and builds the :class:`QuantState` (one use)."""

    def __init__(self, fields: dict[str, Any], origin: dict[str, str], prefix: str, device) -> None:
        self.fields, self.origin, self.prefix, self.device = fields, origin, prefix, device

    def fail(self, name: str, problem: str) -> QuantStateError:
        return QuantStateError(self.origin.get(name, self.prefix + name), problem)

    def get(self, name: str) -> Any:
        if name not in self.fields:
            raise self.fail(name, "missing")
        return self.fields[name]

    def integer(self, name: str, allowed: tuple[int, ...]) -> int:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
            raise self.fail(name, f"{value!r} is not a valid value (expected one of {list(allowed)})")
        return value

    def dtype(self, name: str) -> torch.dtype:
        value = self.get(name)
        if not isinstance(value, str) or value not in _DTYPES_BY_NAME:
            raise self.fail(name, f"{value!r} is not a supported dtype (expected one of {sorted(_DTYPES_BY_NAME)})")
        return _DTYPES_BY_NAME[value]

    def shape(self) -> torch.Size:
        value = self.get("shape")
        if not isinstance(value, (list, tuple)) or len(value) > _MAX_RANK:
            raise self.fail("shape", f"{value!r} is not a shape (expected a list of at most {_MAX_RANK} sizes)")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in value):
            raise self.fail("shape", f"{list(value)} has a size that is not a non-negative integer")
        if math.prod(value) > _MAX_NUMEL:
            raise self.fail("shape", f"{list(value)} is absurdly large ({math.prod(value)} elements)")
        return torch.Size(value)

    def tensor(self, name: str, dtype: torch.dtype, numel: int, why: str = "") -> torch.Tensor:
        value = self.get(name)
        if not isinstance(value, torch.Tensor):
            raise self.fail(name, f"expected a tensor, got {type(value).__name__}")
        if value.dtype != dtype or value.dim() != 1 or value.numel() != numel:
            raise self.fail(
                name,
                f"got a {value.dtype} tensor of shape {tuple(value.shape)} but the state needs "
                f"{dtype_name(dtype)} of shape ({numel},){why}",
            )
        return value

    def _code(self, quant_type: Optional[str]) -> torch.Tensor:
        """The ``quant_map``: a 4-bit type's own table, or any sorted 256-entry 8-bit table."""
        if quant_type is None:
            code = self.tensor("quant_map", torch.float32, CODE_TABLE_SIZE)
            if code.device.type != "meta" and not bool((code[1:] >= code[:-1]).all()):
                raise self.fail("quant_map", "an 8-bit code table must be sorted ascending")
            return code
        return self.table("quant_map", 16, get_4bit_type(quant_type), f"the {quant_type} table")

    def read(self) -> QuantState:
        state = self._validated()
        return state.to(self.device) if self.device is not None else state

    def _validated(self) -> QuantState:
        quant_type = self.get("quant_type")
        if quant_type is not None and quant_type not in QUANT_TYPES_4BIT:
            raise self.fail(
                "quant_type",
                f"unknown quant type {quant_type!r} (expected one of {list(QUANT_TYPES_4BIT)}, or None for 8-bit)",
            )
        # quant_type None: an 8-bit blockwise state (its unpacked as_dict form).
        blocksize = self.integer("blocksize", BLOCKSIZES_4BIT if quant_type else BLOCKSIZES_8BIT_ALL)
        dtype = self.dtype("dtype")
        shape = self.shape()
        blocks = num_blocks(shape.numel(), blocksize)
        per_block = f" (one per block of {blocksize} in shape {list(shape)})"
        code = self._code(quant_type)
        if not any(name.startswith("nested_") for name in self.fields):
            absmax = self.scales("absmax", blocks, per_block)
            return QuantState(absmax, shape=shape, code=code, blocksize=blocksize, quant_type=quant_type, dtype=dtype)
        codes = self.tensor("absmax", torch.uint8, blocks, per_block)
        nested_blocksize = self.integer("nested_blocksize", BLOCKSIZES_8BIT_ALL)
        nested_dtype = self.dtype("nested_dtype")
        offset = self.get("nested_offset")
        # Finite in float32, where it is stored: 1e308 would become inf and poison every scale.
        if (
            isinstance(offset, bool)
            or not isinstance(offset, (int, float))
            or abs(offset) > torch.finfo(torch.float32).max  # before isfinite: a huge int overflows it
            or not math.isfinite(offset)
        ):
            raise self.fail("nested_offset", f"{offset!r} is not a finite float32 number")
        # The absmax was nested with the signed dynamic map (docs/formats.md section 4).
        dynamic = cached_code("dynamic")
        state2 = QuantState(
            self.scales("nested_absmax", num_blocks(blocks, nested_blocksize)),
            shape=(blocks,),
            code=self.table("nested_quant_map", CODE_TABLE_SIZE, dynamic, "the signed dynamic map"),
            blocksize=nested_blocksize,
            dtype=nested_dtype,
        )
        state = QuantState(
            codes,
            shape=shape,
            code=code,
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=dtype,
            offset=torch.tensor(float(offset), dtype=torch.float32, device=codes.device),
            state2=state2,
        )
        self.check_nested_scales(state)
        return state

    def table(self, name: str, size: int, expected: torch.Tensor, what: str) -> torch.Tensor:
        """The code table ``name``, which must hold the values of ``expected`` (``what``)."""
        code = self.tensor(name, torch.float32, size)
        # Value comparison (FP4's -0 equals 0); meta tensors hold no values to compare.
        if code.device.type != "meta" and not bool((code == expected.to(code.device)).all()):
            raise self.fail(name, f"does not hold {what}; it would decode to wrong values")
        return code

    def scales(self, name: str, numel: int, why: str = "") -> torch.Tensor:
        """The float32 scales ``name``: ``numel`` of them, finite and >= 0."""
        scales = self.tensor(name, torch.float32, numel, why)
        check_scales(self.origin.get(name, self.prefix + name), scales)
        return scales

    def check_nested_scales(self, state: QuantState) -> None:
        """Refuse a nested absmax that dequantizes to NaN/inf or negative scales.

        Each stored tensor may look fine while their combination does not (an offset that
        pushes every scale below zero), so the scales the state will use are checked.
        """
        from ._blockwise import dequantize_blockwise  # imports this module

        if state.absmax.device.type == "meta":
            return
        scales = dequantize_blockwise(state.absmax, state.state2) + state.offset
        problem = stored_values_problem(scales, nonnegative=True)
        if problem:
            raise self.fail(
                "absmax",
                f"the nested absmax (these codes x nested_absmax + nested_offset={float(state.offset)!r}) "
                f"dequantizes to scales that are impossible: it {problem}; per-block scales are finite and >= 0",
            )
