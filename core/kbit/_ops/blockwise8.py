"""Custom ops of the 8-bit family: blockwise, whole-tensor and code-only quantization."""

from __future__ import annotations

from typing import Optional

import torch

from .._formats import num_blocks
from . import backend_for
from ._results import Out, checked, fake_from

Tensor = torch.Tensor


def _codes_and_scales(A: Tensor, blocks: int) -> tuple[Out, Out]:
    return Out("codes", A.shape, torch.uint8, A.device), Out("absmax", (blocks,), torch.float32, A.device)


def _quantize_blockwise_out(A: Tensor, code: Tensor, blocksize: int, rand: Optional[Tensor] = None) -> tuple[Out, Out]:
    return _codes_and_scales(A, num_blocks(A.numel(), blocksize))


@torch.library.custom_op("kbit::quantize_blockwise", mutates_args=())
def quantize_blockwise(A: Tensor, code: Tensor, blocksize: int, rand: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """8-bit blockwise quantization; returns ``(codes uint8 like A, absmax float32)``.

    With ``rand`` the codes are rounded stochastically (``docs/formats.md`` section 2).
    """
    if rand is None:
        backend = backend_for("quantize_blockwise", A, blocksize=blocksize, rounding="nearest")
        result = backend.quantize_blockwise(A, code=code, blocksize=blocksize)
    else:  # only a backend declaring stochastic rounding is ever handed ``rand``
        backend = backend_for("quantize_blockwise", A, blocksize=blocksize, rounding="stochastic")
        result = backend.quantize_blockwise(A, code=code, blocksize=blocksize, rand=rand)
    return checked("quantize_blockwise", backend, result, _quantize_blockwise_out(A, code, blocksize, rand))


quantize_blockwise.register_fake(fake_from(_quantize_blockwise_out))


def _dequantize_blockwise_out(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype) -> Out:
    return Out("values", A.shape, dtype, A.device)


@torch.library.custom_op("kbit::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype) -> Tensor:
    """Inverse of ``quantize_blockwise``, producing ``dtype``."""
    backend = backend_for("dequantize_blockwise", A, dtype, blocksize=blocksize)
    result = backend.dequantize_blockwise(A, absmax=absmax, code=code, blocksize=blocksize, dtype=dtype)
    return checked("dequantize_blockwise", backend, result, _dequantize_blockwise_out(A, absmax, code, blocksize, dtype))


dequantize_blockwise.register_fake(fake_from(_dequantize_blockwise_out))


def _quantize_out(A: Tensor, code: Tensor) -> tuple[Out, Out]:
    return _codes_and_scales(A, 1)


@torch.library.custom_op("kbit::quantize", mutates_args=())
def quantize(A: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    """Whole-tensor 8-bit quantization; returns ``(codes, absmax of shape (1,))``."""
    backend = backend_for("quantize", A)
    return checked("quantize", backend, backend.quantize(A, code=code), _quantize_out(A, code))


quantize.register_fake(fake_from(_quantize_out))


def _dequantize_out(A: Tensor, absmax: Tensor, code: Tensor, dtype: torch.dtype) -> Out:
    return Out("values", A.shape, dtype, A.device)


@torch.library.custom_op("kbit::dequantize", mutates_args=())
def dequantize(A: Tensor, absmax: Tensor, code: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of ``quantize``."""
    backend = backend_for("dequantize", A, dtype)
    result = backend.dequantize(A, absmax=absmax, code=code, dtype=dtype)
    return checked("dequantize", backend, result, _dequantize_out(A, absmax, code, dtype))


dequantize.register_fake(fake_from(_dequantize_out))


def _quantize_no_absmax_out(A: Tensor, code: Tensor) -> Out:
    return Out("codes", A.shape, torch.uint8, A.device)


@torch.library.custom_op("kbit::quantize_no_absmax", mutates_args=())
def quantize_no_absmax(A: Tensor, code: Tensor) -> Tensor:
    """Nearest-code index of already-normalised values."""
    backend = backend_for("quantize_no_absmax", A)
    return checked("quantize_no_absmax", backend, backend.quantize_no_absmax(A, code=code), _quantize_no_absmax_out(A, code))


quantize_no_absmax.register_fake(fake_from(_quantize_no_absmax_out))


def _dequantize_no_absmax_out(A: Tensor, code: Tensor, dtype: torch.dtype) -> Out:
    return Out("values", A.shape, dtype, A.device)


@torch.library.custom_op("kbit::dequantize_no_absmax", mutates_args=())
def dequantize_no_absmax(A: Tensor, code: Tensor, dtype: torch.dtype) -> Tensor:
    """``code[A]`` as ``dtype``."""
    backend = backend_for("dequantize_no_absmax", A, dtype)
    result = backend.dequantize_no_absmax(A, code=code, dtype=dtype)
    return checked("dequantize_no_absmax", backend, result, _dequantize_no_absmax_out(A, code, dtype))


dequantize_no_absmax.register_fake(fake_from(_dequantize_no_absmax_out))


def _estimate_quantiles_out(A: Tensor, offset: float, num_quantiles: int) -> Out:
    return Out("quantiles", (num_quantiles,), torch.float32, A.device)


@torch.library.custom_op("kbit::estimate_quantiles", mutates_args=())
def estimate_quantiles(A: Tensor, offset: float, num_quantiles: int) -> Tensor:
    """Equidistant quantiles of ``A`` between ``offset`` and ``1 - offset``."""
    backend = backend_for("estimate_quantiles", A)
    result = backend.estimate_quantiles(A, offset=offset, num_quantiles=num_quantiles)
    return checked("estimate_quantiles", backend, result, _estimate_quantiles_out(A, offset, num_quantiles))


estimate_quantiles.register_fake(fake_from(_estimate_quantiles_out))


def _histogram_out(histogram: Tensor, index1: Tensor, index2: Tensor, source: Tensor) -> None:
    return None


@torch.library.custom_op("kbit::histogram_scatter_add_2d", mutates_args=("histogram",))
def histogram_scatter_add_2d(histogram: Tensor, index1: Tensor, index2: Tensor, source: Tensor) -> None:
    """In place: ``histogram[index1, index2] += source``."""
    backend = backend_for("histogram_scatter_add_2d", histogram)
    result = backend.histogram_scatter_add_2d(histogram, index1=index1, index2=index2, source=source)
    checked("histogram_scatter_add_2d", backend, result, None)


histogram_scatter_add_2d.register_fake(fake_from(_histogram_out))
