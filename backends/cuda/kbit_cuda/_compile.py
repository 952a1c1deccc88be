"""Compiling the kernels with NVRTC: the one set of options, and ptxas' resource report.

The CUDA backend compiles every kernel file itself (NVRTC, through ctypes) and hands CuPy
the finished cubin, instead of letting ``cupy.RawModule`` compile the source: CuPy appends
``-ftz=true``, which flushes subnormal floats to zero and would break bit-exactness with
the reference backend. So the options below are exactly what runs on a GPU, and the
compile gate in the test suite (every file, sm_70 / sm_80 / sm_90, no warnings, no
spills) compiles with them too.

NVRTC is found through ``cuda.pathfinder`` (a CuPy dependency), the
``nvidia-cuda-nvrtc-cu12`` wheel, or the system library path; the CUDA headers
(``cuda_fp16.h``) through ``cuda.pathfinder`` or the ``nvidia-cuda-runtime-cu12`` wheel.
Nothing here needs a GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import importlib.util
import re
from pathlib import Path
from typing import Optional, Sequence

__all__ = [
    "KERNEL_DIR",
    "KERNEL_FILES",
    "NVRTC_OPTIONS",
    "CompileError",
    "Compiled",
    "ResourceUsage",
    "compile_kernel_file",
    "nvrtc_problem",
    "supported_architectures",
]

#: Where the kernel sources live (package data).
KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
#: The kernel files, one per op family.
KERNEL_FILES = ("blockwise8.cu", "quant4.cu", "int8.cu", "optimizer.cu")

#: Options of every compile (plus -arch and the include directories). IEEE float32 as the
#: reference computes it: no flush-to-zero, no fused multiply-add contraction, correctly
#: rounded division and square root.
NVRTC_OPTIONS = ("-std=c++17", "--fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-default-device")


class CompileError(RuntimeError):
    """NVRTC rejected a kernel file; the message carries NVRTC's log."""


@dataclasses.dataclass(frozen=True)
class ResourceUsage:
    """What ptxas reports for one kernel on one architecture."""

    kernel: str
    registers: int
    shared_bytes: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A compiled kernel file: the binary (cubin, or PTX for a ``compute_`` target), the
    NVRTC log, and ptxas' per-kernel resource usage (cubin only)."""

    binary: bytes
    log: str
    resources: dict[str, ResourceUsage]

    @property
    def warnings(self) -> list[str]:
        """Log lines that are warnings (the compile gate requires none)."""
        return [line for line in self.log.splitlines() if "warning" in line.lower()]


@functools.cache
def _nvrtc() -> ctypes.CDLL:
    path: Optional[str] = None
    try:
        from cuda import pathfinder  # installed with cupy-cuda12x

        path = pathfinder.load_nvidia_dynamic_lib("nvrtc").abs_path
    except Exception:  # not installed, or no NVRTC where it looks
        spec = importlib.util.find_spec("nvidia.cuda_nvrtc")
        if spec is not None and spec.submodule_search_locations:
            found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("lib/libnvrtc.so*"))
            path = str(found[0]) if found else None
        path = path or ctypes.util.find_library("nvrtc")
    if path is None:
        raise CompileError("NVRTC not found: pip install nvidia-cuda-nvrtc-cu12 (or kbit[cuda])")
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


@functools.cache
def _header_dir() -> Optional[Path]:
    try:
        from cuda import pathfinder

        located = pathfinder.find_nvidia_header_directory("cudart")
        if located:
            return Path(located)
    except Exception:  # fall through to the wheel's own location
        pass
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is not None and spec.submodule_search_locations:
        include = Path(next(iter(spec.submodule_search_locations))) / "include"
        if (include / "cuda_fp16.h").is_file():
            return include
    return None


def nvrtc_problem() -> Optional[str]:
    """Why kernels cannot be compiled here, or None when NVRTC and the CUDA headers are found."""
    try:
        _nvrtc()
    except (CompileError, OSError) as exc:
        return str(exc)
    if _header_dir() is None:
        return "CUDA headers (cuda_fp16.h) not found: pip install nvidia-cuda-runtime-cu12 (or kbit[cuda])"
    return None


