"""Later epochs of a share cached in memory, cut without Arrow (``sparkhydrogen.data._replay``).

Each test compares the converted replay with the Arrow path it replaces (forced by a memory
budget that holds the share once but not twice): the batches, their order and count, and a
resumed loader's next batch must be the same. Record batches are built here; no Spark.
"""

from __future__ import annotations

import doctest
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from sparkhydrogen.data import Batches, FeedOptions
from sparkhydrogen.data import _replay as replay
from sparkhydrogen.data._batching import agreed, rebatch, shuffle
from sparkhydrogen.data._replay import NUMPY, Gathered, batch_bounds, joinable, shuffled_order

pytestmark = pytest.mark.timeout(120)


def record_batches(sizes: list[int]) -> list[pa.RecordBatch]:
    """``id`` (consecutive), ``x`` = id / 2, ``k`` = id as int32 and a 3-wide float ``v``, in batches of ``sizes``."""
    out, at = [], 0
    for size in sizes:
        ids = np.arange(at, at + size, dtype=np.int64)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.repeat(ids, 3).astype(np.float32)), 3)
        out.append(pa.RecordBatch.from_pydict({"id": ids, "x": ids / 2.0, "k": ids.astype(np.int32),
                                               "v": vectors}))
        at += size
    return out


def share_bytes(batches: list[pa.RecordBatch]) -> int:
    """What the cache holds of ``batches`` in memory (the budget that keeps one copy, not two)."""
    probe = Batches(lambda: iter(batches), FeedOptions(batch_size=1, cache=True, equal_steps=False))
    for _ in probe:
        pass
    assert probe.store is not None
    return probe.store.memory_bytes


def epochs(batches: list[pa.RecordBatch], count: int, **options: Any) -> list[list[dict[str, list[Any]]]]:
    options.setdefault("equal_steps", False)
    loader = Batches(lambda: iter(batches), FeedOptions(cache=True, **options))
    return [[{k: v.tolist() for k, v in b.items()} for b in loader] for _ in range(count)]


CASES = [
    dict(batch_size=7, shuffle=False),
    dict(batch_size=7, shuffle=False, drop_last=True),
    dict(batch_size=64, shuffle=True, shuffle_buffer=50),
    dict(batch_size=5, shuffle=True, shuffle_buffer=1, drop_last=True, seed=3),
    dict(batch_size=16, shuffle=True, shuffle_buffer=1_000),  # the buffer holds the whole share
    dict(batch_size=9, global_shuffle=True, seed=5),  # one rank: no exchange, a shuffle in the rank
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_converted_epochs_hand_out_the_batches_of_the_arrow_path(options: dict[str, Any],
                                                                 caplog: Any) -> None:
    source = record_batches([40, 0, 13, 100, 1, 57])
    arrow_budget = share_bytes(source)
    with caplog.at_level(logging.DEBUG, logger="sparkhydrogen.data"):
        fast = epochs(source, 3, **options)
    assert "converted once" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="sparkhydrogen.data"):
        arrow = epochs(source, 3, cache_memory=arrow_budget, **options)
    assert "does not fit the cache's memory budget" in caplog.text and "converted once" not in caplog.text
    assert fast == arrow
    for epoch in fast:
        ids = [i for b in epoch for i in b["id"]]
        assert len(ids) == len(set(ids))  # exactly once
        assert all(b["x"] == [i / 2 for i in b["id"]] and b["v"] == [[float(i)] * 3 for i in b["id"]]
                   for b in epoch)  # the columns of a row stay together


def test_a_resumed_converted_epoch_continues_with_the_next_batch_of_the_arrow_order() -> None:
    source = record_batches([30, 31, 32, 33])
    options = dict(batch_size=8, shuffle=True, shuffle_buffer=20, seed=1, equal_steps=False)
    arrow = epochs(source, 3, cache_memory=share_bytes(source), **options)
    first = Batches(lambda: iter(source), FeedOptions(cache=True, **options))
    for _ in first:
        pass
    stream = iter(first)  # epoch 1 (converted), stopped after 5 batches
    taken = [next(stream)["id"].tolist() for _ in range(5)]
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (1, 5)
    second = Batches(lambda: iter(source), FeedOptions(cache=True, **options))
    second.load_state_dict(state)
    rest = [b["id"].tolist() for b in second]
    assert taken + rest == [b["id"] for b in arrow[1]]
    assert [b["id"].tolist() for b in second] == [b["id"] for b in arrow[2]]


def test_equal_steps_replay_the_agreed_step_count_converted() -> None:
    source = record_batches([50, 45])
    asked: list[int] = []

    def agree(ready: int, ended: bool) -> tuple[int, bool]:  # the other rank has 6 batches in all
        asked.append(ready)
        return agreed([(ready, ended), (6, True)])

    loader = Batches(lambda: iter(source), FeedOptions(batch_size=10, cache=True), agree=agree)
    counts = [sum(1 for _ in loader) for _ in range(3)]
    assert counts == [6, 6, 6]
    calls = len(asked)
    assert [len(b["id"]) for b in loader] == [10] * 6 and len(asked) == calls  # later epochs ask nothing


