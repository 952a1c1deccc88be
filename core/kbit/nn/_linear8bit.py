"""LLM.int8() modules: ``Int8Params``, ``Linear8bitLt`` and ``Embedding8bit``.

A frozen int8 weight is stored row-major as ``[out, in]`` int8 codes plus one float32
absmax per row (``SCB``). The serialized form (``docs/formats.md`` section 3) is the state
dict keys ``weight`` (int8), ``bias``, ``SCB`` and ``weight_format`` (0-d uint8, 0 means
row-major), the same as bitsandbytes writes.

Quantization happens on the first move to a device (``.to(device)``, ``.cpu()``,
``.cuda()``; ``.to("cpu")`` counts), or at the latest on the first forward, so it works on
every backend's device and not only on CUDA.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .._errors import KbitTypeError, QuantStateError
from ..autograd._matmul8bit import MatmulLtState, matmul
from ..functional._int8 import check_threshold, int8_vectorwise_dequant, int8_vectorwise_quant
from ..functional._validate import check_scales
from ._quantized_param import QuantizedParameter, QuantizedWeightModule, follow_device

__all__ = ["Int8Params", "Linear8bitLt", "Embedding8bit"]

#: ``weight_format`` value of the row-major layout, the only one kbit stores or reads.
ROW_MAJOR_FORMAT = 0


def _is_int8(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.int8


def _checked_codes(codes: object) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor) or not _is_int8(codes):
        found = f"dtype {codes.dtype}" if isinstance(codes, torch.Tensor) else f"type {type(codes).__name__}"
        raise KbitTypeError("Int8Params", "CB", found, "an int8 tensor of codes")
    return codes


class Int8Params(QuantizedParameter):
    """A weight that quantizes itself to int8 row-wise on its first move to a device.

    Attributes:
        CB: the int8 codes ``[out, in]`` once quantized, else None. It reads through to
            ``data`` (never a stale copy); assigning int8 codes to it installs them as ``data``.
        SCB: float32 per-row absmax ``(out,)`` once quantized.
        has_fp16_weights: keep the float weight (trainable) instead of quantizing it.

    ``.to(device)`` / ``.cpu()`` / ``.cuda()`` on a float weight with
    ``has_fp16_weights=False`` quantize it in place and return the parameter itself, which
    is how ``module.to(device)`` leaves the module holding int8 codes. Moving an int8 weight
    never casts its codes: a requested dtype only applies to float weights.

    Constructing with ``CB`` (int8 codes) makes those codes the data, whatever ``data`` is.
    Other keyword arguments become attributes, kept through copies and moves (tooling
    rebuilds weights as ``Int8Params(data, **weight.__dict__)``).
    """

    _OWN_ATTRIBUTES = ("has_fp16_weights", "SCB")

    def __new__(
        cls,
        data: Optional[torch.Tensor] = None,
        requires_grad: bool = True,
        has_fp16_weights: bool = False,
        CB: Optional[torch.Tensor] = None,
        SCB: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> "Int8Params":
        if CB is not None:
            data = _checked_codes(CB)
        if data is None:
            data = torch.empty(0)
        # Only floating-point tensors can require grad; int8 codes are frozen by nature.
        param = torch.Tensor._make_subclass(cls, data, requires_grad and data.is_floating_point())
        param.SCB = SCB
        param.has_fp16_weights = has_fp16_weights
        param._keep_attributes("Int8Params", kwargs)
        return param

    def _quantize(self, device: torch.device) -> "Int8Params":
        """Replace the float data with int8 codes on ``device`` (in place); return self."""
        weight = self.data.to(device).contiguous()
        CB, SCB, _ = int8_vectorwise_quant(weight)
        self.requires_grad_(False)
        self.data = CB
        self.SCB = SCB
        return self

    @property
    def CB(self) -> Optional[torch.Tensor]:
        """The int8 codes (``data`` itself) once quantized; None while the weight is float."""
        return self.data if _is_int8(self) else None

    @CB.setter
    def CB(self, codes: torch.Tensor) -> None:
        self.requires_grad_(False)
        self.data = _checked_codes(codes)

    def _install_codes(self, CB: torch.Tensor, SCB: torch.Tensor) -> None:
        """Hold already-quantized codes and scales (used when loading a checkpoint)."""
        self.requires_grad_(False)
        self.data = CB
        self.SCB = SCB

    def to(self, *args: Any, **kwargs: Any) -> "Int8Params":
        """Move (and on the first move of a frozen float weight, quantize) this weight."""
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type != "meta" and not self.has_fp16_weights and not _is_int8(self):
            return self._quantize(device)
        data = self.data
        moved = data.to(
            device=device,
            dtype=None if _is_int8(self) else dtype,
            non_blocking=non_blocking,
            memory_format=memory_format or torch.preserve_format,
        )
        if moved is data:  # nothing to do: Tensor.to returned its input
            return self
        new = self._with_data(moved)
        new._follow_data_device()
        return new

    def cpu(self) -> "Int8Params":  # type: ignore[override]
        """Same as ``.to("cpu")`` (quantizes a frozen float weight)."""
        return self.to("cpu")

    def cuda(self, device: Optional[Any] = None, non_blocking: bool = False) -> "Int8Params":  # type: ignore[override]
        """Same as ``.to("cuda")`` (quantizes a frozen float weight)."""
        return self.to("cuda" if device is None else device, non_blocking=non_blocking)

    def _follow_data_device(self) -> None:
        self.SCB = follow_device(self.SCB, self.device)

    def __repr__(self) -> str:
        kind = "int8 codes" if _is_int8(self) else f"{self.dtype} weight"
        return f"Int8Params({kind} {tuple(self.shape)}, has_fp16_weights={self.has_fp16_weights})"


def _parse_format(key: str, value: object) -> int:
    """The integer layout code of a ``weight_format`` entry (a 0-d tensor or an int)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point():
            raise QuantStateError(key, f"expected a 0-d integer tensor, got {value.dtype} of shape {tuple(value.shape)}")
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int):
        raise QuantStateError(key, f"expected an integer layout code, got {type(value).__name__}")
    return value


