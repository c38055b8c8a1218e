"""Real local[4] Spark: DataFrames as gangs (mapInPandas / mapInArrow with barrier=True)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2

pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

pytestmark = [pytest.mark.spark, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    with spark_session("local[4]") as session:
        yield session


def test_map_in_pandas_gang_sees_its_rows_and_peers(spark: Any) -> None:
    import pandas as pd

    def train(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        ctx = h2.BarrierTaskContext.get()
        local = pd.concat(list(batches))
        total = sum(ctx.allGather(int(local["id"].sum())))
        yield pd.DataFrame({"rank": [ctx.rank()], "rows": [len(local)], "total": [total],
                            "world": [ctx.worldSize()]})

    out = h2.barrier(spark.range(1000), num_tasks=3).mapInPandas(train, "rank long, rows long, total long, world long")
    rows = sorted(tuple(r) for r in out.collect())
    assert [r[0] for r in rows] == [0, 1, 2]
    assert sum(r[1] for r in rows) == 1000
    assert all(r[2] == sum(range(1000)) and r[3] == 3 for r in rows)


def test_map_in_arrow_gang(spark: Any) -> None:
    import pyarrow as pa

    def body(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        ctx = h2.BarrierTaskContext.get()
        n = sum(b.num_rows for b in batches)
        sizes = ctx.allGather(n)
        yield pa.RecordBatch.from_pydict({"rank": [ctx.rank()], "sizes": [sizes]})

    df = spark.range(0, 90, 1, 4).selectExpr("id", "id * 2 AS twice")
    rows = sorted(h2.barrier(df).mapInArrow(body, "rank long, sizes array<long>").collect())
    assert [r["rank"] for r in rows] == [0, 1, 2, 3]
    assert all(sum(r["sizes"]) == 90 and len(r["sizes"]) == 4 for r in rows)


def test_dataframe_failure_and_retry(spark: Any) -> None:
    import pandas as pd

    def body(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        ctx = h2.BarrierTaskContext.get()
        if ctx.gangAttempt() == 0 and ctx.rank() == 1:
            raise ValueError("bad batch")
        yield pd.DataFrame({"attempt": [ctx.gangAttempt()], "n": [sum(len(b) for b in batches)]})

    df = spark.range(100)
    with pytest.raises(h2.GangFailedError, match="rank 1 raised ValueError: bad batch"):
        h2.retry(lambda: h2.barrier(df, num_tasks=2).mapInPandas(body, "attempt long, n long").collect(),
                 max_retries=0)
    out = h2.retry(lambda: h2.barrier(df, num_tasks=2).mapInPandas(body, "attempt long, n long").collect(),
                   max_retries=1, retry_backoff=0.1)
    assert sorted(tuple(r) for r in out) == [(1, 50), (1, 50)]


def test_dataframe_gang_larger_than_the_cluster_fails_fast(spark: Any) -> None:
    with pytest.raises(h2.InsufficientSlotsError, match=r"needs 6 slots but the cluster has 4"):
        h2.barrier(spark.range(10), num_tasks=6).mapInPandas(lambda it: it, "id long")


def test_bad_arguments(spark: Any) -> None:
    with pytest.raises(ValueError, match="num_tasks must be >= 1"):
        h2.barrier(spark.range(3), num_tasks=0)
    with pytest.raises(TypeError, match="mapInPandas needs a function"):
        h2.barrier(spark.range(3), num_tasks=1).mapInPandas("nope", "id long")
