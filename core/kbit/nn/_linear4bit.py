"""``Linear4bit`` and its NF4/FP4 shorthands: a linear layer with a frozen 4-bit weight."""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from .._errors import KbitWarning
from .._formats import FLOAT_DTYPES
from ..autograd._matmul4bit import matmul_4bit
from ..functional._validate import check_choice, check_dtype
from ._params4bit import Params4bit, Weight4bitStateDict

__all__ = ["Linear4bit", "LinearNF4", "LinearFP4"]


class Linear4bit(Weight4bitStateDict, torch.nn.Linear):
    """``torch.nn.Linear`` whose weight is stored as 4-bit NF4 or FP4 codes.

    The weight is created in float and quantized on the first move to a device
    (``.to("cpu")`` included) or on the first forward. The forward computes in
    ``compute_dtype`` (taken from the first input when None), with the bias cast to it,
    and returns the input's dtype. Gradients reach the input and the bias; the 4-bit
    weight is frozen (train adapters such as LoRA on top of it).

    ``state_dict()`` writes the hub checkpoint layout (``weight``, ``bias``,
    ``weight.absmax``, ``weight.quant_map``, ... ``weight.quant_state.bitsandbytes__<type>``)
    and ``load_state_dict`` reads it directly, or a float ``weight`` (quantized on load).

    Args:
        input_features, output_features, bias: as for ``torch.nn.Linear``.
        compute_dtype: float16, bfloat16 or float32 for the matmul; None picks the dtype
            of the first input.
        compress_statistics: nested (8-bit) absmax, see :func:`kbit.functional.quantize_4bit`.
        quant_type: ``"nf4"`` or ``"fp4"``.
        quant_storage: dtype the packed bytes are viewed as.
        device: where the float weight is created.
    """

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device: Optional[torch.device | str] = None,
    ) -> None:
        if compute_dtype is not None:
            check_choice("Linear4bit", "compute_dtype", compute_dtype, FLOAT_DTYPES)
        super().__init__(input_features, output_features, bias, device)
        self._init_4bit_weight(
            compress_statistics=compress_statistics, quant_type=quant_type, quant_storage=quant_storage
        )
        self.compute_dtype = compute_dtype
        #: Whether ``compute_dtype`` is settled; while False the next input's dtype sets it
        #: (float16 input keeps an explicit ``compute_dtype``, as in bitsandbytes).
        self.compute_type_is_set = compute_dtype is not None

    def _weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def _compute_dtype_for(self, x: torch.Tensor) -> torch.dtype:
        if self.compute_type_is_set and self.compute_dtype is not None:
            compute_dtype = self.compute_dtype
        elif x.dtype == torch.float16 and self.compute_dtype is not None:
            compute_dtype = self.compute_dtype
        else:
            compute_dtype = x.dtype
        if x.dtype == torch.float16 and compute_dtype == torch.float32:
            warnings.warn(
                "Linear4bit: float16 input is computed in float32 (compute_dtype=torch.float32, transformers' "
                "bnb_4bit_compute_dtype default), which makes inference and training slower than needed; "
                "pass compute_dtype=torch.float16 to compute in the input's dtype",
                KbitWarning,
                stacklevel=3,
            )
        return compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` in the compute dtype, returned in ``x``'s dtype."""
        check_dtype("Linear4bit", "x", x, FLOAT_DTYPES)
        weight, state = self._packed_weight()
        if isinstance(weight, Params4bit) and not weight.requires_grad:
            # Its plain data: a tensor subclass takes torch's dispatcher path into the op
            # (kbit._ops: about 20 us a call), and Params4bit's hook changes nothing here.
            weight = weight.data
        compute_dtype = self._compute_dtype_for(x)
        bias = None if self.bias is None else self.bias.to(compute_dtype)
        out = matmul_4bit(x.to(compute_dtype), weight, state, bias=bias)
        # The first input that worked settles the compute dtype (assigned only then: a
        # module's __setattr__ costs microseconds on every call).
        if not self.compute_type_is_set or self.compute_dtype != compute_dtype:
            self.compute_dtype, self.compute_type_is_set = compute_dtype, True
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        quant_type = self._settings()["quant_type"]
        return f"{super().extra_repr()}, quant_type={quant_type}, compute_dtype={self.compute_dtype}"


class LinearNF4(Linear4bit):
    """:class:`Linear4bit` with ``quant_type="nf4"`` (the QLoRA default)."""

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        compress_statistics: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        device: Optional[torch.device | str] = None,
    ) -> None:
        super().__init__(
            input_features, output_features, bias, compute_dtype, compress_statistics, "nf4", quant_storage, device
        )


class LinearFP4(Linear4bit):
    """:class:`Linear4bit` with ``quant_type="fp4"``."""

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        compress_statistics: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        device: Optional[torch.device | str] = None,
    ) -> None:
        super().__init__(
            input_features, output_features, bias, compute_dtype, compress_statistics, "fp4", quant_storage, device
        )
