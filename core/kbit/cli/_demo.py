"""``kbit demo``: a QLoRA fine-tune in miniature on the default backend."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Iterator

import torch

from ._table import render_table


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="fine-tune LoRA adapters on an NF4 model with an 8-bit optimizer and report the savings"
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    parser.add_argument("--size", choices=("small", "medium"), default="small", help="model size (default small)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of both loss curves (needs matplotlib)")
    parser.add_argument("--json", metavar="PATH", help="write the report's numbers as JSON ('-' for stdout)")
    parser.set_defaults(run=run)


def _bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def render_report(report: dict) -> str:
    """The human-readable demo report."""
    config, weights = report["config"], report["memory"]["base_weights"]
    state = report["memory"]["optimizer_state"]
    model = config["model"]
    kbit_run, baseline = report["training"]["kbit"], report["training"]["baseline"]
    lines = [
        "",
        f"kbit demo: QLoRA in miniature ({config['size']}, device {config['device']}, seed {config['seed']})",
        f"model: {model['n_layers']} blocks, d_model {model['d_model']}, {weights['parameters']:,} base weights "
        f"in NF4, {state['trainable_parameters']:,} trainable LoRA parameters (rank {model['lora_rank']})",
        "",
        render_table(
            ("memory", "fp32", "bf16", "kbit", "kbit / bf16"),
            [
                (
                    "base weights (NF4)",
                    _bytes(weights["fp32_bytes"]),
                    _bytes(weights["bf16_bytes"]),
                    _bytes(weights["nf4_bytes"]),
                    f"{weights['ratio_vs_bf16']:.3f}x",
                )
            ],
        ),
        render_table(
            ("optimizer state", "32-bit AdamW", "8-bit", "ratio"),
            [("adapters", _bytes(state["bytes_32bit"]), _bytes(state["bytes_8bit"]), f"{state['ratio']:.3f}x")],
        ),
        "",
        render_table(
            ("training", "loss start", "loss end", "tokens/s"),
            [
                (
                    f"{run['optimizer']}",
                    f"{run['loss_start']:.4f}",
                    f"{run['loss_end']:.4f}",
                    f"{run['tokens_per_second']:,.0f}",
                )
                for run in (kbit_run, baseline)
            ],
        ),
        f"({config['steps']} steps of {config['batch_size']} x {model['seq_len']} tokens each; "
        "loss end = mean of the last 5 steps)",
        "",
        render_table(
            ("kbit op", "served by (calls)"),
            [
                (op, ", ".join(f"{name} ({calls})" for name, calls in served.items()))
                for op, served in report["backends"].items()
            ],
        ),
    ]
    if report["notes"]:
        lines += ["", "notes:"] + [f"  - {note}" for note in report["notes"]]
    lines.append(f"\ndone in {report['elapsed_seconds']:.1f} s")
    return "\n".join(lines)


def write_plot(report: dict, path: str) -> None:
    """Save both loss curves to ``path`` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4))
    styles = {"kbit": ("-", "8-bit state"), "baseline": ("--", "32-bit state")}
    for key, run in report["training"].items():
        line, state = styles[key]
        steps = range(1, len(run["losses"]) + 1)
        axes.plot(steps, run["losses"], line, linewidth=2 if key == "kbit" else 1.5, label=f"{run['optimizer']} ({state})")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_yscale("log")
    axes.set_title("kbit demo: NF4 base + LoRA adapters")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _output_problem(path: str) -> str | None:
    """Why the report cannot be written to ``path`` once the run is over, or None.

    Checked before the run: a typo in a directory name must not cost the whole run.
    """
    target = Path(path)
    if target.is_dir():
        return f"{path} is a directory"
    directory = target.parent
    if not directory.is_dir():
        return f"directory {directory} does not exist"
    if not os.access(directory, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        return f"{path} is not writable"
    return None


def _device_problem(device: str) -> str | None:
    """Why PyTorch cannot allocate on ``device`` (a bad name, a build without it), or None."""
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:  # torch raises AssertionError for missing builds
        return str(exc).strip().splitlines()[-1]
    return None


@contextlib.contextmanager
def _cpu_threads(size: str, device: str) -> Iterator[None]:
    """Run the small model's CPU kernels on one thread, unless ``OMP_NUM_THREADS`` says otherwise.

    Its matrices are small enough that a second thread gains little on an idle machine,
    while on a busy one the threads wait on each other: measured on 2 shared cores, the
    default run took 97-142 s with two threads and 23 s with one. The medium model keeps
    PyTorch's default. The previous setting is restored, so callers in-process keep theirs.
    """
    if size != "small" or torch.device(device).type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(args: argparse.Namespace) -> int:
    from .._demo import DemoConfig, run_demo

    if args.steps < 5:
        print(f"kbit demo: --steps must be at least 5, got {args.steps}", file=sys.stderr)
        return 2
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        to_stdout = option == "--json" and path == "-"
        problem = _output_problem(path) if path and not to_stdout else None
        if problem:
            print(f"kbit demo: {option} {path}: {problem}", file=sys.stderr)
            return 2
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("kbit demo: --plot needs matplotlib; install it with: pip install 'kbit[plot]'", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    problem = _device_problem(device)
    if problem:
        print(f"kbit demo: --device {device!r} cannot be used here: {problem}", file=sys.stderr)
        return 2
    config = DemoConfig(steps=args.steps, size=args.size, device=device, seed=args.seed)
    # With --json - the numbers own stdout; progress and the report go to stderr.
    stream = sys.stderr if args.json == "-" else sys.stdout
    with _cpu_threads(config.size, device):
        report = run_demo(config, stream=stream)
    print(render_report(report), file=stream)
    if args.plot:
        write_plot(report, args.plot)
        print(f"loss curves written to {args.plot}", file=stream)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"numbers written to {args.json}", file=stream)
    return 0