def test_unshuffled_later_epochs_hand_out_read_only_views_that_stay_intact() -> None:
    source = record_batches([25, 25])
    loader = Batches(lambda: iter(source), FeedOptions(batch_size=10, cache=True, equal_steps=False))
    first = list(loader)
    first[0]["x"] += 1  # the first epoch's batches are the consumer's own copies
    second = list(loader)
    with pytest.raises(ValueError, match="read-only"):
        second[0]["x"] += 1
    with pytest.raises(ValueError):
        second[0]["x"].flags.writeable = True
    third = list(loader)
    assert third[0]["x"].tolist() == [i / 2 for i in range(10)]
    assert np.shares_memory(second[1]["id"], third[1]["id"])  # the same views each epoch: nothing copied
    third[0].pop("x")  # each epoch's dicts are new: dropping a key changes nothing later
    assert "x" in next(iter(loader))


def test_shuffled_later_epochs_hand_out_fresh_arrays() -> None:
    source = record_batches([25, 25])
    loader = Batches(lambda: iter(source), FeedOptions(batch_size=10, cache=True, shuffle=True,
                                                       equal_steps=False))
    list(loader)
    second = list(loader)
    ids = second[0]["id"].copy()
    for batch in second:
        for array in batch.values():
            array *= 0  # writable, and the consumer's own
    third = list(loader)
    assert sorted(i for b in third for i in b["id"].tolist()) == list(range(50))
    assert all(b["x"].tolist() == [i / 2 for i in b["id"].tolist()] for b in third)
    assert ids.tolist() != third[0]["id"].tolist()  # reshuffled per epoch


def test_a_spilled_share_replays_from_arrow(tmp_path: Any, caplog: Any) -> None:
    source = record_batches([20, 20, 20])
    with caplog.at_level(logging.DEBUG, logger="sparkhydrogen.data"):
        spilled = Batches(lambda: iter(source), FeedOptions(batch_size=8, cache=True, cache_memory=0,
                                                            equal_steps=False), spill_dir=str(tmp_path))
        out = [[b["id"].tolist() for b in spilled] for _ in range(2)]
    assert "converted once" not in caplog.text
    assert out[0] == out[1] and sum(map(len, out[1])) == 60
    assert out[1][0] == list(range(8)) and next(iter(spilled))["id"].flags.writeable
    spilled.close()


# the pure pieces ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_the_shuffled_order_is_the_order_the_shuffle_gives_the_rows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = [int(s) for s in rng.integers(0, 40, size=int(rng.integers(1, 8)))]
    buffer = int(rng.integers(1, 60))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    chunks = [{"id": np.arange(starts[i], starts[i + 1]), "y": -np.arange(starts[i], starts[i + 1])}
              for i in range(len(sizes))]
    chunk_order = rng.permutation(len(sizes)).tolist()
    rows = shuffle((chunks[c] for c in chunk_order), buffer, np.random.default_rng([seed, 1]))
    expected = [b["id"].tolist() for b in rebatch(rows, 4)]
    order = shuffled_order(sizes, chunk_order, buffer, np.random.default_rng([seed, 1]))
    assert [order[a:b].tolist() for a, b in batch_bounds(len(order), 4, False)] == expected


def test_gathered_batches_are_contiguous_and_keep_dtypes_and_shapes() -> None:
    chunks = [{"a": np.arange(6, dtype=np.float32), "k": np.arange(6, dtype=np.int32),
               "b": np.arange(6, dtype=np.float32) * 10, "v": np.arange(12, dtype=np.float64).reshape(6, 2)}]
    gathered = Gathered(chunks, NUMPY, 4, drop_last=False)
    assert gathered.nbytes == sum(a.nbytes for a in chunks[0].values())
    out = list(gathered.batches(np.array([5, 1, 3, 0, 2, 4]), 0, None))
    assert [list(b) for b in out] == [["a", "k", "b", "v"]] * 2
    first = out[0]
    assert first["a"].tolist() == [5, 1, 3, 0] and first["b"].tolist() == [50, 10, 30, 0]
    assert first["k"].dtype == np.int32 and first["v"].tolist() == [[10, 11], [2, 3], [6, 7], [0, 1]]
    assert all(a.flags.c_contiguous and a.flags.writeable for a in first.values())
    assert out[1]["a"].tolist() == [2, 4]
    assert [b["a"].tolist() for b in gathered.batches(np.arange(6), 1, 2)] == [[4, 5]]


def test_chunks_of_another_layout_are_not_joined() -> None:
    assert joinable([]) is None and joinable([{"x": np.zeros(0)}]) is None
    assert joinable([{"x": np.zeros(2)}, {"y": np.zeros(2)}]) is None
    assert joinable([{"x": np.zeros((2, 3))}, {"x": np.zeros((2, 4))}]) is None
    assert joinable([{"x": np.zeros(2, np.float32)}, {"x": np.zeros(2)}]) is None


def test_doctests() -> None:
    result = doctest.testmod(replay)
    assert result.attempted > 0 and result.failed == 0


