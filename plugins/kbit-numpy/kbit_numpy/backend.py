"""The NumPy backend class: converts tensors at the boundary, computes in ``_kernels``.

kbit calls these methods only for what the manifest declares, with arguments the public
API has already validated (contiguous CPU tensors, declared dtypes and blocksizes), so they
convert and compute without re-checking. Tensors cross to NumPy with ``.numpy()`` (no
copy) and results come back with ``torch.from_numpy``; no torch op computes anything.
Packed 4-bit data crosses as raw bytes: ``Tensor.view(dtype)`` only reinterprets them, which
is how the bfloat16 storage (a dtype NumPy lacks) works without computing in torch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from kbit.backend import Backend, UnsupportedOpError
from kbit.functional import get_4bit_type

from . import _kernels

Tensor = torch.Tensor

_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


def _array(tensor: Tensor) -> np.ndarray:
    return tensor.detach().numpy()


def _tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def _table(quant_type: str) -> np.ndarray:
    # The 16 values are part of the format: take kbit's published table, not a copy.
    return get_4bit_type(quant_type).numpy()


class NumpyBackend(Backend):
    """kbit's 8-bit blockwise family and 4-bit quantize/dequantize in NumPy (float16 and float32, CPU)."""

    def is_available(self) -> bool | str:
        # A hardware backend probes its device here and returns a reason string when it
        # cannot run ("no Acme device found"); NumPy runs wherever it imports.
        return True

    def _numpy_dtype(self, op: str, dtype: torch.dtype) -> np.dtype:
        if dtype not in _NUMPY_DTYPES:
            raise UnsupportedOpError(op, self.name, f"dtype {dtype} has no NumPy equivalent")
        return _NUMPY_DTYPES[dtype]

    def quantize_blockwise(self, A: Tensor, *, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
        codes, absmax = _kernels.quantize_blockwise(_array(A), _array(code), blocksize)
        return _tensor(codes), _tensor(absmax)

    def dequantize_blockwise(
        self, A: Tensor, *, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype
    ) -> Tensor:
        out = self._numpy_dtype("dequantize_blockwise", dtype)
        return _tensor(_kernels.dequantize_blockwise(_array(A), _array(absmax), _array(code), blocksize, out))

    def quantize(self, A: Tensor, *, code: Tensor) -> tuple[Tensor, Tensor]:
        # Whole-tensor quantization is blockwise quantization with one block (absmax 0 if empty).
        codes, absmax = self.quantize_blockwise(A, code=code, blocksize=max(A.numel(), 1))
        return codes, absmax if absmax.numel() else absmax.new_zeros(1)

    def dequantize(self, A: Tensor, *, absmax: Tensor, code: Tensor, dtype: torch.dtype) -> Tensor:
        return self.dequantize_blockwise(A, absmax=absmax, code=code, blocksize=max(A.numel(), 1), dtype=dtype)

    def quantize_no_absmax(self, A: Tensor, *, code: Tensor) -> Tensor:
        values = _array(A).astype(np.float32)
        return _tensor(_kernels.nearest_code_index(values, _array(code)).astype(np.uint8))

    def dequantize_no_absmax(self, A: Tensor, *, code: Tensor, dtype: torch.dtype) -> Tensor:
        out = self._numpy_dtype("dequantize_no_absmax", dtype)
        return _tensor(_array(code).astype(np.float32)[_array(A)].astype(out))

    def histogram_scatter_add_2d(self, histogram: Tensor, *, index1: Tensor, index2: Tensor, source: Tensor) -> None:
        # .numpy() shares memory with the tensor, so the update lands in `histogram`.
        _kernels.scatter_add_2d(_array(histogram), _array(index1), _array(index2), _array(source))

    def quantize_4bit(
        self, A: Tensor, *, blocksize: int, quant_type: str, quant_storage: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        itemsize = torch.empty((), dtype=quant_storage).element_size()
        packed, absmax = _kernels.quantize_4bit(_array(A), _table(quant_type), blocksize, itemsize)
        # (rows, itemsize) bytes viewed as the storage dtype are its (rows, 1) elements: a
        # reinterpretation, no arithmetic (and it keeps the strides right when rows is 0).
        return _tensor(packed.reshape(-1, itemsize)).view(quant_storage), _tensor(absmax)

    def dequantize_4bit(
        self,
        A: Tensor,
        *,
        absmax: Tensor,
        blocksize: int,
        quant_type: str,
        shape: Sequence[int],
        dtype: torch.dtype,
    ) -> Tensor:
        out = self._numpy_dtype("dequantize_4bit", dtype)
        packed = _array(A.reshape(-1).view(torch.uint8))  # the bytes, whatever the storage dtype
        values = _kernels.dequantize_4bit(packed, _array(absmax), _table(quant_type), blocksize, tuple(shape), out)
        return _tensor(values)
