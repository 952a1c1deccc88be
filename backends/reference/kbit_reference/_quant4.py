"""Reference 4-bit quantization (NF4 / FP4): packing, unpacking and the 4-bit matmuls."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from kbit.functional import get_4bit_type

from ._common import block_absmax, blockwise_apply, nearest_code_index, reciprocal_or_zero

Tensor = torch.Tensor


def _pack_nibbles(indices: Tensor, zero_index: int) -> Tensor:
    """Two 4-bit indices per byte, element ``2j`` in the high nibble; uint8, 1-D."""
    if indices.numel() % 2:
        indices = torch.cat([indices, indices.new_full((1,), zero_index)])
    pairs = indices.view(-1, 2)
    return (pairs[:, 0] * 16 + pairs[:, 1]).to(torch.uint8)


def _to_storage(packed: Tensor, storage: torch.dtype) -> Tensor:
    """View packed bytes as a ``(rows, 1)`` tensor of ``storage``, zero-padding the tail."""
    itemsize = torch.empty((), dtype=storage).element_size()
    short = -packed.numel() % itemsize
    if short:
        packed = torch.cat([packed, packed.new_zeros(short)])
    return packed.view(storage).reshape(-1, 1)


def _pair_table(table: Tensor) -> Tensor:
    """``[256, 2]`` float32: the (high, low) nibble values of every byte.

    One gather through this table decodes a whole byte, which is what makes the
    reference dequantization fast enough to be a usable fallback.
    """
    byte = torch.arange(256, device=table.device)
    return torch.stack([table[byte // 16], table[byte % 16]], dim=1)


class Quant4Ops:
    """The ``quant4`` op family of :class:`kbit_reference.ReferenceBackend`."""

    def quantize_4bit(
        self, A: Tensor, *, blocksize: int, quant_type: str, quant_storage: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        table = get_4bit_type(quant_type, device=A.device)
        flat = A.reshape(-1).to(torch.float32)
        absmax = block_absmax(flat, blocksize)
        normalised = blockwise_apply(flat, reciprocal_or_zero(absmax), blocksize, torch.empty_like(flat))
        indices = nearest_code_index(normalised, table)
        # The pad nibble is the code 0.0 quantizes to, looked up on the host (no device sync).
        zero_index = int(nearest_code_index(torch.zeros(1), get_4bit_type(quant_type)))
        return _to_storage(_pack_nibbles(indices, zero_index), quant_storage), absmax

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
        numel = math.prod(shape)
        packed = A.reshape(-1).view(torch.uint8)[: (numel + 1) // 2]
        pairs = _pair_table(get_4bit_type(quant_type, device=A.device))
        # int32 indices: half the memory of int64. embedding() is torch's fastest row
        # gather on CPU (about twice index_select's throughput here).
        values = torch.nn.functional.embedding(packed.to(torch.int32), pairs).view(-1)
        # Scale in place in float32, then cast once: on CPU a multiply that stores straight
        # into a 16-bit tensor is about 1.5x slower than these two passes.
        scaled = blockwise_apply(values[:numel], absmax.to(torch.float32), blocksize, values[:numel])
        result = scaled.view(tuple(shape))
        if dtype != torch.float32:
            return result.to(dtype)
        return result if values.numel() == numel else result.clone()  # no padding left in storage

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
        weight = self.dequantize_4bit(
            B, absmax=absmax, blocksize=blocksize, quant_type=quant_type, shape=shape, dtype=A.dtype
        )
        return torch.nn.functional.linear(A, weight, bias)

    # One row: the reference has no faster way than the general product.
    gemv_4bit = matmul_4bit
