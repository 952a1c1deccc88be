"""Embeddings meant for 8-bit optimizers: their weights always keep 32-bit optimizer state.

Embedding rows receive sparse, spiky gradients that 8-bit state quantizes poorly, so both
modules register a ``{"optim_bits": 32}`` override for their weight with
:class:`kbit.optim.GlobalOptimManager` when they are built. Any kbit optimizer then keeps
that weight's state in 32 bits, whatever its own ``optim_bits``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as torch_functional

from ..optim._manager import GlobalOptimManager

__all__ = ["Embedding", "StableEmbedding"]


def _register_32bit_state(module: torch.nn.Module) -> None:
    GlobalOptimManager.get_instance().register_module_override(module, "weight", {"optim_bits": 32})


class Embedding(torch.nn.Embedding):
    """``torch.nn.Embedding`` with Xavier-uniform initialisation and 32-bit optimizer state.

    Arguments are those of ``torch.nn.Embedding``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int] = None,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Optional[torch.Tensor] = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(
            num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse,
            _weight, device=device, dtype=dtype,
        )  # fmt: skip
        _register_32bit_state(self)

    def reset_parameters(self) -> None:
        """Xavier-uniform weights; the padding row (if any) is zero."""
        torch.nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()


class StableEmbedding(Embedding):
    """An :class:`Embedding` followed by ``LayerNorm``, for stable training with 8-bit optimizers.

    The layer norm runs in the default float dtype and the result is cast back to the
    weight's dtype, so half-precision embeddings are normalised accurately.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int] = None,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Optional[torch.Tensor] = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(
            num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse,
            _weight, device=device, dtype=dtype,
        )  # fmt: skip
        self.norm = torch.nn.LayerNorm(embedding_dim, device=device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Look the rows up, layer-normalise them, return them in the weight's dtype."""
        emb = torch_functional.embedding(
            input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        return self.norm(emb.to(torch.get_default_dtype())).to(self.weight.dtype)
