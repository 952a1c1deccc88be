"""The compile gate: every kernel file compiles with NVRTC (the compiler users run, from
the pip wheels) for sm_70, sm_80 and sm_90 with no warnings, and ptxas spills no
registers on sm_80 and sm_90. No GPU needed.

The files are compiled once per architecture, two at a time, with the options the GPU
path uses (``kbit_cuda._compile.NVRTC_OPTIONS``), so what passes here is what runs.
"""

from __future__ import annotations

import concurrent.futures
import functools

import pytest

from kbit_cuda._compile import KERNEL_DIR, KERNEL_FILES, CompileError, Compiled, compile_kernel_file
from kbit_cuda.emulator import EmulatedModule

from .cuda_support import require_emulator, require_nvrtc

ARCHITECTURES = (70, 80, 90)
SPILL_CHECKED = (80, 90)

# NVRTC 12.x announces that it will drop sm_70 one day; that notice is about the target,
# not about the code, and it is the only warning the gate lets through (for sm_70 only).
_SM70_NOTICE = "Architectures prior to '<compute/sm>_75' are deprecated"


@functools.cache
def _compiled_all() -> dict[tuple[str, int], Compiled | CompileError]:
    jobs = [(name, arch) for arch in ARCHITECTURES for name in KERNEL_FILES]

    def compile_one(job: tuple[str, int]) -> Compiled | CompileError:
        try:
            return compile_kernel_file(*job)
        except CompileError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(jobs, pool.map(compile_one, jobs)))


def compiled(name: str, arch: int) -> Compiled:
    require_nvrtc()
    result = _compiled_all()[(name, arch)]
    if isinstance(result, CompileError):
        pytest.fail(str(result), pytrace=False)
    return result


def test_every_kernel_file_is_in_the_gate():
    assert sorted(path.name for path in KERNEL_DIR.glob("*.cu")) == sorted(KERNEL_FILES)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("name", KERNEL_FILES)
def test_compiles_without_warnings(name, arch):
    result = compiled(name, arch)
    assert result.binary[:4] == b"\x7fELF", "not a cubin"
    warnings = [w for w in result.warnings if not (arch == 70 and _SM70_NOTICE in w)]
    assert not warnings, "\n".join(warnings)


@pytest.mark.slow
@pytest.mark.parametrize("arch", SPILL_CHECKED, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("name", KERNEL_FILES)
def test_no_register_spills(name, arch):
    result = compiled(name, arch)
    assert result.resources, f"ptxas reported no kernels for {name}:\n{result.log}"
    spilling = {
        kernel: (usage.spill_store_bytes, usage.spill_load_bytes)
        for kernel, usage in result.resources.items()
        if usage.spill_store_bytes or usage.spill_load_bytes
    }
    assert not spilling, f"register spills (store, load bytes) on sm_{arch}: {spilling}"


@pytest.mark.slow
@pytest.mark.parametrize("name", KERNEL_FILES)
def test_the_gpu_and_the_emulator_build_the_same_kernels(name):
    """The emulator finds exactly the kernels ptxas compiled: one source, two builds."""
    require_emulator()
    assert sorted(compiled(name, 80).resources) == EmulatedModule(KERNEL_DIR / name).kernel_names


def test_nvrtc_errors_carry_the_log(tmp_path, monkeypatch):
    require_nvrtc()
    import kbit_cuda._compile as compile_module

    (tmp_path / "broken.cu").write_text('extern "C" __global__ void k(float* y) {\n  y[0] = nope;\n}\n')
    monkeypatch.setattr(compile_module, "KERNEL_DIR", tmp_path)
    with pytest.raises(CompileError, match=r'broken\.cu\(2\): error: identifier "nope" is undefined'):
        compile_kernel_file("broken.cu", 80)


def test_ptx_for_a_newer_gpu_than_nvrtc_knows():
    require_nvrtc()
    ptx = compile_kernel_file("int8.cu", 90, ptx=True)
    assert b".target sm_90" in ptx.binary and not ptx.resources
