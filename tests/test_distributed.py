"""kbit under torch.distributed: FSDP2 and DDP on 2 processes (CPU with gloo, or ``--device cuda``).

Each test module-scoped fixture starts its 2 processes once (``kbit._spawn.run_ranks``,
bounded in time: a hang fails the tests instead of blocking CI) and every test reads its
part of the results. The ranks' work is in ``tests/distributed_workers.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kbit._spawn import run_ranks
from kbit.testing.tolerances import conformance_tolerance

from . import distributed_workers as workers
from .conftest import INSTALLED_PLUGINS

pytestmark = pytest.mark.slow

WORLD_SIZE = 2
#: Seconds one launch may take (start-up included) before its processes are ended.
LAUNCH_TIMEOUT = 300


@pytest.fixture(scope="module")
def device(request: pytest.FixtureRequest) -> str:
    """``--device``: cpu (gloo), or cuda (nccl) where there is a GPU for every rank."""
    device = request.config.getoption("--device")
    if device == "cuda" and torch.cuda.device_count() < WORLD_SIZE:
        pytest.skip(f"--device cuda needs {WORLD_SIZE} GPUs, found {torch.cuda.device_count()}")
    return device


@pytest.fixture(scope="module")
def launch(device):
    """``launch(worker, *args)``: the per-rank results of ``worker``, started once per module
    however many fixtures read them."""
    done: dict = {}

    def run(worker, *args):
        key = (worker.__name__, args)
        if key not in done:
            done[key] = run_ranks(worker, WORLD_SIZE, (device, *args), device=device, timeout=LAUNCH_TIMEOUT)
        return done[key]

    return run


# --------------------------------------------------------------------------- FSDP2 models
@pytest.fixture(scope="module")
def fsdp_4bit(launch):
    return launch(workers.fsdp_4bit_worker)


@pytest.mark.parametrize("settings", list(workers.FOUR_BIT_SETTINGS))
def test_fsdp_shards_the_packed_codes(fsdp_4bit, settings):
    for rank, results in enumerate(fsdp_4bit):
        found = results[settings]
        # Each rank holds half the codes (rounded up to whole storage elements per layer) ...
        assert found["full_code_bytes"] / 2 <= found["local_code_bytes"] <= found["full_code_bytes"] / 2 + 64, rank
        # ... and a copy of the per-block scales: 1/32 of the codes with nested absmax (one
        # byte per 64 weights), 1/8 without (a float32 per 64 weights).
        share = 1 / 32 if "nested" in settings else 1 / 8
        assert found["scale_bytes"] <= share * found["full_code_bytes"] * 1.05, (rank, found)  # + nested scales


@pytest.mark.parametrize("settings", list(workers.FOUR_BIT_SETTINGS))
def test_fsdp_forward_and_backward_match_one_process_exactly(fsdp_4bit, settings):
    for rank, results in enumerate(fsdp_4bit):
        found = results[settings]
        assert found["forward_equal"], rank
        assert found["grads_equal"], rank


@pytest.mark.parametrize("settings", list(workers.FOUR_BIT_SETTINGS))
def test_fsdp_state_dicts_keep_the_hub_layout(fsdp_4bit, settings):
    for rank, results in enumerate(fsdp_4bit):
        found = results[settings]
        offloads = (False, True) if rank == 0 else (False,)
        for offload in offloads:
            assert found[f"full_state_dict_keys_equal_offload={offload}"], (rank, offload)
            assert found[f"full_state_dict_equal_offload={offload}"], (rank, offload)
        assert found["sharded_weight_types"] == ["DTensor"]
        assert found["sharded_absmax_types"] == ["Tensor"]  # replicated, saved once by DCP
        assert found["forward_equal_after_load"], rank


def test_fsdp_shards_4bit_embeddings(fsdp_4bit):
    assert all(results["embedding_equal"] for results in fsdp_4bit)


def test_fsdp_refuses_float_storage_cast_by_mixed_precision(fsdp_4bit):
    for results in fsdp_4bit:
        assert results["float_storage_cast_error"].startswith("KbitTypeError")
        assert "quant_storage=torch.uint8" in results["float_storage_cast_error"]
        assert results["uint8_mixed_precision_finite"]


def test_fsdp_refuses_unquantized_weights(fsdp_4bit):
    for results in fsdp_4bit:
        assert results["unquantized_error"].startswith("KbitValueError")
        assert "before fully_shard" in results["unquantized_error"]


# ------------------------------------------------------------------- training parity
def within_optimizer_tolerance(name: str, found: dict[str, float], against: str) -> bool:
    """Single-process bar of docs/formats.md for an optimizer trajectory: the parameters'
    difference within the op's CONFORMANCE tolerance, relative to how far they moved."""
    op = "optimizer_update_8bit_blockwise" if "8bit" in name else "optimizer_update_32bit"
    tolerance = conformance_tolerance(op)
    return found[against] <= tolerance.atol + tolerance.rtol * found["moved"]


