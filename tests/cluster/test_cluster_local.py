"""Real executor JVMs: local-cluster[2,1,1024] (two executors, one core each)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local-cluster[2,1,1024]", **{"spark.executor.memory": "512m"}) as spark:
        yield spark.sparkContext


def test_gang_spans_two_executor_jvms(sc: Any) -> None:
    def fn() -> dict[str, Any]:
        ctx = h2.BarrierTaskContext.get()
        ctx.barrier()
        peers = ctx.allGather({"pid": os.getpid(), "host": socket.gethostname()})
        return {"rank": ctx.rank(), "peers": peers, "addresses": [t.address for t in ctx.getTaskInfos()]}

    out = h2.run(fn, 2)
    assert [o["rank"] for o in out] == [0, 1]
    pids = {p["pid"] for p in out[0]["peers"]}
    assert len(pids) == 2 and os.getpid() not in pids  # two Python workers, neither is the driver
    assert out[0]["peers"] == out[1]["peers"]
    assert len(set(out[0]["addresses"])) == 2  # two executors


def test_barrier_rdd_with_chained_map_on_cluster(sc: Any) -> None:
    def body(rows: Any) -> Iterator[int]:
        ctx = h2.BarrierTaskContext.get()
        total = sum(ctx.allGather(sum(rows)))
        yield total

    rdd = h2.barrier(sc.parallelize(range(100), 2)).mapPartitions(body).map(
        lambda t: (t, h2.BarrierTaskContext.get().rank()))
    assert rdd.collect() == [(4950, 0), (4950, 1)]


def test_rank_failure_across_processes(sc: Any) -> None:
    def fn() -> None:
        ctx = h2.BarrierTaskContext.get()
        if ctx.rank() == 0:
            raise ZeroDivisionError("division by zero in the loss")
        ctx.barrier(timeout=120)

    with pytest.raises(h2.GangFailedError, match="rank 0 raised ZeroDivisionError: division by zero") as info:
        h2.run(fn, 2)
    assert info.value.failed_rank == 0
    assert h2.run(lambda: h2.BarrierTaskContext.get().rank(), 2) == [0, 1]  # the service keeps serving


def test_preflight_counts_executor_slots(sc: Any) -> None:
    with pytest.raises(h2.InsufficientSlotsError, match=r"needs 3 slots but the cluster has 2 \(2 executor\(s\)"):
        h2.run(lambda: None, 3)


def test_killed_python_worker_aborts_the_gang(sc: Any) -> None:
    def fn() -> None:
        ctx = h2.BarrierTaskContext.get()
        ctx.barrier()
        if ctx.rank() == 1:
            os._exit(3)  # the Python worker vanishes without a word
        ctx.barrier(timeout=120)

    with pytest.raises(h2.GangFailedError, match=r"rank 1's process died or lost its connection to the coordinator"):
        h2.run(fn, 2)
