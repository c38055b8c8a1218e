"""Real local[4] Spark: the barrier wrapper, run(), the task context and failures."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2
from sparkhydrogen.launch.service import service_for

pytestmark = [pytest.mark.spark, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local[4]") as spark:
        yield spark.sparkContext


# ---------------------------------------------------------------- happy paths


def test_barrier_rdd_allgather_and_task_infos(sc: Any) -> None:
    def train(rows: Any) -> Iterator[Any]:
        ctx = h2.BarrierTaskContext.get()
        ctx.barrier()
        local = sum(rows)
        gathered = ctx.allGather(local)
        yield (ctx.rank(), ctx.partitionId(), ctx.worldSize(), gathered, len(ctx.getTaskInfos()))

    out = h2.barrier(sc.parallelize(range(8), 4)).mapPartitions(train).collect()
    assert out == [(r, r, 4, [1, 5, 9, 13], 4) for r in range(4)]


def test_map_partitions_with_index_and_chained_map_see_context(sc: Any) -> None:
    def body(index: int, rows: Any) -> Iterator[int]:
        assert index == h2.BarrierTaskContext.get().rank()
        yield from rows

    def after(x: int) -> tuple[int, int, int]:
        ctx = h2.BarrierTaskContext.get()  # a narrow transformation after the barrier stage
        return x, ctx.rank(), sum(ctx.allGather(1))

    out = h2.barrier(sc.parallelize(range(4), 4)).mapPartitionsWithIndex(body).map(after).collect()
    assert out == [(0, 0, 4), (1, 1, 4), (2, 2, 4), (3, 3, 4)]


def test_allgather_str_is_pyspark_compatible_and_broadcast(sc: Any) -> None:
    def body(rows: Any) -> Iterator[Any]:
        ctx = h2.BarrierTaskContext.get()
        names = ctx.allGather(f"host-{ctx.partitionId()}")
        cfg = ctx.broadcast({"lr": 0.1, "from": ctx.rank()} if ctx.rank() == 2 else None, root=2)
        yield names, cfg, ctx.stageId() >= 0, ctx.attemptNumber(), ctx.cpus()

    out = h2.barrier(sc.parallelize(range(3), 3)).mapPartitions(body).collect()
    for names, cfg, has_stage, attempt, cpus in out:
        assert names == ["host-0", "host-1", "host-2"] and all(isinstance(n, str) for n in names)
        assert cfg == {"lr": 0.1, "from": 2}
        assert has_stage and attempt == 0 and cpus == 1


def test_run_returns_results_in_rank_order(sc: Any) -> None:
    def fn(scale: int, offset: int = 0) -> dict[str, Any]:
        ctx = h2.BarrierTaskContext.get()
        ranks = ctx.allGather(ctx.rank())
        return {"rank": ctx.rank(), "value": ctx.rank() * scale + offset, "ranks": ranks}

    out = h2.run(fn, 4, args=(10,), kwargs={"offset": 1})
    assert [o["value"] for o in out] == [1, 11, 21, 31]
    assert all(o["ranks"] == [0, 1, 2, 3] for o in out)


def test_barrier_stage_after_ordinary_stages(sc: Any) -> None:
    counts = sc.parallelize(["a", "b", "a", "c", "a", "b"], 3).map(lambda w: (w, 1)).reduceByKey(lambda a, b: a + b, 2)

    def body(rows: Any) -> Iterator[Any]:
        ctx = h2.BarrierTaskContext.get()
        parts = ctx.allGather(sorted(rows))
        yield dict(kv for part in parts for kv in part)

    out = h2.barrier(counts).mapPartitions(body).collect()
    assert out == [{"a": 3, "b": 2, "c": 1}] * 2
    assert sc.parallelize(range(10), 2).sum() == 45  # ordinary jobs still work afterwards


def test_two_gangs_from_two_driver_threads_are_isolated(sc: Any) -> None:
    results: dict[str, Any] = {}

    def job(tag: str, fail: bool) -> None:
        def fn() -> Any:
            ctx = h2.BarrierTaskContext.get()
            for _ in range(20):
                ctx.barrier()
            if fail and ctx.rank() == 1:
                raise RuntimeError(f"{tag} rank 1 fails on purpose")
            return ctx.allGather((tag, ctx.rank()))

        try:
            results[tag] = h2.run(fn, 2)
        except h2.GangFailedError as exc:
            results[tag] = exc

    threads = [threading.Thread(target=job, args=("A", False)), threading.Thread(target=job, args=("B", True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results["A"] == [[("A", 0), ("A", 1)]] * 2
    assert isinstance(results["B"], h2.GangFailedError) and "B rank 1 fails on purpose" in str(results["B"])


# ---------------------------------------------------------------- failures


def test_rank_failure_aborts_peers_and_names_the_rank(sc: Any, tmp_path: Any) -> None:
    outdir = str(tmp_path)

    def fn() -> None:
        ctx = h2.BarrierTaskContext.get()
        ctx.barrier(timeout=60)  # every rank is up: none can be killed by the cancel before it observes
        if ctx.rank() == 1:
            raise ValueError("bad shard 17")
        start = time.monotonic()
        try:
            ctx.barrier(timeout=60)
        except h2.HydrogenError as exc:
            seen = {"type": type(exc).__name__, "failed_rank": getattr(exc, "failed_rank", None),
                    "cause": getattr(getattr(exc, "cause", None), "type", None),
                    "waited": time.monotonic() - start}
            with open(os.path.join(outdir, f"rank{ctx.rank()}.json"), "w") as fh:
                json.dump(seen, fh)
            raise

    with pytest.raises(h2.GangFailedError, match=r"rank 1 raised ValueError: bad shard 17") as info:
        h2.run(fn, 4)
    assert info.value.failed_rank == 1
    assert info.value.cause is not None and info.value.cause.type == "ValueError"
    assert 'raise ValueError("bad shard 17")' in str(info.value)  # the remote traceback
    seen = [json.load(open(os.path.join(outdir, f))) for f in sorted(os.listdir(outdir))]
    assert seen, "at least one peer observed the abort before Spark killed it"
    for peer in seen:  # aborted by the coordinator, not by the 60 s timeout
        assert peer["type"] == "GangAbortedError" and peer["failed_rank"] == 1 and peer["cause"] == "ValueError"


def test_mismatched_collectives_fail_every_rank_with_names(sc: Any) -> None:
    def fn() -> None:
        ctx = h2.BarrierTaskContext.get()
        if ctx.rank() == 0:
            ctx.allGather("x")
        else:
            ctx.barrier()

    with pytest.raises(h2.GangFailedError, match=r"rank\(s\) 0 called allGather; rank\(s\) 1 called barrier"):
        h2.run(fn, 2)


def test_unequal_number_of_barriers_fails_fast(sc: Any) -> None:
    def fn() -> None:
        ctx = h2.BarrierTaskContext.get()
        for _ in range(2 if ctx.rank() == 0 else 3):
            ctx.barrier()

    with pytest.raises(h2.GangFailedError, match=r"finished (its|their) task after 2 collective call\(s\)"):
        h2.run(fn, 2)


def test_timeout_names_the_missing_rank(sc: Any) -> None:
    def fn() -> None:
        ctx = h2.BarrierTaskContext.get()
        ctx.barrier()
        if ctx.rank() == 0:
            ctx.barrier(timeout=0.5)
        else:
            time.sleep(3)  # a straggler, not a readiness wait
            ctx.barrier()

    with pytest.raises(h2.GangFailedError,
                       match=r"failed: rank 1 never reached barrier \(collective call #2\) within 0\.5 s "
                             r"\(rank 0 waited\)"):
        h2.run(fn, 2)


def test_unpicklable_payload_and_return_value(sc: Any) -> None:
    def gather_lock() -> None:
        h2.BarrierTaskContext.get().allGather(threading.Lock())

    with pytest.raises(h2.GangFailedError, match=r"PayloadError: allGather message of type _thread.lock cannot"):
        h2.run(gather_lock, 2)

    def return_lock() -> Any:
        return threading.Lock()

    with pytest.raises(h2.GangFailedError, match=r"return value of rank \d of type _thread.lock cannot be pickled"):
        h2.run(return_lock, 2)


# ---------------------------------------------------------------- bad input on the driver


def test_preflight_fails_fast_with_numbers(sc: Any) -> None:
    with pytest.raises(h2.InsufficientSlotsError, match=r"needs 5 slots but the cluster has 4 \(master local\[4\]"):
        h2.run(lambda: None, 5)
    with pytest.raises(h2.InsufficientSlotsError, match="repartition"):
        h2.barrier(sc.parallelize(range(10), 6)).mapPartitions(lambda it: it)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: h2.run("not a function", 2), TypeError, "fn must be callable"),
        (lambda: h2.run(lambda: 1, 0), ValueError, "num_tasks must be >= 1"),
        (lambda: h2.run(lambda: 1, 2.0), TypeError, "num_tasks must be an int"),
        (lambda: h2.run(lambda: 1, 2, args=5), TypeError, "args must be a tuple or list"),
        (lambda: h2.run(lambda: 1, 2, kwargs=[1]), TypeError, "kwargs must be a dict"),
        (lambda: h2.barrier([1, 2, 3]), TypeError, "takes a pyspark RDD or DataFrame, got builtins.list"),
    ],
)
def test_wrong_argument_types(sc: Any, call: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_context_outside_a_gang() -> None:
    with pytest.raises(h2.NotInGangError, match="outside a spark-hydrogen barrier task"):
        h2.BarrierTaskContext.get()


def test_garbage_on_the_coordinator_port_does_not_disturb_a_gang(sc: Any) -> None:
    host, port = service_for(sc).server.address
    stop = threading.Event()
    sent = []

    def spam() -> None:
        junk = [b"GET / HTTP/1.1\r\n\r\n", b"\x00" * 64, b"H2\x01\x04" + b"\xff" * 8, os.urandom(256)]
        while not stop.is_set() and len(sent) < 200:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(junk[len(sent) % len(junk)])
                sent.append(1)

    spammer = threading.Thread(target=spam)
    spammer.start()
    try:
        def fn() -> int:
            ctx = h2.BarrierTaskContext.get()
            total = 0
            for i in range(50):
                total += sum(ctx.allGather(i))
            return total

        assert h2.run(fn, 4) == [4 * sum(range(50))] * 4
    finally:
        stop.set()
        spammer.join(timeout=30)
    assert sent, "the spammer connected at least once"
    assert service_for(sc).server.running
