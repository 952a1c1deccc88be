"""``kbit bench``: arguments, the worker processes, the incumbent's rows, the report.

The real bitsandbytes is not installed here; a stand-in package (``bitsandbytes`` with the
few functions the cases call, computed with torch) is put on the path of an interpreter
wrapper, which exercises what matters: a second interpreter, its own worker, its rows
next to kbit's, and what happens when it fails or dies.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kbit
from kbit._bench import worker as bench_worker
from kbit._bench.cases import CASES, OPS, Context, case_ids, parameter_shapes
from kbit._bench.targets import TARGETS, evaluate
from kbit.cli import main
from kbit.cli._bench import render_report

FAKE_BITSANDBYTES = '''
"""A stand-in for bitsandbytes with the calls kbit bench makes (tests only)."""
import os
import torch
__version__ = "0.0-stand-in"
'''

FAKE_FUNCTIONAL = '''
import os
import torch

def quantize_blockwise(A, blocksize=4096):
    if os.environ.get("FAKE_BNB_DIE"):
        os._exit(3)
    if os.environ.get("FAKE_BNB_FAIL"):
        raise RuntimeError("stand-in failure")
    blocks = A.reshape(-1, blocksize) if A.numel() % blocksize == 0 else A.reshape(1, -1)
    absmax = blocks.abs().amax(dim=1)
    return (blocks / absmax[:, None] * 127).round().to(torch.int8).reshape(A.shape), absmax

def dequantize_blockwise(codes, absmax):
    return codes.float()
'''


@pytest.fixture(autouse=True)
def no_incumbent_configured(monkeypatch):
    """A developer's KBIT_BENCH_BNB_PYTHON must not change what these tests see."""
    monkeypatch.delenv("KBIT_BENCH_BNB_PYTHON", raising=False)


@pytest.fixture
def fake_bnb_python(tmp_path: Path) -> str:
    """An interpreter wrapper whose Python finds the stand-in bitsandbytes package."""
    package = tmp_path / "site" / "bitsandbytes"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_BITSANDBYTES + "from . import functional\n")
    (package / "functional.py").write_text(FAKE_FUNCTIONAL)
    wrapper = tmp_path / "python-with-bnb"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{tmp_path / "site"}" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper)


def _bench(tmp_path: Path, *args: str) -> dict:
    path = tmp_path / "bench.json"
    assert main(["bench", "--size", "65536", "--threads", "1", "--json", str(path), *args]) == 0
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("args,message", [
    (["--ops", "quantize,nope"], "unknown op group(s) ['nope', 'quantize']"),
    (["--threads", "0"], "--threads takes positive integers"),
    (["--threads", "two"], "--threads takes positive integers"),
    (["--size", "1000"], "--size must be a multiple of 4096"),
    (["--backends", "cpu9"], "unknown backend(s) ['cpu9']"),
    (["--device", "nonsense"], "--device 'nonsense' cannot be used here"),
])  # fmt: skip
def test_bad_arguments_are_one_line_and_exit_2(capsys, args, message):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_every_op_group_selects_cases():
    assert set(case_ids()) == {case.id for case in CASES}
    for op in OPS:
        assert case_ids([op]), op
    assert case_ids(["optimizers"]) == [case.id for case in CASES if case.kind == "optimizer"]


def test_the_default_size_steps_the_issues_50m_parameters():
    shapes = parameter_shapes(Context(size=16 * 1024 * 1024))
    assert shapes == [(2048, 2048)] * 12 and Context(size=16 * 1024 * 1024).width == 4096
    assert parameter_shapes(Context(size=65536)) == [(196608,)] and Context(size=65536).width == 256


# ---------------------------------------------------------------------------- running
def test_a_run_times_each_backend_and_writes_json(tmp_path, capsys):
    report = _bench(tmp_path, "--ops", "quantize_blockwise,small_call", "--backends", "reference,bitsandbytes")
    out = capsys.readouterr().out
    rows = report["rows"]
    assert {row["impl"] for row in rows} == {"reference"}
    assert {row["case"] for row in rows} == {"quantize_blockwise/bs4096", "quantize_blockwise/bs256", "small_call"}
    for row in rows:
        assert row["best"] > 0 and row["median"] >= row["best"] and row["repeats"] >= 3 and "error" not in row
    bandwidth = [row for row in rows if row["kind"] == "bandwidth"]
    assert all(row["gbps"] > 0 and 0 < row["memcpy_share"] for row in bandwidth)
    assert report["memcpy_gbps"]["1"] > 0 and report["clone_gbps"]["1"] > 0 and report["subject"] == "reference"
    # No incumbent here (at most kbit's own compatibility package): a note says how to add one.
    assert "pass --bnb-python" in " ".join(report["notes"])
    small = next(t for t in report["targets"]["1"] if t["case"] == "small_call")
    assert small["value"] > 0 and small["met"] in (True, False)
    speedups = [t for t in report["targets"]["1"] if "bitsandbytes" in t["target"]]
    assert speedups and all(t["met"] is None for t in speedups)  # no incumbent, not measured
    assert "1 thread(s); memcpy" in out and "quantize_blockwise" in out and "not measured" in out


