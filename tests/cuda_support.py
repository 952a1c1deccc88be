"""Shared by the CUDA backend's tests: when the emulator and NVRTC can run here.

CI installs both (g++ is on the image, NVRTC and the CUDA headers come with the ``test``
extra), so there a missing tool fails the test instead of skipping it: a compile gate that
quietly skips is no gate.
"""

from __future__ import annotations

import os

import pytest

from kbit_cuda._compile import nvrtc_problem
from kbit_cuda.emulator import compiler_problem


def _require(problem: str | None) -> None:
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {problem}", pytrace=False)
    pytest.skip(problem)


def require_emulator() -> None:
    """Skip (fail on CI) unless a C++ compiler can build kernels for the emulator."""
    _require(compiler_problem())


def require_nvrtc() -> None:
    """Skip (fail on CI) unless NVRTC and the CUDA headers are installed."""
    _require(nvrtc_problem())


def gpu_problem() -> str | None:
    """Why the ``gpu`` tests cannot run here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import cupy
    except ImportError:
        return "needs CuPy (pip install 'kbit[cuda]')"
    if not cupy.is_available():
        return "CuPy sees no CUDA device"
    return nvrtc_problem()
