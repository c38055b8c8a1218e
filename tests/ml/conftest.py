"""A local[2] session per module of tests/ml (test_ml_spark.py holds every local[2] test), and the synthetic data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from mldata import synthetic
from sparkutil import spark_session


@pytest.fixture(scope="module")
def ml_spark() -> Iterator[Any]:
    """(Not named ``spark``: tests/conftest.py parametrizes every fixture of that name from a ``conftest``.)"""
    with spark_session("local[2]") as session:
        yield session


@pytest.fixture(scope="module")
def df(ml_spark: Any) -> Any:
    """The synthetic data in 2 partitions of contiguous rows (rank r of a 2-rank gang reads partition r)."""
    frame = ml_spark.createDataFrame(synthetic())
    assert frame.rdd.getNumPartitions() == 2
    return frame.cache()
