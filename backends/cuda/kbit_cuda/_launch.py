"""Launching kernels: one host code path for a real GPU (CuPy) and for the CPU emulator.

Every op of the CUDA backend is written once against :class:`Device`, whose one job is
``device.kernel(file, name)(grid, block, args, shared_mem=0)`` (the shape of a
``cupy.RawModule`` function), plus how many blocks a grid-stride kernel should start.
Two devices implement it:

- :class:`GpuDevice`: the kernel files compiled with NVRTC (``_compile``, the options the
  compile gate checks) for the GPU's architecture, loaded as ``cupy.RawModule`` s, lazily,
  once per device and file. Tensors stay torch tensors: they are handed to CuPy zero-copy
  through ``__cuda_array_interface__``, outputs are allocated by torch on the input's
  device (its caching allocator), and kernels run on torch's current stream.
- :class:`EmulatedDevice`: the same files built for the CPU emulator; CPU tensors are
  passed as host pointers. ``KBIT_CUDA_EMULATE=1`` makes the backend use it for CPU
  tensors.

CuPy is imported only by :class:`GpuDevice`, i.e. only when a CUDA tensor reaches the
backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from . import _compile

__all__ = [
    "Device",
    "GpuDevice",
    "EmulatedDevice",
    "device_for",
    "emulation_enabled",
    "EMULATE_VARIABLE",
    "grid_for",
    "i32",
    "i64",
    "f32",
    "vector_aligned",
]

#: Environment variable: "1" makes the CUDA backend serve CPU tensors through the emulator.
EMULATE_VARIABLE = "KBIT_CUDA_EMULATE"

Kernel = Callable[..., None]


def emulation_enabled() -> bool:
    """True when ``KBIT_CUDA_EMULATE=1``: CPU tensors run the kernels in the emulator."""
    return os.environ.get(EMULATE_VARIABLE, "").strip() == "1"


def grid_for(work_items: int, per_block: int, max_blocks: int) -> int:
    """Blocks for ``work_items`` items at ``per_block`` per block, at most ``max_blocks``
    (the kernels loop grid-stride over the rest), at least 1."""
    return max(1, min(-(-work_items // per_block), max_blocks))


class Device:
    """Where kernels run: a GPU through CuPy, or the CPU emulator."""

    #: Blocks a grid-stride kernel starts at most (enough to fill the device).
    max_blocks: int = 1

    def kernel(self, file: str, name: str) -> Kernel:
        """The kernel ``name`` of ``kernels/<file>``, called as ``k(grid, block, args, shared_mem=0)``."""
        raise NotImplementedError

    @contextlib.contextmanager
    def launching(self) -> Iterator[None]:
        """Context for a sequence of launches (the GPU: torch's current stream)."""
        yield


class EmulatedDevice(Device):
    """The kernels built for the CPU emulator (``kbit_cuda.emulator``), for CPU tensors."""

    # A few blocks, not thousands: every grid-stride loop still takes several turns, and
    # each emulated block costs a fiber per thread.
    max_blocks = 4

    def __init__(self) -> None:
        from .emulator import Settings

        self._modules: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.settings = Settings(schedule=os.environ.get("KBIT_CUDA_EMU_SCHEDULE", "forward"))

    def module(self, file: str) -> Any:
        """The emulated module of ``kernels/<file>``, built on first use."""
        with self._lock:
            module = self._modules.get(file)
            if module is None:
                from .emulator import EmulatedModule

                module = self._modules[file] = EmulatedModule(_compile.KERNEL_DIR / file)
            module.settings = self.settings
            return module

    def kernel(self, file: str, name: str) -> Kernel:
        return self.module(file).get_function(name)


class GpuDevice(Device):
    """The kernels compiled with NVRTC for one CUDA device and run through CuPy."""

    def __init__(self, index: int) -> None:
        import cupy  # only here: a CUDA tensor reached the backend

        self.index = index
        self._cupy = cupy
        self._modules: dict[str, Any] = {}
        self._lock = threading.Lock()
        properties = torch.cuda.get_device_properties(index)
        self.arch = properties.major * 10 + properties.minor
        # Four resident 256-thread blocks per SM, twice over: enough to hide latency.
        self.max_blocks = properties.multi_processor_count * 8

    def _binary(self, file: str) -> Path:
        supported = _compile.supported_architectures()
        ptx = self.arch not in supported
        # A GPU newer than this NVRTC gets PTX for the newest architecture it knows,
        # which the driver compiles.
        arch = max(a for a in supported if a <= self.arch) if ptx else self.arch
        compiled = _compile.compile_kernel_file(file, arch, ptx=ptx)
        digest = hashlib.sha256(compiled.binary).hexdigest()[:20]
        path = Path(tempfile.gettempdir()) / f"kbit-cuda-{Path(file).stem}-{arch}-{digest}.{'ptx' if ptx else 'cubin'}"
        if not path.exists():
            partial = path.with_suffix(path.suffix + f".{os.getpid()}")
            partial.write_bytes(compiled.binary)
            os.replace(partial, path)
        return path

    def module(self, file: str) -> Any:
        """The ``cupy.RawModule`` of ``kernels/<file>`` on this device, compiled on first use."""
        with self._lock:
            module = self._modules.get(file)
            if module is None:
                with self._cupy.cuda.Device(self.index):
                    module = self._modules[file] = self._cupy.RawModule(path=str(self._binary(file)))
            return module

    def kernel(self, file: str, name: str) -> Kernel:
        function = self.module(file).get_function(name)
        cupy = self._cupy

        def as_argument(value: Any) -> Any:
            if value is None:
                return np.uint64(0)  # a null pointer, passed by value
            if not isinstance(value, torch.Tensor):
                return value
            # Zero-copy through __cuda_array_interface__, which refuses tensors that
            # require grad (an optimizer's parameters: detach shares the memory) and has
            # no bfloat16 (the kernel only needs the address: the int16 view has it).
            tensor = value.detach()
            return cupy.asarray(tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor)

        def launch(grid: Sequence[int], block: Sequence[int], args: Sequence[Any], shared_mem: int = 0) -> None:
            function(tuple(grid), tuple(block), tuple(as_argument(a) for a in args), shared_mem=shared_mem)

        return launch

    @contextlib.contextmanager
    def launching(self) -> Iterator[None]:
        stream = torch.cuda.current_stream(self.index)
        with self._cupy.cuda.Device(self.index), self._cupy.cuda.ExternalStream(stream.cuda_stream, self.index):
            yield


_devices: dict[Any, Device] = {}
_devices_lock = threading.Lock()


def device_for(tensor: torch.Tensor) -> Device:
    """The device that runs kernels on ``tensor``'s memory (created once per device)."""
    if tensor.device.type == "cuda":
        key: Any = ("cuda", tensor.device.index if tensor.device.index is not None else torch.cuda.current_device())
    elif tensor.device.type == "cpu":
        key = "emulator"
    else:
        raise RuntimeError(f"the CUDA backend cannot run on {tensor.device}")
    with _devices_lock:
        device = _devices.get(key)
        if device is None:
            device = _devices[key] = EmulatedDevice() if key == "emulator" else GpuDevice(key[1])
        return device


def i64(value: int) -> np.int64:
    """A kernel's ``long long`` argument."""
    return np.int64(value)


def i32(value: int) -> np.int32:
    """A kernel's ``int`` argument."""
    return np.int32(value)


def f32(value: float) -> np.float32:
    """A kernel's ``float`` argument."""
    return np.float32(value)


def vector_aligned(tensor: Optional[torch.Tensor], elements: int = 4) -> int:
    """1 when ``tensor``'s data is aligned for loading ``elements`` of it at once (the
    kernels' vector loads), else 0 (they then load element by element)."""
    if tensor is None:
        return 1
    return int(tensor.data_ptr() % (elements * tensor.element_size()) == 0)
