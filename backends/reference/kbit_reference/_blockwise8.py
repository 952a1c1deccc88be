"""Reference 8-bit quantization: blockwise, whole-tensor and code-only variants."""

from __future__ import annotations

from typing import Optional

import torch

from ._common import block_absmax, blockwise_apply, nearest_code_index, reciprocal_or_zero, stochastic_code_index

Tensor = torch.Tensor


def _codes_to_values(A: Tensor, code: Tensor) -> Tensor:
    # int32 indices: half the memory of the int64 that plain indexing would default to.
    return code.to(A.device)[A.reshape(-1).to(torch.int32)]


class Blockwise8Ops:
    """The ``blockwise8`` op family of :class:`kbit_reference.ReferenceBackend`."""

    def quantize_blockwise(
        self, A: Tensor, *, code: Tensor, blocksize: int, rand: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        flat = A.reshape(-1).to(torch.float32)
        absmax = block_absmax(flat, blocksize)
        normalised = blockwise_apply(flat, reciprocal_or_zero(absmax), blocksize, torch.empty_like(flat))
        table = code.to(A.device)
        if rand is None:
            codes = nearest_code_index(normalised, table).to(torch.uint8)
        else:
            codes = stochastic_code_index(normalised, table, rand).to(torch.uint8)
        return codes.reshape(A.shape), absmax

    def dequantize_blockwise(
        self, A: Tensor, *, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype
    ) -> Tensor:
        out = torch.empty(A.shape, dtype=dtype, device=A.device)
        values = _codes_to_values(A, code)
        blockwise_apply(values, absmax.to(torch.float32), blocksize, out.view(-1))
        return out

    def quantize(self, A: Tensor, *, code: Tensor) -> tuple[Tensor, Tensor]:
        codes, absmax = self.quantize_blockwise(A, code=code, blocksize=max(A.numel(), 1))
        # Exactly one scale, even for an empty tensor (which has no block): 0, as if all-zero.
        return codes, absmax if absmax.numel() else absmax.new_zeros(1)

    def dequantize(self, A: Tensor, *, absmax: Tensor, code: Tensor, dtype: torch.dtype) -> Tensor:
        return self.dequantize_blockwise(A, absmax=absmax, code=code, blocksize=max(A.numel(), 1), dtype=dtype)

    def quantize_no_absmax(self, A: Tensor, *, code: Tensor) -> Tensor:
        flat = A.reshape(-1).to(torch.float32)
        return nearest_code_index(flat, code.to(A.device)).to(torch.uint8).reshape(A.shape)

    def dequantize_no_absmax(self, A: Tensor, *, code: Tensor, dtype: torch.dtype) -> Tensor:
        return _codes_to_values(A, code).to(dtype).reshape(A.shape)

    def estimate_quantiles(self, A: Tensor, *, offset: float, num_quantiles: int) -> Tensor:
        # Exact quantiles with linear interpolation between order statistics.
        ordered = A.reshape(-1).to(torch.float32).sort().values
        n = ordered.numel()
        probabilities = torch.linspace(offset, 1.0 - offset, num_quantiles, dtype=torch.float64, device=A.device)
        position = probabilities * (n - 1)
        below = position.floor().long().clamp_(0, n - 1)
        above = (below + 1).clamp_(max=n - 1)
        weight = (position - below).to(torch.float32)
        return torch.lerp(ordered[below], ordered[above], weight)

    def histogram_scatter_add_2d(self, histogram: Tensor, *, index1: Tensor, index2: Tensor, source: Tensor) -> None:
        histogram.index_put_((index1.long(), index2.long()), source.to(histogram.dtype), accumulate=True)