@pytest.mark.slow
def test_optimizer_rows_measure_memory_and_compare_with_torch(tmp_path):
    report = _bench(tmp_path, "--ops", "optimizers", "--backends", "reference,torch")
    adam = {row["impl"]: row for row in report["rows"] if row["case"] == "optimizer/Adam8bit"}
    assert set(adam) == {"reference", "torch"}
    for row in adam.values():
        assert row["state_bytes"] > 0 and row["moved"] > 3 * 196608 * 4
        if sys.platform.startswith("linux"):
            assert row["peak_extra"] is not None
    # 8-bit state is about a quarter of torch's 32-bit state.
    assert adam["reference"]["state_bytes"] < 0.3 * adam["torch"]["state_bytes"]
    ratio = next(t for t in report["targets"]["1"] if t["target"].startswith("Adam8bit step time"))
    assert ratio["value"] == pytest.approx(adam["reference"]["best"] / adam["torch"]["best"])


def test_the_incumbents_rows_come_from_its_own_interpreter(tmp_path, fake_bnb_python):
    report = _bench(tmp_path, "--ops", "quantize_blockwise", "--backends", "reference,bitsandbytes",
                    "--bnb-python", fake_bnb_python)  # fmt: skip
    assert report["versions"]["bitsandbytes"]["bitsandbytes"] == "0.0-stand-in"
    rows = {(row["case"], row["impl"]): row for row in report["rows"]}
    assert rows[("quantize_blockwise/bs4096", "bitsandbytes")]["best"] > 0
    target = next(t for t in report["targets"]["1"] if t["target"] == "quantize_blockwise bs=4096 speedup over bitsandbytes")
    bnb, ref = rows[("quantize_blockwise/bs4096", "bitsandbytes")], rows[("quantize_blockwise/bs4096", "reference")]
    assert target["value"] == pytest.approx(bnb["best"] / ref["best"])


