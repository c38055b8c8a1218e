"""``run(fn, n, data=...)``: every row reaches exactly one rank, on classic and Spark Connect sessions."""

from __future__ import annotations

from typing import Any

import pytest

import sparkhydrogen as h2

pytestmark = pytest.mark.timeout(300)


def _connect(spark: Any) -> bool:
    return type(spark).__module__.startswith("pyspark.sql.connect")


def _ids() -> Any:
    def fn() -> list[int]:
        import sparkhydrogen as h2

        ctx = h2.BarrierTaskContext.get()
        return [i for batch in ctx.batches() for i in batch.column("id").to_pylist()]

    return fn


def test_every_row_reaches_exactly_one_rank(spark: Any) -> None:
    shares = h2.run(_ids(), 2, data=spark.range(0, 20_000, 1, 5))
    rows = [i for share in shares for i in share]
    assert sorted(rows) == list(range(20_000))
    if _connect(spark):  # a round-robin repartition: balanced to a few rows
        assert abs(len(shares[0]) - len(shares[1])) <= 10
    else:  # whole partitions (4,000 rows each) per rank, balanced within one partition
        assert sorted(len(s) for s in shares) == [8_000, 12_000]


def test_fewer_partitions_than_ranks_are_spread(spark: Any) -> None:
    shares = h2.run(_ids(), 2, data=spark.range(0, 300, 1, 1))
    assert sorted(i for s in shares for i in s) == list(range(300))
    assert all(len(s) > 0 for s in shares)


def test_rows_are_dicts_and_a_share_is_read_once(spark: Any) -> None:
    def fn() -> tuple[int, str]:
        import sparkhydrogen as h2

        ctx = h2.BarrierTaskContext.get()
        first = [row["id"] for row in ctx.rows()]
        try:
            ctx.batches()
        except h2.LaunchError as exc:
            return len(first), str(exc)
        return len(first), ""

    out = h2.run(fn, 2, data=spark.range(0, 100, 1, 2))
    assert sum(n for n, _ in out) == 100
    assert all("already read by rows()" in text for _, text in out)


def test_a_rank_may_leave_its_share_unread(spark: Any) -> None:
    def fn() -> int:
        import sparkhydrogen as h2

        ctx = h2.BarrierTaskContext.get()
        return int(next(ctx.batches()).num_rows > 0)

    assert h2.run(fn, 2, data=spark.range(0, 200_000, 1, 2)) == [1, 1]


def test_without_data_the_context_says_so(spark: Any) -> None:
    def fn() -> None:
        import sparkhydrogen as h2

        next(h2.BarrierTaskContext.get().batches())

    with pytest.raises(h2.GangFailedError, match=r"this gang was launched without data=; pass data="):
        h2.run(fn, 2)


def test_a_retried_gang_reads_its_shares_again(spark: Any) -> None:
    def fn() -> int:
        import sparkhydrogen as h2

        ctx = h2.BarrierTaskContext.get()
        n = sum(b.num_rows for b in ctx.batches())
        if ctx.gangAttempt() == 0 and ctx.rank() == 1:
            raise RuntimeError("first attempt fails after reading")
        return n

    assert sum(h2.run(fn, 2, data=spark.range(0, 1_000, 1, 4), max_retries=1, retry_backoff=0)) == 1_000


def test_bad_data_is_refused_before_launching(spark: Any) -> None:
    with pytest.raises(TypeError, match=r"data= must be a pyspark DataFrame or RDD, got builtins.list"):
        h2.run(_ids(), 2, data=[1, 2, 3])


def test_an_rdd_share_is_its_elements(spark: Any) -> None:
    if _connect(spark):
        pytest.skip("Spark Connect has no RDD API (a DataFrame is tested above)")

    def fn() -> tuple[list[int], int]:
        import sparkhydrogen as h2

        ctx = h2.BarrierTaskContext.get()
        return [x for x, _ in ctx.rows()], 0

    def batched() -> list[int]:
        import sparkhydrogen as h2

        ctx = h2.BarrierTaskContext.get()
        return [x for b in ctx.batches() for x in b.column("_1").to_pylist()]

    rdd = spark.sparkContext.parallelize([(i, str(i)) for i in range(1_000)], 3)
    assert sorted(x for share, _ in h2.run(fn, 2, data=rdd) for x in share) == list(range(1_000))
    assert sorted(x for share in h2.run(batched, 2, data=rdd) for x in share) == list(range(1_000))


def test_resources_on_a_local_master_say_where_they_work(spark: Any) -> None:
    if spark.conf.get("spark.master", "").startswith("local-cluster"):
        pytest.skip("local-cluster supports stage-level resources (tests/cluster/test_stage_resources.py)")
    with pytest.raises(h2.LaunchError, match=r"stage-level resources \(resources=\) need a standalone, YARN or "
                                             r"Kubernetes cluster; master local\[\d\]"):
        h2.run(_ids(), 2, resources={"gpu": 1})