def assert_trains_like_one_process(per_rank: list[dict], name: str) -> None:
    """20 steps: bit for bit against one process summing the same two gradient halves, and
    within the optimizer's tolerance against the whole batch at once."""
    for results in per_rank:
        found = results["long"][name]
        assert found["moved"] > 0.05  # 20 steps really trained
        assert found["slices=2"] == 0.0, found
        assert within_optimizer_tolerance(name, found, "slices=1"), found


def assert_every_optimizer_matches(per_rank: list[dict], exact: bool = True) -> None:
    """A few steps of each optimizer: bit for bit (or within tolerance) against one process."""
    for results in per_rank:
        for name, found in results["all"].items():
            assert found["moved"] > 0, name
            if exact:
                assert found["slices=2"] == 0.0, (name, found)
            else:
                assert within_optimizer_tolerance(name, found, "slices=2"), (name, found)


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def trained(request, launch):
    """(wrapper, per-rank results) of the DDP and the FSDP2 training runs."""
    worker = {"ddp": workers.ddp_worker, "fsdp": workers.fsdp_train_worker}[request.param]
    return request.param, launch(worker)


@pytest.mark.parametrize("name", ["Adam", "Adam8bit"])
def test_training_matches_one_process(trained, name):
    assert_trains_like_one_process(trained[1], name)


def test_every_optimizer_matches_one_process(trained):
    wrapper, per_rank = trained
    if wrapper == "ddp":  # replicated parameters: one 8-bit optimizer per family is enough
        assert_every_optimizer_matches(per_rank)
        return
    assert all(set(results["all"]) == set(workers.optimizer_names()) for results in per_rank)
    kbit_kernels = [{"all": {k: v for k, v in r["all"].items() if k != "PytorchLARS"}} for r in per_rank]
    assert_every_optimizer_matches(kbit_kernels)
    # PytorchLARS is plain torch ops on DTensors: torch sums its norms shard by shard.
    assert_every_optimizer_matches([{"all": {"PytorchLARS": r["all"]["PytorchLARS"]}} for r in per_rank], exact=False)


def test_ddp_model_state_dict_is_the_single_process_one(launch):
    assert all(results["state_dict_equal"] for results in launch(workers.ddp_worker))


@pytest.fixture(scope="module")
def fsdp_train(launch):
    return launch(workers.fsdp_train_worker)


def test_fsdp_optimizer_state_is_kept_per_shard(fsdp_train):
    for results in fsdp_train:
        for name in ("Adam8bit", "Adam"):
            for layout in results["layouts"][name]:
                assert layout["state1"] == ["S(0)"], (name, layout)
                assert layout["state1_share"] == 0.5, (name, layout)
        for layout in results["layouts"]["Adam8bit"]:  # blocks of 256 sharded with the elements
            assert layout["absmax1"] == ["S(0)"] and layout["absmax1_share"] == 0.5, layout
        # LAMB clips by the norm of the whole update: stepped gathered, its state replicated.
        for layout in results["layouts"]["LAMB8bit"]:
            assert layout["state1"] == ["R"], layout


