"""Finding and opening the native library, and describing it (ctypes, no compilation here).

The library is a plain C ABI (``csrc/kbit_cpu.h``) opened with :mod:`ctypes`; every
function is declared here once with its argument types. Loading checks what the backend
needs to run safely and says why when it cannot:

- the library was built (a wheel built without a C compiler has none: the build left a
  note with the compiler's error next to the package);
- it opens and speaks the ABI version this package was written for;
- the process holds one OpenMP runtime. torch's CPU wheels load ``libgomp.so.1`` before
  this library is opened, and the dynamic loader binds the library's ``libgomp.so.1`` to
  that copy, so kbit-cpu and torch share one runtime and one thread pool. If a second
  runtime is nonetheless mapped (a torch built against another OpenMP), two thread pools
  would compete for the cores; the kernels then run on one thread and
  :attr:`NativeLibrary.thread_note` says why.

``KBIT_CPU_ISA`` (``avx512bf16``, ``avx512vbmi``, ``avx512``, ``avx2`` or ``portable``) forces an
instruction set the CPU
supports; by default the best one is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
from ctypes import POINTER, c_char_p, c_float, c_int, c_int32, c_int64, c_size_t, c_void_p
from pathlib import Path
from typing import Iterator, Optional

__all__ = ["ABI_VERSION", "LibraryUnavailable", "NativeLibrary", "OptimizerStep", "OptimizerTensors", "load"]

#: The C ABI version (``KB_ABI_VERSION`` in csrc/kbit_cpu.h) this package calls.
ABI_VERSION = 3
#: Instruction sets whose 4-bit matmul multiplies bfloat16 values with the dot-product instruction.
BF16_DOT_ISAS = ("avx512bf16",)
#: The environment variable that forces an instruction set.
ISA_VARIABLE = "KBIT_CPU_ISA"

_PACKAGE_DIR = Path(__file__).resolve().parent
_LIBRARY_NAMES = ("libkbit_cpu.so", "libkbit_cpu.dylib", "libkbit_cpu.dll")
_BUILD_REPORT = "_native_build.json"
_OPENMP_RUNTIME = re.compile(r"lib(gomp|omp|iomp5|intel-openmp)[^/]*\.(so|dylib)")


class LibraryUnavailable(Exception):
    """The native library cannot be used here; the message says why."""


class OptimizerStep(ctypes.Structure):
    """``kb_optimizer_step``: the scalars of one optimizer step (see csrc/kbit_cpu.h)."""

    _fields_ = [
        ("kind", c_int32),
        ("layout", c_int32),
        ("dtype", c_int32),
        ("first_step", c_int32),
        ("decoupled_decay", c_int32),
        ("skip_zeros", c_int32),
        ("has_weight_decay", c_int32),
        ("has_gnorm_scale", c_int32),
        ("clip", c_int32),
        ("use_update_scale", c_int32),
        ("beta1", c_float),
        ("beta2", c_float),
        ("beta3", c_float),
        ("alpha", c_float),
        ("eps", c_float),
        ("weight_decay", c_float),
        ("gnorm_scale", c_float),
        ("one_minus_beta1", c_float),
        ("one_minus_beta2", c_float),
        ("one_minus_beta3", c_float),
        ("decay", c_float),
        ("step_size", c_float),
        ("neg_lr", c_float),
        ("update_factor", c_float),
        ("eps_scaled", c_float),
        ("inv_c1", c_float),
        ("c2", c_float),
        ("max_unorm", c_float),
        ("update_scale", c_float),
    ]


class OptimizerTensors(ctypes.Structure):
    """``kb_optimizer_tensors``: the data pointers of one optimizer step."""

    _fields_ = [
        ("p", c_void_p),
        ("g", c_void_p),
        ("state1", c_void_p),
        ("state2", c_void_p),
        ("qmap1", c_void_p),
        ("qmap2", c_void_p),
        ("cb1", c_void_p),
        ("cb2", c_void_p),
        ("absmax1", c_void_p),
        ("absmax2", c_void_p),
        ("max1", c_float),
        ("max2", c_float),
        ("new_max1", c_float),
        ("new_max2", c_float),
        ("n", c_int64),
    ]


# name: (restype, argtypes). ``c_void_p`` arguments take tensor.data_ptr() integers.
_SIGNATURES = {
    "kb_abi_version": (c_int, []),
    "kb_isa": (c_char_p, []),
    "kb_supported_isas": (c_char_p, []),
    "kb_set_isa": (c_int, [c_char_p]),
    "kb_openmp": (c_char_p, []),
    "kb_codebook_size": (c_size_t, []),
    "kb_codebook_init": (c_int, [c_void_p, c_void_p, c_int]),
    "kb_codebook_steps": (c_int, [c_void_p]),
    "kb_codebook_compact_size": (c_int, [c_void_p]),
    "kb_codebook_drop_compact": (None, [c_void_p]),
    "kb_quantize_blockwise": (None, [c_void_p, c_int, c_int64, c_int64, c_void_p, c_void_p, c_void_p, c_int]),
    "kb_quantize_blockwise_stochastic": (
        None,
        [c_void_p, c_int, c_int64, c_int64, c_void_p, c_void_p, c_int64, c_void_p, c_void_p, c_int],
    ),
    "kb_dequantize_blockwise": (None, [c_void_p, c_int64, c_int64, c_void_p, c_void_p, c_void_p, c_int, c_int]),
    "kb_quantize_tensor": (None, [c_void_p, c_int, c_int64, c_void_p, c_void_p, c_void_p, c_int]),
    "kb_quantize_no_absmax": (None, [c_void_p, c_int, c_int64, c_void_p, c_void_p, c_int]),
    "kb_quantize_4bit": (None, [c_void_p, c_int, c_int64, c_int64, c_void_p, c_void_p, c_void_p, c_int64, c_int]),
    "kb_dequantize_4bit": (None, [c_void_p, c_int64, c_int64, c_void_p, c_void_p, c_void_p, c_int, c_int]),
    "kb_matmul_4bit": (
        c_int,
        [c_void_p, c_int, c_int64, c_int64, c_void_p, c_void_p, c_int64, c_void_p, c_int64, c_void_p, c_void_p, c_int,
         c_int],
    ),
    "kb_int8_vectorwise_quant": (
        c_int64,
        [c_void_p, c_int, c_int64, c_int64, c_float, c_void_p, c_void_p, c_void_p, c_int],
    ),
    "kb_int8_vectorwise_dequant": (None, [c_void_p, c_int64, c_int64, c_void_p, c_void_p, c_int]),
    "kb_int8_mm_dequant": (
        None,
        [c_void_p, c_int64, c_int64, c_void_p, c_void_p, c_void_p, c_int, c_void_p, c_int, c_int],
    ),
    "kb_optimizer_update": (c_int, [POINTER(OptimizerStep), POINTER(OptimizerTensors), POINTER(c_float), c_int]),
}


def _find_library() -> Path:
    for name in _LIBRARY_NAMES:
        candidate = _PACKAGE_DIR / name
        if candidate.is_file():
            return candidate
    report = _PACKAGE_DIR / _BUILD_REPORT
    if report.is_file():
        try:
            error = json.loads(report.read_text()).get("error")
        except (OSError, ValueError):
            error = None
        if error:
            raise LibraryUnavailable(f"native library not built when kbit-cpu was installed: {error}")
    raise LibraryUnavailable(f"native library not found in {_PACKAGE_DIR} (reinstall kbit-cpu with a C compiler)")


def _openmp_runtimes() -> Optional[set[str]]:
    """Distinct OpenMP runtime files mapped into this process (None where unknown)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if _OPENMP_RUNTIME.search(line)}
    except OSError:
        return None
    return {os.path.realpath(path) for path in paths}


