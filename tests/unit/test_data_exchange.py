"""The global shuffle: the pure assignment, and the all-to-all exchange over real loopback sockets.

Ranks are threads; their ``allGather`` meets at a barrier (the coordinator's part), while the
rows go rank to rank over TCP as in a gang.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from test_data_batching import record_batches

from sparkhydrogen.data import Batches, FeedOptions
from sparkhydrogen.data._assign import destinations, epoch_steps
from sparkhydrogen.data._exchange import gang_exchange
from sparkhydrogen.data._store import ShareStore
from sparkhydrogen.errors import LaunchError

pytestmark = pytest.mark.timeout(60)

SHARES = [[97, 150, 31], [200, 122], [60, 60, 60, 45]]  # uneven shares: 278, 322 and 225 rows


class Gather:
    """``allGather`` for ranks in threads."""

    def __init__(self, size: int) -> None:
        self.slots: list[Any] = [None] * size
        self.meet = threading.Barrier(size, timeout=20)

    def for_rank(self, rank: int) -> Callable[[Any], list[Any]]:
        def all_gather(message: Any) -> list[Any]:
            self.slots[rank] = message
            self.meet.wait()
            out = list(self.slots)
            self.meet.wait()
            return out

        return all_gather


def in_threads(size: int, body: Callable[[int], Any]) -> list[Any]:
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = body(rank)
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    if errors:
        raise errors[0]
    return results


def shares(sizes: Sequence[Sequence[int]]) -> list[list[pa.RecordBatch]]:
    out, start = [], 0
    for share in sizes:
        out.append(record_batches(start, list(share)))
        start += sum(share)
    return out


def gang_epochs(sizes: Sequence[Sequence[int]], epochs: int, *, budget: int = 1 << 30, equal: bool = False,
                seed: int = 5, resume_at: tuple[int, int] | None = None) -> list[list[list[int]]]:
    """Each rank's ids per epoch with global_shuffle; ``resume_at=(epoch, batch)``: a new gang resumes there."""
    data = shares(sizes)
    world = len(sizes)
    opts = FeedOptions(batch_size=16, shuffle_buffer=64, cache=True, equal_steps=equal, seed=seed,
                       global_shuffle=True, cache_memory=budget)
    gather = Gather(world)

    def make(rank: int) -> Batches:
        exchange = gang_exchange(gather.for_rank(rank), rank=rank, world_size=world, seed=seed, host="127.0.0.1",
                                 memory_budget=budget, timeout=20)
        agree = None
        if equal:
            def agree(ready: int, ended: bool) -> tuple[int, bool]:
                from sparkhydrogen.data._batching import agreed
                return agreed(gather.for_rank(rank)((ready, ended)))
        return Batches(lambda: iter(data[rank]), opts, rank=rank, world_size=world, exchange=exchange,
                       agree=agree)

    def body(rank: int) -> list[list[int]]:
        loader = make(rank)
        seen: list[list[int]] = []
        state = None
        for epoch in range(epochs):
            ids: list[int] = []
            for n, batch in enumerate(loader):
                assert np.array_equal(batch["x"], batch["id"] / 2.0)  # a row's columns travel together
                assert np.array_equal(batch["v"], np.repeat(batch["id"], 3).reshape(-1, 3).astype(np.float32))
                ids.extend(int(i) for i in batch["id"])
                if resume_at == (epoch, n + 1):
                    state = loader.state_dict()
                    break
            seen.append(ids)
            if state is not None:
                break
        loader.close()
        if state is None:
            return seen
        again = make(rank)
        again.load_state_dict(state)
        seen[-1].extend(int(i) for b in again for i in b["id"])
        for _ in range(len(seen), epochs):
            seen.append([int(i) for b in again for i in b["id"]])
        again.close()
        return seen

    return in_threads(world, body)


# the pure assignment ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3, 5])
def test_the_assignment_sends_each_row_to_one_rank_balanced_and_deterministic(world: int) -> None:
    rows = [0, 1, 17, 1000, 333][:world]
    for epoch in (1, 2):
        dests = [destinations(n, world, 7, epoch, rank) for rank, n in enumerate(rows)]
        for n, d in zip(rows, dests, strict=True):
            assert d.shape == (n,) and ((0 <= d) & (d < world)).all()  # each row: exactly one rank
            per = np.bincount(d, minlength=world)
            assert per.max() - per.min() <= 1  # each source splits its share evenly
        held = sum(np.bincount(d, minlength=world) for d in dests)
        assert held.max() - held.min() <= world  # so the new shares are balanced within world_size rows
        again = [destinations(n, world, 7, epoch, rank) for rank, n in enumerate(rows)]
        assert all(np.array_equal(a, b) for a, b in zip(dests, again, strict=True))
    assert not np.array_equal(destinations(1000, 3, 7, 1, 0), destinations(1000, 3, 7, 2, 0))  # new each epoch
    assert not np.array_equal(destinations(1000, 3, 7, 1, 0), destinations(1000, 3, 8, 1, 0))  # and per seed


