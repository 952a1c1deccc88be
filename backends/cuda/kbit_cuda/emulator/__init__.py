"""Run kbit's CUDA kernels on the CPU: a ``cupy.RawModule`` look-alike over g++ and fibers.

No machine kbit is developed or tested on has a GPU, and nothing installable runs CUDA C++
on a CPU, so the CUDA backend's kernels are executed here instead: each ``.cu`` file is
compiled with g++ under ``cuda_emu.h`` (the CUDA built-ins, barriers, warp shuffles and
votes, atomics and half types, emulated with one fiber per CUDA thread) into a shared
library, loaded with ctypes, and launched the way CuPy launches a ``RawKernel``::

    module = EmulatedModule(Path("kernels/quant8.cu"))
    module.get_function("dequantize_blockwise_f32")((blocks,), (256,), (codes, table, absmax, out, np.int64(n)))

Tensors are CPU ``torch.Tensor`` s or NumPy arrays (a device pointer is a host pointer
here); scalars must be NumPy scalars of the parameter's exact type, which is checked
against the kernel's real C++ signature (CuPy on a GPU would silently pass wrong bytes).

It ships with the package because ``KBIT_CUDA_EMULATE=1`` serves CPU tensors through it
(``kbit conformance cuda --device cpu``); it is loaded only then, and needs only a C++17
compiler (``$CXX``, default ``g++``). What emulation proves and what it cannot:
``docs/cuda-backend.md``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["EmulatedModule", "EmulatedKernel", "EmulatorError", "Settings", "SCHEDULES", "compiler_problem"]

_HERE = Path(__file__).resolve().parent
_HEADER = _HERE / "cuda_emu.h"
_STUB_INCLUDE = _HERE / "include"

#: Orders in which the fibers of a block run between synchronisation points.
SCHEDULES = ("forward", "reverse", "random")

# No fast-math, no contraction of a*b+c into an FMA: every float operation rounds once,
# as the kernels do on the GPU (compiled with --fmad=false).
_FLAGS = (
    "-std=c++17", "-O2", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing", "-ffp-contract=off",
    "-fno-fast-math", "-fvisibility=hidden", "-Wno-unknown-pragmas",
)  # fmt: skip

# An extern "C" kernel in the preprocessed source, where cuda_emu.h turned __global__
# into a marker (KBIT_EMU_SCAN) and __launch_bounds__ into nothing: kernels made by
# macros are found too.
_KERNEL = re.compile(r'extern\s+"C"\s+kbit_emu_kernel_marker\s+void\s+(\w+)\s*\(')


class EmulatorError(RuntimeError):
    """A kernel broke CUDA's rules (a divergent barrier, a bad warp mask, a deadlock), an
    argument did not match the kernel's signature, or the emulator could not be built."""


