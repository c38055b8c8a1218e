"""Correct with Python worker reuse off (and on, in the other modules): no state leaks between tasks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2

pytestmark = [pytest.mark.spark, pytest.mark.timeout(180)]


@pytest.fixture(scope="module", params=["false", "true"])
def sc(request: Any) -> Iterator[Any]:
    with spark_session("local[2]", **{"spark.python.worker.reuse": request.param}) as spark:
        yield spark.sparkContext


def test_consecutive_gangs_and_plain_jobs(sc: Any) -> None:
    def fn(round_no: int) -> tuple[int, list[int]]:
        ctx = h2.BarrierTaskContext.get()
        return round_no, ctx.allGather(ctx.rank() + round_no)

    def context_or_none(_: Any) -> Any:
        try:
            return repr(h2.BarrierTaskContext.get())
        except h2.NotInGangError:
            return None

    for round_no in range(3):
        assert h2.run(fn, 2, args=(round_no,)) == [(round_no, [round_no, round_no + 1])] * 2
        # an ordinary task in a (possibly reused) worker sees no leftover gang context
        leaked = sc.parallelize([0], 1).map(context_or_none).collect()
        assert leaked == [None]


def test_failed_gang_then_healthy_gang(sc: Any) -> None:
    def bad() -> None:
        if h2.BarrierTaskContext.get().rank() == 0:
            raise KeyError("missing column")
        h2.BarrierTaskContext.get().barrier()

    with pytest.raises(h2.GangFailedError, match="rank 0 raised KeyError"):
        h2.run(bad, 2)
    assert h2.run(lambda: h2.BarrierTaskContext.get().allGather("ok"), 2) == [["ok", "ok"]] * 2

