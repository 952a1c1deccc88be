"""The native CPU backend: allocate outputs with torch, compute in the C library.

kbit calls these methods only for what the manifest declares, with arguments the public
API has validated (CPU tensors of declared dtypes, blocksizes from the format), so they
allocate, pass data pointers and return. Threads: each call may use
``torch.get_num_threads()`` threads of the OpenMP runtime it shares with torch (see
``_library.py``); small calls run on the calling thread.
"""

from __future__ import annotations

import ctypes
import math
from typing import Optional, Sequence

import torch
from kbit._formats import num_blocks
from kbit._ops.quant4 import packed_rows
from kbit.backend import Backend, OptimizerStep
from kbit.functional._codebooks import cached_code

from ._codebook import CodebookCache
from ._library import LibraryUnavailable, NativeLibrary, OptimizerTensors, load
from ._library import OptimizerStep as StepStruct
from ._manifest import KINDS

__all__ = ["CpuBackend"]

Tensor = torch.Tensor

#: dtype codes of the C ABI (KB_F32, KB_F16, KB_BF16).
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: Optimizer kind codes of the C ABI (KB_OPT_*: the order of ``KINDS``).
_KIND_CODES = {name: code for code, name in enumerate(KINDS)}
#: State layout codes of the C ABI.
_FLOAT32_STATE, _BLOCKWISE_STATE, _TENSOR_STATE = 0, 1, 2

#: Above this many rows of A the 4-bit matmul dequantizes the weight in row tiles and lets
#: torch multiply (its GEMM re-uses each weight element across many rows better than the
#: fused kernel, whose cost is one decode per row tile of A); at or below, the fused kernel
#: decodes the packed weight in registers and never writes it out.
FUSED_MATMUL_MAX_ROWS = 32
#: Weight elements dequantized per tile above that size (a few MB of float, never the whole weight).
MATMUL_TILE_ELEMENTS = 1 << 20


def _rows(shape: Sequence[int]) -> int:
    """Rows of a tensor whose leading dimensions are all rows."""
    return math.prod(shape[:-1]) if len(shape) else 1