class NativeLibrary:
    """The opened library: its declared functions as attributes, plus what it runs with."""

    def __init__(self, path: Path) -> None:
        try:
            self._dll = ctypes.CDLL(str(path))
        except OSError as exc:
            raise LibraryUnavailable(f"cannot open {path.name}: {exc}") from exc
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                function = getattr(self._dll, name)
            except AttributeError as exc:
                raise LibraryUnavailable(f"{path.name} lacks {name}: rebuild kbit-cpu") from exc
            function.restype, function.argtypes = restype, argtypes
            setattr(self, name, function)
        version = self.kb_abi_version()
        if version != ABI_VERSION:
            raise LibraryUnavailable(f"{path.name} speaks ABI {version}, this package needs {ABI_VERSION}: reinstall")
        self.path = path
        self.codebook_size = int(self.kb_codebook_size())
        forced = os.environ.get(ISA_VARIABLE, "").strip()
        if forced and self.kb_set_isa(forced.encode()) != 0:
            raise LibraryUnavailable(
                f"{ISA_VARIABLE}={forced!r} is not supported here (supported: {self.supported_isas})"
            )
        runtimes = _openmp_runtimes()
        #: Why the kernels run on one thread, or None when they may use torch's thread count.
        self.thread_note: Optional[str] = None
        if runtimes is not None and len(runtimes) > 1:
            self.thread_note = (
                f"{len(runtimes)} OpenMP runtimes are loaded ({', '.join(sorted(runtimes))}); "
                "kbit-cpu runs single-threaded so that two thread pools do not compete for the cores"
            )

    @property
    def isa(self) -> str:
        """The instruction set the kernels run with."""
        return self.kb_isa().decode()

    @property
    def bf16_dot(self) -> bool:
        """Whether the kernels in use have the bfloat16 dot product (AVX512_BF16)."""
        return self.isa in BF16_DOT_ISAS

    @property
    def supported_isas(self) -> str:
        """Instruction sets this CPU and build support, best first."""
        return self.kb_supported_isas().decode()

    @contextlib.contextmanager
    def use_isa(self, name: str) -> Iterator[None]:
        """Run the kernels with instruction set ``name`` inside the block (tests compare
        every path this CPU can run); raises ValueError when it cannot run here."""
        previous = self.isa
        if self.kb_set_isa(name.encode()) != 0:
            raise ValueError(f"instruction set {name!r} is not supported here (supported: {self.supported_isas})")
        try:
            yield
        finally:
            self.kb_set_isa(previous.encode())

    @property
    def openmp(self) -> str:
        """The OpenMP version the library was built with ("none": single-threaded build)."""
        return self.kb_openmp().decode()


_loaded: Optional[NativeLibrary] = None


def load() -> NativeLibrary:
    """The native library, opened once per process; raises :class:`LibraryUnavailable`."""
    global _loaded
    if _loaded is None:
        import torch  # noqa: F401  torch's OpenMP runtime must be loaded first (see above)

        _loaded = NativeLibrary(_find_library())
    return _loaded