def test_epoch_steps_take_the_rank_with_the_fewest_rows() -> None:
    assert epoch_steps([[10, 6], [5, 20]], 4, False) == ([15, 26], 4)
    assert epoch_steps([[10, 6], [5, 20]], 4, True) == ([15, 26], 3)


def test_global_shuffle_needs_the_cache_and_implies_the_local_shuffle() -> None:
    with pytest.raises(ValueError, match="cache=True"):
        FeedOptions(batch_size=4, global_shuffle=True)
    assert FeedOptions(batch_size=4, global_shuffle=True, cache=True).shuffle


# the exchange over loopback sockets ------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["in-memory", "spilled"])
def test_every_row_once_per_epoch_across_ranks_and_rows_cross_ranks(budget: int) -> None:
    total = sum(map(sum, SHARES))
    seen = gang_epochs(SHARES, 3, budget=budget)
    owners = [set(range(s, s + sum(sh))) for s, sh in zip([0, 278, 600], SHARES, strict=True)]
    for epoch in range(3):
        ids = np.concatenate([np.array(rank[epoch], dtype=np.int64) for rank in seen])
        assert np.array_equal(np.sort(ids), np.arange(total)), epoch  # every row exactly once
    for rank, own in enumerate(owners):
        assert set(seen[rank][0]) == own  # epoch 0: the rank's own share, as Spark gave it
        for epoch in (1, 2):
            got = set(seen[rank][epoch])
            assert got - own and len(got & own) > 0  # rows from other ranks, and some of its own stay
            assert abs(len(got) - total / 3) <= 3  # balanced within world_size rows
    assert set(seen[0][1]) != set(seen[0][2])  # a new assignment each epoch
    assert seen == gang_epochs(SHARES, 3, budget=budget)  # deterministic given (seed, epoch)


def test_equal_steps_with_global_shuffle_gives_every_rank_the_same_batches_per_epoch() -> None:
    seen = gang_epochs(SHARES, 3, equal=True)
    for epoch in range(3):
        steps = {-(-len(rank[epoch]) // 16) for rank in seen}
        assert len(steps) == 1, epoch
        ids = np.concatenate([np.array(rank[epoch]) for rank in seen])
        assert len(np.unique(ids)) == len(ids)  # no row twice


@pytest.mark.parametrize("resume_at", [(1, 3), (2, 9)])
def test_a_resumed_gang_continues_the_global_shuffle_in_the_same_order(resume_at: tuple[int, int]) -> None:
    assert gang_epochs(SHARES, 3, resume_at=resume_at) == gang_epochs(SHARES, 3)


@pytest.mark.parametrize(("rows", "match"), [(0, r"waiting for rows from rank\(s\) 1"),
                                             (10, "rank 0 cannot connect to rank 1 at 127.0.0.1:9")])
def test_a_peer_that_never_sends_or_listens_is_named_and_a_bad_greeting_is_refused(
        caplog: Any, rows: int, match: str) -> None:
    store = ShareStore(1 << 20)
    for batch in record_batches(0, [rows]):
        store.append(batch, {"id": batch.column(0).to_numpy()})
    store.finish()

    def all_gather(message: Any) -> list[Any]:
        host, port = message[0], message[1]
        with socket.create_connection((host, port)) as intruder:  # a connection without the token
            intruder.sendall(b"H2X1" + bytes(16 + 32))
        return [message, ("127.0.0.1", 9, "00" * 32, 1, (7, 0))]  # "rank 1" announces 7 rows, never sends them

    exchange = gang_exchange(all_gather, rank=0, world_size=2, seed=0, host="127.0.0.1", memory_budget=1 << 20,
                             timeout=1.5)
    with pytest.raises(LaunchError, match=match):
        exchange(1, store)
    if rows == 0:
        assert "bad greeting" in caplog.text
    store.close()


def test_ranks_in_different_epochs_are_told_so() -> None:
    store = ShareStore(1 << 20)
    store.finish()
    exchange = gang_exchange(lambda m: [m, ("127.0.0.1", 9, "00" * 32, 2, (0, 0))], rank=0, world_size=2, seed=0,
                             host="127.0.0.1", memory_budget=1 << 20, timeout=1)
    with pytest.raises(LaunchError, match="rank 1 exchanges rows for epoch 2, rank 0 for epoch 1"):
        exchange(1, store)


def test_the_loaders_take_global_shuffle() -> None:
    from sparkhydrogen.data import numpy_batches
    from sparkhydrogen.data.jax_feed import batches

    for loader in (batches, numpy_batches):  # torch's and tf's pass it on the same way (not imported here)
        with pytest.raises(ValueError, match="pass cache=True too"):
            loader(8, global_shuffle=True)  # checked before the rank's stream is touched
