"""``QuantState``: everything needed to dequantize a quantized tensor."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["QuantState"]


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
        self.quant_type = quant_type
        self.dtype = dtype
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        """True when ``absmax`` is itself quantized (``compress_statistics`` / ``nested``)."""
        return self.state2 is not None

    def to(self, device: torch.device | str) -> "QuantState":
        """Move every tensor to ``device`` (in place, like ``Module.to``) and return self."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.offset is not None:
            self.offset = self.offset.to(device)
        if self.state2 is not None:
            self.state2.to(device)
        return self

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

    def __repr__(self) -> str:
        nested = ", nested" if self.nested else ""
        shape = tuple(self.shape) if self.shape is not None else None
        return (
            f"QuantState(shape={shape}, dtype={self.dtype}, blocksize={self.blocksize}, "
            f"quant_type={self.quant_type!r}{nested})"
        )
