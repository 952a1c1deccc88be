"""A small transformer language model whose linear layers can be swapped for NF4 + LoRA."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the demo model."""

    vocab_size: int = 64
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 1024
    seq_len: int = 64
    lora_rank: int = 16


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o projections."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.q = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k = nn.Linear(config.d_model, config.d_model, bias=False)
        self.v = nn.Linear(config.d_model, config.d_model, bias=False)
        self.o = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2)

        attended = nn.functional.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True
        )
        return self.o(attended.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm transformer block: attention then a GELU MLP, each with a residual."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attention = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.up = nn.Linear(config.d_model, config.d_ff)
        self.down = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    """Token + position embeddings, ``n_layers`` blocks, a final norm and an LM head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.position = nn.Parameter(torch.randn(config.seq_len, config.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class LoRA(nn.Module):
    """A frozen base layer plus a trainable low-rank update ``B @ A`` (B starts at zero).

    Starting from zero means the adapted model is exactly the base model at step 0, as
    in QLoRA; only ``A`` and ``B`` receive gradients.
    """

    def __init__(self, base: nn.Module, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = 2.0  # alpha / rank with alpha = 2 * rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x.to(self.lora_a.dtype) @ self.lora_a.T) @ self.lora_b.T
        return self.base(x) + (self.scale * update).to(x.dtype)


def linear_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, layer)`` for every ``nn.Linear`` inside the transformer blocks."""
    found = []
    for parent in model.modules():
        if isinstance(parent, (Block, CausalSelfAttention)):
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    found.append((parent, name, child))
    return found


def to_qlora(model: TinyLM, device: torch.device, rank: int, *, quant_type: str = "nf4",
             compress_statistics: bool = True, quant_storage: torch.dtype = torch.uint8) -> TinyLM:  # fmt: skip
    """Freeze ``model``, turn every block linear into 4-bit ``Linear4bit`` + :class:`LoRA`.

    Embeddings, norms and the head stay frozen in float32, as QLoRA keeps them in 16-bit.
    The float weights are copied into ``Linear4bit`` (NF4 with nested statistics unless
    the keywords say otherwise) and quantized when it moves to ``device``.
    """
    from ..nn import Linear4bit

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parent, name, linear in linear_layers(model):
        quantized = Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.float32,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )
        quantized.load_state_dict(linear.state_dict())
        quantized.requires_grad_(False)
        adapter = LoRA(quantized, linear.in_features, linear.out_features, rank)
        setattr(parent, name, adapter)
    return model.to(device)
