"""On a real GPU: the CuPy path gives the emulator's bits (marked ``gpu``; skipped, with the
reason, on machines without one).

These are the only checks of the emulator itself and of what it cannot see (the GPU's
memory model, the driver, the real compiler's code). Run them wherever a GPU is at hand:
``pytest -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

from kbit.backend import OPTIMIZER_KINDS, OptimizerStep
from kbit.functional._codebooks import create_dynamic_map
from kbit_cuda.backend import CudaBackend

from .cuda_support import gpu_problem, require_emulator

pytestmark = pytest.mark.gpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def backend() -> CudaBackend:
    problem = gpu_problem()
    if problem:
        pytest.skip(problem)
    require_emulator()
    return CudaBackend()


def on_both(function, *tensors: torch.Tensor):
    """``function`` on CUDA copies and on CPU copies (the emulator); results on the CPU."""
    gpu = function(*(t.cuda() for t in tensors))
    cpu = function(*(t.clone() for t in tensors))
    gpu = gpu if isinstance(gpu, tuple) else (gpu,)
    cpu = cpu if isinstance(cpu, tuple) else (cpu,)
    return [g.cpu() for g in gpu], list(cpu)


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_blockwise_gpu_equals_emulator(backend, dtype, blocksize):
    A = torch.randn(5 * blocksize + 3).to(dtype)
    code = create_dynamic_map()
    gpu, cpu = on_both(lambda a, c: backend.quantize_blockwise(a, code=c, blocksize=blocksize), A, code)
    for g, c in zip(gpu, cpu):
        assert torch.equal(g, c)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_4bit_gpu_equals_emulator(backend, dtype, quant_type):
    A = torch.randn(64, 256).to(dtype)
    quantize = lambda a: backend.quantize_4bit(a, blocksize=64, quant_type=quant_type, quant_storage=torch.uint8)  # noqa: E731
    gpu, cpu = on_both(quantize, A)
    assert torch.equal(gpu[0], cpu[0]) and torch.equal(gpu[1], cpu[1])
    dequantize = lambda p, s: backend.dequantize_4bit(p, absmax=s, blocksize=64, quant_type=quant_type,  # noqa: E731
                                                      shape=A.shape, dtype=dtype)  # fmt: skip
    gpu, cpu = on_both(dequantize, *cpu)
    assert torch.equal(gpu[0], cpu[0])
    x = torch.randn(1, 256).to(dtype) / 16
    gemv = lambda x_, p, s: backend.gemv_4bit(x_, p, shape=[64, 256], absmax=s, blocksize=64, quant_type=quant_type)  # noqa: E731
    packed, absmax = quantize(A)
    gpu, cpu = on_both(gemv, x, packed, absmax)
    torch.testing.assert_close(gpu[0].float(), cpu[0].float(), rtol=1e-3, atol=1e-3)  # summation order differs


def test_optimizer_step_gpu_equals_emulator(backend):
    p, g = torch.randn(5000), torch.randn(5000)

    def step(p_, g_):
        s1, s2 = torch.zeros_like(p_, dtype=torch.uint8), torch.zeros_like(p_, dtype=torch.uint8)
        a1, a2 = torch.zeros(20, device=p_.device), torch.zeros(20, device=p_.device)
        step = OptimizerStep(OPTIMIZER_KINDS["adam"], 1, 1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
        backend.optimizer_update_8bit_blockwise(
            step, g_, p_, s1, s2, qmap1=create_dynamic_map().to(p_.device),
            qmap2=create_dynamic_map(signed=False).to(p_.device), absmax1=a1, absmax2=a2,
        )  # fmt: skip
        return p_, s1, s2, a1, a2

    gpu, cpu = on_both(step, p, g)
    for got, want in zip(gpu, cpu):  # the same IEEE operations in the same order: the same bits
        assert torch.equal(got, want)
