"""``Params4bit``, a weight that quantizes itself to 4 bits, and the state-dict support of the
modules that hold one.

A ``Params4bit`` starts as an ordinary float tensor. The first move to a device (``.to``,
``.cpu()``, ``.cuda()``; on CPU ``.to("cpu")`` counts) or the first forward of its module
quantizes it: ``data`` becomes the packed codes and ``quant_state`` the
:class:`~kbit.functional.QuantState`. From then on moves carry the packed bytes and the
state along and dtype conversions leave the bytes alone (casting them would destroy them).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch

from .._errors import KbitValueError, QuantStateError
from .._formats import BLOCKSIZES_4BIT, QUANT_STORAGES_4BIT, QUANT_TYPES_4BIT
from ..functional._quant4 import packed_size_problem, quantize_4bit
from ..functional._quant_state import QuantState
from ..functional._validate import check_choice
from ._quantized_param import QuantizedParameter, QuantizedWeightModule, follow_device

__all__ = ["Params4bit", "QuantStateView"]

_SETTINGS = ("blocksize", "compress_statistics", "quant_type", "quant_storage")
_ATTRIBUTES = (*_SETTINGS, "quant_state", "bnb_quantized", "module")

#: Blocksize when the constructor is given None (bitsandbytes' default on every device
#: kbit serves the same way).
DEFAULT_BLOCKSIZE = 64


class QuantStateView:
    """A read-only attribute of a quantized :class:`Params4bit`, read from its quant state.

    FSDP walks a parameter's tensor attributes by name (``absmax``, ``nested_absmax``,
    ...); they are views of ``quant_state``, so each value exists once. Reading one while
    there is no such value (not quantized yet, or not nested) raises ``AttributeError``,
    so ``hasattr`` is False; assigning one raises too (change the quant state instead).
    """

    def __init__(self, read: Callable[[QuantState], Any]) -> None:
        self._read = read
        self._name = "?"

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, param: Optional["Params4bit"], owner: Optional[type] = None) -> Any:
        if param is None:
            return self
        state = param.__dict__.get("quant_state")
        value = self._read(state) if state is not None else None
        if value is None:
            raise AttributeError(f"'Params4bit' object has no attribute {self._name!r} (its quant state has none)")
        return value

    def __set__(self, param: "Params4bit", value: Any) -> None:
        raise AttributeError(f"Params4bit.{self._name} is read from quant_state; change the quant state instead")


def _nested(read: Callable[[QuantState], Any]) -> Callable[[QuantState], Any]:
    return lambda state: read(state.state2) if state.state2 is not None else None


#: torch functions whose results keep the Params4bit class (see __torch_function__).
_SHARDING_FUNCTIONS = frozenset({torch.chunk, torch.split, torch.Tensor.chunk, torch.Tensor.split})


class Params4bit(QuantizedParameter):
    """A frozen weight parameter stored as 4-bit NF4/FP4 codes.

    Args:
        data: the float weight (or packed codes with ``bnb_quantized=True``).
        requires_grad: must stay False once quantized (4-bit weights are frozen).
        quant_state: the :class:`~kbit.functional.QuantState` of packed ``data``.
        blocksize, compress_statistics, quant_type, quant_storage: how to quantize, see
            :func:`kbit.functional.quantize_4bit` (``blocksize=None`` means 64).
        module: the module holding this weight (kept as ``.module``); kbit modules read
            the state from their weight, so nothing depends on it.
        bnb_quantized: whether ``data`` already holds packed codes.
        **kwargs: other attributes to carry (what tooling set on a weight that is rebuilt
            as ``Params4bit(data, **weight.__dict__)``); kept through copies and moves.

    Once quantized, ``absmax``, ``code`` / ``quant_map``, ``offset`` and ``nested_absmax``,
    ``nested_code`` / ``nested_quant_map``, ``nested_blocksize``, ``nested_dtype``,
    ``nested_offset`` read through to the quant state. ``torch.chunk`` and ``torch.split``
    of a ``Params4bit`` give ``Params4bit`` pieces sharing its settings and state (FSDP
    shards weights that way).
    """

    _OWN_ATTRIBUTES = _ATTRIBUTES

    def __new__(
        cls,
        data: Optional[torch.Tensor] = None,
        requires_grad: bool = False,
        quant_state: Optional[QuantState] = None,
        blocksize: Optional[int] = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        module: Optional[torch.nn.Module] = None,
        bnb_quantized: bool = False,
        **kwargs: Any,
    ) -> "Params4bit":
        op = "Params4bit"
        if blocksize is None:
            blocksize = DEFAULT_BLOCKSIZE
        check_choice(op, "blocksize", blocksize, BLOCKSIZES_4BIT)
        check_choice(op, "quant_type", quant_type, QUANT_TYPES_4BIT)
        check_choice(op, "quant_storage", quant_storage, QUANT_STORAGES_4BIT)
        if data is None:
            data = torch.empty(0)
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.blocksize = blocksize
        self.compress_statistics = bool(compress_statistics)
        self.quant_type = quant_type
        self.quant_storage = quant_storage
        self.quant_state = quant_state
        self.bnb_quantized = bnb_quantized
        self.module = module
        self._keep_attributes(op, kwargs)
        return self

    absmax = QuantStateView(lambda state: state.absmax)
    code = QuantStateView(lambda state: state.code)
    quant_map = QuantStateView(lambda state: state.code)
    offset = QuantStateView(lambda state: state.offset)
    nested_absmax = QuantStateView(_nested(lambda state2: state2.absmax))
    nested_code = QuantStateView(_nested(lambda state2: state2.code))
    nested_quant_map = QuantStateView(_nested(lambda state2: state2.code))
    nested_blocksize = QuantStateView(_nested(lambda state2: state2.blocksize))
    nested_dtype = QuantStateView(_nested(lambda state2: state2.dtype))
    nested_offset = QuantStateView(lambda state: state.offset)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Parameter subclasses return plain tensors from every op; chunk and split keep
        # the class (and share settings and state) because FSDP shards weights with them.
        with torch._C.DisableTorchFunctionSubclass():  # traceable by torch.compile
            result = func(*args, **(kwargs or {}))
        if func in _SHARDING_FUNCTIONS:
            return tuple(args[0]._with_data(piece) for piece in result)
        return result

    def _follow_data_device(self) -> None:
        # A moved copy rather than QuantState.to (in place): aliases of this parameter
        # (detach(), earlier .to() results) keep a state on their own device.
        self.quant_state = _state_on(self.quant_state, self.device)

    @classmethod
    def from_prequantized(
        cls,
        data: torch.Tensor,
        quantized_stats: dict[str, Any],
        requires_grad: bool = False,
        device: Optional[torch.device | str] = None,
        module: Optional[torch.nn.Module] = None,
        **kwargs: Any,
    ) -> "Params4bit":
        """A quantized parameter from packed ``data`` and its serialized quant state.

        ``quantized_stats`` is the ``weight.``-prefixed (or unprefixed) part of a
        checkpoint, read by :meth:`QuantState.from_dict`, which validates it. ``device``
        defaults to ``data``'s. Extra keyword arguments are accepted for bitsandbytes
        compatibility and ignored: the state decides blocksize, type and storage.
        ``module`` is kept as the parameter's ``.module``.
        """
        device = torch.device(device) if device is not None else data.device
        state = QuantState.from_dict(quantized_stats, device=device)
        return cls._from_state(data, state, device, requires_grad, module=module)

    @classmethod
    def _from_state(
        cls,
        data: torch.Tensor,
        state: QuantState,
        device: torch.device,
        requires_grad: bool = False,
        key: str = "weight",
        module: Optional[torch.nn.Module] = None,
    ) -> "Params4bit":
        if not isinstance(data, torch.Tensor) or data.dtype not in QUANT_STORAGES_4BIT:
            found = data.dtype if isinstance(data, torch.Tensor) else type(data).__name__
            raise QuantStateError(key, f"packed data must be a uint8/float16/bfloat16/float32 tensor, got {found}")
        problem = packed_size_problem(data, state.shape)
        if problem:
            raise QuantStateError(key, problem)
        return cls(
            data.to(device).reshape(-1, 1),
            requires_grad,
            quant_state=state,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=data.dtype,
            module=module,
            bnb_quantized=True,
        )

    def _quantize(self, device: Optional[torch.device | str] = None) -> "Params4bit":
        """Quantize in place (on ``device``) and return self."""
        if self.requires_grad:
            raise KbitValueError(
                "Params4bit", "requires_grad", True, "4-bit weights are frozen; train adapters (e.g. LoRA) instead"
            )
        weight = self.data.contiguous()
        if device is not None:
            weight = weight.to(device)
        packed, state = quantize_4bit(
            weight,
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
        )
        self.data = packed
        self.quant_state = state
        self.bnb_quantized = True
        return self

    def to(self, *args: Any, **kwargs: Any) -> "Params4bit":
        """Move (quantizing on the first move to a real device) or, before quantization, cast."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if not self.bnb_quantized:
            if device is not None and device.type != "meta":
                # In place: Module.to keeps this object and only swaps in the returned
                # data, so the quant state must land on this very object.
                if dtype is not None:
                    self.data = self.data.to(dtype)
                return self._quantize(device)
            return self._with_data(torch.Tensor.to(self, device=device, dtype=dtype, non_blocking=non_blocking))
        if device is None:
            return self  # a dtype alone would reinterpret packed bytes as numbers
        # The result is independent of self: its own state on the new device. (A module's
        # weight follows through QuantizedWeightModule._apply, as Module.to swaps only
        # .data into the parameter object the module keeps.)
        moved = self._with_data(torch.Tensor.to(self, device=device, non_blocking=non_blocking))
        if moved is not self:
            moved._follow_data_device()
        return moved

    def cpu(self, *args: Any, **kwargs: Any) -> "Params4bit":
        """Move to (and on first move quantize on) the CPU."""
        return self.to("cpu")

    def cuda(self, device: Optional[torch.device | int | str] = None, non_blocking: bool = False, **kwargs: Any):
        """Move to (and on first move quantize on) a CUDA device."""
        if isinstance(device, int):
            device = f"cuda:{device}"
        return self.to(device if device is not None else "cuda", non_blocking=non_blocking)

    def _cast(self, dtype: torch.dtype) -> "Params4bit":
        return self if self.bnb_quantized else self._with_data(self.data.to(dtype))

    def half(self, *args: Any, **kwargs: Any) -> "Params4bit":
        """float16 before quantization; packed codes are left as they are."""
        return self._cast(torch.float16)

    def bfloat16(self, *args: Any, **kwargs: Any) -> "Params4bit":
        """bfloat16 before quantization; packed codes are left as they are."""
        return self._cast(torch.bfloat16)

    def float(self, *args: Any, **kwargs: Any) -> "Params4bit":
        """float32 before quantization; packed codes are left as they are."""
        return self._cast(torch.float32)

    def double(self, *args: Any, **kwargs: Any) -> "Params4bit":
        """float64 before quantization; packed codes are left as they are."""
        return self._cast(torch.float64)

    def __repr__(self) -> str:
        if not self.bnb_quantized:
            return f"Params4bit (not yet quantized, {self.quant_type}) containing:\n{self.data!r}"
        return f"Params4bit({self.quant_state!r}, packed {tuple(self.shape)} {self.dtype} on {self.device})"