@pytest.mark.slow
def test_a_failing_incumbent_op_is_a_row_not_a_crash(tmp_path, fake_bnb_python, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_BNB_FAIL", "1")
    report = _bench(tmp_path, "--ops", "quantize_blockwise", "--backends", "reference,bitsandbytes",
                    "--bnb-python", fake_bnb_python)  # fmt: skip
    failed = [row for row in report["rows"] if row["impl"] == "bitsandbytes"]
    assert failed and all(row["error"] == "RuntimeError: stand-in failure" for row in failed)
    assert "failed" in capsys.readouterr().out


@pytest.mark.slow
def test_a_dying_incumbent_worker_leaves_kbit_rows_and_a_note(tmp_path, fake_bnb_python, monkeypatch):
    monkeypatch.setenv("FAKE_BNB_DIE", "1")
    report = _bench(tmp_path, "--ops", "quantize_blockwise", "--backends", "reference,bitsandbytes",
                    "--bnb-python", fake_bnb_python)  # fmt: skip
    assert all(row["best"] > 0 for row in report["rows"] if row["impl"] == "reference")
    assert any("bitsandbytes worker failed" in note and "stopped" in note for note in report["notes"])


@pytest.mark.slow
def test_an_interpreter_without_bitsandbytes_is_a_note(tmp_path):
    report = _bench(tmp_path, "--ops", "small_call", "--backends", "reference,bitsandbytes",
                    "--bnb-python", sys.executable)  # fmt: skip
    assert {row["impl"] for row in report["rows"]} == {"reference"}
    # Either no bitsandbytes at all, or kbit's own compatibility package (README's commands).
    assert any(note.startswith("bitsandbytes: not installed in") or "compatibility package" in note
               for note in report["notes"])  # fmt: skip


def test_kbits_own_bitsandbytes_package_is_never_timed_as_the_incumbent(tmp_path, fake_bnb_python):
    # plugins/bitsandbytes-compat provides the import name, versioned "<api level>+kbit".
    init = Path(fake_bnb_python).parent / "site" / "bitsandbytes" / "__init__.py"
    init.write_text(init.read_text().replace('"0.0-stand-in"', '"0.50.2+kbit"'))
    report = _bench(tmp_path, "--ops", "small_call", "--backends", "reference,bitsandbytes",
                    "--bnb-python", fake_bnb_python)  # fmt: skip
    assert {row["impl"] for row in report["rows"]} == {"reference"}
    assert any("is kbit's compatibility package (0.50.2+kbit), not the incumbent" in note for note in report["notes"])


def test_a_missing_interpreter_is_a_note(tmp_path):
    report = _bench(tmp_path, "--ops", "small_call", "--backends", "reference,bitsandbytes",
                    "--bnb-python", str(tmp_path / "no-python"))  # fmt: skip
    assert any("cannot start" in note for note in report["notes"])


def test_json_to_stdout_keeps_stdout_pure(capsys):
    assert main(["bench", "--size", "65536", "--threads", "1", "--ops", "small_call", "--backends", "reference",
                 "--json", "-"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert json.loads(captured.out)["rows"] and "kbit bench" in captured.err


# ----------------------------------------------------------------------------- pieces
def test_state_bytes_are_counted_with_the_demos_helper():
    from kbit._demo._accounting import optimizer_state_bytes

    params = [torch.nn.Parameter(torch.randn(5000)) for _ in range(2)]
    optimizer = kbit.optim.Adam8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    # Both parameters' states index the same two code tables: counted once, not per parameter.
    codes, scales = 2 * 2 * 5000, 2 * 2 * 20 * 4
    assert optimizer_state_bytes(optimizer) == codes + scales + 2 * 256 * 4
    assert bench_worker._accounting().optimizer_state_bytes(optimizer) == optimizer_state_bytes(optimizer)


def test_targets_compare_the_subject_with_the_named_baseline():
    rows = {"optimizer/Adam8bit": {"cpu": {"best": 0.5, "state_bytes": 100, "peak_extra": 4},
                                   "torch": {"best": 1.0}}}  # fmt: skip
    results = {r["target"]: r for r in evaluate(rows, "cpu")}
    assert results["Adam8bit step time / torch Adam(fused=True)"]["value"] == 0.5
    assert results["Adam8bit step time / torch Adam(fused=True)"]["met"] is True
    assert results["Adam8bit peak extra memory / optimizer state"]["value"] == 0.04
    assert len({t.description for t in TARGETS}) == len(TARGETS)


def test_the_report_renders_errors_targets_and_notes():
    report = {
        "config": {"size": 65536, "device": "cpu", "threads": [1]},
        "versions": {"kbit": {"torch": "2.x", "kbit": "0.x"}},
        "subject": "cpu",
        "memcpy_gbps": {"1": 10.0},
        "clone_gbps": {"1": 2.0},
        "rows": [
            {"threads": 1, "case": "small_call", "op": "small call", "variant": "v", "kind": "latency",
             "impl": "cpu", "best": 20e-6, "median": 25e-6},
            {"threads": 1, "case": "small_call", "op": "small call", "variant": "v", "kind": "latency",
             "impl": "bitsandbytes", "error": "RuntimeError: boom"},
        ],  # fmt: skip
        "targets": {"1": evaluate({"small_call": {"cpu": {"best": 20e-6}}}, "cpu")},
        "notes": ["a note"],
    }
    text = render_report(report)
    assert "20.0 us" in text and "RuntimeError: boom" in text and "a note" in text
    assert "4096-element quantize_blockwise, end to end  20.0 us" in text and "met" in text


def test_the_worker_runs_as_a_script_without_kbit_on_its_path(tmp_path):
    # The incumbent's interpreter may lack kbit: the worker must not need it for its own rows.
    import subprocess

    code = textwrap.dedent(f"""
        import builtins, runpy, sys
        real_import = builtins.__import__
        def no_kbit(name, *args, **kwargs):
            if name == "kbit" or name.startswith("kbit."):
                raise ImportError("kbit is not installed here")
            return real_import(name, *args, **kwargs)
        builtins.__import__ = no_kbit
        sys.argv = ["worker.py", "1"]
        sys.path.insert(0, {str(Path(bench_worker.__file__).parent)!r})
        runpy.run_path({bench_worker.__file__!r}, run_name="__main__")
    """)
    request = json.dumps({"kind": "memcpy", "threads": 1, "size": 65536, "device": "cpu"}) + "\n"
    result = subprocess.run([sys.executable, "-c", code], input=request, capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["seconds"] > 0 and answer["fresh_seconds"] > 0 and answer["bytes"] == 2 * 65536 * 4


def test_the_workers_byte_accounting_loads_without_kbit(tmp_path):
    """The optimizer rows count state bytes with kbit's accounting module, which imports
    ``kbit._dtensor``; in the incumbent's interpreter (no kbit) both load from their files."""
    import subprocess

    code = textwrap.dedent(f"""
        import builtins, sys
        real_import = builtins.__import__
        def no_kbit(name, *args, **kwargs):
            if name == "kbit" or name.startswith("kbit."):
                raise ImportError("kbit is not installed here")
            return real_import(name, *args, **kwargs)
        builtins.__import__ = no_kbit
        sys.path.insert(0, {str(Path(bench_worker.__file__).parent)!r})
        import torch, worker
        state = {{"state1": torch.zeros(10, dtype=torch.uint8), "absmax1": torch.zeros(1)}}
        class Optimizer:  # what optimizer_state_bytes reads: .state
            pass
        optimizer = Optimizer()
        optimizer.state = {{0: state}}
        print(worker._accounting().optimizer_state_bytes(optimizer))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "14"