# torch ----------------------------------------------------------------------------------------


def torch_loader(source: list[pa.RecordBatch], **kwargs: Any) -> Any:
    from sparkhydrogen.data.torch_feed import RankDataLoader, RankDataset, _as_is

    batches = Batches(lambda: iter(source), FeedOptions(batch_size=10, cache=True, equal_steps=False))
    return RankDataLoader(RankDataset(batches), batch_size=None, num_workers=0, collate_fn=_as_is, **kwargs)


def test_torch_later_epochs_reuse_their_tensors_until_one_is_changed_in_place(caplog: Any) -> None:
    pytest.importorskip("torch.utils.data")
    loader = torch_loader(record_batches([25, 25]))
    first, second, third = list(loader), list(loader), list(loader)
    assert first[0]["x"].data_ptr() != second[0]["x"].data_ptr()
    assert [b["x"].data_ptr() for b in second] == [b["x"].data_ptr() for b in third]  # nothing made again
    third[0]["x"].add_(100)  # an in-place change to a tensor the loader hands out again
    third[4]["v"][0, 0] = -1.0
    with caplog.at_level(logging.WARNING, logger="sparkhydrogen.data"):
        fourth, fifth = list(loader), list(loader)
    assert "changed in place" in caplog.text and caplog.text.count("changed in place") == 1
    for epoch in (fourth, fifth):
        assert [b["id"].tolist() for b in epoch] == [list(range(a, min(a + 10, 50))) for a in range(0, 50, 10)]
        assert all(b["x"].tolist() == [i / 2 for i in b["id"].tolist()] for b in epoch)
        assert all(b["v"].tolist() == [[float(i)] * 3 for i in b["id"].tolist()] for b in epoch)
    assert fourth[0]["x"].data_ptr() != fifth[0]["x"].data_ptr()  # made afresh from Arrow from then on


def test_torch_shuffled_later_epochs_are_fresh_tensors_in_the_arrow_order() -> None:
    pytest.importorskip("torch.utils.data")
    from sparkhydrogen.data.torch_feed import RankDataLoader, RankDataset, _as_is

    source = record_batches([30, 31, 32])
    options = FeedOptions(batch_size=8, cache=True, shuffle=True, shuffle_buffer=25, equal_steps=False)
    loader = RankDataLoader(RankDataset(Batches(lambda: iter(source), options)), batch_size=None, num_workers=0,
                            collate_fn=_as_is)
    epochs_ = [list(loader) for _ in range(3)]
    arrow = epochs(source, 3, cache_memory=share_bytes(source), batch_size=8, shuffle=True, shuffle_buffer=25)
    assert [[b["id"].tolist() for b in e] for e in epochs_] == [[b["id"] for b in e] for e in arrow]
    epochs_[1][0]["x"].mul_(0)  # the consumer's own tensor: later epochs are unaffected
    assert all(b["x"].tolist() == [i / 2 for i in b["id"].tolist()] for b in loader)


def test_torch_loader_with_pin_memory_goes_through_the_dataloader_iterator() -> None:
    pytest.importorskip("torch.utils.data")  # the environments without torch (test-compat) skip it, as above
    import warnings

    import torch

    loader = torch_loader(record_batches([15]), pin_memory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no accelerator here: torch says pinning is skipped
        iterator = iter(loader)
        batches = list(iterator)
    assert type(iterator).__name__ == "_SingleProcessDataLoaderIter"
    assert [b["id"].tolist() for b in batches] == [list(range(10)), list(range(10, 15))]
    assert isinstance(batches[0]["x"], torch.Tensor)
    assert type(iter(torch_loader(record_batches([15])))).__name__ == "generator"


def test_unshuffled_numpy_epochs_view_the_cache_itself_and_torch_needs_room_for_a_copy(caplog: Any) -> None:
    pytest.importorskip("torch.utils.data")
    source = record_batches([20, 30, 10])  # every batch of 10 inside one Arrow batch: nothing to join
    budget = share_bytes(source)  # room for the cache once
    with caplog.at_level(logging.DEBUG, logger="sparkhydrogen.data"):
        numpy = epochs(source, 2, batch_size=10, cache_memory=budget)
    assert "converted once for later epochs (InOrder, 60 rows, 0 bytes beside the cache" in caplog.text
    assert numpy[0] == numpy[1]
    caplog.clear()
    from sparkhydrogen.data.torch_feed import RankDataLoader, RankDataset, _as_is

    options = FeedOptions(batch_size=10, cache=True, equal_steps=False, cache_memory=budget)
    loader = RankDataLoader(RankDataset(Batches(lambda: iter(source), options)), batch_size=None, num_workers=0,
                            collate_fn=_as_is)
    with caplog.at_level(logging.DEBUG, logger="sparkhydrogen.data"):
        tensors = [[b["id"].tolist() for b in loader] for _ in range(2)]
    assert "does not fit the cache's memory budget" in caplog.text and "converted once" not in caplog.text
    assert tensors == [[b["id"] for b in epoch] for epoch in numpy]
