"""The long session: thousands of bare barrier jobs in one SparkContext keep nothing.

A notebook runs ``h2.barrier(rdd).mapPartitions(f).collect()`` over and over. Each job
is a Spark stage attempt whose gang the coordinator forms when its first task joins and
forgets when the stage is done, so after N jobs the coordinator holds no gang, attempt,
hook or connection, and the driver's resident memory is flat after warm-up.

``SPARKHYDROGEN_BARE_JOBS`` sets N (default 10,000; about 10 to 20 minutes on a 2-core
machine, by load). Run with ``make test-load``.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2

pytestmark = [pytest.mark.load, pytest.mark.spark, pytest.mark.timeout(3600)]

from pyspark import cloudpickle as _cloudpickle  # noqa: E402

_cloudpickle.register_pickle_by_value(sys.modules[__name__])  # executors cannot import a test module

JOBS = int(os.environ.get("SPARKHYDROGEN_BARE_JOBS", "10000"))
WARMUP = min(500, JOBS // 4)
#: Resident memory the driver may gain between the end of warm-up and the last job (Py4J and pyspark caches
#: settle within it; a leak of even one small object graph per job would exceed it).
RSS_SLACK_MIB = 40.0

log = logging.getLogger(__name__)


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _step(rows: Iterator[int]) -> Iterator[int]:
    ctx = h2.BarrierTaskContext.get()
    total = sum(ctx.allGather(sum(rows)))
    yield total


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local[2]", **{"spark.ui.retainedJobs": "50", "spark.ui.retainedStages": "50",
                                      "spark.sql.ui.retainedExecutions": "50"}) as session:
        yield session.sparkContext


def test_thousands_of_bare_barrier_jobs_keep_no_gang_state_and_flat_rss(sc: Any) -> None:
    from sparkhydrogen.launch.service import service_for

    rdd = sc.parallelize([1, 2, 3, 4], 2)
    started = time.monotonic()
    warm_rss = 0.0
    for job in range(JOBS):
        assert h2.barrier(rdd).mapPartitions(_step).collect() == [10, 10]
        if job + 1 == WARMUP:
            gc.collect()
            warm_rss = _rss_mib()
    gc.collect()
    end_rss = _rss_mib()
    elapsed = time.monotonic() - started
    server = service_for(sc).server
    deadline = time.monotonic() + 30  # the last job's ranks close their connections just after it returns
    while server.footprint()["connections"] and time.monotonic() < deadline:
        gc.collect()
    footprint = server.footprint()
    print(f"\n{JOBS} bare jobs in {elapsed:.0f} s ({elapsed / JOBS * 1000:.0f} ms/job); driver RSS after "
          f"{WARMUP} jobs {warm_rss:.1f} MiB, after {JOBS} {end_rss:.1f} MiB; coordinator {footprint}")
    kept = {k: v for k, v in footprint.items() if v and k != "connections"}
    assert kept == {}, f"the coordinator keeps state after {JOBS} bare jobs: {kept}"
    assert end_rss - warm_rss < RSS_SLACK_MIB, (
        f"driver RSS grew {end_rss - warm_rss:.1f} MiB from job {WARMUP} to job {JOBS}")
