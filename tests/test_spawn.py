"""kbit._spawn.run_ranks: results in rank order, failures and hangs end every process."""

from __future__ import annotations

import time

import pytest
from kbit._spawn import RanksError, RanksTimeoutError, backend_for_device, run_ranks

from . import distributed_workers as workers

pytestmark = pytest.mark.slow


def test_results_come_back_in_rank_order():
    found = run_ranks(workers.rank_and_size, 2, timeout=120)
    assert found == [{"rank": r, "world_size": 2, "group_rank": r, "group_size": 2} for r in range(2)]


def test_a_raising_rank_fails_the_run_with_its_traceback():
    # Rank 0 fails too (its barrier loses rank 1); the error names the cause.
    with pytest.raises(RanksError, match="rank 1 failed .*ValueError: rank 1 gives up") as raised:
        run_ranks(workers.fail_on_rank_1, 2, timeout=120)
    assert raised.value.rank == 1 and "fail_on_rank_1" in raised.value.details


def test_a_hanging_rank_fails_the_run_in_time():
    # Rank 0 waits in a barrier for rank 1, which sleeps: whichever comes first, the run's
    # deadline or the process group's timeout in rank 0, the run fails well before the sleep ends.
    started = time.monotonic()
    with pytest.raises((RanksTimeoutError, RanksError)):
        run_ranks(workers.hang_on_rank_1, 2, timeout=20)
    assert time.monotonic() - started < 60  # the processes were ended, not waited for


def test_unknown_devices_are_refused_before_starting():
    with pytest.raises(ValueError, match="no process-group backend"):
        backend_for_device("mps")
    with pytest.raises(ValueError, match="no process-group backend"):
        run_ranks(workers.rank_and_size, 2, device="xpu")
