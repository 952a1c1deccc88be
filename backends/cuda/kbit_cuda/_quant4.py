"""NF4 / FP4 on the GPU: quantize, dequantize, the fused batch-1 product, and the matmul.

Kernels: ``kernels/quant4.cu`` (design and numerics in ``docs/cuda-backend.md``).
"""

from __future__ import annotations

import math
import threading
from typing import Optional, Sequence

import torch

from kbit._formats import num_blocks
from kbit._ops.quant4 import packed_rows
from kbit.functional import get_4bit_type

from ._blockwise8 import SCALE_PER_BLOCK, SUFFIX, THREADS, prepare_table, quantize_kernel
from ._launch import Device, device_for, grid_for, i32, i64, vector_aligned

Tensor = torch.Tensor

FILE = "quant4.cu"
#: Output rows (one warp each) per gemv block.
GEMV_ROWS_PER_BLOCK = THREADS // 32

_tables: dict[tuple[str, str, str], Tensor] = {}
_tables_lock = threading.Lock()


def _table(device: Device, quant_type: str, where: torch.device, prepared: bool) -> Tensor:
    """The 16-entry table of ``quant_type`` on ``where`` (``prepared``: searchable, for
    quantizing), made once per device: kbit owns these copies, nobody mutates them."""
    key = (quant_type, str(where), "prepared" if prepared else "values")
    with _tables_lock:
        table = _tables.get(key)
        if table is None:
            values = get_4bit_type(quant_type, device=where)
            table = _tables[key] = prepare_table(device, values) if prepared else values
        return table


class Quant4Kernels:
    """The ``quant4`` op family of :class:`kbit_cuda.backend.CudaBackend`."""

    def quantize_4bit(
        self, A: Tensor, *, blocksize: int, quant_type: str, quant_storage: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        n = A.numel()
        rows = packed_rows(n, quant_storage)
        itemsize = torch.empty((), dtype=quant_storage).element_size()
        packed = torch.empty(rows * itemsize, dtype=torch.uint8, device=A.device)
        packed[(n + 1) // 2 :].zero_()  # the bytes padding the last storage element
        absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=A.device)
        if n:
            device = device_for(A)
            with device.launching():
                table = _table(device, quant_type, A.device, prepared=True)
                quantize_kernel(device, A, table, packed, absmax, bits=4, blocksize=blocksize, mode=SCALE_PER_BLOCK)
        return packed.view(quant_storage).reshape(rows, 1), absmax

    def dequantize_4bit(
        self,
        A: Tensor,
        *,
        absmax: Tensor,
        blocksize: int,
        quant_type: str,
        shape: Sequence[int],
        dtype: torch.dtype,
    ) -> Tensor:
        out = torch.empty(tuple(shape), dtype=dtype, device=A.device)
        n = out.numel()
        if n == 0:
            return out
        packed = A.reshape(-1).view(torch.uint8)
        device = device_for(A)
        with device.launching():
            table = _table(device, quant_type, A.device, prepared=False)
            grid = grid_for(-(-n // 8), THREADS, device.max_blocks)
            device.kernel(FILE, f"dequantize_4bit_{SUFFIX[dtype]}")(
                (grid,), (THREADS,),
                (packed, table, absmax.contiguous(), out, i64(n), i32(blocksize), i32(packed.data_ptr() % 4 == 0)),
            )  # fmt: skip
        return out

    def gemv_4bit(
        self,
        A: Tensor,
        B: Tensor,
        *,
        shape: Sequence[int],
        absmax: Tensor,
        blocksize: int,
        quant_type: str,
        bias: Optional[Tensor] = None,
    ) -> Tensor:
        N, K = int(shape[0]), int(shape[1])
        out = torch.empty((*A.shape[:-1], N), dtype=A.dtype, device=A.device)
        if N == 0:
            return out
        x = A.reshape(-1).contiguous()
        packed = B.reshape(-1).view(torch.uint8)
        # The fast path reads 4 packed bytes (8 codes) and 8 inputs at a time.
        fast = K % 8 == 0 and packed.data_ptr() % 4 == 0 and vector_aligned(x) == 1
        device = device_for(A)
        with device.launching():
            table = _table(device, quant_type, A.device, prepared=False)
            grid = grid_for(N, GEMV_ROWS_PER_BLOCK, device.max_blocks)
            device.kernel(FILE, f"gemv_4bit_{SUFFIX[A.dtype]}")(
                (grid,), (THREADS,),
                (x, packed, table, absmax.contiguous(), out, i32(N), i32(K), i32(blocksize), i32(int(fast))),
            )  # fmt: skip
        # The bias is added to the rounded product (in A's dtype): inside the op, so eager and
        # compiled calls agree; the kernel itself has no bias operand yet.
        return out if bias is None else out.add_(bias)

    def matmul_4bit(
        self,
        A: Tensor,
        B: Tensor,
        *,
        shape: Sequence[int],
        absmax: Tensor,
        blocksize: int,
        quant_type: str,
        bias: Optional[Tensor] = None,
    ) -> Tensor:
        # Several rows: dequantize once with the kernel, then the vendor GEMM (cuBLAS).
        if math.prod(A.shape[:-1]) == 1:
            return self.gemv_4bit(
                A, B, shape=shape, absmax=absmax, blocksize=blocksize, quant_type=quant_type, bias=bias
            )
        weight = self.dequantize_4bit(
            B, absmax=absmax, blocksize=blocksize, quant_type=quant_type, shape=shape, dtype=A.dtype
        )
        return torch.nn.functional.linear(A, weight, bias)
