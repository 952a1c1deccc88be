"""``kbit demo --ranks N``: the QLoRA miniature sharded over N processes with FSDP2.

Every process builds the same seeded model, quantizes it, shards it with
``torch.distributed.fsdp.fully_shard`` (one unit per transformer block, one for the rest)
and trains the adapters with ``kbit.optim.PagedAdamW8bit`` on its slice of each global
batch. This process then runs the same global batches on one process, so the report can
set each rank's memory for weights and optimizer state beside the single process's, and
the two loss curves side by side.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
import warnings
from typing import Any, Optional, TextIO

import torch

from .._dtensor import local_tensor
from .._errors import KbitWarning
from .._spawn import run_ranks
from . import SIZES, DemoConfig, _base_weight_bytes, _train
from ._model import TinyLM, to_qlora

__all__ = ["run_ranks_demo"]

#: Seconds the whole multi-process run may take before its processes are ended.
_TIMEOUT = 1800.0


def _memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state_bytes: int) -> dict[str, Any]:
    """What this process holds: 4-bit weights (codes and scales), optimizer state, trainable values."""
    trainable = sum(local_tensor(p).numel() for group in optimizer.param_groups for p in group["params"])
    return {"weight_bytes": _base_weight_bytes(model)["nf4_bytes"], "optimizer_state_bytes": state_bytes,
            "trainable_parameters": trainable}  # fmt: skip


def _model(config: DemoConfig) -> TinyLM:
    """The demo's seeded QLoRA model, quantized on ``config.device``."""
    model_config, _ = SIZES[config.size]
    torch.manual_seed(config.seed)
    return to_qlora(TinyLM(model_config), torch.device(config.device), model_config.lora_rank)


def _optimizer(model: torch.nn.Module, config: DemoConfig) -> torch.optim.Optimizer:
    from ..optim import PagedAdamW8bit

    return PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)


def _rank_main(rank: int, world_size: int, fields: dict[str, Any], progress_to_stderr: bool) -> dict[str, Any]:
    """One rank of the run: shard, train on this rank's slice of every batch, measure."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    config = DemoConfig(**fields)
    model_config, batch_size = SIZES[config.size]
    model = _model(config)
    mesh = init_device_mesh(torch.device(config.device).type, (world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KbitWarning)  # the single-process run reports them
        optimizer = _optimizer(model, config)
        per_rank = batch_size // world_size
        stream: TextIO = (sys.stderr if progress_to_stderr else sys.stdout) if rank == 0 else io.StringIO()
        run = _train(model, optimizer, config, model_config, batch_size, f"rank {rank} of {world_size} (FSDP2)",
                     stream, part=slice(rank * per_rank, (rank + 1) * per_rank))  # fmt: skip
    return {"losses": run.losses, "seconds": run.seconds, "tokens": run.tokens,
            "memory": _memory(model, optimizer, run.state_bytes)}  # fmt: skip


def run_ranks_demo(config: DemoConfig, ranks: int, stream: Optional[TextIO] = None) -> dict[str, Any]:
    """Run the demo on ``ranks`` processes with FSDP2 and on one; return the report as a dict.

    Raises:
        ValueError: ``ranks`` below 2, or a global batch that does not split evenly.
    """
    if config.size not in SIZES:
        raise ValueError(f"unknown demo size {config.size!r}; choose one of {sorted(SIZES)}")
    model_config, batch_size = SIZES[config.size]
    if ranks < 2 or batch_size % ranks:
        raise ValueError(f"--ranks must be at least 2 and divide the batch of {batch_size}, got {ranks}")
    stream = stream or sys.stdout
    started = time.perf_counter()
    per_rank = run_ranks(_rank_main, ranks, (dataclasses.asdict(config), stream is sys.stderr),
                         device=config.device, timeout=_TIMEOUT)  # fmt: skip

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KbitWarning)
        model = _model(config)
        optimizer = _optimizer(model, config)
        single = _train(model, optimizer, config, model_config, batch_size, "1 process", stream)

    # Each rank's loss is the mean over its equal slice: their mean is the global batch's.
    losses = [sum(values) / ranks for values in zip(*(result["losses"] for result in per_rank), strict=True)]
    single_memory = _memory(model, optimizer, single.state_bytes)
    seconds = max(result["seconds"] for result in per_rank)
    tokens = sum(result["tokens"] for result in per_rank)
    return {
        "config": dataclasses.asdict(config) | {"model": dataclasses.asdict(model_config), "batch_size": batch_size,
                                                "ranks": ranks},  # fmt: skip
        "memory": {
            "single_process": single_memory,
            "ranks": [result["memory"] for result in per_rank],
        },
        "training": {
            "ranks": {"optimizer": f"{single.optimizer} (FSDP2, {ranks} ranks)", "losses": losses,
                      "tokens_per_second": tokens / seconds, "seconds": seconds},  # fmt: skip
            "single": {"optimizer": f"{single.optimizer} (1 process)", "losses": single.losses,
                       "tokens_per_second": single.tokens / single.seconds, "seconds": single.seconds},  # fmt: skip
        },
        "max_loss_difference": max(abs(a - b) for a, b in zip(losses, single.losses, strict=True)),
        "notes": sorted({str(w.message) for w in caught if issubclass(w.category, KbitWarning)}),
        "elapsed_seconds": time.perf_counter() - started,
    }
