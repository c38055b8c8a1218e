"""One classic ``local[2]`` session shared by every test of the data feed (two ranks, two cores)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sparkutil import spark_session


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    with spark_session("local[2]", **{"spark.sql.execution.arrow.maxRecordsPerBatch": "10000"}) as session:
        yield session
