"""The core behaviours, through the public API, on every kind of session and every launch path.

Sessions (``spark`` fixture, tests/conftest.py): ``local[4]``, ``local-cluster[2,1,1024]``
and Spark Connect. Launch paths:

* ``run``: ``h2.run(fn, num_tasks=2, spark=spark)``;
* ``rdd``: ``h2.barrier(rdd).mapPartitions(f)`` (classic only: Connect has no RDD API);
* ``df``: ``h2.barrier(df, num_tasks=2).mapInPandas(f, schema)``;
* ``df_plan``: ``h2.barrier(spark.range(100).repartition(2)).mapInPandas(f, schema)``, the gang
  size read from the plan.

Failures of the barrier paths are asserted through ``h2.retry(lambda: ....collect())``, the
documented way to get our error (and retries) around a Spark action.

These tests are the specification for Spark Connect too: ``h2.run(..., spark=connect_session)``
and ``df_plan`` on Connect are behaviour the launch layer is being built to provide.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import sparkhydrogen as h2

pytestmark = [pytest.mark.spark, pytest.mark.timeout(240)]

WORLD = 2  # every kind has at least 2 slots (local-cluster: 2 executors x 1 core; Connect: local[2])
PATHS = ("run", "rdd", "df", "df_plan")

Body = Callable[[Any], Any]  # body(ctx) -> this rank's result

# Task closures use this module's helpers; executors cannot import a test module, so ship them by value.
from pyspark import cloudpickle as _cloudpickle  # noqa: E402

_cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _is_connect(spark: Any) -> bool:
    return type(spark).__module__.startswith("pyspark.sql.connect")


@pytest.fixture(params=PATHS)
def path(request: Any, spark: Any) -> str:
    if request.param == "rdd" and _is_connect(spark):
        pytest.skip("Spark Connect has no RDD API")
    return request.param


# ---------------------------------------------------------------- launching a body on a gang


def _run_body(body: Body) -> Any:
    return body(h2.BarrierTaskContext.get())


def _rdd_body(body: Body, rows: Iterator[Any]) -> Iterator[tuple[int, Any]]:
    ctx = h2.BarrierTaskContext.get()
    yield ctx.rank(), body(ctx)


def _pandas_body(body: Body, batches: Iterator[Any]) -> Iterator[Any]:
    import pickle

    import pandas as pd

    for _ in batches:  # consume this rank's share of the input
        pass
    ctx = h2.BarrierTaskContext.get()
    result = body(ctx)
    yield pd.DataFrame({"rank": [ctx.rank()], "result": [pickle.dumps(result)]})


def gang(spark: Any, path: str, body: Body, *, max_retries: int | None = None) -> list[Any]:
    """Run ``body(ctx)`` on a gang of :data:`WORLD` ranks through ``path``; every rank's result, by rank.

    ``max_retries=None`` launches a bare job (``h2.run`` with its default); a number runs the
    barrier paths inside ``h2.retry`` (and passes it to ``h2.run``).
    """
    import functools
    import pickle

    backoff = 0.1
    if path == "run":
        fn = functools.partial(_run_body, body)
        if max_retries is None:
            return h2.run(fn, WORLD, spark=spark)
        return h2.run(fn, WORLD, spark=spark, max_retries=max_retries, retry_backoff=backoff)

    if path == "rdd":
        def action() -> list[Any]:
            rdd = spark.sparkContext.parallelize(range(WORLD), WORLD)
            pairs = h2.barrier(rdd).mapPartitions(functools.partial(_rdd_body, body)).collect()
            return [result for _, result in sorted(pairs, key=lambda kv: kv[0])]
    else:
        def action() -> list[Any]:
            if path == "df":
                wrapped = h2.barrier(spark.range(100), num_tasks=WORLD)
            else:
                wrapped = h2.barrier(spark.range(100).repartition(WORLD))
            rows = wrapped.mapInPandas(functools.partial(_pandas_body, body), "rank long, result binary").collect()
            return [pickle.loads(bytes(r["result"])) for r in sorted(rows, key=lambda r: r["rank"])]

    if max_retries is None:
        return action()
    return h2.retry(action, max_retries=max_retries, retry_backoff=backoff)


def _record(folder: str, ctx: Any, **seen: Any) -> None:
    with open(os.path.join(folder, f"rank{ctx.rank()}-attempt{ctx.gangAttempt()}.json"), "w") as fh:
        json.dump(seen, fh)


def _records(folder: str) -> list[dict[str, Any]]:
    out = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as fh:
            out.append(json.load(fh))
    return out


# ---------------------------------------------------------------- happy paths


def test_barrier_round(spark: Any, path: str) -> None:
    def body(ctx: Any) -> tuple[int, int, int]:
        for _ in range(5):
            ctx.barrier(timeout=60)
        return ctx.rank(), ctx.worldSize(), ctx.gangAttempt()

    assert gang(spark, path, body) == [(r, WORLD, 0) for r in range(WORLD)]


def test_all_gather_objects_in_rank_order(spark: Any, path: str) -> None:
    def body(ctx: Any) -> list[Any]:
        r = ctx.rank()
        return ctx.allGather({"rank": r, "pair": (r, f"r{r}"), "tags": frozenset({r, -r}), "blob": bytes([r]) * 3},
                             timeout=60)

    expected = [{"rank": r, "pair": (r, f"r{r}"), "tags": frozenset({r, -r}), "blob": bytes([r]) * 3}
                for r in range(WORLD)]
    assert gang(spark, path, body) == [expected] * WORLD


def test_broadcast_from_a_non_zero_root(spark: Any, path: str) -> None:
    root = WORLD - 1

    def body(ctx: Any) -> Any:
        mine = {"from": ctx.rank(), "weights": [0.5, 1.5]} if ctx.rank() == root else None
        return ctx.broadcast(mine, root=root, timeout=60)

    assert gang(spark, path, body) == [{"from": root, "weights": [0.5, 1.5]}] * WORLD


# ---------------------------------------------------------------- failures


def test_mismatched_collectives_fail_every_rank_at_once(spark: Any, path: str, tmp_path: Any) -> None:
    folder = str(tmp_path)

    def body(ctx: Any) -> None:
        start = time.monotonic()
        try:
            if ctx.rank() == 0:
                ctx.allGather("x", timeout=60)
            else:
                ctx.barrier(timeout=60)
        except h2.HydrogenError as exc:
            _record(folder, ctx, type=type(exc).__name__, waited=time.monotonic() - start)
            raise

    with pytest.raises(h2.GangFailedError, match=r"rank\(s\) 0 called allGather; rank\(s\) 1 called barrier"):
        gang(spark, path, body, max_retries=0)
    seen = _records(folder)
    assert seen, "at least one rank saw the mismatch before Spark stopped the stage"
    for rank_saw in seen:  # by the coordinator's check, not by the 60 s timeout
        assert rank_saw["type"] == "CollectiveMismatchError" and rank_saw["waited"] < 30, rank_saw


def test_collective_timeout_names_the_missing_rank(spark: Any, path: str) -> None:
    def body(ctx: Any) -> None:
        ctx.barrier(timeout=60)
        if ctx.rank() == 0:
            ctx.barrier(timeout=0.5)
        else:
            time.sleep(3)  # a straggler that misses rank 0's deadline (not a readiness wait)
            ctx.barrier(timeout=60)

    with pytest.raises(h2.GangFailedError,
                       match=r"failed: rank 1 never reached barrier \(collective call #2\) within 0\.5 s "
                             r"\(rank 0 waited\)"):
        gang(spark, path, body, max_retries=0)


def test_rank_raising_aborts_peers_and_names_rank_and_exception(spark: Any, path: str, tmp_path: Any) -> None:
    folder = str(tmp_path)

    def body(ctx: Any) -> None:
        ctx.barrier(timeout=60)
        if ctx.rank() == 1:
            raise ValueError("bad shard 17")
        start = time.monotonic()
        try:
            ctx.barrier(timeout=60)
        except h2.HydrogenError as exc:
            _record(folder, ctx, type=type(exc).__name__, failed_rank=getattr(exc, "failed_rank", None),
                    cause=getattr(getattr(exc, "cause", None), "type", None), waited=time.monotonic() - start)
            raise

    with pytest.raises(h2.GangFailedError, match=r"rank 1 raised ValueError: bad shard 17") as info:
        gang(spark, path, body, max_retries=0)
    assert info.value.failed_rank == 1
    assert info.value.cause is not None and info.value.cause.type == "ValueError"
    assert 'raise ValueError("bad shard 17")' in str(info.value)  # rank 1's traceback
    seen = _records(folder)
    assert seen, "rank 0 observed the abort before Spark stopped it"
    for peer in seen:  # aborted by the coordinator within moments, not by the 60 s timeout
        assert peer == {"type": "GangAbortedError", "failed_rank": 1, "cause": "ValueError",
                        "waited": peer["waited"]} and peer["waited"] < 30, peer


def test_one_retry_relaunches_the_gang_as_attempt_1(spark: Any, path: str, tmp_path: Any) -> None:
    folder = str(tmp_path)

    def body(ctx: Any) -> tuple[int, int, list[int]]:
        _record(folder, ctx, rank=ctx.rank(), attempt=ctx.gangAttempt())
        if ctx.gangAttempt() == 0 and ctx.rank() == 1:
            raise RuntimeError("transient failure")
        return ctx.gangAttempt(), ctx.rank(), ctx.allGather(ctx.rank() * 10, timeout=60)

    out = gang(spark, path, body, max_retries=1)
    assert out == [(1, r, [10 * q for q in range(WORLD)]) for r in range(WORLD)]
    attempts = {(s["rank"], s["attempt"]) for s in _records(folder)}
    assert {(1, 0)} | {(r, 1) for r in range(WORLD)} <= attempts, attempts


def test_failure_without_retries_is_not_relaunched(spark: Any, path: str, tmp_path: Any) -> None:
    folder = str(tmp_path)

    def body(ctx: Any) -> None:
        _record(folder, ctx, attempt=ctx.gangAttempt())
        if ctx.rank() == 0:
            raise RuntimeError(f"always fails, attempt {ctx.gangAttempt()}")
        ctx.barrier(timeout=60)

    with pytest.raises(h2.GangFailedError, match=r"rank 0 raised RuntimeError: always fails, attempt 0"):
        gang(spark, path, body, max_retries=0)
    assert {s["attempt"] for s in _records(folder)} == {0}
