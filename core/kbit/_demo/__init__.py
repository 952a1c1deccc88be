"""``kbit demo``: a QLoRA fine-tune in miniature.

A small transformer's block weights are quantized to NF4 (``kbit.nn.Linear4bit``),
low-rank adapters are trained on top with ``kbit.optim.PagedAdamW8bit`` on synthetic
next-token data, and the same steps are run with PyTorch's 32-bit AdamW for comparison.
The report says how much memory 4-bit weights and 8-bit optimizer state save, how the
losses compare, and which backend served every kbit op.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from typing import Optional, TextIO

import torch
from torch import nn

from .. import backends
from .._dtensor import local_tensor
from .._errors import KbitWarning
from ._accounting import optimizer_state_bytes, storage_bytes
from ._data import PermutationTask
from ._model import LoRA, ModelConfig, TinyLM, to_qlora
from ._progress import Progress

__all__ = ["DemoConfig", "SIZES", "run_demo"]

#: Model and run shapes by ``--size``.
SIZES: dict[str, tuple[ModelConfig, int]] = {
    "small": (ModelConfig(), 16),
    "medium": (ModelConfig(d_model=512, n_heads=8, n_layers=4, d_ff=2048, lora_rank=32), 16),
}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What ``kbit demo`` runs."""

    steps: int = 60
    size: str = "small"
    device: str = "cpu"
    seed: int = 0
    learning_rate: float = 3e-3


@dataclasses.dataclass
class RunResult:
    """Losses and speed of one training run."""

    optimizer: str
    losses: list[float]
    seconds: float
    tokens: int
    state_bytes: int

    def summary(self) -> dict:
        """Numbers for the report: start/end loss (end = mean of the last 5 steps)."""
        tail = self.losses[-5:]
        return {
            "optimizer": self.optimizer,
            "loss_start": self.losses[0],
            "loss_end": sum(tail) / len(tail),
            "losses": self.losses,
            "tokens_per_second": self.tokens / self.seconds,
            "seconds": self.seconds,
            "state_bytes": self.state_bytes,
        }


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: DemoConfig,
    model_config: ModelConfig,
    batch_size: int,
    label: str,
    stream: Optional[TextIO],
    part: slice = slice(None),
) -> RunResult:
    """Train ``config.steps`` steps; ``part`` is this process's slice of every batch (all of it alone)."""
    task = PermutationTask(model_config.vocab_size, model_config.seq_len, seed=config.seed + 1)
    device = torch.device(config.device)
    progress = Progress(label, config.steps, stream)
    losses = []
    started = time.perf_counter()
    for step in range(1, config.steps + 1):
        inputs, targets = task.batch(batch_size, device)
        inputs, targets = inputs[part], targets[part]
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.update(step, losses[-1])
    seconds = time.perf_counter() - started
    return RunResult(
        type(optimizer).__name__, losses, seconds, config.steps * len(range(batch_size)[part]) * model_config.seq_len,
        optimizer_state_bytes(optimizer),
    )


def _base_weight_bytes(model: nn.Module) -> dict:
    """Bytes of the quantized block weights, and what they would take in fp32 / bf16."""
    numel = 0
    held = []
    for module in model.modules():
        if isinstance(module, LoRA):
            # Under FSDP the weight is a DTensor: count this process's shard of the codes.
            weight = local_tensor(module.base.weight)
            state = module.base.quant_state
            numel += state.shape.numel()
            held += [weight.data, state.absmax, state.code]
            if state.nested:
                held += [state.offset, state.state2.absmax, state.state2.code]
    nf4 = storage_bytes(held)
    return {
        "parameters": numel,
        "fp32_bytes": numel * 4,
        "bf16_bytes": numel * 2,
        "nf4_bytes": nf4,
        "ratio_vs_bf16": nf4 / (numel * 2),
        "ratio_vs_fp32": nf4 / (numel * 4),
    }


def run_demo(config: DemoConfig, stream: Optional[TextIO] = None) -> dict:
    """Run the demo and return its report as a JSON-serialisable dict."""
    from ..optim import PagedAdamW8bit

    if config.size not in SIZES:
        raise ValueError(f"unknown demo size {config.size!r}; choose one of {sorted(SIZES)}")
    model_config, batch_size = SIZES[config.size]
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    started = time.perf_counter()

    with warnings.catch_warnings(record=True) as caught, backends.record_calls() as calls:
        warnings.simplefilter("always", KbitWarning)
        model = to_qlora(TinyLM(model_config), device, model_config.lora_rank)
        baseline_model = copy.deepcopy(model)
        adapters = [p for p in model.parameters() if p.requires_grad]
        optimizer = PagedAdamW8bit(adapters, lr=config.learning_rate)
        kbit_run = _train(model, optimizer, config, model_config, batch_size, "NF4 + PagedAdamW8bit", stream)

    baseline_params = [p for p in baseline_model.parameters() if p.requires_grad]
    baseline_optimizer = torch.optim.AdamW(baseline_params, lr=config.learning_rate)
    baseline_run = _train(
        baseline_model, baseline_optimizer, config, model_config, batch_size, "NF4 + torch AdamW 32-bit", stream
    )

    trainable = sum(p.numel() for p in adapters)
    return {
        "config": dataclasses.asdict(config) | {"model": dataclasses.asdict(model_config), "batch_size": batch_size},
        "memory": {
            "base_weights": _base_weight_bytes(model),
            "optimizer_state": {
                "trainable_parameters": trainable,
                "bytes_32bit": baseline_run.state_bytes,
                "bytes_8bit": kbit_run.state_bytes,
                "ratio": kbit_run.state_bytes / baseline_run.state_bytes,
            },
        },
        "training": {"kbit": kbit_run.summary(), "baseline": baseline_run.summary()},
        "backends": calls.by_op(),
        "notes": sorted({str(w.message) for w in caught if issubclass(w.category, KbitWarning)}),
        "elapsed_seconds": time.perf_counter() - started,
    }
