"""The process that runs ``kbit bench``'s measurements, one request at a time.

Run as a script (``python worker.py FD``), possibly by another interpreter: the incumbent's
rows run in whatever environment has bitsandbytes installed, which need not have kbit.
Requests arrive as JSON lines on stdin; each answer is one JSON line written to the file
descriptor ``FD`` (stdout stays free for whatever the libraries print). A failure becomes
``{"error": "Type: message"}``, never a traceback.

Requests:

- ``{"kind": "hello"}``: versions of Python, torch, kbit and bitsandbytes here.
- ``{"kind": "memcpy", "threads", "size", "device"}``: seconds and bytes of a plain copy.
- ``{"kind": "case", "case", "family", "backend", "threads", "size", "device", "memory"}``:
  time one case with one implementation (and, with ``memory``, the peak extra memory of
  one call); ``backend`` names the kbit backend for the ``kbit`` family.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import platform
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import torch

if __package__:  # imported as kbit._bench.worker (the tests do)
    from . import cases as bench_cases
    from . import timing
else:  # run as a script, by any interpreter: its directory is on sys.path
    import cases as bench_cases
    import timing

_CASES = {case.id: case for case in bench_cases.CASES}


#: kbit's byte accounting and the one module it imports (torch only, both), as a
#: stand-in package: the bitsandbytes worker runs where kbit may not be installed.
_ACCOUNTING_PACKAGE = "kbit_bench_accounting"
_ACCOUNTING_FILES = {"_dtensor": ("_dtensor.py",), "_demo._accounting": ("_demo", "_accounting.py")}


def _accounting():
    """kbit's byte accounting, loaded from its files without importing kbit (which the
    bitsandbytes interpreter need not have): its relative import of ``kbit._dtensor``
    resolves inside a stand-in package that holds just these two modules."""
    loaded = sys.modules.get(f"{_ACCOUNTING_PACKAGE}._demo._accounting")
    if loaded is not None:
        return loaded
    root = Path(__file__).resolve().parents[1]
    for package, path in ((_ACCOUNTING_PACKAGE, root), (f"{_ACCOUNTING_PACKAGE}._demo", root / "_demo")):
        stand_in = types.ModuleType(package)
        stand_in.__path__ = [str(path)]  # a package whose __init__ never runs
        sys.modules.setdefault(package, stand_in)
    module = None
    for name, parts in _ACCOUNTING_FILES.items():
        spec = importlib.util.spec_from_file_location(f"{_ACCOUNTING_PACKAGE}.{name}", root.joinpath(*parts))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def _version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        module = __import__(name)
    except Exception as exc:  # a broken install is reported, not fatal
        return f"unusable ({type(exc).__name__}: {exc})"
    return getattr(module, "__version__", "unknown")


@contextlib.contextmanager
def _kbit_backend(family: str, backend: str | None) -> Iterator[None]:
    if family != "kbit":
        yield
        return
    import kbit

    # No fallback: a row names the backend that computed it, or says it could not. The
    # reference is itself the fallback, which is how it serves devices it does not list.
    with kbit.backends.use_backend(backend, fallback="reference" if backend == "reference" else "error"):
        yield


class Worker:
    """Answers requests; keeps the inputs of the last case so the next implementation reuses them."""

    def __init__(self) -> None:
        self._inputs_key: tuple | None = None
        self._inputs: dict[str, Any] = {}

    def handle(self, request: dict) -> dict:
        kind = request["kind"]
        if kind == "hello":
            return {
                "python": platform.python_version(),
                "executable": sys.executable,
                "torch": torch.__version__,
                "kbit": _version("kbit"),
                "bitsandbytes": _version("bitsandbytes"),
            }
        torch.set_num_threads(int(request["threads"]))
        device = torch.device(request.get("device", "cpu"))
        if kind == "memcpy":
            seconds, fresh, moved = timing.memcpy_seconds(int(request["size"]), device)
            return {"seconds": seconds, "fresh_seconds": fresh, "bytes": moved}
        if kind == "case":
            return self._case(request, device)
        raise ValueError(f"unknown request kind {kind!r}")

    def _case(self, request: dict, device: torch.device) -> dict:
        case = _CASES[request["case"]]
        ctx = bench_cases.Context(size=int(request["size"]), device=str(device), seed=int(request.get("seed", 0)))
        key = (case.setup, ctx)
        if key != self._inputs_key:
            self._inputs, self._inputs_key = {}, None
            gc.collect()
            self._inputs, self._inputs_key = case.setup(ctx), key
        inputs = self._inputs
        family = request["family"]
        runner = case.runners[family]
        with _kbit_backend(family, request.get("backend")):
            fn = runner(ctx, inputs)
            answer: dict[str, Any] = {"moved": case.moved(ctx) if case.moved else None}
            if request.get("memory"):
                fn()  # warm: whatever the first call allocates for good is not a temporary
                gc.collect()
                answer["peak_extra"] = timing.peak_extra_bytes(fn)
            else:
                if case.kind == "latency":
                    result = timing.time_call(fn, device=device, warmup=20, min_repeats=5, budget=1.0, inner=200)
                else:
                    result = timing.time_call(fn, device=device)
                answer.update(best=result.best, median=result.median, repeats=result.repeats)
            if case.kind == "optimizer":
                optimizer = inputs.pop("optimizer")
                answer["state_bytes"] = _accounting().optimizer_state_bytes(optimizer)
                param_bytes = sum(p.numel() * p.element_size() for p in inputs["params"])
                # p read and written, g read; every state byte read and written
                answer["moved"] = 3 * param_bytes + 2 * answer["state_bytes"]
                del optimizer
            del fn
        return answer


def main() -> int:
    answers = os.fdopen(int(sys.argv[1]), "w")
    worker = Worker()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = worker.handle(json.loads(line))
        except Exception as exc:  # every failure is reported to the parent as data
            answer = {"error": f"{type(exc).__name__}: {exc}".strip()}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
