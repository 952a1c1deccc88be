"""Running ``kbit bench``: workers, the order of measurements, and the report.

Every measurement runs in a worker process (``worker.py``): one on this interpreter for
kbit's backends and the torch baselines, one on the incumbent's interpreter (this one when
bitsandbytes imports here, else ``--bnb-python``), and for the optimizer rows a second
worker of each kind started with :data:`timing.MEMORY_WORKER_ENV` that measures peak memory.
Measurements run one at a time, case by case, every implementation of a case right after
the other, so their ratios come from the same minutes of the same machine.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from . import targets as bench_targets
from .cases import CASES, Case, case_ids
from .timing import MEMORY_WORKER_ENV

__all__ = ["BenchConfig", "Implementation", "WorkerFailed", "is_kbit_compat", "rows_by_case", "run_bench"]

WORKER_SCRIPT = Path(__file__).resolve().parent / "worker.py"
BITSANDBYTES = "bitsandbytes"
TORCH = "torch"


class WorkerFailed(RuntimeError):
    """A worker process died or could not start; the message holds its last words."""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to run: kbit backends (None: every available one for the device), ops (None:
    all), the input size, thread counts, and the interpreter with bitsandbytes."""

    size: int
    threads: tuple[int, ...]
    device: str = "cpu"
    backends: Optional[tuple[str, ...]] = None
    ops: Optional[tuple[str, ...]] = None
    bnb_python: Optional[str] = None
    include_bitsandbytes: bool = True
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One column of results: a case family (``kbit``, ``bitsandbytes``, ``torch``) and,
    for kbit, the backend."""

    name: str
    family: str
    backend: Optional[str] = None


class Worker:
    """A worker process answering JSON requests (see worker.py)."""

    def __init__(self, python: str, memory: bool = False) -> None:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, **(MEMORY_WORKER_ENV if memory else {}))
        env.pop("PYTHONPATH", None)  # the worker imports what its own interpreter has
        self._log = tempfile.TemporaryFile(mode="w+")
        try:
            self._process = subprocess.Popen(
                [python, str(WORKER_SCRIPT), str(write_fd)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log, pass_fds=(write_fd,),
                env=env, text=True,
            )  # fmt: skip
        except OSError as exc:
            os.close(read_fd)
            raise WorkerFailed(f"cannot start {python}: {exc}") from exc
        finally:
            os.close(write_fd)
        self._answers = os.fdopen(read_fd)
        self.python = python

    def request(self, **request: object) -> dict:
        """Send one request and wait for its answer."""
        try:
            assert self._process.stdin is not None
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
            line = self._answers.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            raise WorkerFailed(f"the worker on {self.python} stopped: {self._last_words()}")
        return json.loads(line)

    def _last_words(self) -> str:
        self._process.wait(timeout=30)
        self._log.seek(0)
        lines = [line for line in self._log.read().splitlines() if line.strip()]
        return lines[-1] if lines else f"exit code {self._process.returncode}"

    def close(self) -> None:
        """End the worker."""
        if self._process.poll() is None:
            try:
                assert self._process.stdin is not None
                self._process.stdin.close()
                self._process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
        self._answers.close()
        self._log.close()


def is_kbit_compat(version: str) -> bool:
    """Whether a ``bitsandbytes`` version is kbit's compatibility package (plugins/bitsandbytes-compat,
    versioned ``<api level>+kbit``), which must never be timed as the incumbent."""
    return version.endswith("+kbit")


def find_bitsandbytes_python(explicit: Optional[str]) -> Optional[str]:
    """The interpreter for the incumbent's rows: ``explicit``, else ``KBIT_BENCH_BNB_PYTHON``,
    else this one when bitsandbytes is importable here, else None."""
    chosen = explicit or os.environ.get("KBIT_BENCH_BNB_PYTHON")
    if chosen:
        return chosen
    return sys.executable if importlib.util.find_spec(BITSANDBYTES) is not None else None


def kbit_implementations(config: BenchConfig) -> list[Implementation]:
    """kbit backends to time: the requested ones, or every available one serving the device."""
    import kbit

    if config.backends is not None:
        names = [name for name in config.backends if name not in (BITSANDBYTES, TORCH)]
    else:
        device_type = config.device.split(":")[0]
        names = [
            record.name
            for record in kbit.backends.list()
            # the reference serves every device type, as the fallback
            if record.state == "available" and (device_type in record.device_types or record.name == "reference")
        ]
    return [Implementation(name, "kbit", name) for name in names]


def default_backend(device: str) -> str:
    """The kbit backend the registry picks on ``device`` by default (the targets' subject)."""
    import torch

    import kbit

    return kbit.backends.resolve("quantize_blockwise", device.split(":")[0], torch.float32, blocksize=4096).name


Progress = Callable[[int, int, str], None]


def run_bench(config: BenchConfig, progress: Optional[Progress] = None) -> dict:
    """Run every selected case for every implementation and thread count; return the report.

    Raises :class:`WorkerFailed` when kbit's own worker cannot run; the incumbent's worker
    failing only drops its rows (with a note).
    """
    notes: list[str] = []
    implementations = kbit_implementations(config)
    wanted = set(config.backends) if config.backends is not None else None
    selected: list[Case] = [case for case in CASES if case.id in set(case_ids(list(config.ops) if config.ops else None))]

    kbit_worker = Worker(sys.executable)
    workers = {"kbit": kbit_worker}
    memory_workers: dict[str, Worker] = {}
    try:
        hello = {"kbit": kbit_worker.request(kind="hello")}
        if "error" in hello["kbit"]:
            raise WorkerFailed(hello["kbit"]["error"])
        bnb_python = find_bitsandbytes_python(config.bnb_python)
        if config.include_bitsandbytes and (wanted is None or BITSANDBYTES in wanted):
            if bnb_python is None:
                notes.append("bitsandbytes: not importable here; pass --bnb-python (or set KBIT_BENCH_BNB_PYTHON) "
                             "to an interpreter that has it")  # fmt: skip
            else:
                try:
                    worker = Worker(bnb_python)
                    hello[BITSANDBYTES] = worker.request(kind="hello")
                    version = hello[BITSANDBYTES].get("bitsandbytes")
                    if version is None or str(version).startswith("unusable"):
                        notes.append(f"bitsandbytes: {version or 'not installed'} in {bnb_python}")
                        worker.close()
                    elif is_kbit_compat(str(version)):
                        notes.append(f"bitsandbytes in {bnb_python} is kbit's compatibility package ({version}), "
                                     "not the incumbent; pass --bnb-python (or set KBIT_BENCH_BNB_PYTHON) to an "
                                     "interpreter with the real bitsandbytes")  # fmt: skip
                        worker.close()
                    else:
                        workers[BITSANDBYTES] = worker
                        implementations.append(Implementation(BITSANDBYTES, BITSANDBYTES))
                except WorkerFailed as exc:
                    notes.append(f"bitsandbytes: {exc}")
        # The torch baselines are what the ratios of the layer and optimizer rows divide by.
        implementations.append(Implementation(TORCH, TORCH))

        plan = [
            (threads, case, impl)
            for threads in config.threads
            for case in selected
            for impl in implementations
            if impl.family in case.runners
        ]
        total = len(plan) + len(config.threads)
        done = 0
        memcpy: dict[int, float] = {}
        fresh: dict[int, float] = {}
        rows: list[dict] = []
        for threads in config.threads:
            if progress:
                progress(done, total, f"memcpy, {threads} thread(s)")
            answer = kbit_worker.request(kind="memcpy", threads=threads, size=config.size, device=config.device)
            if "error" in answer:
                raise WorkerFailed(f"memcpy: {answer['error']}")
            memcpy[threads] = answer["bytes"] / answer["seconds"] / 1e9
            fresh[threads] = answer["bytes"] / answer["fresh_seconds"] / 1e9
            done += 1
            for case in selected:
                for impl in implementations:
                    if impl.family not in case.runners:
                        continue
                    if progress:
                        progress(done, total, f"{case.op} ({case.variant}) - {impl.name}, {threads} thread(s)")
                    rows.append(_measure(config, case, impl, threads, memcpy[threads], workers, memory_workers, notes))
                    done += 1
        if progress:
            progress(total, total, "done")
    finally:
        for worker in (*workers.values(), *memory_workers.values()):
            worker.close()

    subject = default_backend(config.device)
    return {
        "config": {**dataclasses.asdict(config), "threads": list(config.threads)},
        "versions": hello,
        "subject": subject,
        "memcpy_gbps": {str(threads): value for threads, value in memcpy.items()},
        "clone_gbps": {str(threads): value for threads, value in fresh.items()},
        "rows": rows,
        "targets": {
            str(threads): bench_targets.evaluate(rows_by_case(rows, threads), subject) for threads in config.threads
        },
        "notes": notes,
    }


def _worker_for(impl: Implementation, workers: dict[str, Worker]) -> Optional[Worker]:
    return workers.get(BITSANDBYTES) if impl.family == BITSANDBYTES else workers["kbit"]


def _memory_worker(impl: Implementation, workers: dict[str, Worker], memory_workers: dict[str, Worker]) -> Worker:
    key = BITSANDBYTES if impl.family == BITSANDBYTES else "kbit"
    if key not in memory_workers:
        memory_workers[key] = Worker(workers[key].python, memory=True)
    return memory_workers[key]


def _measure(config: BenchConfig, case: Case, impl: Implementation, threads: int, memcpy_gbps: float,
             workers: dict[str, Worker], memory_workers: dict[str, Worker], notes: list[str]) -> dict:  # fmt: skip
    row: dict = {"threads": threads, "case": case.id, "op": case.op, "variant": case.variant, "kind": case.kind,
                 "impl": impl.name}  # fmt: skip
    request = dict(kind="case", case=case.id, family=impl.family, backend=impl.backend, threads=threads,
                   size=config.size, device=config.device, seed=config.seed)  # fmt: skip
    worker = _worker_for(impl, workers)
    if worker is None:
        row["error"] = "the bitsandbytes worker is not running"
        return row
    try:
        answer = worker.request(**request)
        if "error" not in answer and case.kind == "optimizer":
            measured = _memory_worker(impl, workers, memory_workers).request(**request, memory=True)
            if "error" in measured:
                answer["memory_error"] = measured["error"]
            else:
                answer["peak_extra"] = measured.get("peak_extra")
    except WorkerFailed as exc:
        if impl.family != BITSANDBYTES:
            raise
        notes.append(f"bitsandbytes worker failed at {case.id}: {exc}")
        workers.pop(BITSANDBYTES, None)
        answer = {"error": str(exc)}
    row.update(answer)
    if "error" not in answer and answer.get("moved") and case.kind in ("bandwidth", "optimizer"):
        row["gbps"] = answer["moved"] / answer["best"] / 1e9
        row["memcpy_share"] = row["gbps"] / memcpy_gbps
    return row


def rows_by_case(rows: list[dict], threads: int) -> dict[str, dict[str, dict]]:
    """The rows of one thread count as ``{case: {implementation: row}}``."""
    table: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row["threads"] == threads:
            table.setdefault(row["case"], {})[row["impl"]] = row
    return table