class CpuBackend(Backend):
    """kbit's 8-bit, 4-bit and int8 quantization and optimizer updates in native C kernels
    for CPU tensors."""

    def __init__(self) -> None:
        self._library: Optional[NativeLibrary] = None
        self._unavailable: Optional[str] = None
        self._codebooks: Optional[CodebookCache] = None
        try:
            self._library = load()
            self._codebooks = CodebookCache(self._library)
        except LibraryUnavailable as exc:
            self._unavailable = str(exc)

    def is_available(self) -> bool | str:
        return True if self._library is not None else (self._unavailable or "native library unavailable")

    # ------------------------------------------------------------------ helpers
    @property
    def library(self) -> NativeLibrary:
        """The opened native library (the backend is only called when it is available)."""
        assert self._library is not None
        return self._library

    def describe(self) -> str:
        """One line for reports: instruction set, OpenMP, threads."""
        if self._library is None:
            return f"unavailable: {self._unavailable}"
        lib = self._library
        threads = "1 thread" if lib.thread_note else f"{torch.get_num_threads()} threads"
        return f"{lib.isa} kernels (supported: {lib.supported_isas}), {lib.openmp}, {threads}"

    def _threads(self) -> int:
        return 1 if self.library.thread_note else torch.get_num_threads()

    def _codebook(self, op: str, code: Tensor) -> ctypes.Array:
        assert self._codebooks is not None
        return self._codebooks.get(op, code)

    # ------------------------------------------------------------------ 8-bit
    def quantize_blockwise(
        self, A: Tensor, *, code: Tensor, blocksize: int, rand: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        A = A.contiguous()
        n = A.numel()
        codes = torch.empty(A.shape, dtype=torch.uint8)
        absmax = torch.empty((num_blocks(n, blocksize),), dtype=torch.float32)
        if n == 0:
            return codes, absmax
        cb = self._codebook("quantize_blockwise", code)
        if rand is None:
            self.library.kb_quantize_blockwise(
                A.data_ptr(), _DTYPE_CODES[A.dtype], n, blocksize, ctypes.addressof(cb), absmax.data_ptr(),
                codes.data_ptr(), self._threads(),
            )  # fmt: skip
        else:
            rand = rand.to(torch.float32).contiguous()
            self.library.kb_quantize_blockwise_stochastic(
                A.data_ptr(), _DTYPE_CODES[A.dtype], n, blocksize, ctypes.addressof(cb), rand.data_ptr(),
                rand.numel(), absmax.data_ptr(), codes.data_ptr(), self._threads(),
            )  # fmt: skip
        return codes, absmax

    def dequantize_blockwise(
        self, A: Tensor, *, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype
    ) -> Tensor:
        return self._dequantize8(A, absmax, code, blocksize, dtype)

    def _dequantize8(self, A: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype) -> Tensor:
        A = A.contiguous()
        out = torch.empty(A.shape, dtype=dtype)
        n = A.numel()
        if n:
            table = _full_table(code)
            scales = absmax.to(torch.float32).contiguous()
            self.library.kb_dequantize_blockwise(
                A.data_ptr(), n, blocksize, table.data_ptr(), scales.data_ptr(), out.data_ptr(),
                _DTYPE_CODES[dtype], self._threads(),
            )  # fmt: skip
        return out

    def quantize(self, A: Tensor, *, code: Tensor) -> tuple[Tensor, Tensor]:
        A = A.contiguous()
        codes = torch.empty(A.shape, dtype=torch.uint8)
        absmax = torch.zeros((1,), dtype=torch.float32)
        if A.numel():
            cb = self._codebook("quantize", code)
            self.library.kb_quantize_tensor(
                A.data_ptr(), _DTYPE_CODES[A.dtype], A.numel(), ctypes.addressof(cb), absmax.data_ptr(),
                codes.data_ptr(), self._threads(),
            )  # fmt: skip
        return codes, absmax

    def dequantize(self, A: Tensor, *, absmax: Tensor, code: Tensor, dtype: torch.dtype) -> Tensor:
        return self._dequantize8(A, absmax, code, max(A.numel(), 1), dtype)

    def quantize_no_absmax(self, A: Tensor, *, code: Tensor) -> Tensor:
        A = A.contiguous()
        codes = torch.empty(A.shape, dtype=torch.uint8)
        if A.numel():
            cb = self._codebook("quantize_no_absmax", code)
            self.library.kb_quantize_no_absmax(
                A.data_ptr(), _DTYPE_CODES[A.dtype], A.numel(), ctypes.addressof(cb), codes.data_ptr(), self._threads()
            )
        return codes

    def dequantize_no_absmax(self, A: Tensor, *, code: Tensor, dtype: torch.dtype) -> Tensor:
        # code[A] * 1.0 is code[A] exactly: the blockwise kernel with one unit scale.
        return self._dequantize8(A, _UNIT_SCALE, code, max(A.numel(), 1), dtype)

    # ------------------------------------------------------------------ 4-bit
    def quantize_4bit(
        self, A: Tensor, *, blocksize: int, quant_type: str, quant_storage: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        A = A.contiguous()
        n = A.numel()
        itemsize = torch.empty((), dtype=quant_storage).element_size()
        rows = packed_rows(n, quant_storage)
        packed = torch.empty((rows, itemsize), dtype=torch.uint8)
        absmax = torch.empty((num_blocks(n, blocksize),), dtype=torch.float32)
        if n:
            cb = self._codebook("quantize_4bit", cached_code(quant_type))
            self.library.kb_quantize_4bit(
                A.data_ptr(), _DTYPE_CODES[A.dtype], n, blocksize, ctypes.addressof(cb), absmax.data_ptr(),
                packed.data_ptr(), rows * itemsize, self._threads(),
            )  # fmt: skip
        # (rows, itemsize) bytes viewed as the storage dtype are its (rows, 1) elements.
        return packed.view(quant_storage), absmax

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
        out = torch.empty(tuple(shape), dtype=dtype)
        n = out.numel()
        if n:
            packed = _bytes_of(A)
            scales = absmax.to(torch.float32).contiguous()
            self.library.kb_dequantize_4bit(
                packed.data_ptr(), n, blocksize, cached_code(quant_type).data_ptr(), scales.data_ptr(),
                out.data_ptr(), _DTYPE_CODES[dtype], self._threads(),
            )  # fmt: skip
        return out

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
        N, K = int(shape[0]), int(shape[1])
        out = torch.empty((*A.shape[:-1], N), dtype=A.dtype)
        M = _rows(A.shape)
        if out.numel() == 0:
            return out
        if bias is not None:
            bias = bias.to(A.dtype).contiguous()
        if K == 0:
            return out.copy_(bias.expand_as(out)) if bias is not None else out.zero_()
        A = A.contiguous()
        scales = absmax.to(torch.float32).contiguous()
        packed = _bytes_of(B)
        table = cached_code(quant_type)
        if M > FUSED_MATMUL_MAX_ROWS and self._tiles_align(N, K, blocksize):
            self._matmul_in_tiles(A.view(M, K), packed, scales, blocksize, table, N, K, bias, out.view(M, N))
            return out
        if A.dtype == torch.float32 and torch.get_float32_matmul_precision() == "medium" and self.library.bf16_dot:
            # torch's "medium" float32 matmul precision allows bfloat16 products: A rounded to
            # bfloat16 takes the bfloat16 dot-product kernels; the sums and the result stay float32.
            A = A.to(torch.bfloat16)
        status = self.library.kb_matmul_4bit(
            A.data_ptr(), _DTYPE_CODES[A.dtype], M, K, packed.data_ptr(), scales.data_ptr(), blocksize,
            table.data_ptr(), N, None if bias is None else bias.data_ptr(), out.data_ptr(), _DTYPE_CODES[out.dtype],
            self._threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError(f"matmul_4bit: out of memory for a copy of A ({M} x {K})")
        return out

    # One row is the matmul with M == 1; the fused kernel serves both.
    gemv_4bit = matmul_4bit

    @staticmethod
    def _tiles_align(N: int, K: int, blocksize: int) -> bool:
        # A row tile starts at a whole byte and a whole block when its rows do.
        return K % blocksize == 0 and K % 2 == 0

    def _matmul_in_tiles(self, A: Tensor, packed: Tensor, scales: Tensor, blocksize: int, table: Tensor, N: int,
                         K: int, bias: Optional[Tensor], out: Tensor) -> None:  # fmt: skip
        rows_per_tile = max(1, MATMUL_TILE_ELEMENTS // K)
        weight = torch.empty((min(rows_per_tile, N), K), dtype=A.dtype)
        threads = self._threads()
        for first in range(0, N, rows_per_tile):
            rows = min(rows_per_tile, N - first)
            tile = weight[:rows]
            self.library.kb_dequantize_4bit(
                packed.data_ptr() + first * K // 2, rows * K, blocksize, table.data_ptr(),
                scales.data_ptr() + 4 * (first * K // blocksize), tile.data_ptr(), _DTYPE_CODES[A.dtype], threads,
            )  # fmt: skip
            # linear adds the bias before its one rounding, as the fused kernel does
            out[:, first : first + rows] = torch.nn.functional.linear(
                A, tile, None if bias is None else bias[first : first + rows]
            )

    # ------------------------------------------------------------------ int8
    def int8_vectorwise_quant(self, A: Tensor, *, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
        A = A.contiguous()
        K = A.shape[-1] if A.dim() else 1
        rows = _rows(A.shape)
        codes = torch.empty(A.shape, dtype=torch.int8)
        stats = torch.empty((rows,), dtype=torch.float32)
        columns = torch.empty((K,), dtype=torch.int64)
        count = 0
        if A.numel():
            count = self.library.kb_int8_vectorwise_quant(
                A.data_ptr(), _DTYPE_CODES[A.dtype], rows, K, threshold, codes.data_ptr(), stats.data_ptr(),
                columns.data_ptr(), self._threads(),
            )  # fmt: skip
            if count < 0:
                raise MemoryError("int8_vectorwise_quant: out of memory for the outlier column mask")
        elif rows:
            stats.zero_()
        return codes, stats, columns[:count].clone()

    def int8_vectorwise_dequant(self, A: Tensor, *, stats: Tensor) -> Tensor:
        A = A.contiguous()
        out = torch.empty(A.shape, dtype=torch.float32)
        if A.numel():
            stats = stats.to(torch.float32).contiguous()
            self.library.kb_int8_vectorwise_dequant(
                A.data_ptr(), _rows(A.shape), A.shape[-1], stats.data_ptr(), out.data_ptr(), self._threads()
            )
        return out

    def int8_mm_dequant(
        self, A: Tensor, *, row_stats: Tensor, col_stats: Tensor, bias: Optional[Tensor], dtype: torch.dtype
    ) -> Tensor:
        A = A.contiguous()
        out = torch.empty(A.shape, dtype=dtype)
        if A.numel():
            rows = row_stats.to(torch.float32).contiguous()
            cols = col_stats.to(torch.float32).contiguous()
            if bias is not None and bias.dtype not in _DTYPE_CODES:
                bias = bias.to(torch.float32)
            bias = None if bias is None else bias.contiguous()
            self.library.kb_int8_mm_dequant(
                A.data_ptr(), _rows(A.shape), A.shape[-1], rows.data_ptr(), cols.data_ptr(),
                None if bias is None else bias.data_ptr(), 0 if bias is None else _DTYPE_CODES[bias.dtype],
                out.data_ptr(), _DTYPE_CODES[dtype], self._threads(),
            )  # fmt: skip
        return out

    # ------------------------------------------------------------------ optimizers
    def optimizer_update_32bit(
        self,
        step: OptimizerStep,
        g: Tensor,
        p: Tensor,
        state1: Tensor,
        state2: Optional[Tensor],
        unorm_vec: Optional[Tensor],
    ) -> None:
        if p.numel() == 0:
            return
        tensors = _optimizer_tensors(g, p, state1, state2)
        self._update(step, _FLOAT32_STATE, p.dtype, tensors, unorm_vec)

    def optimizer_update_8bit(
        self,
        step: OptimizerStep,
        g: Tensor,
        p: Tensor,
        state1: Tensor,
        state2: Optional[Tensor],
        *,
        qmap1: Tensor,
        qmap2: Optional[Tensor],
        max1: Tensor,
        max2: Optional[Tensor],
        new_max1: Tensor,
        new_max2: Optional[Tensor],
        unorm_vec: Optional[Tensor],
    ) -> None:
        if p.numel() == 0:
            return
        tensors, keep = self._eight_bit_tensors("optimizer_update_8bit", g, p, state1, state2, qmap1, qmap2)
        tensors.max1 = float(max1.reshape(-1)[0])
        tensors.max2 = float(max2.reshape(-1)[0]) if max2 is not None else 0.0
        self._update(step, _TENSOR_STATE, p.dtype, tensors, unorm_vec)
        new_max1.fill_(tensors.new_max1)
        if new_max2 is not None:
            new_max2.fill_(tensors.new_max2)
        del keep

    def optimizer_update_8bit_blockwise(
        self,
        step: OptimizerStep,
        g: Tensor,
        p: Tensor,
        state1: Tensor,
        state2: Optional[Tensor],
        *,
        qmap1: Tensor,
        qmap2: Optional[Tensor],
        absmax1: Tensor,
        absmax2: Optional[Tensor],
    ) -> None:
        if p.numel() == 0:
            return
        tensors, keep = self._eight_bit_tensors("optimizer_update_8bit_blockwise", g, p, state1, state2, qmap1, qmap2)
        tensors.absmax1 = absmax1.data_ptr()
        tensors.absmax2 = absmax2.data_ptr() if absmax2 is not None else None
        self._update(step, _BLOCKWISE_STATE, p.dtype, tensors, None)
        del keep

    def _eight_bit_tensors(self, op: str, g: Tensor, p: Tensor, state1: Tensor, state2: Optional[Tensor],
                           qmap1: Tensor, qmap2: Optional[Tensor]) -> tuple[OptimizerTensors, list]:  # fmt: skip
        """The tensors of an 8-bit update, and what must stay alive until the call returns."""
        tensors = _optimizer_tensors(g, p, state1, state2)
        table1 = qmap1.to(torch.float32).contiguous()
        keep: list = [table1, self._codebook(op, table1)]
        tensors.qmap1, tensors.cb1 = table1.data_ptr(), ctypes.addressof(keep[1])
        if qmap2 is not None:
            table2 = qmap2.to(torch.float32).contiguous()
            keep += [table2, self._codebook(op, table2)]
            tensors.qmap2, tensors.cb2 = table2.data_ptr(), ctypes.addressof(keep[3])
        return tensors, keep

    def _update(self, step: OptimizerStep, layout: int, dtype: torch.dtype, tensors: OptimizerTensors,
                unorm_vec: Optional[Tensor]) -> None:  # fmt: skip
        unorm = ctypes.c_float(0.0)
        self.library.kb_optimizer_update(
            ctypes.byref(_step_struct(step, layout, dtype)), ctypes.byref(tensors), ctypes.byref(unorm), self._threads()
        )
        if step.max_unorm > 0 and unorm_vec is not None:
            unorm_vec.fill_(unorm.value)


_UNIT_SCALE = torch.ones(1, dtype=torch.float32)


def _full_table(code: Tensor) -> Tensor:
    """``code`` as a contiguous float32 table of 256 entries (codes index 0..255).

    A shorter table (the API allows 1..256 values) is padded with NaN, so a code beyond it
    dequantizes to NaN instead of reading past the table.
    """
    table = code.detach().to(torch.float32).contiguous()
    if table.numel() < 256:
        table = torch.cat([table, table.new_full((256 - table.numel(),), math.nan)])
    return table


def _bytes_of(packed: Tensor) -> Tensor:
    """The bytes of packed 4-bit data, whatever dtype it is stored as."""
    return packed.contiguous().view(-1).view(torch.uint8)


def _optimizer_tensors(g: Tensor, p: Tensor, state1: Tensor, state2: Optional[Tensor]) -> OptimizerTensors:
    """The data pointers of an update (kbit hands over contiguous tensors, updated in place)."""
    tensors = OptimizerTensors()
    tensors.p, tensors.g = p.data_ptr(), g.data_ptr()
    tensors.state1 = state1.data_ptr()
    tensors.state2 = state2.data_ptr() if state2 is not None else None
    tensors.n = p.numel()
    return tensors


def _step_struct(step: OptimizerStep, layout: int, dtype: torch.dtype) -> StepStruct:
    """The C form of ``step``: compound scalars derived in double precision and rounded once,
    as the reference backend's PyTorch expressions do (docs/formats.md section 5)."""
    kind = step.kind.name
    t = step.step
    c1 = 1.0 - step.beta1**t
    c2 = math.sqrt(1.0 - step.beta2**t)
    factor = c2 / c1 if kind in ("adam", "lamb") else 1.0
    s = StepStruct()
    s.kind, s.layout, s.dtype = _KIND_CODES[kind], layout, _DTYPE_CODES[dtype]
    s.first_step = t == 1
    s.decoupled_decay = step.kind.decoupled_decay
    s.skip_zeros = step.skip_zeros
    s.has_weight_decay = step.weight_decay > 0
    s.has_gnorm_scale = step.gnorm_scale != 1.0
    s.clip = step.max_unorm > 0
    s.beta1, s.beta2, s.beta3, s.alpha, s.eps = step.beta1, step.beta2, step.beta3, step.alpha, step.eps
    s.weight_decay, s.gnorm_scale = step.weight_decay, step.gnorm_scale
    s.one_minus_beta1, s.one_minus_beta2, s.one_minus_beta3 = 1.0 - step.beta1, 1.0 - step.beta2, 1.0 - step.beta3
    s.decay = 1.0 - step.lr * step.weight_decay
    s.update_factor = factor
    s.step_size = -step.lr * factor
    s.neg_lr = -step.lr
    s.eps_scaled = step.eps * c2
    s.inv_c1 = 1.0 / c1 if c1 else 0.0
    s.c2 = c2
    s.max_unorm = step.max_unorm
    s.update_scale = 1.0
    return s
