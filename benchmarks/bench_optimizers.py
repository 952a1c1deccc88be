"""Optimizer step time, state size and step memory: kbit 8-bit / 32-bit Adam vs torch.optim.Adam.

Usage: python benchmarks/bench_optimizers.py [--layers 12] [--width 2048] [--repeats 3]
                                              [--dtype float32] [--backend NAME]

The model is ``--layers`` Linear(width, width) layers (12 x 2048 -> 50.4M parameters) with
fixed random gradients. For each optimizer it prints:

- ms per step: the fastest of ``--repeats`` steps, after one warm-up step that allocates
  the state;
- state bytes per parameter: the bytes of the distinct storages in ``optimizer.state``
  (shared code tables once) divided by the number of parameters;
- peak extra memory during a step: the rise of the process's resident set during one
  (warm) step above what it held just before the step, i.e. every temporary the step
  allocates. Measured by resetting the kernel's high-water mark (``/proc/self/clear_refs``)
  and reading ``VmHWM`` after the step; the script runs with ``MALLOC_MMAP_THRESHOLD_``
  set so that freed buffers go back to the kernel instead of being cached by malloc (which
  would hide them). Linux only; printed as "n/a" elsewhere.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Callable, Optional

import torch

import kbit
from kbit._demo._accounting import optimizer_state_bytes  # the demo's: shared tables counted once


def _ensure_malloc_returns_memory() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_extra_bytes(step: Callable[[], object]) -> Optional[int]:
    """Resident-set rise during ``step()`` above the level just before it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM to the current RSS
    except OSError:
        step()
        return None
    before = _status_kb("VmRSS")
    step()
    peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return None
    return max(peak - before, 0) * 1024


def main() -> None:
    _ensure_malloc_returns_memory()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--backend", help="kbit backend to prefer (default: the registry's choice)")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)]).to(dtype)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in params)

    candidates: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "kbit Adam8bit": lambda: kbit.optim.Adam8bit(params, lr=1e-4),
        "kbit Adam32bit": lambda: kbit.optim.Adam32bit(params, lr=1e-4),
        "torch Adam fused": lambda: torch.optim.Adam(params, lr=1e-4, fused=True),
        "torch Adam foreach": lambda: torch.optim.Adam(params, lr=1e-4, foreach=True),
    }
    print(f"model: {args.layers} x Linear({args.width}, {args.width}), {numel / 1e6:.1f}M {args.dtype} parameters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    header = f"{'optimizer':<20} {'ms/step':>9} {'state B/param':>14} {'peak extra MB':>14} {'extra B/param':>14}"
    print(header)
    print("-" * len(header))
    context = kbit.backends.use_backend(args.backend) if args.backend else None
    if context is not None:
        context.__enter__()
    for name, make in candidates.items():
        optimizer = make()
        optimizer.step()  # allocates the state
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            optimizer.step()
            best = min(best, time.perf_counter() - start)
        gc.collect()
        extra = _peak_extra_bytes(optimizer.step)
        state = optimizer_state_bytes(optimizer) / numel
        extra_text = ("n/a", "n/a") if extra is None else (f"{extra / 2**20:.0f}", f"{extra / numel:.2f}")
        print(f"{name:<20} {best * 1e3:>9.1f} {state:>14.3f} {extra_text[0]:>14} {extra_text[1]:>14}", flush=True)
        del optimizer
        gc.collect()
    if context is not None:
        context.__exit__(None, None, None)


if __name__ == "__main__":
    main()