def _check(code: int, what: str) -> None:
    if code != 0:
        raise CompileError(f"{what}: {_nvrtc().nvrtcGetErrorString(code).decode()}")


@functools.cache
def supported_architectures() -> tuple[int, ...]:
    """Compute capabilities this NVRTC compiles for, e.g. ``(50, 52, ..., 90, 100, 120)``."""
    lib = _nvrtc()
    count = ctypes.c_int()
    _check(lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)), "nvrtcGetNumSupportedArchs")
    archs = (ctypes.c_int * count.value)()
    _check(lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
    return tuple(archs)


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def _parse_resources(log: str) -> dict[str, ResourceUsage]:
    """Per-kernel resource lines of ``ptxas -v`` (through ``-Xptxas=-v``)."""
    usage: dict[str, ResourceUsage] = {}
    kernel, frame = None, (0, 0, 0)
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            kernel, frame = match.group(1), (0, 0, 0)
        elif (match := _FRAME.search(line)) and kernel:
            frame = tuple(int(g) for g in match.groups())  # type: ignore[assignment]
        elif (match := _USED.search(line)) and kernel:
            smem = _SMEM.search(line)
            usage[kernel] = ResourceUsage(kernel, int(match.group(1)), int(smem.group(1)) if smem else 0, *frame)
            kernel = None
    return usage


def compile_kernel_file(name: str, arch: int, *, ptx: bool = False, extra_options: Sequence[str] = ()) -> Compiled:
    """Compile ``kernels/<name>`` for compute capability ``arch`` (e.g. 80).

    A cubin (``-arch=sm_80``) by default, with ptxas' resource report and spill warnings
    in the log; PTX (``-arch=compute_80``) with ``ptx=True``, for a GPU newer than this
    NVRTC knows, which the driver then compiles itself.
    """
    lib = _nvrtc()
    headers = _header_dir()
    if headers is None:
        raise CompileError(nvrtc_problem() or "CUDA headers not found")
    source = (KERNEL_DIR / name).read_bytes()
    target = f"-arch=compute_{arch}" if ptx else f"-arch=sm_{arch}"
    options = [*NVRTC_OPTIONS, target, f"-I{KERNEL_DIR}", f"-I{headers}", *extra_options]
    if not ptx:
        options += ["-Xptxas=-v", "-Xptxas=--warn-on-spills"]
    program = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(program), source, name.encode(), 0, None, None), "nvrtcCreateProgram")
    try:
        encoded = [option.encode() for option in options]
        argv = (ctypes.c_char_p * len(encoded))(*encoded)
        status = lib.nvrtcCompileProgram(program, len(encoded), argv)
        size = ctypes.c_size_t()
        _check(lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        buffer = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetProgramLog(program, buffer), "nvrtcGetProgramLog")
        log = buffer.value.decode(errors="replace")
        if status != 0:
            raise CompileError(f"NVRTC failed on {name} for {target}:\n{log}")
        getter_size, getter = ("nvrtcGetPTXSize", "nvrtcGetPTX") if ptx else ("nvrtcGetCUBINSize", "nvrtcGetCUBIN")
        _check(getattr(lib, getter_size)(program, ctypes.byref(size)), getter_size)
        binary = ctypes.create_string_buffer(size.value)
        _check(getattr(lib, getter)(program, binary), getter)
        return Compiled(binary.raw, log, {} if ptx else _parse_resources(log))
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def _print_resources(archs: Sequence[int]) -> None:
    """``python -m kbit_cuda._compile [ARCH ...]``: ptxas' resource usage of every kernel."""
    print(f"{'kernel':40s} {'arch':>5s} {'regs':>5s} {'smem B':>7s} {'stack B':>8s} {'spill B':>8s}")
    for arch in archs:
        for name in KERNEL_FILES:
            for usage in sorted(compile_kernel_file(name, arch).resources.values(), key=lambda u: u.kernel):
                spill = usage.spill_store_bytes + usage.spill_load_bytes
                print(f"{usage.kernel:40s} {'sm_' + str(arch):>5s} {usage.registers:5d} {usage.shared_bytes:7d} "
                      f"{usage.stack_bytes:8d} {spill:8d}")  # fmt: skip


if __name__ == "__main__":
    import sys

    _print_resources([int(a) for a in sys.argv[1:]] or [80, 90])
