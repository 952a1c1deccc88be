"""8-bit quantization on the GPU: blockwise, whole-tensor, code-only, stochastic rounding.

Kernels: ``kernels/blockwise8.cu`` (design and numerics in ``docs/cuda-backend.md``).
"""

from __future__ import annotations

from typing import Optional

import torch

from kbit._formats import num_blocks

from ._launch import Device, device_for, grid_for, i32, i64, vector_aligned

Tensor = torch.Tensor

FILE = "blockwise8.cu"
THREADS = 256
#: Elements one block quantizes per tile at VECS = 1 (4 per thread).
TILE = 4 * THREADS
#: Bytes of a prepared code table (``kbit::CodeTable``: bounds, values, index, count).
TABLE_BYTES = 256 * 4 + 256 * 4 + 256 + 4

# kbit::ScaleMode
SCALE_PER_BLOCK, SCALE_GIVEN, SCALE_NONE = 0, 1, 2

#: Kernel name suffix of each float dtype.
SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def prepare_table(device: Device, code: Tensor) -> Tensor:
    """The code table sorted, deduplicated and with its decision boundaries (one tiny
    launch), as the quantize kernels read it."""
    table = torch.empty(TABLE_BYTES, dtype=torch.uint8, device=code.device)
    code = code.to(torch.float32).contiguous()
    device.kernel(FILE, "prepare_code_table")((1,), (THREADS,), (code, i32(code.numel()), table))
    return table


def quantize_kernel(device: Device, A: Tensor, table: Tensor, out: Tensor, absmax: Optional[Tensor], *, bits: int,
                    blocksize: int, mode: int, rand: Optional[Tensor] = None) -> None:  # fmt: skip
    """Launch the 8-bit or 4-bit quantize kernel for ``A`` (see ``kernels/quantize.cuh``)."""
    n = A.numel()
    vecs = max(1, blocksize // TILE) if mode == SCALE_PER_BLOCK else 1
    if mode != SCALE_PER_BLOCK:
        blocksize = TILE  # unused by the kernel, but must describe a whole tile
    name = f"quantize_{bits}bit_{SUFFIX[A.dtype]}_v{vecs}" + ("_stochastic" if rand is not None else "")
    grid = grid_for(n, TILE * vecs, device.max_blocks)
    rand_count = rand.numel() if rand is not None else 1
    device.kernel("blockwise8.cu" if bits == 8 else "quant4.cu", name)(
        (grid,), (THREADS,),
        (A, table, absmax, out, i64(n), i32(blocksize), i32(mode), i32(vector_aligned(A)), rand, i64(rand_count)),
    )  # fmt: skip


def dequantize_kernel(device: Device, A: Tensor, code: Tensor, absmax: Optional[Tensor], blocksize: int,
                      dtype: torch.dtype) -> Tensor:  # fmt: skip
    """``code[A] (* absmax[i // blocksize])`` as ``dtype``, A's shape."""
    out = torch.empty(A.shape, dtype=dtype, device=A.device)
    n = A.numel()
    if n == 0:
        return out
    code = code.to(torch.float32).contiguous()
    grid = grid_for(-(-n // 4), THREADS, device.max_blocks)
    scales = None if absmax is None else absmax.to(torch.float32).contiguous()
    with device.launching():
        device.kernel(FILE, f"dequantize_8bit_{SUFFIX[dtype]}")(
            (grid,), (THREADS,),
            (A, code, i32(code.numel()), scales, out, i64(n), i64(blocksize), i32(vector_aligned(A, 4))),
        )  # fmt: skip
    return out


class Blockwise8Kernels:
    """The ``blockwise8`` op family of :class:`kbit_cuda.backend.CudaBackend`."""

    def quantize_blockwise(self, A: Tensor, *, code: Tensor, blocksize: int,
                           rand: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        codes = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
        absmax = torch.empty(num_blocks(A.numel(), blocksize), dtype=torch.float32, device=A.device)
        if A.numel() == 0:
            return codes, absmax
        device = device_for(A)
        with device.launching():
            table = prepare_table(device, code)
            quantize_kernel(device, A, table, codes, absmax, bits=8, blocksize=blocksize, mode=SCALE_PER_BLOCK,
                            rand=rand)  # fmt: skip
        return codes, absmax

    def dequantize_blockwise(
        self, A: Tensor, *, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype
    ) -> Tensor:
        return dequantize_kernel(device_for(A), A, code, absmax, blocksize, dtype)

    def quantize(self, A: Tensor, *, code: Tensor) -> tuple[Tensor, Tensor]:
        codes = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
        # One scale even for an empty tensor: 0, as if all-zero. The absmax kernel's
        # atomicMax on the float's bits starts from it.
        absmax = torch.zeros(1, dtype=torch.float32, device=A.device)
        n = A.numel()
        if n == 0:
            return codes, absmax
        device = device_for(A)
        with device.launching():
            table = prepare_table(device, code)
            grid = grid_for(-(-n // 4), THREADS, device.max_blocks)
            device.kernel(FILE, f"tensor_absmax_{SUFFIX[A.dtype]}")(
                (grid,), (THREADS,), (A, i64(n), absmax, i32(vector_aligned(A)))
            )
            quantize_kernel(device, A, table, codes, absmax, bits=8, blocksize=TILE, mode=SCALE_GIVEN)
        return codes, absmax

    def dequantize(self, A: Tensor, *, absmax: Tensor, code: Tensor, dtype: torch.dtype) -> Tensor:
        return dequantize_kernel(device_for(A), A, code, absmax, max(A.numel(), 1), dtype)

    def quantize_no_absmax(self, A: Tensor, *, code: Tensor) -> Tensor:
        codes = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
        if A.numel() == 0:
            return codes
        device = device_for(A)
        with device.launching():
            table = prepare_table(device, code)
            quantize_kernel(device, A, table, codes, None, bits=8, blocksize=TILE, mode=SCALE_NONE)
        return codes

    def dequantize_no_absmax(self, A: Tensor, *, code: Tensor, dtype: torch.dtype) -> Tensor:
        return dequantize_kernel(device_for(A), A, code, None, max(A.numel(), 1), dtype)
