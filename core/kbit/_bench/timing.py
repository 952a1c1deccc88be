"""Timing and memory measurement for ``kbit bench`` (torch only: the worker that times the
incumbent may run in an interpreter without kbit).

- :func:`time_call`: warm-up calls, then repeated timed calls (at least ``min_repeats``,
  more while the time budget lasts), reporting the fastest and the median.
- :func:`memcpy_seconds`: the time of a plain tensor copy, the bandwidth every
  memory-bound op is compared with.
- :func:`peak_extra_bytes`: how far the process's resident set rises above its level
  before a call, during that call (Linux: the kernel's high-water mark, reset through
  ``/proc/self/clear_refs``). It sees every temporary a call allocates only when freed
  buffers go back to the kernel at once, which is why memory is measured in a worker
  started with ``MALLOC_MMAP_THRESHOLD_`` set (see :data:`MEMORY_WORKER_ENV`).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional

import torch

__all__ = ["MEMORY_WORKER_ENV", "Timing", "memcpy_seconds", "peak_extra_bytes", "time_call"]

#: Environment of a worker that measures memory: glibc serves allocations above 64 KiB
#: with mmap and unmaps them on free, so no temporary hides in malloc's cache.
MEMORY_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: fastest and median of ``repeats`` timed calls."""

    best: float
    median: float
    repeats: int


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for ``device``'s queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_call(
    fn: Callable[[], object],
    *,
    device: torch.device = torch.device("cpu"),
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 15,
    budget: float = 3.0,
    inner: int = 1,
) -> Timing:
    """Time ``fn``: ``warmup`` untimed calls, then timed ones until ``budget`` seconds have
    passed (between ``min_repeats`` and ``max_repeats`` samples). Each sample runs ``fn``
    ``inner`` times and counts the mean, for calls too short to time one by one."""
    sync = synchronizer(device)
    for _ in range(warmup):
        fn()
    sync()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < max_repeats:
        begin = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - begin) / inner)
        if len(samples) >= min_repeats and time.perf_counter() - started > budget:
            break
    return Timing(min(samples), statistics.median(samples), len(samples))


def memcpy_seconds(numel: int, device: torch.device, repeats: int = 10) -> tuple[float, float, int]:
    """``(seconds into an existing tensor, seconds into a fresh one, bytes moved)`` of the
    fastest copy of ``numel`` float32; bytes moved counts the read and the write.

    The first is the bandwidth the ops are measured against. The second (``clone``) also
    pays for the fresh output every op returns: where first-touch page faults are slow
    (virtual machines), it shows how much of an op's time no kernel can remove.
    """
    source = torch.ones(numel, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    copy = time_call(lambda: target.copy_(source), device=device, warmup=2, min_repeats=repeats, budget=1.0)
    clone = time_call(source.clone, device=device, warmup=1, min_repeats=repeats, budget=1.0)
    return copy.best, clone.best, 2 * source.numel() * source.element_size()


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_bytes(fn: Callable[[], object]) -> Optional[int]:
    """The rise of the resident set during ``fn()`` above its level just before the call,
    or None where the kernel does not report it (not Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the high-water mark (VmHWM) to the current resident set
    except OSError:
        fn()
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return None
    return max(peak - before, 0) * 1024
