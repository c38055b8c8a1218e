"""Real local[4] Spark: failures are named right (a timeout blames the rank that never came) and liveness
tells a busy rank from a dead one.

The session's liveness is scaled down (2 s heartbeat timeout) and every collective has a 1 s default
timeout (``spark.hydrogen.collective.timeout``); calls that must not time out pass their own.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2

pytestmark = [pytest.mark.spark, pytest.mark.timeout(240)]

HEARTBEAT_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    conf = {"spark.hydrogen.heartbeat.timeout": f"{HEARTBEAT_TIMEOUT:g}s",
            "spark.hydrogen.heartbeat.interval": "250ms",
            "spark.hydrogen.collective.timeout": "1s"}
    with spark_session("local[4]", **conf) as spark:
        yield spark.sparkContext


def test_a_collective_timeout_blames_the_rank_that_never_arrived(sc: Any) -> None:
    def fn() -> None:
        ctx = h2.BarrierTaskContext.get()
        ctx.barrier(timeout=60)  # all ranks are up
        if ctx.rank() == 1:
            time.sleep(4)  # a straggler that misses the others' 1 s deadline (not a readiness wait)
        ctx.barrier()  # the session's default timeout: 1 s

    with pytest.raises(h2.GangFailedError) as caught:
        h2.run(fn, 2)
    error = caught.value
    assert error.failed_rank == 1
    assert error.cause is not None and error.cause.type == "CollectiveTimeoutError"
    headline = str(error).splitlines()[0]
    assert re.match(r"gang '[\w.<>]*fn' failed: rank 1 never reached barrier \(collective call #2\) within 1 s "
                    r"\(rank 0 waited\): rank 1 \(host ", headline), headline
    assert "raised CollectiveTimeoutError" not in str(error)


# ------------------------------------------------------------------ liveness


def test_a_rank_holding_the_gil_in_one_long_c_call_is_busy_not_dead(sc: Any, caplog: Any) -> None:
    """Rank 1 holds the GIL for 3x the heartbeat timeout inside one C call: no heartbeat, connection alive."""
    hold = 3 * HEARTBEAT_TIMEOUT

    def fn() -> tuple[int, int]:
        import ctypes

        ctx = h2.BarrierTaskContext.get()
        ctx.barrier(timeout=60)
        if ctx.rank() == 1:
            # libc's sleep() through PyDLL, which (unlike CDLL) keeps the GIL for the whole call: the
            # heartbeat thread cannot run, as during a long sort or the pickling of a large value
            ctypes.PyDLL(None).sleep(int(hold))
        ctx.barrier(timeout=60)  # rank 0 waits here for rank 1 all that time
        return ctx.rank(), ctx.gangAttempt()

    def busy_rank() -> h2.RankStatus | None:
        return next((r for g in h2.status() for r in g.ranks if r.busy), None)

    with caplog.at_level(logging.WARNING, logger="sparkhydrogen.coordinator"), \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(h2.run, fn, 2)
        seen = None
        while seen is None and not job.done():  # status() while rank 1 holds the GIL: reported busy, kept
            seen = busy_rank()
            concurrent.futures.wait([job], timeout=0.1)  # the next look, or the job's end
        assert job.result(timeout=120) == [(0, 0), (1, 0)]  # first attempt, no retry
    assert seen is not None and seen.rank == 1 and "busy" in str(seen), seen
    lines = [r.getMessage() for r in caplog.records if "rank 1 (host" in r.getMessage()]
    assert len([line for line in lines if "has sent no heartbeat" in line and "it is kept, not failed" in line]) == 1
    assert len([line for line in lines if "is heard from again after" in line]) == 1


def test_a_rank_holding_the_gil_after_its_last_collective_is_not_failed(sc: Any) -> None:
    """The others have finished; the busy rank's result (here: its long call) still arrives."""

    def fn() -> int:
        import ctypes

        ctx = h2.BarrierTaskContext.get()
        ctx.barrier(timeout=60)
        if ctx.rank() == 0:
            ctypes.PyDLL(None).sleep(int(3 * HEARTBEAT_TIMEOUT))
        return ctx.gangAttempt()

    assert h2.run(fn, 2) == [0, 0]


def test_a_killed_rank_is_still_found_at_once_by_its_closed_connection(sc: Any) -> None:
    def fn() -> None:
        import os
        import signal

        ctx = h2.BarrierTaskContext.get()
        ctx.barrier(timeout=60)
        if ctx.rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        ctx.barrier(timeout=120)  # only the closed connection can end this wait before its timeout

    with pytest.raises(h2.GangFailedError, match=r"rank 1's process died or lost its connection to the "
                                                 r"coordinator") as caught:
        h2.run(fn, 2)
    assert caught.value.failed_rank == 1
    assert caught.value.cause is not None and caught.value.cause.type == "RankLostError"
