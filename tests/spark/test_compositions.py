"""A gang's output composed the ordinary ways, compared with pyspark's own barrier mode.

A gang is a Spark stage attempt, not a Python object: the plan built on it may be
rebound, selected, grouped, joined, viewed through SQL, cached, turned from an RDD into
a DataFrame, and run any number of times. Every composition below is run three ways on
the same data, with ``gc.collect()`` between building the plan and running it (the
Python wrapper of the gang stage is gone by then):

* ``native``: pyspark's barrier mode (``rdd.barrier()``, ``mapInPandas(..., barrier=True)``);
* ``h2``: ``sparkhydrogen.barrier(...)``;
* ``install``: pyspark's calls with transparent mode installed.

and the three answers must agree. Sessions: the shared ``spark`` fixture on ``local[4]``
and Spark Connect (Connect has no RDD API, so the RDD compositions run on the classic
session only; the multi-JVM placement is ``test_core_matrix``'s).
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import sparkhydrogen as h2

pytestmark = [pytest.mark.spark, pytest.mark.timeout(240)]

from pyspark import cloudpickle as _cloudpickle  # noqa: E402

_cloudpickle.register_pickle_by_value(sys.modules[__name__])

MODES = ("native", "h2", "install")
#: Classic (one JVM) and Connect: the API surfaces a user composes on. Multi-JVM placement is the core matrix's.
SESSION_KINDS = ("local[4]", "connect")
ROWS = 40
PARTS = 2


def _is_connect(spark: Any) -> bool:
    return type(spark).__module__.startswith("pyspark.sql.connect")


def _frames(batches: Iterator[Any]) -> Iterator[Any]:
    """A gang body: one barrier, then every row keyed by ``id % 3`` with the gang's size."""
    import pandas as pd
    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()  # ours under transparent mode and h2.barrier, pyspark's in native mode
    ctx.barrier()
    world = len(ctx.getTaskInfos())
    for batch in batches:
        yield pd.DataFrame({"k": batch["id"] % 3, "v": batch["id"], "w": [world] * len(batch)})


def _pairs(rows: Iterator[int]) -> Iterator[tuple[int, int]]:
    from pyspark import BarrierTaskContext

    ctx = h2.BarrierTaskContext.get() if h2.BarrierTaskContext._current is not None else BarrierTaskContext.get()
    ctx.barrier()
    for x in rows:
        yield x % 3, x


SCHEMA = "k long, v long, w long"


def gang_df(spark: Any, mode: str) -> Any:
    df = spark.range(0, ROWS, 1, PARTS)
    if mode == "h2":
        return h2.barrier(df).mapInPandas(_frames, SCHEMA)
    return df.mapInPandas(_frames, SCHEMA, barrier=True)  # native, or transparent mode when installed


def gang_rdd(spark: Any, mode: str) -> Any:
    rdd = spark.sparkContext.parallelize(range(ROWS), PARTS)
    if mode == "h2":
        return h2.barrier(rdd).mapPartitions(_pairs)
    return rdd.barrier().mapPartitions(_pairs)


def _rows(rows: list[Any]) -> list[tuple[Any, ...]]:
    return sorted(tuple(r) for r in rows)


def _rebound(spark: Any, mode: str) -> Callable[[], Any]:
    df = gang_df(spark, mode)
    df = df.filter("v > 3")  # the name now holds the derived plan only
    df = df.withColumn("x", df.v * 2)
    return lambda: _rows(df.collect())


def _temp_view(spark: Any, mode: str) -> Callable[[], Any]:
    gang_df(spark, mode).createOrReplaceTempView(f"gang_{mode}")
    return lambda: _rows(spark.sql(f"SELECT k, sum(v) AS s, count(*) AS n FROM gang_{mode} GROUP BY k").collect())


def _cached(spark: Any, mode: str) -> Callable[[], Any]:
    df = gang_df(spark, mode).cache()

    def run() -> Any:
        try:
            first = df.count()
            return first, _rows(df.collect())  # from the cache (or recomputed: another stage attempt)
        finally:
            df.unpersist()

    return run


def _run_twice(spark: Any, mode: str) -> Callable[[], Any]:
    df = gang_df(spark, mode).select("k", "v")
    return lambda: (_rows(df.collect()), _rows(df.collect()))  # the same plan, two stage attempts


def _join(spark: Any, mode: str) -> Callable[[], Any]:
    other = spark.range(0, 3).withColumnRenamed("id", "k").withColumn("label", h2_lit("x"))
    joined = gang_df(spark, mode).join(other, "k")
    return lambda: _rows(joined.collect())


def h2_lit(value: str) -> Any:
    from pyspark.sql import functions as F

    return F.lit(value)


def _union_after_shuffle(spark: Any, mode: str) -> Callable[[], Any]:
    counts = gang_df(spark, mode).groupBy("k").count()
    both = counts.union(spark.range(0, 2).selectExpr("id AS k", "0L AS count"))
    return lambda: _rows(both.collect())


