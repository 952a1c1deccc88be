"""The CUDA backend class."""

from __future__ import annotations

import importlib.util

import torch

from kbit.backend import Backend


class CudaBackend(Backend):
    """CuPy RawKernel implementation for tensors on CUDA devices."""

    def is_available(self) -> bool | str:
        # Checked cheapest first; CuPy is imported only when it is installed at all.
        if importlib.util.find_spec("cupy") is None:
            return "cupy is not installed (pip install 'kbit[cuda]')"
        if not torch.cuda.is_available():
            return "no CUDA device: torch.cuda.is_available() is False"
        import cupy

        if not cupy.is_available():
            return "no CUDA device visible to CuPy (cupy.is_available() is False)"
        return True
