"""The GPU launch path without a GPU: a stand-in for CuPy records what the launch layer
asks of it (compiled binary, architecture, stream, arguments)."""

from __future__ import annotations

import contextlib
import sys
import types

import numpy as np
import pytest
import torch

from kbit_cuda import _launch

from .cuda_support import require_nvrtc


class FakeCupy(types.ModuleType):
    """Just enough of CuPy's surface for ``GpuDevice``; records every call."""

    def __init__(self) -> None:
        super().__init__("cupy")
        self.modules: list[str] = []
        self.launches: list[tuple] = []
        self.streams: list[tuple] = []
        fake = self

        class RawModule:
            def __init__(self, path: str) -> None:
                fake.modules.append(path)

            def get_function(self, name: str):
                return lambda grid, block, args, shared_mem=0: fake.launches.append((name, grid, block, args))

        @contextlib.contextmanager
        def external_stream(handle, device):
            fake.streams.append((handle, device))
            yield

        self.RawModule = RawModule
        self.asarray = lambda tensor: ("cupy array", tensor.dtype, tensor.data_ptr())
        self.cuda = types.SimpleNamespace(Device=lambda index: contextlib.nullcontext(), ExternalStream=external_stream)


@pytest.fixture
def fake_gpu(monkeypatch):
    require_nvrtc()
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)

    def properties(index):
        return types.SimpleNamespace(major=fake.arch // 10, minor=fake.arch % 10, multi_processor_count=132)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: types.SimpleNamespace(cuda_stream=0xBEEF))
    return fake


@pytest.mark.parametrize("arch,suffix", [(90, ".cubin"), (130, ".ptx")])
def test_gpu_device_compiles_for_its_architecture_and_launches_on_torchs_stream(fake_gpu, arch, suffix):
    fake_gpu.arch = arch
    device = _launch.GpuDevice(0)
    assert device.max_blocks == 132 * 8
    x = torch.randn(8).to(torch.bfloat16).requires_grad_()  # a parameter, say
    with device.launching():
        device.kernel("int8.cu", "int8_dequantize_rows")((2,), (256,), (x, None, np.int64(8)))
    assert fake_gpu.modules[0].endswith(suffix)  # a GPU newer than NVRTC knows gets PTX
    assert fake_gpu.streams == [(0xBEEF, 0)]
    name, grid, block, args = fake_gpu.launches[0]
    assert (name, grid, block) == ("int8_dequantize_rows", (2,), (256,))
    # bfloat16 has no __cuda_array_interface__ type, and a tensor requiring grad none at
    # all: they travel detached, as the int16 view, at the same address.
    assert args[0] == ("cupy array", torch.int16, x.data_ptr())
    assert args[1] == np.uint64(0) and args[1].dtype == np.uint64  # None: a null pointer
    device.kernel("int8.cu", "int8_dequantize_rows")
    assert len(fake_gpu.modules) == 1  # compiled once per device and file
