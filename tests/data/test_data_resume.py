"""Cached epochs (in memory and spilled to disk) and loaders resumed after a gang retry, on real Spark.

One shared ``local[2]`` session (tests/data/conftest.py). A "failure" is ``os._exit`` in rank 1 on
attempt 0 mid-way through epoch 2; ``max_retries=1`` launches the whole gang again, and each rank
restores its last checkpoint (loader state, rows seen so far, model) to continue.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import sparkhydrogen as h2

pytestmark = [pytest.mark.spark, pytest.mark.timeout(240)]

# One session: tests/data/conftest.py's ``local[2]``.

ROWS = 20_000  # 10,000 per rank, 100 batches of 100 per epoch


def cached_epochs(rows: int, cache_memory: int | None) -> Callable[[], dict[str, Any]]:
    """Rank body: three shuffled cached epochs; how often each id came per epoch, the RSS growth, the spill file."""

    def body() -> dict[str, Any]:
        import os

        import numpy as np

        from sparkhydrogen.data import numpy_batches

        page = os.sysconf("SC_PAGE_SIZE")

        def rss() -> int:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * page

        counts = np.zeros((3, rows), np.uint8)
        counts[:] = 1  # touched now, so the tally's own pages are resident before the measurement starts
        counts[:] = 0
        batches = numpy_batches(4096, shuffle=True, shuffle_buffer=20_000, cache=True, equal_steps=False,
                                cache_memory=cache_memory)
        start = peak = rss()
        heads, share_bytes = [], 0
        for epoch in range(3):
            for i, batch in enumerate(batches):
                if not np.array_equal(batch["f3"], batch["id"] * 3.0):
                    raise AssertionError("a row's columns were separated")
                counts[epoch, batch["id"]] += 1
                if i == 0:
                    heads.append(batch["id"][:100].copy())
                share_bytes += sum(v.nbytes for v in batch.values()) if epoch == 0 else 0
                if i % 4 == 0:
                    peak = max(peak, rss())
        store = batches.store
        return {"counts": counts, "heads": heads, "growth": peak - start, "share_bytes": share_bytes,
                "spilled": store.spilled_chunks if store else -1, "path": store.path if store else None,
                "local_dirs": os.environ.get("SPARK_LOCAL_DIRS", "")}

    return body


# In memory first: the first task of a fresh Python worker keeps ~50 MB of the stream's transient buffers
# in its allocator whatever the loader does (measured: a plain pass without cache), which would hide
# what the spill saves; later tasks on the reused worker measure the cache's own footprint.
@pytest.mark.parametrize("spill", [False, True], ids=["in-memory", "spilled"])
def test_cached_epochs_give_every_row_exactly_once_and_the_spill_bounds_memory(spark: Any, spill: bool) -> None:
    rows = 600_000
    df = spark.range(rows, numPartitions=2).selectExpr("id", *[f"cast(id * {k} AS double) AS f{k}" for k in range(7)])
    out = h2.run(cached_epochs(rows, 2 << 20 if spill else None), 2, data=df)
    total = sum(rank["counts"].astype(np.int64) for rank in out)
    assert (total == 1).all()  # every row exactly once in each of the 3 epochs, on one rank
    for rank in out:
        assert [h.tolist() for h in rank["heads"]].count(rank["heads"][1].tolist()) == 1  # reshuffled per epoch
        share = rank["share_bytes"]  # 300,000 rows x 8 columns x 8 bytes: 18 MB
        print(f"spill={spill}: rank RSS growth {rank['growth'] / 2**20:.1f} MiB over 3 epochs of a share of "
              f"{share / 2**20:.1f} MiB, {rank['spilled']} Arrow batches spilled")
        if spill:
            assert rank["spilled"] > 0 and rank["path"] is not None
            assert rank["path"].startswith(tuple(rank["local_dirs"].split(","))), rank["path"]
            assert not os.path.exists(os.path.dirname(rank["path"]))  # removed when the rank ended
            assert rank["growth"] < share / 3, rank["growth"]
        else:
            assert rank["spilled"] == 0 and rank["growth"] > share * 0.7  # the measurement sees a cache


def resumable_epochs(kind: str, kill: bool, cache_memory: int | None,
                     given: list[dict[str, Any]] | None = None) -> Callable[[], dict[str, Any]]:
    """Rank body: three epochs of ids from a numpy or tf.data loader, checkpointed every 10 batches.

    ``given``: each rank's state to start from (instead of ``ctx.restore()``).
    """

    def body() -> dict[str, Any]:
        import os

        import sparkhydrogen as h2

        ctx = h2.BarrierTaskContext.get()
        calls = [0]
        gather = ctx.allGather

        def counted(message: Any = "", timeout: float | None = None) -> list[Any]:
            calls[0] += 1
            return gather(message, timeout)

        ctx.allGather = counted  # type: ignore[method-assign]  # counts the loader's agreements
        options: dict[str, Any] = {"columns": ["id"], "shuffle": True, "shuffle_buffer": 700, "cache": True,
                                   "seed": 11, "cache_memory": cache_memory}
        if kind == "tf":
            from sparkhydrogen.data.tensorflow_feed import dataset

            loader: Any = dataset(100, **options)

            def ids() -> Any:
                return (b["id"].numpy() for b in loader)
        else:
            from sparkhydrogen.data import numpy_batches

            loader = numpy_batches(100, **options)

            def ids() -> Any:
                return (b["id"] for b in loader)
        seen: list[list[int]] = [[], [], []]
        state = ctx.restore() if given is None else given[ctx.rank()]
        if state is not None:
            loader.load_state_dict(state["loader"])
            seen = state["seen"]
        agreements, middle = [], None
        for epoch in range(loader.state_dict()["epoch"], 3):
            before = calls[0]
            for batch in ids():
                seen[epoch].extend(batch.tolist())
                position = loader.state_dict()["position"]
                if position * 100 != len(seen[epoch]):  # tf.data too: the state counts what the loop received
                    raise AssertionError(f"state at batch {position}, the loop received {len(seen[epoch]) // 100}")
                if position % 10 == 0:
                    ctx.checkpoint({"loader": loader.state_dict(), "seen": seen})
                if epoch == 1 and position == 57:
                    middle = {"loader": loader.state_dict(), "seen": [list(e) for e in seen]}
                    if kill and ctx.gangAttempt() == 0 and ctx.rank() == 1:
                        os._exit(3)
            agreements.append(calls[0] - before)
        return {"seen": seen, "attempt": ctx.gangAttempt(), "agreements": agreements, "middle": middle,
                "local_dirs": os.environ.get("SPARK_LOCAL_DIRS", "")}

    return body


@pytest.fixture(scope="module")
def ids_df(spark: Any) -> Any:
    return spark.range(ROWS, numPartitions=2)


@pytest.fixture(scope="module")
def uninterrupted(ids_df: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = h2.run(resumable_epochs("numpy", False, None), 2, data=ids_df)
    return out


def check_resumed(out: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    for rank, ref in zip(out, reference, strict=True):
        assert rank["attempt"] == 1 and ref["attempt"] == 0
        assert rank["seen"] == ref["seen"]  # every epoch in the uninterrupted order, the failed one included
        assert rank["agreements"] == [0, 0]  # the resumed epoch and the next take the saved step count
    for epoch in range(3):
        ids = np.concatenate([rank["seen"][epoch] for rank in out])
        assert np.array_equal(np.sort(ids), np.arange(ROWS)), epoch  # exactly once across the failure


def test_uninterrupted_epochs_agree_a_few_times_in_the_first_epoch_and_never_after(
        uninterrupted: list[dict[str, Any]]) -> None:
    for rank in uninterrupted:
        assert [len(e) for e in rank["seen"]] == [ROWS // 2] * 3
        assert rank["agreements"] == [4, 0, 0]  # windows of 8, 16, 32, then the last 44: 100 steps, 4 collectives


def test_numpy_batches_killed_mid_epoch_resume_exactly_from_a_spilled_cache(
        ids_df: Any, uninterrupted: list[dict[str, Any]]) -> None:
    started = time.monotonic()
    out = h2.run(resumable_epochs("numpy", True, 0), 2, data=ids_df, max_retries=1, retry_backoff=0.1)
    print(f"numpy: killed and resumed run {time.monotonic() - started:.1f} s")
    check_resumed(out, uninterrupted)
    dirs = {d for rank in out for d in rank["local_dirs"].split(",") if d}
    assert dirs and not [name for d in dirs for name in os.listdir(d) if name.startswith("sparkhydrogen-spill-")]


def test_tf_dataset_given_a_mid_epoch_state_continues_exactly(ids_df: Any,
                                                               uninterrupted: list[dict[str, Any]]) -> None:
    """The state numpy_batches had at batch 57 of epoch 2, loaded into a fresh gang's tf.data dataset.

    The retry itself is the numpy and torch tests' (a TensorFlow import per new worker would
    double this test's time); what is TensorFlow's own is that the dataset's state counts the
    batches the loop received and that loading it continues the same order.
    """
    pytest.importorskip("tensorflow")
    states = [rank["middle"] for rank in uninterrupted]
    out = h2.run(resumable_epochs("tf", False, None, given=states), 2, data=ids_df)
    for rank, ref in zip(out, uninterrupted, strict=True):
        assert rank["seen"] == ref["seen"] and rank["agreements"] == [0, 0]
        assert len(ref["middle"]["seen"][1]) == 57 * 100


def torch_training(kill: bool) -> Callable[[], dict[str, Any]]:
    """Rank body: a linear model under DDP, three epochs, checkpointed (model, optimizer, loader) every 4 steps."""

    def train() -> dict[str, Any]:
        import os

        import torch
        from torch.nn.parallel import DistributedDataParallel

        import sparkhydrogen as h2
        from sparkhydrogen.data.torch_feed import data_loader

        ctx = h2.BarrierTaskContext.get()
        torch.manual_seed(0)
        net = torch.nn.Linear(2, 1)
        model = DistributedDataParallel(net)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loader = data_loader(64, columns=["id", "x", "y"], shuffle=True, shuffle_buffer=500, cache=True, seed=5)
        seen: list[list[int]] = [[], [], []]
        state = ctx.restore()
        if state is not None:
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            loader.load_state_dict(state["loader"])
            seen = state["seen"]
        for epoch in range(loader.state_dict()["epoch"], 3):
            for batch in loader:
                loss = torch.nn.functional.mse_loss(model(batch["x"]).squeeze(1), batch["y"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                seen[epoch].extend(batch["id"].tolist())
                position = loader.state_dict()["position"]
                if position % 4 == 0:  # 1,000 rows per rank: 16 steps per epoch
                    ctx.checkpoint({"model": net.state_dict(), "opt": opt.state_dict(),
                                    "loader": loader.state_dict(), "seen": seen})
                if kill and ctx.gangAttempt() == 0 and epoch == 1 and position == 10 and ctx.rank() == 1:
                    os._exit(3)
        return {"seen": seen, "params": [p.detach().numpy().copy() for p in net.parameters()],
                "attempt": ctx.gangAttempt()}

    return train


def test_torch_ddp_killed_mid_epoch_resumes_to_the_parameters_of_an_uninterrupted_run(spark: Any) -> None:
    pytest.importorskip("torch")
    import sparkhydrogen.torch as h2torch

    df = spark.range(2_000, numPartitions=2).selectExpr(
        "id", "array(cast(rand(1) AS float), cast(rand(2) AS float)) AS x").selectExpr(
        "id", "x", "cast(3 * x[0] - 2 * x[1] + 1 AS float) AS y")
    timings = []
    runs = []
    for kill in (False, True):
        started = time.monotonic()
        runs.append(h2torch.run(torch_training(kill), num_processes=2, data=df, return_all=True, stream_logs=False,
                                max_retries=1, retry_backoff=0.1))
        timings.append(time.monotonic() - started)
    print(f"torch: uninterrupted {timings[0]:.1f} s, killed and resumed {timings[1]:.1f} s")
    whole, resumed = runs
    for ref, rank in zip(whole, resumed, strict=True):
        assert (ref["attempt"], rank["attempt"]) == (0, 1)
        assert rank["seen"] == ref["seen"]
        for a, b in zip(ref["params"], rank["params"], strict=True):
            assert np.array_equal(a, b), (a, b)
    ids = np.concatenate([rank["seen"][1] for rank in resumed])
    assert np.array_equal(np.sort(ids), np.arange(2_000))


def globally_shuffled_epochs() -> Callable[[], dict[str, Any]]:
    """Rank body: two epochs of ids with ``global_shuffle=True`` (the second one exchanged between the ranks)."""

    def body() -> dict[str, Any]:
        from sparkhydrogen.data import numpy_batches

        loader = numpy_batches(100, columns=["id"], cache=True, global_shuffle=True, seed=3)
        seen = [[int(i) for batch in loader for i in batch["id"]] for _ in range(2)]
        return {"seen": seen, "state": loader.state_dict()}

    return body


def test_global_shuffle_moves_rows_between_ranks_and_keeps_every_row_once_per_epoch(ids_df: Any) -> None:
    out = h2.run(globally_shuffled_epochs(), 2, data=ids_df)
    for epoch in range(2):
        ids = np.concatenate([rank["seen"][epoch] for rank in out])
        assert np.array_equal(np.sort(ids), np.arange(ROWS)), epoch  # exactly once across the ranks
    for rank in out:
        first, second = set(rank["seen"][0]), set(rank["seen"][1])
        assert len(first) == ROWS // 2 and second - first and second & first  # rows came from the other rank
        assert len(rank["seen"][1]) == len(out[0]["seen"][1])  # equal_steps: the same number of batches
        assert rank["state"]["epoch"] == 2 and rank["state"]["global_shuffle"]
