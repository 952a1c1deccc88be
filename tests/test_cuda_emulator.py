"""The CUDA emulator's own semantics: shuffles, votes, barriers, atomics, argument checks,
and that it exposes or reports the classic kernel bugs instead of answering quietly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kbit_cuda.emulator import EmulatedModule, EmulatorError, Settings

from .cuda_support import require_emulator

SOURCE = Path(__file__).resolve().parent / "cuda" / "semantics.cu"


@pytest.fixture(scope="module")
def module() -> EmulatedModule:
    require_emulator()
    return EmulatedModule(SOURCE)


@pytest.fixture
def semantics(module: EmulatedModule):
    module.settings = Settings()
    yield module
    module.settings = Settings()


def expected_source_lane(mode: int, lane: int, b: int, width: int) -> int:
    """The lane a shuffle reads, from the CUDA programming guide's definitions."""
    segment = lane // width * width
    if mode == 0:  # __shfl_sync: lane b of the segment
        return segment + b % width
    if mode == 1:  # up: b lanes lower, unless that leaves the segment
        return lane - b if lane - segment >= b else lane
    if mode == 2:  # down
        return lane + b if lane - segment + b < width else lane
    source = lane ^ b  # xor: a lane of a later segment is not read
    return lane if source // width * width > segment else source


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("mode", [0, 1, 2, 3], ids=["idx", "up", "down", "xor"])
def test_shuffles_follow_the_programming_guide(semantics, mode, width):
    kernel = semantics.get_function("shuffle_probe")
    for b in (0, 1, 3, 5, 8, 13, 16, 31):
        out = np.empty(64, np.int32)
        kernel((1,), (64,), (np.int32(mode), np.int32(b), np.int32(width), out))
        expected = [1000 + 32 * (t // 32) + expected_source_lane(mode, t % 32, b, width) for t in range(64)]
        assert out.tolist() == expected, (mode, b, width)


def test_ballot_and_counting_barriers(semantics):
    rng = np.random.default_rng(0)
    predicate = (rng.random(3 * 128) < 0.5).astype(np.int32)
    predicate[128:256] = 1  # block 1: all true
    ballots = np.empty(12, np.uint32)
    counts = np.empty(9, np.int32)
    semantics.get_function("vote_probe")((3,), (128,), (predicate, ballots, counts))
    for warp in range(12):
        bits = predicate[32 * warp : 32 * warp + 32]
        assert ballots[warp] == sum(int(bit) << i for i, bit in enumerate(bits))
    for block in range(3):
        p = predicate[128 * block : 128 * block + 128]
        assert counts[3 * block : 3 * block + 3].tolist() == [p.sum(), int(p.all()), int(p.any())]


@pytest.mark.parametrize("offset", [1, 255], ids=["reads_higher_lane", "reads_lower_lane"])
def test_a_missing_barrier_shows_under_one_of_the_schedules(semantics, offset):
    x = np.arange(512, dtype=np.float32)
    correct = x + np.roll(x.reshape(2, 256), -offset, axis=1).ravel()
    wrong = {}
    for schedule in ("forward", "reverse"):
        semantics.settings = Settings(schedule=schedule)
        out = np.empty_like(x)
        semantics.get_function("neighbour_sum_racy")((2,), (256,), (x, out, np.int32(offset)))
        wrong[schedule] = int((out != correct).sum())
        fixed = np.empty_like(x)
        semantics.get_function("neighbour_sum")((2,), (256,), (x, fixed, np.int32(offset)))
        assert np.array_equal(fixed, correct), schedule
    assert max(wrong.values()) > 100, wrong  # one order reads slots not yet written


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_the_barrier_version_is_right_under_every_schedule(semantics, schedule):
    semantics.settings = Settings(schedule=schedule, seed=7)
    x = np.random.default_rng(1).standard_normal(1024).astype(np.float32)
    out = np.empty_like(x)
    semantics.get_function("neighbour_sum")((4,), (256,), (x, out, np.int32(3)))
    assert np.array_equal(out, x + np.roll(x.reshape(4, 256), -3, axis=1).ravel())


@pytest.mark.parametrize(
    "kernel,args,block,message",
    [
        ("divergent_barrier", lambda: (np.zeros(32, np.float32),), 32, r"divergent __syncthreads: .*semantics\.cu:\d+"),
        ("early_return", lambda: (np.zeros(32, np.float32), np.int32(10)), 32, "thread exited while 10 thread"),
        ("partial_warp_shuffle", lambda: (np.zeros(32, np.int32),), 32, "warp intrinsic with mask 0xffffffff"),
        ("mismatched_sync", lambda: (np.zeros(64, np.int32),), 64, "deadlock"),
    ],
)
def test_strict_mode_reports_undefined_behaviour(semantics, kernel, args, block, message):
    with pytest.raises(EmulatorError, match=message):
        semantics.get_function(kernel)((1,), (block,), args())


def test_lenient_mode_runs_an_early_return_like_hardware(semantics):
    semantics.settings = Settings(strict=False)
    out = np.zeros(32, np.float32)
    semantics.get_function("early_return")((1,), (32,), (out, np.int32(10)))
    assert out.tolist() == [1.0] * 10 + [0.0] * 22


def test_a_spin_lock_across_blocks_on_two_os_threads(semantics):
    semantics.settings = Settings(os_threads=2)
    lock, counter = np.zeros(1, np.int32), np.zeros(1, np.int32)
    semantics.get_function("locked_count")((40,), (32,), (lock, counter))
    assert counter[0] == 40


def test_arguments_are_checked_against_the_kernel_signature(semantics):
    kernel = semantics.get_function("scalar_types")
    out = np.zeros(3, np.float32)
    kernel((1,), (1,), (out, np.float32(1.5), np.int64(-2), np.uint32(7)))
    assert out.tolist() == [1.5, -2.0, 7.0]
    with pytest.raises(EmulatorError, match="pass a NumPy scalar"):
        kernel((1,), (1,), (out, 1.5, np.int64(-2), np.uint32(7)))
    with pytest.raises(EmulatorError, match="the parameter is i8, got int32"):
        kernel((1,), (1,), (out, np.float32(1.5), np.int32(-2), np.uint32(7)))
    with pytest.raises(EmulatorError, match="takes 4 arguments, got 3"):
        kernel((1,), (1,), (out, np.float32(1.5), np.int64(-2)))
    read_only = np.zeros(3, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(EmulatorError, match="read-only array passed for a non-const pointer"):
        kernel((1,), (1,), (read_only, np.float32(1.5), np.int64(-2), np.uint32(7)))


def test_invalid_launch_configuration(semantics):
    with pytest.raises(EmulatorError, match="cudaErrorInvalidConfiguration"):
        semantics.get_function("divergent_barrier")((1,), (2048,), (np.zeros(2048, np.float32),))
    with pytest.raises(KeyError, match="has no kernel 'nope'"):
        semantics.get_function("nope")
