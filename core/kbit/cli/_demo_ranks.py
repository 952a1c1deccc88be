"""The report of ``kbit demo --ranks N`` (FSDP2 over N processes against one process)."""

from __future__ import annotations

from ._demo import _bytes
from ._table import render_table


def render_ranks_report(report: dict) -> str:
    """The human-readable report of a multi-process demo run."""
    config, memory, training = report["config"], report["memory"], report["training"]
    model, single = config["model"], memory["single_process"]

    def share(value: int, whole: int) -> str:
        return f"{value / whole:.3f}x" if whole else "-"

    rows = [("1 process", _bytes(single["weight_bytes"]), _bytes(single["optimizer_state_bytes"]),
             f"{single['trainable_parameters']:,}")]  # fmt: skip
    for rank, held in enumerate(memory["ranks"]):
        rows.append((
            f"rank {rank}",
            f"{_bytes(held['weight_bytes'])} ({share(held['weight_bytes'], single['weight_bytes'])})",
            f"{_bytes(held['optimizer_state_bytes'])} "
            f"({share(held['optimizer_state_bytes'], single['optimizer_state_bytes'])})",
            f"{held['trainable_parameters']:,}",
        ))  # fmt: skip
    runs = [training["ranks"], training["single"]]
    lines = [
        "",
        f"kbit demo: QLoRA in miniature on {config['ranks']} processes with FSDP2 ({config['size']}, "
        f"device {config['device']}, seed {config['seed']})",
        f"model: {model['n_layers']} blocks, d_model {model['d_model']}, NF4 base weights, LoRA rank "
        f"{model['lora_rank']}; each rank trains on {config['batch_size'] // config['ranks']} of every "
        f"{config['batch_size']} sequences",
        "",
        render_table(("memory held", "4-bit weights", "optimizer state", "trainable values"), rows),
        "(4-bit weights: this process's share of the packed codes plus the replicated scales)",
        "",
        render_table(
            ("training", "loss start", "loss end", "tokens/s"),
            [
                (run["optimizer"], f"{run['losses'][0]:.4f}", f"{sum(run['losses'][-5:]) / len(run['losses'][-5:]):.4f}",
                 f"{run['tokens_per_second']:,.0f}")
                for run in runs
            ],
        ),  # fmt: skip
        f"largest difference between the two loss curves at any step: {report['max_loss_difference']:.2e}",
        f"({config['steps']} steps; loss end = mean of the last 5 steps)",
    ]
    if report["notes"]:
        lines += ["", "notes:"] + [f"  - {note}" for note in report["notes"]]
    lines.append(f"\ndone in {report['elapsed_seconds']:.1f} s")
    return "\n".join(lines)
