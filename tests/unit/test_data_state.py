"""Resumable loaders, the spill store and windowed equal steps, without Spark (pure feed logic).

A "retry" here is a new :class:`Batches` over the same record batches, given the old one's
``state_dict()``; two ranks are two threads whose ``agree`` meets at a barrier.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from test_data_batching import Gang, record_batches

from sparkhydrogen.config import HydrogenConfig
from sparkhydrogen.data import Batches, FeedOptions
from sparkhydrogen.data._batching import equal_steps
from sparkhydrogen.data._state import LoaderState
from sparkhydrogen.data._store import PREFIX, ShareStore, spill_root, sweep
from sparkhydrogen.errors import LaunchError

pytestmark = pytest.mark.timeout(60)

SIZES = [97, 150, 31, 200, 122]  # 600 rows in uneven Arrow batches


def options(**extra: Any) -> FeedOptions:
    base: dict[str, Any] = {"batch_size": 16, "shuffle": True, "shuffle_buffer": 64, "cache": True,
                            "equal_steps": False, "seed": 3}
    base.update(extra)
    return FeedOptions(**base)


def make(share: list[pa.RecordBatch], opts: FeedOptions, **kw: Any) -> Batches:
    return Batches(lambda: iter(share), opts, **kw)


def epochs_of(batches: Batches, count: int) -> list[list[int]]:
    return [[int(i) for b in batches for i in b["id"]] for _ in range(count)]


def run_with_failure(share: list[pa.RecordBatch], opts: FeedOptions, epoch: int, after: int,
                     **kw: Any) -> list[list[int]]:
    """Three epochs where the first loader dies after ``after`` batches of ``epoch``; a new one resumes."""
    first = make(share, opts, **kw)
    seen: list[list[int]] = []
    state: dict[str, Any] | None = None
    for e in range(3):
        ids: list[int] = []
        if e == epoch and after == 0:
            state = first.state_dict()
        else:
            for n, batch in enumerate(first):
                ids.extend(int(i) for i in batch["id"])
                if e == epoch and n + 1 == after:
                    state = first.state_dict()  # checkpointed after the step; the rank dies before the next
                    break
        seen.append(ids)
        if state is not None:
            break
    first.close()
    assert state is not None and state["epoch"] == epoch and state["position"] == after
    second = make(share, opts, **kw)
    second.load_state_dict(state)
    for e in range(epoch, 3):
        ids = [int(i) for b in second for i in b["id"]]
        if e == epoch:
            seen[e].extend(ids)
        else:
            seen.append(ids)
    second.close()
    return seen


@pytest.mark.parametrize(("epoch", "after"), [(0, 0), (0, 5), (1, 1), (1, 37), (2, 20)])
@pytest.mark.parametrize("budget", [1 << 30, 6000])
def test_a_resumed_loader_continues_with_the_next_batch_in_the_uninterrupted_order(
        epoch: int, after: int, budget: int) -> None:
    share = record_batches(0, SIZES)
    opts = options(drop_last=epoch == 2)
    reference = epochs_of(make(share, opts, memory_budget=budget), 3)
    assert all(len(set(e)) == len(e) == len(reference[0]) for e in reference) and reference[1] != reference[2]
    assert run_with_failure(share, opts, epoch, after, memory_budget=budget) == reference


def test_the_spill_keeps_the_order_and_removes_its_file_on_close(tmp_path: Any) -> None:
    share = record_batches(0, SIZES)
    in_memory = epochs_of(make(share, options()), 3)
    spilled = make(share, options(), memory_budget=5000, spill_dir=str(tmp_path))
    assert epochs_of(spilled, 3) == in_memory
    store = spilled.store
    assert store is not None and store.spilled_chunks >= 3 and store.path is not None
    assert store.path.startswith(str(tmp_path)) and os.path.exists(store.path)
    spilled.close()
    assert not os.path.exists(os.path.dirname(store.path)) and os.listdir(tmp_path) == []


def test_equal_steps_resume_keeps_the_agreed_count_and_asks_only_in_the_first_pass() -> None:
    shares = [record_batches(0, [300, 211]), record_batches(1000, [170, 33])]
    opts = options(equal_steps=True, shuffle_buffer=40)

    def reference(r: int, gang: Gang) -> list[list[int]]:
        return epochs_of(make(shares[r], opts, agree=gang.agree(r), rank=r, world_size=2), 3)

    whole = Gang(2)
    expected = whole.run(lambda r: reference(r, whole))
    assert (len(expected[0][0]), len(expected[1][0])) == (13 * 16, 203)  # rank 1's 203 rows: 13 batches
    assert whole.calls == [2, 2]  # two windows (8, then 16) in the first epoch, none after

    def resumed(r: int, gang: Gang) -> list[list[int]]:
        return run_with_failure(shares[r], opts, 1, 6, agree=gang.agree(r), rank=r, world_size=2)

    again = Gang(2)
    assert again.run(lambda r: resumed(r, again)) == expected
    assert again.calls == [2, 2]  # the resumed loader in epoch 1 took the saved step count


def test_equal_steps_resume_within_the_first_epoch_agrees_on_the_rest() -> None:
    shares = [record_batches(0, [300, 211]), record_batches(1000, [170, 33])]
    opts = options(equal_steps=True, cache=False)
    whole = Gang(2)
    expected = whole.run(lambda r: [[int(i) for b in make(shares[r], opts, agree=whole.agree(r), rank=r,
                                                              world_size=2) for i in b["id"]]])
    again = Gang(2)

    def resumed(r: int) -> list[list[int]]:
        first = make(shares[r], opts, agree=again.agree(r), rank=r, world_size=2)
        it = iter(first)
        ids = [int(i) for _ in range(4) for i in next(it)["id"]]
        state = first.state_dict()  # taken while the pass is open, as a checkpoint in the loop is
        second = make(shares[r], opts, agree=again.agree(r), rank=r, world_size=2)
        second.load_state_dict(state)
        return [ids + [int(i) for b in second for i in b["id"]]]

    assert again.run(resumed) == expected


def test_windows_make_the_agreements_logarithmic_in_the_steps() -> None:
    calls: list[int] = []

    def agree(ready: int, ended: bool) -> tuple[int, bool]:
        calls.append(ready)
        return ready, ended

    batches = ({"x": np.zeros(4)} for _ in range(5000))
    assert sum(1 for _ in equal_steps(batches, agree, lambda s, r: None, max_window=1024)) == 5000
    assert calls == [8, 16, 32, 64, 128, 256, 512, 1024, 1024, 1024, 912]
    held: list[int] = []
    big = ({"x": np.zeros(1000)} for _ in range(100))  # 8 kB each; 20 kB allowed ahead: 3 batches
    list(equal_steps(big, lambda ready, ended: (held.append(ready), (ready, ended))[1], lambda s, r: None,
                     max_bytes=20_000))
    assert max(held) == 3 and sum(held) == 100


def test_state_after_a_finished_epoch_points_at_the_next_one_and_a_fresh_loader_at_zero() -> None:
    batches = make(record_batches(0, SIZES), options())
    assert (batches.state_dict()["epoch"], batches.state_dict()["position"]) == (0, 0)
    it = iter(batches)
    assert (batches.state_dict()["epoch"], batches.state_dict()["position"]) == (0, 0)
    next(it)
    next(it)
    assert (batches.state_dict()["epoch"], batches.state_dict()["position"]) == (0, 2)
    for _ in it:
        pass
    state = batches.state_dict()
    assert (state["epoch"], state["position"], state["steps"], state["rows"], state["complete"]) == (1, 0, 38, 600,
                                                                                                      True)


def test_a_share_that_comes_back_in_another_order_is_named() -> None:
    share = record_batches(0, SIZES)
    first = make(share, options())
    epochs_of(first, 2)
    state = first.state_dict()
    reordered = [share[1], share[0], *share[2:]]
    second = make(reordered, options())
    second.load_state_dict(state)
    with pytest.raises(LaunchError, match=r"rank 0's share of data= differs .* not deterministic"):
        list(second)
    fewer = make(share[:-1], options())
    fewer.load_state_dict(state)
    with pytest.raises(LaunchError, match=r"478 rows in 4 Arrow batches \(all of it\) where the saved state read "
                                          r"600 rows in 5"):
        list(fewer)


def test_the_first_batch_decides_at_once_in_the_first_epoch() -> None:
    share = record_batches(0, SIZES)
    first = make(share, options(cache=False))
    it = iter(first)
    next(it)
    state = first.state_dict()
    changed = [record_batches(5, [97])[0], *share[1:]]
    second = make(changed, options(cache=False))
    second.load_state_dict(state)
    with pytest.raises(LaunchError, match="differs from the attempt that saved"):
        next(iter(second))


@pytest.mark.parametrize(("change", "match"), [
    ({"seed": 4}, "saved by a loader with seed=3, this one has seed=4"),
    ({"batch_size": 8}, "batch_size=16, this one has batch_size=8"),
    ({"shuffle": False}, "shuffle=True, this one has shuffle=False"),
])
def test_a_state_from_a_loader_with_other_options_is_refused(change: dict[str, Any], match: str) -> None:
    state = make(record_batches(0, SIZES), options()).state_dict()
    with pytest.raises(ValueError, match=match):
        make(record_batches(0, SIZES), options(**change)).load_state_dict(state)


def test_bad_states_are_refused_with_the_fix() -> None:
    share = record_batches(0, SIZES)
    state = make(share, options()).state_dict()
    with pytest.raises(ValueError, match="world_size=1, this one has world_size=2"):
        make(share, options(), world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="version 0, this spark-hydrogen reads version 1"):
        make(share, options()).load_state_dict({**state, "version": 0})
    with pytest.raises(ValueError, match="lacks position"):
        make(share, options()).load_state_dict({k: v for k, v in state.items() if k != "position"})
    with pytest.raises(TypeError, match="takes the dict state_dict"):
        make(share, options()).load_state_dict([1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only a loader with cache=True has"):
        make(share, options(cache=False)).load_state_dict({**state, "epoch": 1, "steps": 3})
    started = make(share, options())
    next(iter(started))
    with pytest.raises(LaunchError, match="before the first pass"):
        started.load_state_dict(state)
    assert LoaderState.from_dict(state).to_dict() == state


def test_spill_root_uses_spark_local_dirs_and_the_budget_key_is_read(tmp_path: Any) -> None:
    assert spill_root({"SPARK_LOCAL_DIRS": f"/nonexistent,{tmp_path}"}) == str(tmp_path)
    conf = {"spark.hydrogen.data.cacheMemoryBudget": "64m"}
    assert HydrogenConfig.from_conf(conf.get, "localhost").launch.data_cache_memory == 64 << 20
    with pytest.raises(ValueError, match=r"spark.hydrogen.data.cacheMemoryBudget='lots' is not a size"):
        HydrogenConfig.from_conf({"spark.hydrogen.data.cacheMemoryBudget": "lots"}.get, "localhost")
    with pytest.raises(ValueError, match="budget must be >= 0"):
        ShareStore(-1)


def test_a_spill_directory_of_a_dead_worker_is_swept_and_a_live_ones_kept(tmp_path: Any) -> None:
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True, timeout=60)
    dead = tmp_path / f"{PREFIX}{gone.stdout.strip()}-abc"
    live = tmp_path / f"{PREFIX}{os.getppid()}-def"
    other = tmp_path / "blockmgr-1"
    for folder in (dead, live, other):
        folder.mkdir()
    assert sweep(str(tmp_path)) == [dead.name]
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name])


def test_rank_end_runs_every_closer_even_after_one_fails(caplog: Any) -> None:
    from sparkhydrogen.task.data import RankData

    share = RankData(iter(()), arrow=True)
    ran: list[str] = []

    def broken() -> None:
        raise OSError("disk gone")

    share.closers += [lambda: ran.append("a"), broken, lambda: ran.append("b")]
    share.close()
    share.close()  # once only
    assert ran == ["a", "b"] and "disk gone" in caplog.text
