"""Build the native library of kbit-cpu: one shared object, kernels compiled per instruction set.

``csrc/kernels.c`` is compiled once per instruction set with that set's flags only
(``-mavx512f ... -mavx512vbmi -mavx512bf16`` where the compiler knows it, ``-mavx512f ...
-mavx512vbmi``, ``-mavx512f ...``, ``-mavx2 -mfma -mf16c``, and none for the portable build),
never with ``-march=native``; ``csrc/api.c`` picks the best one at run time. On CPUs other than
x86-64 (aarch64, ...) only the portable build exists; ``KBIT_CPU_PORTABLE_ONLY=1`` builds
only that one on x86-64 too (the path other architectures take, testable here). The
library is a plain C ABI called through ctypes, so the wheel is tagged
``py3-none-<platform>``: one wheel per platform serves every Python and torch version.

Numerics: ``-ffp-contract=off`` (no fused multiply-add where C writes a separate multiply and
add) and never ``-ffast-math``; the format contract depends on both.

A missing or failing C compiler does not fail the install: the package is installed
without the library and the backend reports itself unavailable with the compiler's error
(``kbit info``), so kbit's reference backend serves CPU calls. ``KBIT_CPU_REQUIRE_NATIVE=1``
turns that into a build error (CI uses it).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
PACKAGE = "kbit_cpu"
LIBRARY_STEM = "libkbit_cpu"
BUILD_REPORT = "_native_build.json"

COMMON_FLAGS = ["-O3", "-std=c11", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-fno-math-errno"]
# Kernel objects per instruction set: (name, extra flags). The first entries need x86-64.
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
X86_ISAS = [
    ("avx512vbmi", [*_AVX512, "-mavx512vbmi"]),
    ("avx512", _AVX512),
    ("avx2", ["-mavx2", "-mfma", "-mf16c"]),
]
# AVX-512 with VBMI plus the bfloat16 dot products (one tier: CPUs with BF16 and without VBMI,
# Cooper Lake only, take the avx512 kernels), built only where the compiler knows the flag (GCC 9+,
# Clang 9+); api.c then offers it first (-DKB_HAVE_AVX512BF16).
AVX512BF16 = ("avx512bf16", [*_AVX512, "-mavx512vbmi", "-mavx512bf16"])
PORTABLE = ("portable", [])


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _library_suffix() -> str:
    if os.name == "nt":
        return ".dll"
    return ".dylib" if platform.system() == "Darwin" else ".so"


class BuildNative(build_ext):
    """Compile csrc/ into kbit_cpu/libkbit_cpu.<so|dylib>; record why when it cannot."""

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")[:-1], LIBRARY_STEM + _library_suffix())

    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        report = target.parent / BUILD_REPORT
        try:
            isas, openmp = self._compile_and_link(target)
        except Exception as exc:  # no compiler, unsupported compiler, compile error
            if os.environ.get("KBIT_CPU_REQUIRE_NATIVE") == "1":
                raise
            message = f"{type(exc).__name__}: {exc}".strip()
            self.warn(f"kbit-cpu: native library not built ({message}); kbit's reference backend will serve CPU")
            report.write_text(json.dumps({"built": False, "error": message[-2000:]}))
            return
        report.write_text(json.dumps({"built": True, "isas": isas, "openmp": openmp}))

    def _compile_and_link(self, target: Path) -> tuple[list[str], bool]:
        compiler = self.compiler
        if getattr(compiler, "compiler_type", "") == "msvc":
            raise RuntimeError("MSVC is not supported; build with GCC or Clang")
        temp = Path(self.build_temp) / "kbit_cpu"
        openmp = self._supports(["-fopenmp"])
        x86 = _is_x86_64() and os.environ.get("KBIT_CPU_PORTABLE_ONLY") != "1"
        bf16 = x86 and self._supports(AVX512BF16[1])
        isas = ([AVX512BF16] if bf16 else []) + ([*X86_ISAS] if x86 else []) + [PORTABLE]
        objects: list[str] = []
        for name, flags in isas:
            objects += compiler.compile(
                [str(CSRC / "kernels.c")],
                output_dir=str(temp / name),
                macros=[("KB_ISA", name)],
                include_dirs=[str(CSRC)],
                extra_postargs=COMMON_FLAGS + flags,
            )
        shared = ["codebook.c", "api.c"]
        objects += compiler.compile(
            [str(CSRC / source) for source in shared],
            output_dir=str(temp / "shared"),
            include_dirs=[str(CSRC)],
            macros=([] if x86 else [("KB_PORTABLE_ONLY", "1")]) + ([("KB_HAVE_AVX512BF16", "1")] if bf16 else []),
            extra_postargs=COMMON_FLAGS + (["-fopenmp"] if openmp else []),
        )
        compiler.link_shared_object(
            objects,
            str(target),
            libraries=["m"] if os.name != "nt" else [],
            extra_postargs=["-fopenmp"] if openmp else [],
        )
        return [name for name, _ in isas], openmp

    def _supports(self, flags: list[str]) -> bool:
        """Whether the compiler accepts ``flags`` (compiles and links a tiny program)."""
        with tempfile.TemporaryDirectory() as scratch:
            source = Path(scratch) / "probe.c"
            source.write_text("int kb_probe(void) { return 0; }\n")
            try:
                objects = self.compiler.compile([str(source)], output_dir=scratch, extra_postargs=flags + ["-fPIC"])
                self.compiler.link_shared_object(objects, str(Path(scratch) / "probe.so"), extra_postargs=flags)
            except Exception:
                return False
        return True


class PlatformWheel(bdist_wheel):
    """Tag the wheel ``py3-none-<platform>``: the library does not use Python's C API."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self) -> tuple[str, str, str]:
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(
    ext_modules=[Extension(f"{PACKAGE}._native", sources=[str(p.relative_to(HERE)) for p in sorted(CSRC.glob("*.c"))])],
    cmdclass={"build_ext": BuildNative, "bdist_wheel": PlatformWheel},
)
