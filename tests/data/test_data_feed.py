"""The data feed on real Spark: ``run(fn, 2, data=df)`` into the loaders (numpy, torch DDP, tf.data, JAX).

One shared ``local[2]`` session; functions shipped to the ranks are defined inside the tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import sparkhydrogen as h2

pytestmark = [pytest.mark.spark, pytest.mark.timeout(180)]


def test_every_row_reaches_exactly_one_rank(spark: Any) -> None:
    df = spark.range(300_000, numPartitions=5)

    def collect_ids() -> Any:
        import numpy as np

        import sparkhydrogen.data as h2data

        ids = [b["id"] for b in h2data.numpy_batches(4096, columns=["id"], equal_steps=False)]
        return np.concatenate(ids)

    shares = h2.run(collect_ids, 2, data=df)
    assert len(shares[0]) != len(shares[1])  # 5 partitions in 2 shares: uneven
    assert np.array_equal(np.sort(np.concatenate(shares)), np.arange(300_000))


def test_torch_ddp_over_uneven_shares_finishes_in_equal_steps_and_learns(spark: Any) -> None:
    pytest.importorskip("torch")
    import sparkhydrogen.torch as h2torch

    df = spark.range(20_000, numPartitions=5).selectExpr(
        "array(cast(rand(1) AS float), cast(rand(2) AS float)) AS x").selectExpr(
        "x", "cast(3 * x[0] - 2 * x[1] + 1 AS float) AS y")

    def train() -> dict[str, Any]:
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from sparkhydrogen.data.torch_feed import data_loader

        torch.manual_seed(0)
        model = DistributedDataParallel(torch.nn.Linear(2, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loader = data_loader(128, columns=["x", "y"], shuffle=True, shuffle_buffer=2_000, cache=True)
        losses, steps = [], []
        for _ in range(3):
            count = 0
            for batch in loader:
                loss = torch.nn.functional.mse_loss(model(batch["x"]).squeeze(1), batch["y"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                count += 1
            steps.append(count)
        return {"first": sum(losses[:5]) / 5, "last": sum(losses[-5:]) / 5, "steps": steps,
                "rank": dist.get_rank()}

    out = h2torch.run(train, num_processes=2, data=df, return_all=True, stream_logs=False)
    assert out[0]["steps"] == out[1]["steps"] and len(set(out[0]["steps"])) == 1
    assert out[0]["steps"][0] <= 8_000 // 128 + 1  # the smaller share (2 of 5 partitions) sets the pace
    assert out[0]["last"] < out[0]["first"] / 20, out


def test_memory_stays_bounded_while_streaming_far_more_than_a_batch(spark: Any) -> None:
    df = spark.range(4_000_000, numPartitions=2).selectExpr(
        "cast(id AS double) AS a", "cast(id * 2 AS double) AS b", "cast(id % 7 AS double) AS c",
        "cast(id % 11 AS double) AS d")

    def stream() -> dict[str, int]:
        import os

        import sparkhydrogen.data as h2data

        page = os.sysconf("SC_PAGE_SIZE")

        def rss() -> int:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * page

        start = peak = 0
        streamed = 0
        for i, batch in enumerate(h2data.numpy_batches(4096, shuffle=True, shuffle_buffer=20_000)):
            streamed += sum(v.nbytes for v in batch.values())
            if i == 0:  # from the first batch on: the imports (pyarrow, ~40 MB in a fresh worker) are done
                start = peak = rss()
            elif i % 16 == 0:
                peak = max(peak, rss())
        return {"growth": peak - start, "streamed": streamed}

    out = h2.run(stream, 2, data=df)
    for rank in out:
        assert rank["streamed"] == 2_000_000 * 4 * 8
        assert rank["growth"] < rank["streamed"] / 4, out


def test_tensorflow_dataset_is_consumed_in_a_rank(spark: Any) -> None:
    pytest.importorskip("tensorflow")
    df = spark.range(5_000, numPartitions=3).selectExpr("id", "array(cast(id AS float), 1.0f) AS v")

    def consume() -> dict[str, Any]:
        from sparkhydrogen.data.tensorflow_feed import dataset

        ds = dataset(256, columns=["v", "id"], drop_last=True)
        spec = {k: (str(s.dtype.name), s.shape.as_list()) for k, s in ds.element_spec.items()}
        batches = list(ds.as_numpy_iterator())
        return {"spec": spec, "steps": len(batches), "first": batches[0]["v"][0].tolist()}

    out = h2.run(consume, 2, data=df)
    assert out[0]["spec"] == {"v": ("float32", [256, 2]), "id": ("int64", [256])}
    assert out[0]["steps"] == out[1]["steps"] > 0


def test_jax_batches_are_consumed_in_a_rank(spark: Any) -> None:
    pytest.importorskip("jax")
    df = spark.range(10_000, numPartitions=2).selectExpr("cast(id AS float) AS x")

    def consume() -> float:
        import jax.numpy as jnp

        from sparkhydrogen.data.jax_feed import batches

        return float(sum(float(jnp.sum(jnp.asarray(b["x"]))) for b in batches(1000, drop_last=True)))

    assert sum(h2.run(consume, 2, data=df)) == float(sum(range(10_000)))


def test_cached_torch_epochs_replay_converted_batches_exactly_once_and_survive_in_place_changes(spark: Any) -> None:
    pytest.importorskip("torch")
    df = spark.range(30_000, numPartitions=3).selectExpr("id", "cast(id AS double) / 2 AS x")

    def train() -> dict[str, Any]:
        import logging

        from sparkhydrogen.data.torch_feed import data_loader

        warnings: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                warnings.append(record.getMessage())

        logging.getLogger("sparkhydrogen.data").addHandler(Keep(logging.WARNING))
        loader = data_loader(1000, cache=True)
        epochs, intact, reused = [], [], []
        for epoch in range(4):
            ids, ptrs, ok = [], [], True
            for batch in loader:
                ids.extend(batch["id"].tolist())
                ok = ok and batch["x"].tolist() == [i / 2 for i in batch["id"].tolist()]
                ptrs.append(batch["x"].data_ptr())
                if epoch == 2:
                    batch["x"].add_(7.0)  # changes a tensor handed out again next epoch
            epochs.append(ids)
            intact.append(ok)
            reused.append(ptrs)
        return {"epochs": epochs, "intact": intact, "same_tensors": reused[1] == reused[2],
                "fresh_after_change": reused[3] != reused[2], "warnings": warnings}

    out = h2.run(train, 2, data=df)
    for epoch in range(4):
        ids = sorted(out[0]["epochs"][epoch] + out[1]["epochs"][epoch])
        assert len(ids) == len(set(ids))  # exactly once
        assert len(out[0]["epochs"][epoch]) == len(out[1]["epochs"][epoch])  # equal steps
        assert all(rank["epochs"][epoch] == rank["epochs"][0] for rank in out)  # unshuffled: the same order
    for rank in out:
        assert rank["intact"] == [True] * 4 and rank["same_tensors"] and rank["fresh_after_change"]
        assert len(rank["warnings"]) == 1 and "changed in place" in rank["warnings"][0]


def test_cached_tensorflow_and_numpy_epochs_replay_the_same_rows(spark: Any) -> None:
    pytest.importorskip("tensorflow")
    df = spark.range(6_000, numPartitions=2).selectExpr("id", "array(cast(id AS float), 1.0f) AS v")

    def consume() -> dict[str, Any]:
        from sparkhydrogen.data.tensorflow_feed import dataset

        ds = dataset(500, columns=["id", "v"], cache=True)
        epochs = [[b["id"].tolist() for b in ds.as_numpy_iterator()] for _ in range(3)]
        values = all(b["v"][:, 0].tolist() == b["id"].tolist() for b in ds.as_numpy_iterator())
        return {"epochs": epochs, "values": values}

    out = h2.run(consume, 2, data=df)
    for rank in out:
        assert rank["epochs"][0] == rank["epochs"][1] == rank["epochs"][2] and rank["values"]
    assert sorted(i for rank in out for b in rank["epochs"][2] for i in b) == list(range(6_000))
