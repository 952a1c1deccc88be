"""The CUDA backend class: one mixin per op family, kernels launched through ``_launch``."""

from __future__ import annotations

import importlib.util

import torch

from kbit.backend import Backend

from ._blockwise8 import Blockwise8Kernels
from ._int8 import Int8Kernels
from ._launch import EMULATE_VARIABLE, emulation_enabled
from ._optim import OptimizerKernels
from ._quant4 import Quant4Kernels


class CudaBackend(Blockwise8Kernels, Quant4Kernels, Int8Kernels, OptimizerKernels, Backend):
    """CuPy RawKernels for tensors on CUDA devices (and, with ``KBIT_CUDA_EMULATE=1``, the
    same kernels run by the CPU emulator for CPU tensors)."""

    def is_available(self) -> bool | str:
        if emulation_enabled():
            from .emulator import compiler_problem

            problem = compiler_problem()
            return f"{EMULATE_VARIABLE}=1 but {problem}" if problem else True
        # Checked cheapest first; CuPy is imported only when it is installed at all.
        if importlib.util.find_spec("cupy") is None:
            return "cupy is not installed (pip install 'kbit[cuda]')"
        if not torch.cuda.is_available():
            return "no CUDA device: torch.cuda.is_available() is False"
        import cupy

        if not cupy.is_available():
            return "no CUDA device visible to CuPy (cupy.is_available() is False)"
        from ._compile import nvrtc_problem

        problem = nvrtc_problem()
        return problem if problem else True