def test_fsdp_8bit_blocks_never_straddle_shards(fsdp_train):
    for results in fsdp_train:
        found = results["misaligned"]
        # 150 elements per rank: a block would straddle, so the parameter is stepped whole.
        assert found["layouts"][0]["state1"] == ["R"], found
        assert found["difference"] == 0.0, found


def test_fsdp_nan_in_one_ranks_shard_stops_the_step_on_every_rank(fsdp_train):
    for rank, results in enumerate(fsdp_train):
        found = results["nan_on_one_rank"]
        assert found["error"].startswith("KbitValueError"), found
        assert "parameter 3 of group 0" in found["error"]
        expected = "in this rank's shard" if rank == 1 else "in another rank's shard"
        assert expected in found["error"], found
        assert found["unchanged"] and found["moved_after"], found


# ------------------------------------------------------------------------ checkpoints
#: Optimizers of the checkpoint round trips: 8-bit and 32-bit, paged stacked state, gathered state.
CHECKPOINTED = ["Adam8bit", "Adam", "PagedAdEMAMix8bit", "LAMB8bit"]


@pytest.fixture(scope="module")
def dcp_round_trips(launch, tmp_path_factory):
    return launch(workers.dcp_worker, str(tmp_path_factory.mktemp("dcp")), tuple(CHECKPOINTED))


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_dcp_full_optimizer_state_equals_one_process(dcp_round_trips, name):
    for results in dcp_round_trips:
        assert results[name]["full_optimizer_state_differences"] == []


@pytest.mark.parametrize("name", CHECKPOINTED)
@pytest.mark.parametrize("change", ["2->2", "2->1", "2->plain", "1->2"])
def test_dcp_resumes_with_the_uninterrupted_next_step(dcp_round_trips, name, change):
    ranks = [results[name] for results in dcp_round_trips if change in results[name]]
    assert ranks, change
    for found in ranks:
        assert found[change] == 0.0, found


# ------------------------------------------------------------------------------- demo
def test_demo_on_two_ranks_halves_memory_and_keeps_the_loss_curve(device, tmp_path):
    report_path, plot_path = tmp_path / "report.json", tmp_path / "losses.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBIT_")}
    env["KBIT_DISABLE_PLUGINS"] = ",".join(INSTALLED_PLUGINS)
    result = subprocess.run(
        [sys.executable, "-m", "kbit", "demo", "--ranks", "2", "--steps", "10", "--device", device,
         "--json", str(report_path), "--plot", str(plot_path)],
        capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    single = report["memory"]["single_process"]
    assert len(report["memory"]["ranks"]) == 2
    for held in report["memory"]["ranks"]:
        # Half the codes plus a copy of the (nested) scales; half the 8-bit state.
        assert 0.5 <= held["weight_bytes"] / single["weight_bytes"] < 0.55, held
        assert 0.5 <= held["optimizer_state_bytes"] / single["optimizer_state_bytes"] < 0.52, held
        assert held["trainable_parameters"] * 2 == single["trainable_parameters"]
    runs = report["training"]
    assert runs["ranks"]["losses"][-1] < runs["ranks"]["losses"][0] / 2
    assert report["max_loss_difference"] < 1e-3 * runs["single"]["losses"][0]
    assert "rank 1" in result.stdout and plot_path.stat().st_size > 0


# ------------------------------------------------------------------------------- docs
def test_the_fsdp_example_of_the_docs_runs_under_torchrun(tmp_path):
    # test_docs only defines the example's functions (it is guarded by __main__); here it
    # runs as the page says, on 2 CPU processes started by torchrun.
    page = (Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text()
    script = tmp_path / "train.py"
    script.write_text(re.search(r"^```python\n(.*?)^```", page, re.S | re.M).group(1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBIT_")}
    env.update(KBIT_DISABLE_PLUGINS=",".join(INSTALLED_PLUGINS), CHECKPOINT=str(tmp_path / "checkpoint"))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ranks: resumed from" in result.stdout and "as before" in result.stdout
