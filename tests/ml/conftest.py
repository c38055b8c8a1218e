"""One local[2] session for every module of tests/ml (package scope), and the shared synthetic data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from sparkutil import spark_session

ROWS = 256
COLS = ["a", "b", "c", "d"]


def synthetic(seed: int = 7) -> Any:
    """256 rows, 4 raw features on different scales, a separable 2-class ``label`` and a linear ``target``."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    scale, shift = np.array([1.0, 3.0, 0.5, 2.0]), np.array([5.0, -2.0, 0.0, 1.0])
    x = rng.normal(size=(ROWS, 4)) * scale + shift
    logit = (x - shift) / scale @ np.array([1.5, -2.0, 1.0, 0.0])
    frame = pd.DataFrame(x, columns=COLS)
    frame["label"] = (logit > 0).astype("float64")
    frame["target"] = logit + rng.normal(scale=0.1, size=ROWS)
    return frame


@pytest.fixture(scope="package")
def ml_spark() -> Iterator[Any]:
    """(Not named ``spark``: tests/conftest.py parametrizes every fixture of that name from a ``conftest``.)"""
    with spark_session("local[2]") as session:
        yield session


@pytest.fixture(scope="package")
def df(ml_spark: Any) -> Any:
    """The synthetic data in 2 partitions of contiguous rows (rank r of a 2-rank gang reads partition r)."""
    frame = ml_spark.createDataFrame(synthetic())
    assert frame.rdd.getNumPartitions() == 2
    return frame.cache()
