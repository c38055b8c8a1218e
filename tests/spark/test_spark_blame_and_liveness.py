"""Real local[4] Spark: failures are named right (a timeout blames the rank that never came) and liveness
tells a busy rank from a dead one.

The session's liveness is scaled down (2 s heartbeat timeout) and every collective has a 1 s default
timeout (``spark.hydrogen.collective.timeout``); calls that must not time out pass their own.
"""

from __future__ import annotations

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
