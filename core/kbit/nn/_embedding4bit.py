"""``Embedding4bit`` and its NF4/FP4 shorthands: an embedding table stored in 4 bits."""

from __future__ import annotations

from typing import Optional

import torch

from ..functional._quant4 import checked_4bit_state, dequantize_4bit
from ..functional._quant_state import QuantState
from ._params4bit import Weight4bitStateDict

__all__ = ["Embedding4bit", "EmbeddingNF4", "EmbeddingFP4"]


class Embedding4bit(Weight4bitStateDict, torch.nn.Embedding):
    """``torch.nn.Embedding`` whose table is stored as 4-bit NF4 or FP4 codes (frozen).

    When every row is a whole number of quantization blocks (``embedding_dim`` a multiple
    of the blocksize, 64), a lookup dequantizes only the rows asked for; otherwise the
    table is dequantized whole for each call. Output is in the table's original dtype.
    The state dict has the same layout as :class:`Linear4bit`'s.

    Args:
        num_embeddings, embedding_dim: as for ``torch.nn.Embedding``.
        dtype: dtype of the float table (and of the output).
        quant_type: ``"nf4"`` or ``"fp4"``.
        quant_storage: dtype the packed bytes are viewed as.
        device: where the float table is created.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: Optional[torch.dtype] = None,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device: Optional[torch.device | str] = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self._init_4bit_weight(compress_statistics=False, quant_type=quant_type, quant_storage=quant_storage)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the looked-up vectors: the float table's (recorded in its quant state once quantized)."""
        state = self.quant_state
        return state.dtype if state is not None and state.dtype is not None else self.weight.dtype

    def _weight_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """The rows of ``input`` (integer indices of any shape), shape ``(*input.shape, dim)``."""
        weight, state = self._packed_weight()
        if self.embedding_dim % state.blocksize:
            return torch.nn.functional.embedding(input, dequantize_4bit(weight, state))
        return self._lookup_rows(input, weight, state)

    def _lookup_rows(self, input: torch.Tensor, weight: torch.Tensor, state: QuantState) -> torch.Tensor:
        # Row r is bytes [r * dim / 2, (r + 1) * dim / 2) and blocks [r * dim / bs, ...):
        # gather those for the requested rows and dequantize just them.
        scales, _ = checked_4bit_state("Embedding4bit", weight, state, None, name="weight")
        rows, dim = self.num_embeddings, self.embedding_dim
        table = weight.detach().reshape(-1).view(torch.uint8)[: rows * dim // 2].view(rows, dim // 2)
        index = input.reshape(-1)
        picked = table.index_select(0, index).reshape(-1, 1)
        picked_scales = scales.view(rows, dim // state.blocksize).index_select(0, index).reshape(-1)
        picked_state = QuantState(
            picked_scales,
            shape=(index.numel(), dim),
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            dtype=state.dtype,
        )
        return dequantize_4bit(picked, picked_state).view(*input.shape, dim)


class EmbeddingNF4(Embedding4bit):
    """:class:`Embedding4bit` with ``quant_type="nf4"``."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: Optional[torch.dtype] = None,
        quant_storage: torch.dtype = torch.uint8,
        device: Optional[torch.device | str] = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, dtype, "nf4", quant_storage, device)


class EmbeddingFP4(Embedding4bit):
    """:class:`Embedding4bit` with ``quant_type="fp4"``."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: Optional[torch.dtype] = None,
        quant_storage: torch.dtype = torch.uint8,
        device: Optional[torch.device | str] = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, dtype, "fp4", quant_storage, device)
