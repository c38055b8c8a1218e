"""Spark Connect (in-process local server): ``mapInPandas/mapInArrow(barrier=True)`` on Connect's DataFrame."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from sparkhydrogen import transparent

pytest.importorskip("grpc")
pd = pytest.importorskip("pandas")

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def spark(connect_spark: Any) -> Iterator[Any]:
    """The shared Connect session (tests/conftest.py, local[2]) with transparent mode installed while it runs."""
    transparent.install()
    try:
        yield connect_spark
    finally:
        transparent.uninstall()


def test_connect_map_in_pandas_barrier_is_served_by_spark_hydrogen(spark: Any) -> None:
    from pyspark import BarrierTaskContext, TaskContext

    def body(batches: Any) -> Iterator[Any]:
        context = BarrierTaskContext.get()
        n = sum(len(b) for b in batches)
        start = time.perf_counter()
        for _ in range(10):
            context.barrier()
        elapsed = time.perf_counter() - start
        yield pd.DataFrame({"m": [type(context).__module__], "same": [TaskContext.get() is context],
                            "g": [",".join(context.allGather(str(n)))], "elapsed": [elapsed]})

    df = spark.range(0, 8, numPartitions=2)
    assert type(df).__module__.startswith("pyspark.sql.connect")
    rows = df.mapInPandas(body, "m string, same boolean, g string, elapsed double", barrier=True).collect()
    assert sorted((r.m, r.same, r.g) for r in rows) == [("sparkhydrogen.context", True, "4,4")] * 2
    assert max(r.elapsed for r in rows) < 5.0  # ten native rounds would take ~10 s


def test_connect_without_barrier_is_untouched(spark: Any) -> None:
    from pyspark import TaskContext

    rows = spark.range(0, 4, numPartitions=2).mapInPandas(
        lambda bs: (pd.DataFrame({"m": [type(TaskContext.get()).__module__]}) for _ in [0]), "m string").collect()
    assert {r.m for r in rows} == {"pyspark.taskcontext"}
