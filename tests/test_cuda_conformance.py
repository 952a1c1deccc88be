"""The conformance suite on the CUDA backend's kernels, run by the CPU emulator.

Exactly what ``KBIT_CUDA_EMULATE=1 kbit conformance cuda --device cpu`` runs: every op and
variant the cuda manifest declares, against the reference backend (about two minutes on
two cores, hence slow; CI runs it).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kbit.testing import BackendConformance
from kbit_cuda._manifest import build_manifest

from .cuda_support import require_emulator


@pytest.mark.slow
class TestEmulatedCudaConformance(BackendConformance):
    backend = "cuda"
    device = "cpu"
    manifest = build_manifest(emulate=True)

    @pytest.fixture(autouse=True)
    def _emulate(self, monkeypatch: pytest.MonkeyPatch) -> None:
        require_emulator()
        monkeypatch.setenv("KBIT_CUDA_EMULATE", "1")


def test_the_cli_runs_the_emulated_suite():
    require_emulator()
    env = {**os.environ, "KBIT_CUDA_EMULATE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "kbit", "conformance", "cuda", "--device", "cpu", "-k", "dequantize_no_absmax"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backend 'cuda' on cpu: CONFORMANT" in result.stdout