class _Int8WeightModule(QuantizedWeightModule):
    """State-dict and device handling shared by modules whose ``weight`` is an Int8Params.

    Subclasses call :meth:`_ensure_quantized` at the start of ``forward`` and may override
    :meth:`_after_weight_change` to mirror the weight elsewhere.
    """

    weight: Int8Params

    @property
    def _int8_trainable(self) -> bool:
        return self.weight.has_fp16_weights

    def _ensure_quantized(self) -> None:
        """Quantize a frozen float weight on first use (no move to a device happened yet)."""
        if not self._int8_trainable and not _is_int8(self.weight):
            self.weight._quantize(self.weight.device)
            self._after_weight_change()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars and prefix + "weight" in destination:
            # Int8Params.detach keeps the class (Parameter(t) requires it), but a saved
            # checkpoint must hold a plain tensor: torch.load(weights_only=True) refuses ours.
            destination[prefix + "weight"] = self.weight.data
        if _is_int8(self.weight) and self.weight.SCB is not None:
            scb = self.weight.SCB
            destination[prefix + "SCB"] = scb if keep_vars else scb.detach()
            destination[prefix + "weight_format"] = torch.tensor(ROW_MAJOR_FORMAT, dtype=torch.uint8)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        weight_key, scb_key, format_key = prefix + "weight", prefix + "SCB", prefix + "weight_format"
        incoming = state_dict.get(weight_key)
        if incoming is None and (scb_key in state_dict or format_key in state_dict):
            present = scb_key if scb_key in state_dict else format_key
            raise QuantStateError(weight_key, f"missing, although {present!r} (which describes its codes) is there")
        if scb_key in state_dict and not isinstance(self.weight, Int8Params):
            # Tied weights (or other tooling) replaced the Int8Params by a plain parameter,
            # which has nowhere to keep int8 codes and their scales.
            raise QuantStateError(
                scb_key,
                f"holds int8 scales, but this module's weight is a plain {type(self.weight).__name__}, not an "
                "Int8Params (was it tied to another module's weight?); it cannot hold int8 codes",
            )
        # Validate and convert first, so a malformed checkpoint leaves the module untouched.
        converted = None
        if incoming is not None:
            converted = self._converted_weight(incoming, state_dict.get(scb_key), state_dict.get(format_key), prefix)
        rest = {k: v for k, v in state_dict.items() if k not in (weight_key, scb_key, format_key)}

        def install() -> None:
            data, scb = converted
            if scb is not None:
                self.weight._install_codes(data, scb)
            else:
                with torch.no_grad():
                    self.weight.copy_(data)
            self._after_weight_change()

        self._load_rest_then_install(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs,
            install if converted is not None else None,
        )  # fmt: skip

    def _converted_weight(
        self, incoming: object, scb: object, weight_format: object, prefix: str
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What loading ``incoming`` installs: ``(int8 codes, SCB)`` or ``(float data, None)``.

        An int8 checkpoint loads into a frozen module as codes (whether or not it was
        quantized yet) and into a trainable one dequantized; a float checkpoint loads into
        an already-quantized module quantized.
        """
        weight_key, scb_key = prefix + "weight", prefix + "SCB"
        if not isinstance(incoming, torch.Tensor):
            raise QuantStateError(weight_key, f"expected a tensor, got {type(incoming).__name__}")
        if tuple(incoming.shape) != tuple(self.weight.shape):
            raise QuantStateError(
                weight_key, f"shape {tuple(incoming.shape)} does not match the module's {tuple(self.weight.shape)}"
            )
        device = self.weight.device
        if incoming.is_floating_point():
            if scb is not None:
                raise QuantStateError(
                    scb_key,
                    f"given beside a floating-point weight ({incoming.dtype}): int8 codes cast to float? "
                    "A float checkpoint has no SCB, an int8 one has int8 codes",
                )
            if _is_int8(self.weight):
                CB, SCB, _ = int8_vectorwise_quant(incoming.to(device))
                return CB, SCB
            return incoming, None
        if not _is_int8(incoming):
            raise QuantStateError(weight_key, f"expected int8 codes or a floating-point weight, got {incoming.dtype}")
        if weight_format is not None:
            layout = _parse_format(prefix + "weight_format", weight_format)
            if layout != ROW_MAJOR_FORMAT:
                raise QuantStateError(
                    prefix + "weight_format",
                    f"layout {layout} (a tiled GPU layout) is not supported; kbit reads row-major (0) weights",
                )
        if scb is None:
            raise QuantStateError(scb_key, "missing: int8 weight codes need their per-row absmax")
        # float32 exactly, as written: a 16-bit copy has already lost digits of every scale.
        if not isinstance(scb, torch.Tensor) or scb.dtype != torch.float32:
            found = scb.dtype if isinstance(scb, torch.Tensor) else type(scb).__name__
            raise QuantStateError(scb_key, f"expected a float32 tensor, got {found}")
        if scb.numel() != incoming.shape[0]:
            raise QuantStateError(scb_key, f"holds {scb.numel()} values, expected one per row ({incoming.shape[0]})")
        check_scales(scb_key, scb)
        CB = incoming.to(device).contiguous()
        SCB = scb.reshape(-1).to(device=device, copy=True)
        if self._int8_trainable:
            return int8_vectorwise_dequant(CB, SCB).to(self.weight.dtype), None
        return CB, SCB


class Linear8bitLt(_Int8WeightModule, nn.Linear):
    """``nn.Linear`` running LLM.int8(): int8 matmul with 16-bit outlier columns.

    Args:
        input_features, output_features, bias: as ``nn.Linear``.
        has_fp16_weights: keep a trainable float weight (quantized on the fly every call);
            ``False`` stores int8 codes, quantized on the first move to a device or forward.
        threshold: activation columns holding a value with ``|x| >= threshold`` are
            multiplied in 16-bit (0 disables it; 6.0 is the LLM.int8() paper's choice).
        index: kept for bitsandbytes compatibility; unused.
        device: where to create the (float) parameters.

    The state dict of a quantized layer holds ``weight`` (int8 ``[out, in]``), ``bias``,
    ``SCB`` and ``weight_format``; such a dict also loads into a module that has not been
    quantized yet (and, dequantized, into a trainable one).
    """

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        has_fp16_weights: bool = True,
        threshold: float = 0.0,
        index: Any = None,
        device: Optional[Any] = None,
    ) -> None:
        threshold = check_threshold("Linear8bitLt", threshold)
        super().__init__(input_features, output_features, bias, device)
        self._state = MatmulLtState(
            threshold=threshold,
            has_fp16_weights=has_fp16_weights,
            use_pool=threshold > 0.0 and not has_fp16_weights,
        )
        self.index = index
        self.weight = Int8Params(self.weight.data, requires_grad=has_fp16_weights, has_fp16_weights=has_fp16_weights)

    @property
    def state(self) -> MatmulLtState:
        """The :class:`~kbit.MatmulLtState` of this layer.

        Its ``CB`` and ``SCB`` are refreshed from the weight on every access, so they are
        never stale copies, even after ``layer.weight`` (or its data) was replaced.
        """
        state = self._state
        weight = self._parameters.get("weight")
        if weight is not None and _is_int8(weight):
            state.CB, state.SCB = weight.data, getattr(weight, "SCB", None)
        return state

    @state.setter
    def state(self, state: MatmulLtState) -> None:
        self._state = state

    def _after_weight_change(self) -> None:
        if not _is_int8(self.weight):
            self._state.reset_grads()  # codes of a float weight are recomputed on use

    def init_8bit_state(self) -> None:
        """Refresh ``self.state`` from the weight (bitsandbytes API; reads happen anyway)."""
        self._after_weight_change()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` through LLM.int8(); output in ``x``'s dtype."""
        self._ensure_quantized()
        state = self.state  # read after quantizing: picks up the current codes and SCB
        state.is_training = self.training
        return matmul(x, self.weight, bias=self.bias, state=state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, has_fp16_weights={self.state.has_fp16_weights}, threshold={self.state.threshold}"


class Embedding8bit(_Int8WeightModule, nn.Embedding):
    """``nn.Embedding`` whose table is stored as int8 codes with one float32 scale per row.

    Args:
        num_embeddings, embedding_dim: as ``nn.Embedding``.
        device: where to create the table.
        dtype: dtype of the looked-up vectors (the float table's dtype by default).

    The table quantizes on the first move to a device or the first forward. Its state dict
    holds ``weight`` (int8), ``SCB`` and ``weight_format``, like :class:`Linear8bitLt`;
    a float ``weight`` (from an ``nn.Embedding``) loads too and is quantized.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, device: Optional[Any] = None, dtype: Optional[torch.dtype] = None
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self._float_dtype = self.weight.dtype
        self.weight = Int8Params(self.weight.data, requires_grad=False, has_fp16_weights=False)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the looked-up vectors: the float table's, or the one it had when quantized."""
        weight = self.weight
        return weight.dtype if weight.is_floating_point() else self._float_dtype

    def _remember_float_dtype(self) -> None:
        # Called just before anything may quantize the table (a move, the first forward).
        if self.weight.is_floating_point():
            self._float_dtype = self.weight.dtype

    def _apply(self, fn, recurse: bool = True):
        self._remember_float_dtype()
        return super()._apply(fn, recurse)

    def _ensure_quantized(self) -> None:
        self._remember_float_dtype()
        super()._ensure_quantized()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Look up rows of the int8 table and dequantize them to ``self.dtype``."""
        self._ensure_quantized()
        codes = nn.functional.embedding(input, self.weight)
        scales = self.weight.SCB.index_select(0, input.reshape(-1))
        rows = int8_vectorwise_dequant(codes.reshape(-1, self.embedding_dim), scales)
        return rows.reshape(codes.shape).to(self.dtype)
