"""Tiny timing helpers shared by the benchmark scripts (wall clock, best of N)."""

from __future__ import annotations

import time
from typing import Callable


def best_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """The fastest of ``repeats`` timed calls of ``fn``, in seconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gbps(num_bytes: int, seconds: float) -> float:
    """Throughput in GB/s (10^9 bytes per second)."""
    return num_bytes / seconds / 1e9
