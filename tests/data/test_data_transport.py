"""How a DataFrame's share reaches a rank on real Spark: Arrow messages in the gangs' own Python workers.

One shared ``local[2]`` session (``conftest.py``); functions shipped to the ranks are defined inside the tests.
"""

from __future__ import annotations

import datetime
from typing import Any

import numpy as np
import pytest

import sparkhydrogen as h2

pytestmark = [pytest.mark.spark, pytest.mark.timeout(180)]

# classic Spark only (tests/data/conftest.py's local[2]): Spark Connect keeps mapInArrow (its gangs are barrier
# DataFrame stages)


def test_a_data_gang_runs_in_the_python_workers_of_the_gangs_before_it(spark: Any) -> None:
    df = spark.range(5_000, numPartitions=2).selectExpr("id", "cast(id AS float) AS x")

    def worker() -> tuple[int, int]:
        import os

        return os.getpid(), os.getppid()  # a rank's unread share is drained after it returns

    before = set(h2.run(worker, 2))
    fed = set(h2.run(worker, 2, data=df))
    # the same daemon (parent) serves both: no second set of workers is started for data=
    assert {parent for _, parent in fed} == {parent for _, parent in before}


def test_every_column_type_arrives_with_its_values_and_arrow_types(spark: Any) -> None:
    df = spark.range(3_000, numPartitions=3).selectExpr(
        "id", "cast(id AS int) AS i", "cast(id % 100 AS smallint) AS s", "cast(id % 100 AS tinyint) AS t",
        "cast(id AS double) / 4 AS d", "cast(id AS float) AS f", "id % 3 = 0 AS b", "cast(id AS string) AS str",
        "cast(cast(id AS string) AS binary) AS bin", "date_add(date'2020-01-01', cast(id % 50 AS int)) AS day",
        "array(cast(id AS float), cast(-id AS float)) AS v", "named_struct('a', id, 'b', cast(id AS string)) AS st",
        "timestamp_seconds(id) AS ts")  # a timestamp: the mapInArrow path, in the same table
    def rank_rows() -> Any:
        import pyarrow as pa

        import sparkhydrogen as h2

        batches = list(h2.BarrierTaskContext.get().batches())
        return pa.Table.from_batches(batches).to_pylist() if batches else [], [str(t) for t in batches[0].schema.types]

    shares = h2.run(rank_rows, 2, data=df)
    rows = sorted((row for share, _ in shares for row in share), key=lambda r: r["id"])
    expected = sorted((r.asDict(recursive=True) for r in df.collect()), key=lambda r: r["id"])
    assert len(rows) == 3_000
    for got, want in zip(rows, expected, strict=True):
        for name in ("id", "i", "s", "t", "d", "f", "b", "str", "bin", "day", "v"):
            assert got[name] == want[name], name
        assert got["st"] == want["st"]
        assert got["ts"].timestamp() == got["id"]  # timestamp_seconds(id), whatever the zone it is shown in
    assert isinstance(rows[1]["day"], datetime.date)
    assert shares[0][1] == shares[1][1]


def test_messages_carry_the_arrow_types_mapinarrow_gives(spark: Any) -> None:
    df = spark.range(100, numPartitions=2).selectExpr(
        "id", "cast(id AS int) AS i", "cast(id AS float) AS f", "id % 2 = 0 AS b", "cast(id AS string) AS s",
        "date'2020-01-01' AS day", "array(cast(id AS double)) AS v")

    def through_map_in_arrow(batches: Any) -> Any:
        import pyarrow as pa

        batches = list(batches)
        yield pa.RecordBatch.from_pydict({"types": [",".join(str(t) for t in batches[0].schema.types)]})

    def fixed_types() -> list[str]:
        import pyarrow as pa

        import sparkhydrogen as h2

        return [str(t) for t in pa.Table.from_batches(list(h2.BarrierTaskContext.get().batches())).schema.types]

    native = {row["types"] for row in df.mapInArrow(through_map_in_arrow, "types string").collect()}
    ours = {",".join(types) for types in h2.run(fixed_types, 2, data=df)}
    assert ours == native and len(ours) == 1


def test_the_torch_loader_over_a_real_share_keeps_dtypes_shapes_and_exactly_once(spark: Any) -> None:
    pytest.importorskip("torch")
    df = spark.range(25_000, numPartitions=3).selectExpr(
        "id", "cast(id AS float) AS x", "array(cast(id AS float), cast(2 * id AS float)) AS v",
        "cast(id % 7 AS int) AS k")

    def epochs() -> Any:
        import numpy as np
        import torch

        from sparkhydrogen.data.torch_feed import data_loader

        loader = data_loader(1000, cache=True, equal_steps=False)
        seen, kinds = [], set()
        for _ in range(2):
            ids = []
            for batch in loader:
                kinds.add(tuple((name, str(t.dtype), tuple(t.shape[1:])) for name, t in batch.items()))
                assert torch.equal(batch["v"][:, 1], 2 * batch["x"]) and torch.equal(batch["x"], batch["id"].float())
                ids.append(batch["id"].numpy().copy())
            seen.append(np.concatenate(ids))
        return seen, kinds

    shares = h2.run(epochs, 2, data=df)
    for epoch in range(2):
        assert np.array_equal(np.sort(np.concatenate([s[0][epoch] for s in shares])), np.arange(25_000))
    kinds = set().union(*(s[1] for s in shares))
    assert kinds == {(("id", "torch.int64", ()), ("x", "torch.float32", ()), ("v", "torch.float32", (2,)),
                      ("k", "torch.int32", ()))}