DATAFRAME_CASES: dict[str, Callable[[Any, str], Callable[[], Any]]] = {
    "collect": lambda spark, mode: (lambda df: lambda: _rows(df.collect()))(gang_df(spark, mode)),
    "select": lambda spark, mode: (lambda df: lambda: _rows(df.select("v").collect()))(gang_df(spark, mode)),
    "rebind_filter": _rebound,
    "groupby_count": lambda spark, mode: (lambda df: lambda: _rows(df.collect()))(
        gang_df(spark, mode).groupBy("k").count()),
    "join": _join,
    "temp_view_sql": _temp_view,
    "cache_then_reuse": _cached,
    "same_plan_twice": _run_twice,
    "union_after_shuffle": _union_after_shuffle,
}

RDD_CASES: dict[str, Callable[[Any, str], Callable[[], Any]]] = {
    "rdd_map": lambda spark, mode: (lambda r: lambda: sorted(r.collect()))(gang_rdd(spark, mode).map(lambda kv: kv[1])),
    "rdd_reduceByKey": lambda spark, mode: (lambda r: lambda: sorted(r.collect()))(
        gang_rdd(spark, mode).reduceByKey(lambda a, b: a + b)),
    "rdd_toDF_filter": lambda spark, mode: (lambda df: lambda: _rows(df.collect()))(
        gang_rdd(spark, mode).toDF("k long, v long").filter("v > 3")),
    "rdd_cache_union": lambda spark, mode: _rdd_cache_union(spark, mode),
}


def _rdd_cache_union(spark: Any, mode: str) -> Callable[[], Any]:
    cached = gang_rdd(spark, mode).cache()

    def run() -> Any:
        try:
            first = cached.count()
            both = cached.reduceByKey(lambda a, b: a + b).union(spark.sparkContext.parallelize([(9, 9)], 1))
            return first, sorted(both.collect())
        finally:
            cached.unpersist()

    return run


def _answer(spark: Any, mode: str, build: Callable[[Any, str], Callable[[], Any]]) -> Any:
    if mode == "install":
        h2.install()
    try:
        run = build(spark, mode)
        gc.collect()  # the gang stage's Python wrapper is unreachable now: only the plan remains
        return run()
    finally:
        if mode == "install":
            h2.uninstall()


@pytest.mark.parametrize("case", sorted(DATAFRAME_CASES))
def test_dataframe_composition_matches_native_barrier_mode(spark: Any, case: str) -> None:
    build = DATAFRAME_CASES[case]
    answers = {mode: _answer(spark, mode, build) for mode in MODES}
    assert answers["h2"] == answers["native"], f"{case}: h2.barrier differs from pyspark's barrier mode"
    assert answers["install"] == answers["native"], f"{case}: transparent mode differs from pyspark's barrier mode"
    assert answers["native"]  # every case produced data


@pytest.mark.parametrize("case", sorted(RDD_CASES))
def test_rdd_composition_matches_native_barrier_mode(spark: Any, case: str) -> None:
    if _is_connect(spark):
        pytest.skip("Spark Connect has no RDD API (pyspark's own limit)")
    build = RDD_CASES[case]
    answers = {mode: _answer(spark, mode, build) for mode in MODES}
    assert answers["h2"] == answers["native"], f"{case}: h2.barrier differs from pyspark's barrier mode"
    assert answers["install"] == answers["native"], f"{case}: transparent mode differs from pyspark's barrier mode"
    assert answers["native"]


def test_gang_size_is_the_stage_task_count(spark: Any) -> None:
    """Nothing planned the query on the driver: the gang has as many ranks as the stage has tasks."""
    rows = h2.barrier(spark.range(0, 30, 1, 2)).mapInPandas(_frames, SCHEMA).select("w").distinct().collect()
    assert [r["w"] for r in rows] == [2]
    one = h2.barrier(spark.range(0, 30, 1, 1)).mapInPandas(_frames, SCHEMA).select("w").distinct().collect()
    assert [r["w"] for r in one] == [1]


def test_empty_input_gives_no_rows_as_pyspark_does(spark: Any) -> None:
    empty = spark.range(0, 0, 1, 1).filter("id < 0")
    native = _rows(empty.mapInPandas(_frames, SCHEMA, barrier=True).collect())
    assert _rows(h2.barrier(empty).mapInPandas(_frames, SCHEMA).collect()) == native == []
    if not _is_connect(spark):
        none = spark.sparkContext.emptyRDD()
        assert none.getNumPartitions() == 0
        assert h2.barrier(none).mapPartitions(_pairs).collect() == none.barrier().mapPartitions(_pairs).collect() == []


def test_bare_jobs_leave_no_gang_state_on_the_driver(spark: Any) -> None:
    if _is_connect(spark):
        pytest.skip("under Spark Connect the coordinator lives in rank 0's task: there is no driver state to check")
    from sparkhydrogen.launch.service import service_for

    df = h2.barrier(spark.range(0, 8, 1, 2)).mapInPandas(_frames, SCHEMA)
    for _ in range(5):
        assert len(df.collect()) == 8
    server = service_for(spark).server
    deadline = time.monotonic() + 30  # the last rank's connection closes just after its task's output is sent
    while server.footprint()["gangs"] and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    footprint = server.footprint()
    assert footprint["gangs"] == 0 and footprint["attempts"] == 0 and footprint["stage_tombstones"] == 0, footprint
