"""The CUDA backend: unavailable with a reason on a machine without a GPU, and its kernels,
run by the CPU emulator (``KBIT_CUDA_EMULATE=1``), against the reference backend."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kbit
from kbit.backend import OPTIMIZER_KINDS, OptimizerStep
from kbit.functional._codebooks import create_dynamic_map, create_linear_map
from kbit_cuda import _launch
from kbit_cuda._manifest import MANIFEST, build_manifest
from kbit_cuda._optim import RULES
from kbit_cuda.backend import CudaBackend
from kbit_cuda.emulator import Settings
from kbit_reference.backend import ReferenceBackend

from .cuda_support import require_emulator

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def test_cuda_backend_reports_why_it_is_unavailable():
    record = {r.name: r for r in kbit.backends.list()}["cuda"]
    assert record.distribution == "kbit"
    if _launch.emulation_enabled():
        pytest.skip("KBIT_CUDA_EMULATE=1 is set for this run")
    assert record.device_types == ("cuda",)
    if not torch.cuda.is_available():
        assert record.state == "unavailable"
        assert record.reason.startswith(("cupy is not installed", "no CUDA device"))


def test_the_emulated_manifest_serves_cpu_and_declares_the_same_ops():
    emulated = build_manifest(emulate=True)
    assert emulated.device_types == ("cuda", "cpu")
    assert build_manifest(emulate=False).device_types == ("cuda",)
    assert dict(emulated.ops) == dict(MANIFEST.ops)


def test_every_optimizer_kind_has_a_kernel_rule():
    """The manifest declares every kind of the table: each needs its rule in the kernels."""
    assert set(RULES) == set(OPTIMIZER_KINDS)
    for op in ("optimizer_update_32bit", "optimizer_update_8bit", "optimizer_update_8bit_blockwise"):
        assert set(MANIFEST.ops[op].optimizers) <= set(RULES), op


def test_kbit_info_with_emulation_lists_cuda_for_cpu():
    require_emulator()
    env = {**os.environ, "KBIT_CUDA_EMULATE": "1"}
    out = subprocess.run([sys.executable, "-m", "kbit", "info"], capture_output=True, text=True, env=env, check=True).stdout
    line = next(line for line in out.splitlines() if line.split() and line.split()[0] == "cuda")
    assert "available" in line and "unavailable" not in line and "cpu" in line, out


def test_emulated_backend_serves_cpu_calls(monkeypatch):
    require_emulator()
    monkeypatch.setenv("KBIT_CUDA_EMULATE", "1")
    kbit.backends.register(build_manifest(emulate=True), replace=True)
    with kbit.backends.record_calls() as log:
        codes, state = kbit.functional.quantize_blockwise(torch.randn(300), blocksize=64)
    assert log.by_op()["quantize_blockwise"] == {"cuda": 1}
    assert codes.dtype == torch.uint8 and state.absmax.shape == (5,)


# --------------------------------------------------------------- kernels vs the reference
@pytest.fixture(params=["forward", "reverse", "random"])
def backend(request):
    """The CUDA backend on the emulator, under each thread schedule."""
    require_emulator()
    device = _launch.device_for(torch.empty(0))
    saved = device.settings
    device.settings = Settings(schedule=request.param, seed=3)
    yield CudaBackend()
    device.settings = saved


REFERENCE = ReferenceBackend()


@pytest.mark.parametrize("blocksize", [64, 1024, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_blockwise_is_bit_exact_under_every_schedule(backend, dtype, blocksize):
    A = torch.randn(2 * blocksize + 7, generator=torch.Generator().manual_seed(blocksize)).to(dtype)
    A[blocksize // 2] = float("nan")  # block 0 NaN, block 1 inf: they stay visibly poisoned
    A[blocksize + 1] = float("inf")
    code = create_dynamic_map()
    got = backend.quantize_blockwise(A, code=code, blocksize=blocksize)
    want = REFERENCE.quantize_blockwise(A, code=code, blocksize=blocksize)
    assert torch.equal(got[1].isnan(), want[1].isnan()) and torch.equal(got[1][1:], want[1][1:])
    assert torch.equal(got[0], want[0])
    back = backend.dequantize_blockwise(got[0], absmax=got[1], code=code, blocksize=blocksize, dtype=dtype)
    assert torch.equal(back.isnan(), REFERENCE.dequantize_blockwise(*want[:1], absmax=want[1], code=code,
                                                                    blocksize=blocksize, dtype=dtype).isnan())  # fmt: skip


def test_misaligned_input_takes_the_element_path():
    require_emulator()
    backend, code = CudaBackend(), create_linear_map()
    A = torch.randn(1 + 3 * 256)[1:]  # a view 4 bytes past an aligned address
    assert _launch.vector_aligned(A) == 0
    got = backend.quantize_blockwise(A, code=code, blocksize=256)
    want = REFERENCE.quantize_blockwise(A, code=code, blocksize=256)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_under_every_schedule(backend, quant_type):
    A = torch.randn(3 * 32 + 1, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    got = backend.quantize_4bit(A, blocksize=32, quant_type=quant_type, quant_storage=torch.uint8)
    want = REFERENCE.quantize_4bit(A, blocksize=32, quant_type=quant_type, quant_storage=torch.uint8)
    assert torch.equal(got[1], want[1])
    table = kbit.functional.get_4bit_type(quant_type)
    decode = lambda packed: table[torch.stack([packed.view(-1) // 16, packed.view(-1) % 16], 1).view(-1).long()]  # noqa: E731
    assert torch.equal(decode(got[0]), decode(want[0]))  # value-exact (FP4's two zeros are one value)


@pytest.mark.parametrize("K", [64, 256, 1032])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_4bit_fast_path(dtype, K):
    """K % 8 == 0: 4 packed bytes and 8 inputs per lane (conformance's shapes use the other path)."""
    require_emulator()
    backend = CudaBackend()
    generator = torch.Generator().manual_seed(K)
    W = torch.randn(9, K, generator=generator)
    packed, absmax = REFERENCE.quantize_4bit(W, blocksize=64, quant_type="nf4", quant_storage=torch.uint8)
    x = (torch.randn(1, K, generator=generator) / K**0.5).to(dtype)
    got = backend.gemv_4bit(x, packed, shape=[9, K], absmax=absmax, blocksize=64, quant_type="nf4")
    want = REFERENCE.gemv_4bit(x, packed, shape=[9, K], absmax=absmax, blocksize=64, quant_type="nf4")
    assert torch.allclose(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)


def test_int8_and_optimizer_kernels_under_every_schedule(backend):
    A = torch.randn(12, 40, generator=torch.Generator().manual_seed(5))
    A[3, 7] = 9.0
    for got, want in zip(backend.int8_double_quant(A, threshold=6.0), REFERENCE.int8_double_quant(A, threshold=6.0)):
        assert torch.equal(got, want)
    p, g = torch.randn(600), torch.randn(600)
    states = {}
    for name, impl in (("cuda", backend), ("reference", REFERENCE)):
        p_i, s1 = p.clone(), torch.zeros(600, dtype=torch.uint8)
        s2, a1, a2 = torch.zeros(600, dtype=torch.uint8), torch.zeros(3), torch.zeros(3)
        step = OptimizerStep(OPTIMIZER_KINDS["adam"], 1, 1e-2, beta1=0.9, beta2=0.99, eps=1e-8)
        impl.optimizer_update_8bit_blockwise(step, g, p_i, s1, s2, qmap1=create_dynamic_map(),
                                             qmap2=create_dynamic_map(signed=False), absmax1=a1, absmax2=a2)  # fmt: skip
        states[name] = (p_i, s1, s2, a1, a2)
    (p_got, *codes_got, a1_got, a2_got), (p_want, *codes_want, a1_want, a2_want) = states["cuda"], states["reference"]
    assert torch.allclose(p_got, p_want, rtol=1e-5, atol=1e-7)
    assert torch.allclose(a1_got, a1_want, rtol=1e-5) and torch.allclose(a2_got, a2_want, rtol=1e-5)
    for got, want in zip(codes_got, codes_want):  # a state on a midpoint may take either code
        assert (got == want).float().mean() >= 0.99


# --------------------------------------------------------------------- stochastic rounding
def stochastic_oracle(A: torch.Tensor, code: torch.Tensor, blocksize: int, rand: torch.Tensor) -> torch.Tensor:
    """The rule (docs/formats.md section 2) written out independently of both backends:
    between lo <= x <= hi take hi when r < (x - lo) / (hi - lo)."""
    flat = A.reshape(-1).float()
    absmax = REFERENCE.quantize_blockwise(A, code=code, blocksize=blocksize)[1]
    inverse = torch.where(absmax == 0, torch.zeros_like(absmax), 1 / absmax).repeat_interleave(blocksize)[: flat.numel()]
    x = flat * inverse
    hi = torch.searchsorted(code, x).clamp(max=code.numel() - 1)  # first value >= x
    lo = torch.where(code[hi] == x, hi, (hi - 1).clamp(min=0))
    fraction = (x - code[lo]) / (code[hi] - code[lo])
    r = rand[torch.arange(flat.numel()) % rand.numel()]
    return torch.where((lo != hi) & (r < fraction), hi, lo).to(torch.uint8).reshape(A.shape)


@pytest.mark.parametrize("rand_size", ["same", 1024])
@pytest.mark.parametrize("blocksize", [64, 2048])
def test_stochastic_rounding_follows_the_rule(blocksize, rand_size):
    require_emulator()
    generator = torch.Generator().manual_seed(blocksize)
    A = torch.randn(2 * blocksize + 5, generator=generator)
    rand = torch.rand(A.numel() if rand_size == "same" else rand_size, generator=generator)
    code = create_dynamic_map()
    codes, absmax = CudaBackend().quantize_blockwise(A, code=code, blocksize=blocksize, rand=rand)
    assert torch.equal(absmax, REFERENCE.quantize_blockwise(A, code=code, blocksize=blocksize)[1])
    assert torch.equal(codes, stochastic_oracle(A, code, blocksize, rand))
    assert torch.equal(codes, REFERENCE.quantize_blockwise(A, code=code, blocksize=blocksize, rand=rand)[0])


def test_stochastic_rounding_is_unbiased():
    require_emulator()
    code = create_linear_map()
    A = torch.full((4096,), 0.3)
    A[0] = 1.0  # absmax 1: x = 0.3, between two linear codes
    codes, absmax = CudaBackend().quantize_blockwise(A, code=code, blocksize=4096, rand=torch.rand(4096))
    mean = code[codes[1:].long()].mean()
    assert abs(float(mean) - 0.3) < 2e-3, float(mean)