def _state_on(state: Optional[QuantState], device: torch.device) -> Optional[QuantState]:
    """A copy of ``state`` with its tensors on ``device`` (``state`` itself is left alone)."""
    if state is None:
        return None
    moved = copy.copy(state)
    moved.absmax = follow_device(state.absmax, device)
    moved.code = follow_device(state.code, device)
    moved.offset = follow_device(state.offset, device)
    moved.state2 = _state_on(state.state2, device)
    return moved


class Weight4bitStateDict(QuantizedWeightModule):
    """State-dict save/load for a module whose ``weight`` is a :class:`Params4bit`.

    Saving writes the hub layout: ``weight`` (packed codes) and, next to it,
    ``weight.absmax``, ``weight.quant_map``, ... and ``weight.quant_state.bitsandbytes__<type>``.
    Loading accepts that layout directly (validated; the module adopts the checkpoint's
    quant type and blocksize) and also a plain float ``weight``, which is quantized on
    load with the module's settings. A mix-in placed before the ``torch.nn`` base class;
    the module says which float shape its weight has via :meth:`_weight_shape`.
    """

    def _weight_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def _init_4bit_weight(self, **settings: Any) -> None:
        """Wrap the float weight the ``torch.nn`` base created; remember how to quantize it."""
        self._quant_settings = settings
        self.weight = Params4bit(self.weight.data, requires_grad=False, module=self, **settings)

    def _settings(self) -> dict[str, Any]:
        """How float weights are quantized: the weight's own settings, else the remembered ones."""
        weight = self.weight
        if isinstance(weight, Params4bit):
            return {name: getattr(weight, name) for name in _SETTINGS}
        return self._quant_settings

    def _quantized_weight(self) -> Params4bit:
        """The weight, quantized where it lives if it never was.

        Generic tensor code such as ``Module.to_empty`` can replace the ``Params4bit`` by a
        plain ``Parameter``; it is wrapped again with the remembered settings.
        """
        weight = self.weight
        if not isinstance(weight, Params4bit):
            weight = self.weight = Params4bit(weight.data, requires_grad=False, module=self, **self._settings())
        if not weight.bnb_quantized:
            weight._quantize(weight.device)
        return weight

    @property
    def quant_storage(self) -> torch.dtype:
        """dtype the packed bytes are viewed as (the loaded weight's, after a load)."""
        return self._settings()["quant_storage"]

    @property
    def quant_state(self) -> Optional[QuantState]:
        """The weight's :class:`~kbit.functional.QuantState` (None before quantization)."""
        return getattr(self.weight, "quant_state", None)

    @quant_state.setter
    def quant_state(self, state: Optional[QuantState]) -> None:
        self.weight.quant_state = state

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = self.weight
        if not keep_vars:
            destination[prefix + "weight"] = weight.data  # a plain tensor, loadable with weights_only
        if getattr(weight, "bnb_quantized", False) and weight.quant_state is not None:
            for key, value in weight.quant_state.as_dict(packed=True).items():
                destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        key = prefix + "weight"
        # Full keys: QuantState.from_dict strips the prefix itself and names them in errors.
        stats = {k: v for k, v in state_dict.items() if k.startswith(key + ".")}
        rest = {k: v for k, v in state_dict.items() if k != key and not k.startswith(key + ".")}
        if stats and key not in state_dict:
            raise QuantStateError(key, f"missing, although its quantization statistics ({sorted(stats)[0]}, ...) are there")
        # Build (and so validate) the new weight before anything else is loaded: a bad
        # checkpoint must leave the module exactly as it was.
        weight = self._weight_from(key, state_dict[key], stats) if key in state_dict else None

        def install() -> None:
            self.weight = weight
            self._quant_settings = self._settings()

        self._load_rest_then_install(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs,
            install if weight is not None else None,
        )  # fmt: skip

    def _weight_from(self, key: str, value: torch.Tensor, stats: dict[str, Any]) -> Params4bit:
        current = self.weight
        device = current.device if current.device.type != "meta" else value.device
        expected = torch.Size(self._weight_shape())
        if stats:
            copied = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in stats.items()}
            state = QuantState.from_dict(copied, device=device)
            if state.shape != expected:
                raise QuantStateError(key, f"holds a weight of shape {tuple(state.shape)}; this module needs {tuple(expected)}")
            return Params4bit._from_state(value.detach().clone(), state, device, key=key, module=self)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            found = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise QuantStateError(key, f"holds {found}: expected a float weight, or packed codes with their quant-state keys")
        if value.shape != expected:
            raise QuantStateError(key, f"holds a weight of shape {tuple(value.shape)}; this module needs {tuple(expected)}")
        fresh = Params4bit(value.detach().to(device, copy=True), False, module=self, **self._settings())
        return fresh._quantize() if device.type != "meta" else fresh
