"""``kbit demo``: the README's main job."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch

import kbit
from kbit._demo import DemoConfig, run_demo
from kbit._demo._progress import Progress
from kbit.cli import main
from tests.conftest import INSTALLED_PLUGINS


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> tuple[dict, str]:
    """One 20-step demo run through the console script, as a user would start it."""
    path = tmp_path_factory.mktemp("demo") / "report.json"
    # Module-scoped, so it runs before the per-test registry fixture: hide installed
    # plugins from the subprocess the same way that fixture hides them from the tests.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBIT_")}
    env["KBIT_DISABLE_PLUGINS"] = ",".join(INSTALLED_PLUGINS)
    result = subprocess.run(
        [sys.executable, "-m", "kbit", "demo", "--steps", "20", "--json", str(path)],
        capture_output=True, text=True, check=True, timeout=300, env=env,
    )  # fmt: skip
    return json.loads(path.read_text()), result.stdout


def test_demo_report_meets_the_promises(demo_report):
    report, _ = demo_report
    weights = report["memory"]["base_weights"]
    assert weights["nf4_bytes"] <= 0.3 * weights["bf16_bytes"]
    state = report["memory"]["optimizer_state"]
    assert state["bytes_8bit"] <= 0.27 * state["bytes_32bit"]
    for run in report["training"].values():
        assert run["loss_end"] < run["loss_start"] / 2, run["optimizer"]
        assert len(run["losses"]) == 20 and run["tokens_per_second"] > 0
    # The 8-bit run tracks the 32-bit one closely on this task.
    kbit_run, baseline = report["training"]["kbit"], report["training"]["baseline"]
    assert kbit_run["optimizer"] == "PagedAdamW8bit" and baseline["optimizer"] == "AdamW"
    assert abs(kbit_run["loss_end"] - baseline["loss_end"]) < 0.1 * baseline["loss_start"]


def test_demo_says_which_backend_served_each_op(demo_report):
    report, stdout = demo_report
    served = report["backends"]
    for op in ("quantize_4bit", "matmul_4bit", "optimizer_update_8bit_blockwise"):
        assert sum(served[op].values()) > 0, op
    # Whichever backends this environment has (the reference alone in CI, a plugin too on
    # a developer's machine) served the ops, and the printed report names them.
    available = {record.name for record in kbit.backends.list() if record.state == "available"}
    names = {name for calls in served.values() for name in calls}
    assert names and names <= available, (names, available)
    assert "optimizer_update_8bit_blockwise" in stdout
    assert all(f"{name} (" in stdout for name in names)


def test_demo_prints_plain_progress_when_not_a_terminal(demo_report):
    _, stdout = demo_report
    assert "NF4 + PagedAdamW8bit: step 20/20 loss" in stdout
    assert "\r" not in stdout
    # The report: memory fp32/bf16 vs NF4 and 32-bit vs 8-bit state, both runs' losses and
    # throughput, and the op table.
    for heading in ("fp32", "bf16", "kbit / bf16", "32-bit AdamW", "8-bit", "loss start", "loss end", "tokens/s"):
        assert heading in stdout, heading
    assert "PagedAdamW8bit " in stdout and "AdamW " in stdout and "served by (calls)" in stdout


def test_json_to_stdout_keeps_stdout_pure(capsys):
    # `--json -` is for pipes (`kbit demo --json - | jq`): only the JSON may reach stdout.
    assert main(["demo", "--steps", "5", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert len(report["training"]["kbit"]["losses"]) == 5
    assert "NF4 + PagedAdamW8bit: step 5/5" in err and "kbit / bf16" in err


@pytest.mark.slow
def test_medium_size_runs_the_larger_model(tmp_path):
    path = tmp_path / "medium.json"
    assert main(["demo", "--steps", "5", "--size", "medium", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["config"]["size"] == "medium" and report["config"]["model"]["d_model"] == 512
    # 4 blocks of q, k, v, o (512 x 512) and up, down (512 x 2048) in NF4.
    assert report["memory"]["base_weights"]["parameters"] == 4 * (4 * 512 * 512 + 2 * 512 * 2048)
    assert report["memory"]["base_weights"]["ratio_vs_bf16"] <= 0.3


def test_small_cpu_run_uses_one_thread_and_restores_the_setting(monkeypatch):
    import kbit._demo as demo

    seen = []
    real_run_demo = demo.run_demo

    def spy(config, stream=None):
        seen.append((config.size, torch.get_num_threads()))
        return real_run_demo(config, stream)

    monkeypatch.setattr(demo, "run_demo", spy)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["demo", "--steps", "5", "--device", "cpu"]) == 0
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert main(["demo", "--steps", "5", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(before)
    # One thread for the small model; an explicit OMP_NUM_THREADS is left alone.
    assert seen == [("small", 1), ("small", 2)]


def test_progress_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = Progress("run", 4, stream)
    for step in range(1, 5):
        progress.update(step, 1.0 / step)
    text = stream.getvalue()
    assert text.count("\r") == 4 and "[" + "#" * 30 + "]" in text and text.endswith("\n")


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    assert main(["demo", "--steps", "5", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a)
    )
    assert main(["demo", "--steps", "5", "--plot", "x.png"]) == 2
    assert "pip install 'kbit[plot]'" in capsys.readouterr().err


def test_bad_arguments():
    assert main(["demo", "--steps", "2"]) == 2
    with pytest.raises(SystemExit):
        main(["demo", "--size", "huge"])
    with pytest.raises(ValueError, match="huge"):
        run_demo(DemoConfig(size="huge"))


def test_unusable_device_is_a_clear_error(capsys):
    # This CPU build of torch has no CUDA: a one-line reason, not a traceback.
    assert main(["demo", "--steps", "5", "--device", "nonsense"]) == 2
    assert "--device 'nonsense' cannot be used here" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["demo", "--steps", "5", "--device", "cuda"]) == 2
        assert "--device 'cuda' cannot be used here" in capsys.readouterr().err


def test_ranks_that_cannot_split_the_batch_are_a_clear_error(capsys):
    # The run on several processes itself is in tests/test_distributed.py.
    for ranks in ("0", "3"):
        assert main(["demo", "--steps", "5", "--device", "cpu", "--ranks", ranks]) == 2
        assert f"--ranks {ranks}: must be a divisor of the batch of 16" in capsys.readouterr().err

