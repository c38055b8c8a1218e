"""Transparent mode names the failing rank in the error Spark reports, on every Python the package supports.

On Python 3.11+ the name rides on the exception as a note (``add_note``); Python 3.10 has no notes in
its tracebacks, so there the exception's own text carries it. Real local[2] Spark, plain pyspark code.
A gang of one rank: the error Spark reports is that rank's own, so its attribution must be in it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pyspark import BarrierTaskContext
from sparkutil import spark_session

from sparkhydrogen import transparent

pytestmark = [pytest.mark.spark, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local[2]") as spark:
        transparent.install()
        try:
            yield spark.sparkContext
        finally:
            transparent.uninstall()


def test_a_builtin_exception_names_its_rank(sc: Any) -> None:
    def f(it: Any) -> Iterator[int]:
        BarrierTaskContext.get().barrier()
        raise ValueError("bad shard")
        yield 0

    with pytest.raises(Exception, match=r"ValueError: bad shard\s+spark-hydrogen: raised by rank 0 of 1 "
                                        r"\(gang attempt 0\): ValueError: bad shard"):
        sc.parallelize(range(1), 1).barrier().mapPartitions(f).collect()


def test_a_library_exception_names_its_rank_and_keeps_its_type(sc: Any) -> None:
    def f(it: Any) -> Iterator[int]:
        class TrainingError(Exception):
            """A library's own exception class."""

        BarrierTaskContext.get().barrier()
        raise TrainingError("loss is NaN")
        yield 0

    with pytest.raises(Exception, match=r"TrainingError: loss is NaN\s+spark-hydrogen: raised by rank 0 of 1 "
                                        r"\(gang attempt 0\): TrainingError: loss is NaN") as caught:
        sc.parallelize(range(1), 1).barrier().mapPartitions(f).collect()
    assert "__noted" not in str(caught.value)  # the type is shown by its own name