def compiler_problem() -> str | None:
    """Why kernels cannot be built here (no C++ compiler), or None when they can."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler {compiler!r} on PATH (the CUDA emulator builds kernels with it; set CXX)"
    return None


@dataclasses.dataclass(frozen=True)
class Settings:
    """How an emulated launch runs.

    ``schedule``: order of a block's threads between synchronisation points (see
    :data:`SCHEDULES`); ``seed`` seeds the random one. ``os_threads``: OS threads running
    blocks in parallel. ``stack_kb``: stack per CUDA thread (a guard page turns an overflow
    into SIGSEGV). ``strict``: report undefined behaviour instead of running it the way
    hardware might.
    """

    schedule: str = "forward"
    seed: int = 1
    os_threads: int = 1
    stack_kb: int = 64
    strict: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


def _cache_dir() -> Path:
    explicit = os.environ.get("KBIT_CUDA_EMU_CACHE")
    path = Path(explicit) if explicit else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kbit-cuda-emu"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compiler_version(compiler: str) -> str:
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True)
    return result.stdout.splitlines()[0] if result.stdout else compiler


def _build(source: Path, include_dirs: Sequence[Path], defines: Sequence[str]) -> Path:
    """Compile ``source`` under the emulation header into a cached shared library."""
    problem = compiler_problem()
    if problem:
        raise EmulatorError(problem)
    compiler = os.environ.get("CXX", "g++")
    # Everything the build reads goes into the key: the header, every file next to the
    # kernel (its includes), the flags and the compiler.
    inputs = sorted({_HEADER, source, *source.parent.glob("*.cu"), *source.parent.glob("*.cuh")})
    digest = hashlib.sha256()
    for path in inputs:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    flags = [*_FLAGS, *(f"-D{d}" for d in defines)]
    sanitize = os.environ.get("KBIT_CUDA_EMU_SANITIZE")  # e.g. "address"; needs libasan preloaded
    if sanitize:
        flags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
    digest.update("\0".join([*flags, *map(str, include_dirs), _compiler_version(compiler)]).encode())
    cache = _cache_dir()
    library = cache / f"{source.stem}-{digest.hexdigest()[:20]}.so"
    if library.exists():
        return library
    includes = [f"-I{d}" for d in (_HERE, _STUB_INCLUDE, source.parent, *include_dirs)]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        unit = Path(tmp) / "unit.cpp"
        unit.write_text(f'#include "cuda_emu.h"\n#include "{source}"\n')
        scan = subprocess.run([compiler, "-E", "-P", "-DKBIT_EMU_SCAN", *flags, *includes, str(unit)],
                              capture_output=True, text=True)  # fmt: skip
        names = _KERNEL.findall(scan.stdout) if scan.returncode == 0 else []
        if scan.returncode or not names:
            raise EmulatorError(f"{source.name}: no extern \"C\" __global__ kernel found\n{scan.stderr}")
        unit.write_text(unit.read_text() + "".join(f"KBIT_EMU_REGISTER({name})\n" for name in names))
        output = Path(tmp) / "unit.so"
        command = [compiler, *flags, *includes, str(unit), "-o", str(output)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise EmulatorError(f"building {source.name} for the emulator failed:\n{' '.join(command)}\n{result.stderr}")
        os.replace(output, library)  # atomic: concurrent builders agree on the result
    return library


class EmulatedModule:
    """The kernels of one ``.cu`` file, built for the CPU; mirrors ``cupy.RawModule``.

    ``get_function(name)`` returns a launchable :class:`EmulatedKernel`. ``settings`` (a
    :class:`Settings`) applies to every launch of this module's kernels.
    """

    def __init__(self, source: Path, *, include_dirs: Sequence[Path] = (), defines: Sequence[str] = (),
                 settings: Settings = Settings()) -> None:  # fmt: skip
        self.source = Path(source).resolve()
        self._library = ctypes.CDLL(str(_build(self.source, include_dirs, defines)))
        lib = self._library
        lib.kbit_emu_kernel_name.restype = ctypes.c_char_p
        lib.kbit_emu_kernel_signature.restype = ctypes.c_char_p
        lib.kbit_emu_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint, ctypes.c_ulonglong, ctypes.c_int]
        lib.kbit_emu_launch.argtypes = [ctypes.c_int, *[ctypes.c_uint] * 6, ctypes.c_ulonglong,
                                        ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_ulonglong]  # fmt: skip
        self._kernels: dict[str, EmulatedKernel] = {}
        for index in range(lib.kbit_emu_kernel_count()):
            name = lib.kbit_emu_kernel_name(index).decode()
            codes = [code for code in lib.kbit_emu_kernel_signature(index).decode().split(",") if code]
            self._kernels[name] = EmulatedKernel(self, index, name, [(code[0], int(code[1:])) for code in codes])
        # The emulator's configuration is global to the library: launches are serialised.
        self._lock = threading.Lock()
        self.settings = settings

    @property
    def kernel_names(self) -> list[str]:
        """Names of the kernels this module holds, sorted."""
        return sorted(self._kernels)

    def get_function(self, name: str) -> "EmulatedKernel":
        """The kernel called ``name`` (``KeyError`` naming the known ones otherwise)."""
        try:
            return self._kernels[name]
        except KeyError:
            raise KeyError(f"{self.source.name} has no kernel {name!r} (it has {self.kernel_names})") from None


_SCALAR_KINDS = {"f": "f", "i": "iu", "u": "iu", "b": "b"}


class EmulatedKernel:
    """One kernel; call it like a ``cupy.RawKernel``: ``kernel(grid, block, args, shared_mem=0)``."""

    def __init__(self, module: EmulatedModule, index: int, name: str, params: list[tuple[str, int]]) -> None:
        self.module, self.index, self.name, self.params = module, index, name, params

    def _pack(self, position: int, value: Any, kind: str, size: int, keep: list) -> Any:
        where = f"{self.name}: argument {position}"
        if kind in "pc":
            if value is None:
                return ctypes.c_void_p(0)
            pointer = _data_pointer(value, where, writable=kind == "p")
            keep.append(value)
            return ctypes.c_void_p(pointer)
        if not isinstance(value, np.generic):
            raise EmulatorError(
                f"{where}: pass a NumPy scalar of the parameter's type ({kind}{size}), not {type(value).__name__}"
            )
        if kind == "s":
            if value.dtype.itemsize != size:
                raise EmulatorError(f"{where}: the parameter is a {size}-byte struct, got {value.dtype.itemsize} bytes")
        elif value.dtype.itemsize != size or value.dtype.kind not in _SCALAR_KINDS[kind]:
            raise EmulatorError(f"{where}: the parameter is {kind}{size}, got {value.dtype}")
        return ctypes.create_string_buffer(value.tobytes(), size)

    def __call__(self, grid: Any, block: Any, args: Sequence[Any], *, shared_mem: int = 0) -> None:
        grid = (grid,) if isinstance(grid, int) else tuple(grid)
        block = (block,) if isinstance(block, int) else tuple(block)
        grid, block = (grid + (1, 1))[:3], (block + (1, 1))[:3]
        if len(args) != len(self.params):
            raise EmulatorError(f"{self.name}: takes {len(self.params)} arguments, got {len(args)}")
        keep: list = []
        buffers = [self._pack(i, a, k, s, keep) for i, (a, (k, s)) in enumerate(zip(args, self.params))]
        argv = (ctypes.c_void_p * max(1, len(buffers)))(*[ctypes.addressof(b) for b in buffers])
        error = ctypes.create_string_buffer(2048)
        module = self.module
        settings = module.settings
        with module._lock:
            module._library.kbit_emu_configure(settings.os_threads, SCHEDULES.index(settings.schedule),
                                               settings.seed, settings.stack_kb * 1024, int(settings.strict))  # fmt: skip
            failed = module._library.kbit_emu_launch(self.index, *map(int, grid), *map(int, block), int(shared_mem),
                                                     argv, error, len(error))  # fmt: skip
        if failed:
            raise EmulatorError(f"{self.name}: {error.value.decode(errors='replace')}")


def _data_pointer(value: Any, where: str, writable: bool) -> int:
    """The host address of a CPU tensor or NumPy array passed for a pointer parameter."""
    if isinstance(value, np.ndarray):
        if writable and not value.flags.writeable:
            raise EmulatorError(f"{where}: a read-only array passed for a non-const pointer")
        if not value.flags.c_contiguous:
            raise EmulatorError(f"{where}: the array is not contiguous")
        return value.ctypes.data
    data_ptr = getattr(value, "data_ptr", None)
    if data_ptr is not None:  # a torch.Tensor (not imported here: the emulator does not need torch)
        if value.device.type != "cpu":
            raise EmulatorError(f"{where}: a tensor on {value.device} (the emulator runs on CPU memory)")
        if not value.is_contiguous():
            raise EmulatorError(f"{where}: the tensor is not contiguous")
        return data_ptr()
    raise EmulatorError(f"{where}: expected a CPU tensor or NumPy array for a pointer, got {type(value).__name__}")
