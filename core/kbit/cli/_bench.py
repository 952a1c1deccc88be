"""``kbit bench``: every op on every available backend side by side, with the incumbent.

The measurements run in worker processes (``kbit._bench``); this module parses the
arguments, shows progress, and prints one table per thread count, the performance
targets of the CPU backend with what was measured, and the notes of the run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Optional, TextIO

from ._table import render_table

DEFAULT_SIZE = 16 * 1024 * 1024
MIN_SIZE = 65536


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time every op on every backend (and bitsandbytes when available) side by side",
        description="Time each op on each available backend side by side in one run: warm-up, repeats, "
        "best and median, effective GB/s and its share of a measured memcpy bandwidth, the "
        "optimizer step against torch.optim.Adam(fused=True) with peak extra memory, Linear4bit "
        "against a dense nn.Linear, and the small-call latency. bitsandbytes gets a row when it "
        "imports here or in the interpreter given by --bnb-python.",
    )
    parser.add_argument("--backends", help="comma-separated kbit backends, 'bitsandbytes' and 'torch' "
                        "(default: every available one)")  # fmt: skip
    parser.add_argument("--ops", help="comma-separated op groups (default: all): " + ", ".join(_op_names()))
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"elements of the bandwidth ops' input (default {DEFAULT_SIZE}; the optimizers step "
                        "3x as many parameters, the Linear4bit layer is up to 4096 square)")  # fmt: skip
    parser.add_argument("--threads", default=None,
                        help="comma-separated torch thread counts, one table each (default: 1 and torch's)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--bnb-python", metavar="PATH", help="Python interpreter with bitsandbytes installed "
                        "(default: $KBIT_BENCH_BNB_PYTHON, or this one when bitsandbytes imports here)")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="write every number as JSON ('-' for stdout)")
    parser.set_defaults(run=run)


def _op_names() -> tuple[str, ...]:
    from .._bench.cases import OPS

    return OPS


def _split(value: Optional[str]) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _fail(message: str) -> int:
    print(f"kbit bench: {message}", file=sys.stderr)
    return 2


def _thread_counts(value: Optional[str]) -> tuple[int, ...]:
    import torch

    if value is None:
        return tuple(sorted({1, torch.get_num_threads()}))
    counts = []
    for part in _split(value) or ():
        count = int(part)  # ValueError is reported by run()
        if count < 1:
            raise ValueError(part)
        counts.append(count)
    if not counts:
        raise ValueError(value)
    return tuple(dict.fromkeys(counts))


def run(args: argparse.Namespace) -> int:
    import kbit

    from .._bench.runner import BITSANDBYTES, TORCH, BenchConfig, WorkerFailed, run_bench

    try:
        threads = _thread_counts(args.threads)
    except ValueError:
        return _fail(f"--threads takes positive integers separated by commas, got {args.threads!r}")
    if args.size < MIN_SIZE or args.size % 4096:
        return _fail(f"--size must be a multiple of 4096 and at least {MIN_SIZE}, got {args.size}")
    ops = _split(args.ops)
    unknown = sorted(set(ops or ()) - set(_op_names()))
    if unknown or ops == ():
        return _fail(f"unknown op group(s) {unknown or [args.ops]}; choose from {', '.join(_op_names())}")
    backends = _split(args.backends)
    if backends is not None:
        known = {record.name for record in kbit.backends.list()} | {BITSANDBYTES, TORCH}
        unknown = sorted(set(backends) - known)
        if unknown or not backends:
            return _fail(f"unknown backend(s) {unknown or [args.backends]}; known: {', '.join(sorted(known))}")
    device_problem = _device_problem(args.device)
    if device_problem:
        return _fail(f"--device {args.device!r} cannot be used here: {device_problem}")

    config = BenchConfig(size=args.size, threads=threads, device=args.device, backends=backends, ops=ops,
                         bnb_python=args.bnb_python)  # fmt: skip
    stream = sys.stderr if args.json == "-" else sys.stdout
    from .._demo._progress import Progress

    bar: Optional[Progress] = None

    def progress(done: int, total: int, status: str) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress("kbit bench", total, stream, every=1)
        bar.update(done, status=status)

    try:
        report = run_bench(config, progress)
    except WorkerFailed as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted")
    print(render_report(report), file=stream)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"numbers written to {args.json}", file=stream)
    return 0


def _device_problem(device: str) -> Optional[str]:
    import torch

    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        return str(exc).strip().splitlines()[-1]
    return None


# ----------------------------------------------------------------------------- report
def _seconds(value: Optional[float], kind: str) -> str:
    if value is None:
        return "-"
    return f"{value * 1e6:.1f} us" if kind == "latency" else f"{value * 1e3:.2f} ms"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _megabytes(count: Optional[float]) -> str:
    return "-" if count is None else f"{count / 1e6:.1f} MB"


def _speedup(row: dict, other: Optional[dict]) -> Optional[float]:
    if other is None or other is row or row.get("error") or other.get("error"):
        return None
    return other["best"] / row["best"] if row.get("best") else None


def _time_ratio(row: dict, other: Optional[dict]) -> Optional[float]:
    if other is None or other is row or row.get("error") or other.get("error") or not other.get("best"):
        return None
    return row["best"] / other["best"]


def _peak(row: dict) -> str:
    if row.get("peak_extra") is None:
        return "-"
    share = f" ({100 * row['peak_extra'] / row['state_bytes']:.1f}% of state)" if row.get("state_bytes") else ""
    return _megabytes(row["peak_extra"]) + share


def _table_rows(report: dict, threads: int) -> list[tuple[str, ...]]:
    from .._bench.runner import BITSANDBYTES, TORCH, rows_by_case

    table = []
    for rows in rows_by_case(report["rows"], threads).values():
        bnb, reference, torch_row = rows.get(BITSANDBYTES), rows.get("reference"), rows.get(TORCH)
        for name, row in rows.items():
            if row.get("error"):
                table.append((row["op"], row["variant"], name, "failed", *["-"] * 7, row["error"]))
                continue
            share = row.get("memcpy_share")
            table.append((
                row["op"], row["variant"], name, _seconds(row.get("best"), row["kind"]),
                _seconds(row.get("median"), row["kind"]),
                "-" if row.get("gbps") is None else f"{row['gbps']:.2f}",
                "-" if share is None else f"{100 * share:.0f}%",
                _ratio(_speedup(row, bnb)), _ratio(_speedup(row, reference)), _ratio(_time_ratio(row, torch_row)),
                _peak(row), row.get("memory_error", ""),
            ))  # fmt: skip
    return table


def _target_rows(report: dict, threads: int) -> list[tuple[str, ...]]:
    rows = []
    for target in report["targets"][str(threads)]:
        value, limit, unit = target["value"], target["limit"], target["unit"]

        def show(number: float) -> str:
            if unit == "share":
                return f"{100 * number:.1f}%"
            return f"{number:.1f} us" if unit == "us" else f"{number:.2f}x"

        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        measured = "-" if value is None else show(value)
        rows.append((target["target"], measured, ("<= " if target["at_most"] else ">= ") + show(limit), verdict))
    return rows


def render_report(report: dict, stream: Optional[TextIO] = None) -> str:
    """The human-readable tables of a bench report."""
    config = report["config"]
    versions = report["versions"]
    lines = [
        "",
        f"kbit bench: size {config['size']:,}, device {config['device']}, python {platform.python_version()}, "
        f"torch {versions['kbit'].get('torch')}, kbit {versions['kbit'].get('kbit')}"
        + (f", bitsandbytes {versions['bitsandbytes'].get('bitsandbytes')} ({versions['bitsandbytes'].get('executable')})"
           if "bitsandbytes" in versions else ""),
        "speedups: other's time / this row's time (above 1: this row is faster); "
        "/ torch: this row's time / the torch baseline's",
    ]  # fmt: skip
    headers = ("OP", "VARIANT", "IMPL", "BEST", "MEDIAN", "GB/S", "MEMCPY", "VS BNB", "VS REF", "/ TORCH", "PEAK EXTRA",
               "NOTE")
    for threads in config["threads"]:
        memcpy, clone = report["memcpy_gbps"][str(threads)], report["clone_gbps"][str(threads)]
        lines += ["", f"{threads} thread(s); memcpy {memcpy:.2f} GB/s (read + write, into an existing tensor; "
                  f"into a fresh one, as ops return: {clone:.2f} GB/s)", ""]  # fmt: skip
        lines.append(render_table(headers, _table_rows(report, threads)))
        targets = _target_rows(report, threads)
        if targets:
            lines += ["", f"targets of the '{report['subject']}' backend, {threads} thread(s):", ""]
            lines.append(render_table(("TARGET", "MEASURED", "REQUIRED", "RESULT"), targets))
    if report["notes"]:
        lines += ["", "notes:"] + [f"  - {note}" for note in report["notes"]]
    return "\n".join(lines)
