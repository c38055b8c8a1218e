"""Spark Connect (pyspark[connect], local server): the coordinator runs inside rank 0's task."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import sparkhydrogen as h2

pytest.importorskip("grpc")
pytest.importorskip("pandas")

pytestmark = [pytest.mark.spark, pytest.mark.timeout(240)]

#: the in-process Connect server's master (``connect_spark``, tests/conftest.py): gangs of 4 need 4 slots
CONNECT_MASTER = "local[4]"


@pytest.fixture(scope="module")
def spark(connect_spark: Any) -> Any:
    return connect_spark


def test_connect_session_has_no_rdd_api(spark: Any) -> None:
    from sparkhydrogen.launch.dataframe import is_connect

    assert is_connect(spark.range(1)) and is_connect(spark)


def test_gang_over_connect_with_embedded_coordinator(spark: Any) -> None:
    import pandas as pd

    def train(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        ctx = h2.BarrierTaskContext.get()
        n = sum(len(b) for b in batches)
        for _ in range(20):
            ctx.barrier()
        sizes = ctx.allGather({"rank": ctx.rank(), "n": n})
        plan = ctx.broadcast("from rank 0" if ctx.rank() == 0 else None)
        yield pd.DataFrame({"rank": [ctx.rank()], "total": [sum(s["n"] for s in sizes)], "plan": [plan]})

    rows = h2.barrier(spark.range(400), num_tasks=4).mapInPandas(train, "rank long, total long, plan string").collect()
    assert sorted((r["rank"], r["total"], r["plan"]) for r in rows) == [(r, 400, "from rank 0") for r in range(4)]


def test_failure_over_connect_names_the_rank(spark: Any) -> None:
    import pandas as pd

    def body(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        ctx = h2.BarrierTaskContext.get()
        if ctx.rank() == 2:
            raise KeyError("feature_7")
        ctx.barrier()
        yield pd.DataFrame({"rank": [ctx.rank()]})

    # Spark reports the first task failure it processed: either rank 2's own exception (task index 2), or a
    # peer's GangAbortedError, whose message names rank 2 and its exception. Both point at rank 2.
    named = r"rank 2 raised KeyError: 'feature_7'|ResultTask\(\d+, 2\)[\s\S]*KeyError: 'feature_7'"
    with pytest.raises(Exception, match=named):
        h2.barrier(spark.range(40), num_tasks=4).mapInPandas(body, "rank long").collect()


def test_gang_size_from_the_plan_or_the_stage(spark: Any) -> None:
    """No num_tasks: a trailing repartition(n) states the size; otherwise the ranks count the stage's tasks."""
    import pandas as pd

    from sparkhydrogen.launch.dataframe import planned_partitions

    assert planned_partitions(spark.range(100).repartition(3)) == 3
    assert planned_partitions(spark.range(100).repartition(3).select("id")) == 3
    assert planned_partitions(spark.range(0, 10, 1, 2)) == 2
    assert planned_partitions(spark.range(100).groupBy("id").count()) is None

    def sizes(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        ctx = h2.BarrierTaskContext.get()
        n = sum(len(b) for b in batches)
        yield pd.DataFrame({"rank": [ctx.rank()], "world": [ctx.worldSize()], "rows": [sum(ctx.allGather(n))]})

    rows = h2.barrier(spark.range(100).repartition(3)).mapInPandas(sizes, "rank long, world long, rows long")
    assert sorted(tuple(r) for r in rows.collect()) == [(0, 3, 100), (1, 3, 100), (2, 3, 100)]
    unstated = h2.barrier(spark.range(0, 60, 1, 2).filter("id % 2 = 0")).mapInPandas(
        sizes, "rank long, world long, rows long")
    assert sorted(tuple(r) for r in unstated.collect()) == [(0, 2, 30), (1, 2, 30)]
