"""The one task lifecycle on real Spark: outcomes reported once, early close, release after every finish."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from tests.sparkutil import spark_session

import sparkhydrogen as h2
from sparkhydrogen.coordinator.server import MAX_STAGE_TOMBSTONES
from sparkhydrogen.launch.service import service_for

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local[4]") as spark:
        yield spark.sparkContext


def _two_rows_with_a_barrier_between() -> Any:
    def body(rows: Iterable[int]) -> Iterator[int]:  # nested: pickled by value (tests are not importable on executors)
        ctx = h2.BarrierTaskContext.get()
        yield ctx.rank()
        ctx.barrier()
        yield 100 + ctx.rank()

    return body


def test_every_consumer_stopping_early_completes_the_gang(sc: Any) -> None:
    out = (h2.barrier(sc.parallelize(range(4), 2)).mapPartitions(_two_rows_with_a_barrier_between())
           .mapPartitions(lambda it: itertools.islice(it, 1)).collect())
    assert sorted(out) == [0, 1]


def test_one_consumer_stopping_early_is_named_to_its_peers(sc: Any) -> None:
    def first_only_on_rank_0(rows: Iterator[int]) -> Iterator[int]:
        from pyspark import TaskContext  # called before the rank's generator starts (and installs our context)

        return itertools.islice(rows, 1) if TaskContext.get().partitionId() == 0 else rows

    rdd = h2.barrier(sc.parallelize(range(4), 2)).mapPartitions(_two_rows_with_a_barrier_between())
    with pytest.raises(Exception, match=r"rank 0's partition was closed early by its consumer") as info:
        rdd.mapPartitions(first_only_on_rank_0).collect()
    assert "CollectiveMismatchError" not in str(info.value)


def test_successful_gangs_release_quietly(sc: Any, caplog: Any) -> None:
    """Release waits for every rank's finish: no 'aborted' logs, no abort hooks, for successful runs."""
    def quick() -> int:
        ctx = h2.BarrierTaskContext.get()
        ctx.barrier()
        return ctx.rank()

    with caplog.at_level(logging.INFO, logger="sparkhydrogen"):
        for _ in range(15):
            assert h2.run(quick, 3) == [0, 1, 2]
    noisy = [r.getMessage() for r in caplog.records if "abort" in r.getMessage().lower()
             or "cancelled" in r.getMessage().lower()]
    assert noisy == []


def test_bare_jobs_hold_no_gangs_whether_their_rdds_live_or_not(sc: Any) -> None:
    """A bare gang lives as long as its stage attempt: nothing is kept per job or per RDD."""
    import time

    def total(rows: Iterable[int]) -> Iterator[int]:
        yield sum(h2.BarrierTaskContext.get().allGather(sum(rows)))

    for _ in range(40):
        assert h2.barrier(sc.parallelize(range(4), 2)).mapPartitions(total).collect() == [6, 6]
    server = service_for(sc).server
    kept = h2.barrier(sc.parallelize(range(4), 2)).mapPartitions(total)  # alive, and run twice: two stage attempts
    assert kept.collect() == [6, 6] and kept.collect() == [6, 6]
    deadline = time.monotonic() + 30
    while server.footprint()["connections"] and time.monotonic() < deadline:  # the last ranks close just after
        time.sleep(0.05)
    footprint = server.footprint()
    # nothing live is kept; a gang whose attempt was aborted after its job's answer was in (a heartbeat missed on
    # an overloaded machine) stays as a bounded tombstone, refusing its late tasks
    assert footprint["gangs"] == footprint["stage_tombstones"] <= MAX_STAGE_TOMBSTONES, footprint
    assert footprint["running_gangs"] == 0 and footprint["checkpoint_bytes"] == 0, footprint
    assert kept.collect() == [6, 6]  # and the live RDD still runs
