"""Run a function on several local processes joined in one ``torch.distributed`` group.

``kbit demo --ranks N`` and the project's multi-process tests use it. Each process gets a
rank, joins the group through a ``FileStore`` in a private temporary directory (no port to
pick, so runs started side by side cannot collide), calls ``fn(rank, world_size, *args)``
and hands back its result. The run is bounded in time: a process stuck in a collective
makes :func:`run_ranks` fail after ``timeout`` seconds instead of blocking forever, and
every process it started is ended.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

import torch

__all__ = ["run_ranks", "RanksError", "RanksTimeoutError", "backend_for_device"]

#: Process-group backend by device type.
_BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


class RanksError(RuntimeError):
    """A process of :func:`run_ranks` raised; the others were ended.

    Attributes:
        rank: the rank that failed first (the others usually fail because it left).
        details: its traceback.
    """

    def __init__(self, rank: int, details: str, others: list[int]) -> None:
        self.rank = rank
        self.details = details
        then = f" (then ranks {others}, which lost it)" if others else ""
        last = details.strip().splitlines()[-1] if details.strip() else "no message"
        super().__init__(f"rank {rank} failed{then}: {last}\n\n{details}")


class RanksTimeoutError(TimeoutError):
    """The processes of :func:`run_ranks` did not all finish in time (they were ended)."""


def backend_for_device(device: str) -> str:
    """The ``torch.distributed`` backend for ``device`` ("cpu": gloo, "cuda": nccl)."""
    kind = torch.device(device).type
    if kind not in _BACKENDS:
        raise ValueError(f"no process-group backend for device {device!r}; use one of {sorted(_BACKENDS)}")
    return _BACKENDS[kind]


def _rank_main(rank: int, fn: Callable[..., Any], world_size: int, args: Sequence[Any], device: str,
               workdir: str, timeout: float, threads: int) -> None:  # fmt: skip
    """The body of one spawned process: join the group, run ``fn``, save its result."""
    import torch.distributed as dist

    if threads > 0:
        torch.set_num_threads(threads)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(rank)
    store = dist.FileStore(os.path.join(workdir, "store"), world_size)
    dist.init_process_group(
        backend_for_device(device), store=store, rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )  # fmt: skip
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(workdir, f"rank{rank}.pt"))
        dist.barrier()  # no process leaves while another may still talk to it
    except BaseException:
        # Written before this process exits, so before its peers notice it left and fail in
        # turn: the earliest report names the cause.
        with open(os.path.join(workdir, f"rank{rank}.error"), "w") as report:
            report.write(f"{time.time()!r}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *, device: str = "cpu",
              timeout: float = 300.0, threads: int = 1) -> list[Any]:  # fmt: skip
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes; return their results.

    Args:
        fn: a module-level function (the processes are spawned, so it is imported by name).
            Its result must be loadable with ``torch.load(weights_only=True)``: tensors,
            numbers, strings and lists/tuples/dicts of them.
        world_size: number of processes (ranks).
        args: further positional arguments for ``fn`` (picklable).
        device: ``"cpu"`` (gloo) or ``"cuda"`` (nccl, rank ``r`` on GPU ``r``).
        timeout: seconds for the whole run, also the process group's collective timeout.
        threads: ``torch.set_num_threads`` in each process (0 keeps torch's default).

    Returns:
        The results of ranks ``0 .. world_size - 1``, in order.

    Raises:
        RanksError: a process raised; the error names the rank that failed first and
            carries its traceback. The others are ended.
        RanksTimeoutError: the run took longer than ``timeout``.
    """
    import torch.multiprocessing as mp

    backend_for_device(device)  # an unknown device fails here, not in every process
    with tempfile.TemporaryDirectory(prefix="kbit-ranks-") as workdir:
        context = mp.start_processes(
            _rank_main, args=(fn, world_size, tuple(args), device, workdir, timeout, threads),
            nprocs=world_size, join=False, start_method="spawn",
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    alive = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
                    raise RanksTimeoutError(
                        f"run_ranks: {fn.__module__}.{fn.__qualname__} on {world_size} ranks did not finish in "
                        f"{timeout:.0f} s (ranks still running: {alive}); they were ended"
                    )
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            failed = _first_failure(workdir, world_size)
            if failed is None:
                raise  # killed without a Python error (a signal, out of memory)
            raise failed from exc
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join(5)
        return [torch.load(os.path.join(workdir, f"rank{rank}.pt"), weights_only=True) for rank in range(world_size)]


def _first_failure(workdir: str, world_size: int) -> RanksError | None:
    """The error the first failing rank reported (the others' came after), or None."""
    reports = []
    for rank in range(world_size):
        path = os.path.join(workdir, f"rank{rank}.error")
        if os.path.exists(path):
            with open(path) as report:
                when, _, details = report.read().partition("\n")
            try:
                reports.append((float(when), rank, details))
            except ValueError:
                continue  # still being written by a rank that failed later
    if not reports:
        return None
    reports.sort()
    _, rank, details = reports[0]
    return RanksError(rank, details, [other for _, other, _ in reports[1:]])
