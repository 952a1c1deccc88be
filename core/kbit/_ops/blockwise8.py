"""Custom ops of the 8-bit family: blockwise, whole-tensor and code-only quantization."""

from __future__ import annotations

import torch

from .._formats import num_blocks
from . import backend_for

Tensor = torch.Tensor


@torch.library.custom_op("kbit::quantize_blockwise", mutates_args=())
def quantize_blockwise(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """8-bit blockwise quantization; returns ``(codes uint8 like A, absmax float32)``."""
    backend = backend_for("quantize_blockwise", A, blocksize=blocksize)
    return backend.quantize_blockwise(A, code=code, blocksize=blocksize)


@quantize_blockwise.register_fake
def _(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    return (
        torch.empty(A.shape, dtype=torch.uint8, device=A.device),
        A.new_empty((num_blocks(A.numel(), blocksize),), dtype=torch.float32),
    )


@torch.library.custom_op("kbit::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype) -> Tensor:
    """Inverse of ``quantize_blockwise``, producing ``dtype``."""
    backend = backend_for("dequantize_blockwise", A, dtype, blocksize=blocksize)
    return backend.dequantize_blockwise(A, absmax=absmax, code=code, blocksize=blocksize, dtype=dtype)


@dequantize_blockwise.register_fake
def _(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype) -> Tensor:
    return torch.empty(A.shape, dtype=dtype, device=A.device)


@torch.library.custom_op("kbit::quantize", mutates_args=())
def quantize(A: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    """Whole-tensor 8-bit quantization; returns ``(codes, absmax of shape (1,))``."""
    return backend_for("quantize", A).quantize(A, code=code)


@quantize.register_fake
def _(A: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty(A.shape, dtype=torch.uint8, device=A.device), A.new_empty((1,), dtype=torch.float32)


@torch.library.custom_op("kbit::dequantize", mutates_args=())
def dequantize(A: Tensor, absmax: Tensor, code: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of ``quantize``."""
    return backend_for("dequantize", A, dtype).dequantize(A, absmax=absmax, code=code, dtype=dtype)


@dequantize.register_fake
def _(A: Tensor, absmax: Tensor, code: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty(A.shape, dtype=dtype, device=A.device)


@torch.library.custom_op("kbit::quantize_no_absmax", mutates_args=())
def quantize_no_absmax(A: Tensor, code: Tensor) -> Tensor:
    """Nearest-code index of already-normalised values."""
    return backend_for("quantize_no_absmax", A).quantize_no_absmax(A, code=code)


@quantize_no_absmax.register_fake
def _(A: Tensor, code: Tensor) -> Tensor:
    return torch.empty(A.shape, dtype=torch.uint8, device=A.device)


@torch.library.custom_op("kbit::dequantize_no_absmax", mutates_args=())
def dequantize_no_absmax(A: Tensor, code: Tensor, dtype: torch.dtype) -> Tensor:
    """``code[A]`` as ``dtype``."""
    return backend_for("dequantize_no_absmax", A, dtype).dequantize_no_absmax(A, code=code, dtype=dtype)


@dequantize_no_absmax.register_fake
def _(A: Tensor, code: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty(A.shape, dtype=dtype, device=A.device)


@torch.library.custom_op("kbit::estimate_quantiles", mutates_args=())
def estimate_quantiles(A: Tensor, offset: float, num_quantiles: int) -> Tensor:
    """Equidistant quantiles of ``A`` between ``offset`` and ``1 - offset``."""
    backend = backend_for("estimate_quantiles", A)
    return backend.estimate_quantiles(A, offset=offset, num_quantiles=num_quantiles)


@estimate_quantiles.register_fake
def _(A: Tensor, offset: float, num_quantiles: int) -> Tensor:
    return A.new_empty((num_quantiles,), dtype=torch.float32)


@torch.library.custom_op("kbit::histogram_scatter_add_2d", mutates_args=("histogram",))
def histogram_scatter_add_2d(histogram: Tensor, index1: Tensor, index2: Tensor, source: Tensor) -> None:
    """In place: ``histogram[index1, index2] += source``."""
    backend = backend_for("histogram_scatter_add_2d", histogram)
    backend.histogram_scatter_add_2d(histogram, index1=index1, index2=index2, source=source)


@histogram_scatter_add_2d.register_fake
def _(histogram: Tensor, index1: Tensor, index2: Tensor, source: Tensor) -> None:
    return None
