"""The data feed's pure core: rebatching, the shuffle buffer, equal steps across ranks, caching, errors.

Record batches are built here; two ranks are two threads whose ``agree`` meets at a barrier.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

import sparkhydrogen.data as h2data
from sparkhydrogen.data import Batches, FeedOptions
from sparkhydrogen.data._batching import agreed, rebatch, shuffle
from sparkhydrogen.data._convert import to_chunk
from sparkhydrogen.errors import LaunchError, NotInGangError

pytestmark = pytest.mark.timeout(60)


def record_batches(start: int, sizes: list[int]) -> list[pa.RecordBatch]:
    """Batches of the given sizes with ``id`` (consecutive from ``start``), ``x`` = id / 2 and a 3-wide ``v``."""
    out, at = [], start
    for size in sizes:
        ids = np.arange(at, at + size, dtype=np.int64)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.repeat(ids, 3).astype(np.float32)), 3)
        out.append(pa.RecordBatch.from_pydict({"id": ids, "x": ids / 2.0, "v": vectors}))
        at += size
    return out


def feed(batches: list[pa.RecordBatch], **options: Any) -> Batches:
    options.setdefault("equal_steps", False)
    return Batches(lambda: iter(batches), FeedOptions(**options))


class Gang:
    """``agree`` for ``size`` ranks running in threads: every rank's report meets at a barrier (an allGather)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.answers: list[tuple[int, bool]] = [(0, False)] * size
        self.calls = [0] * size
        self._meet = threading.Barrier(size, timeout=20)

    def agree(self, rank: int) -> Callable[[int, bool], tuple[int, bool]]:
        def agree(ready: int, ended: bool) -> tuple[int, bool]:
            self.calls[rank] += 1
            self.answers[rank] = (ready, ended)
            self._meet.wait()
            verdict = agreed(self.answers)
            self._meet.wait()  # nobody overwrites an answer before everyone has read them
            return verdict

        return agree

    def run(self, body: Callable[[int], Any]) -> list[Any]:
        results: list[Any] = [None] * self.size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = body(rank)
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)
                self._meet.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        if errors:
            raise errors[0]
        return results


# rebatching ------------------------------------------------------------------

def test_chunks_of_any_size_become_batches_of_batch_size_in_order() -> None:
    out = list(feed(record_batches(0, [3, 7, 1, 10]), batch_size=4))
    assert [len(b["id"]) for b in out] == [4, 4, 4, 4, 4, 1]
    assert np.concatenate([b["id"] for b in out]).tolist() == list(range(21))
    assert all(b["id"].flags.writeable and b["id"].flags.c_contiguous for b in out)


def test_drop_last_drops_the_short_batch() -> None:
    out = list(feed(record_batches(0, [3, 7, 1, 10]), batch_size=4, drop_last=True))
    assert [len(b["id"]) for b in out] == [4] * 5


def test_rebatch_keeps_views_of_large_chunks_apart() -> None:
    chunks = [{"a": np.arange(10)}]
    out = list(rebatch(chunks, 3))
    out[0]["a"][0] = 99
    assert chunks[0]["a"][0] == 0 and [b["a"].tolist() for b in out][1:] == [[3, 4, 5], [6, 7, 8], [9]]


def test_columns_are_selected_in_the_order_given() -> None:
    batch = next(iter(feed(record_batches(0, [5]), batch_size=5, columns=["x", "id"])))
    assert list(batch) == ["x", "id"]
    assert batch["x"].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_a_missing_column_is_named_with_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"column 'y' is not in the data; its columns are: 'id', 'x', 'v'"):
        list(feed(record_batches(0, [5]), batch_size=2, columns=["x", "y"]))


def test_list_columns_become_2d_arrays() -> None:
    batch = next(iter(feed(record_batches(10, [4]), batch_size=4, columns=["v"])))
    assert batch["v"].shape == (4, 3) and batch["v"].dtype == np.float32
    assert batch["v"][2].tolist() == [12.0, 12.0, 12.0]


def test_variable_lists_of_one_length_nested_lists_and_sliced_batches_convert() -> None:
    rb = pa.RecordBatch.from_pydict({"l": pa.array([[1, 2], [3, 4], [5, 6]]),
                                     "m": pa.array([[[1, 2]], [[3, 4]], [[5, 6]]])})
    chunk = to_chunk(rb.slice(1, 2), None)
    assert chunk["l"].tolist() == [[3, 4], [5, 6]]
    assert chunk["m"].shape == (2, 1, 2) and chunk["m"][1].tolist() == [[5, 6]]


def test_ragged_lists_nulls_and_structs_are_refused_with_the_fix() -> None:
    ragged = pa.RecordBatch.from_pydict({"l": pa.array([[1], [2, 3]])})
    with pytest.raises(ValueError, match=r"column 'l' holds lists of different lengths \(1 to 2\).*pad"):
        to_chunk(ragged, None)
    nulls = pa.RecordBatch.from_pydict({"n": pa.array([1.0, None])})
    with pytest.raises(ValueError, match=r"column 'n' has 1 null value.*df.na.fill"):
        to_chunk(nulls, None)
    struct = pa.RecordBatch.from_pydict({"s": pa.array([{"a": 1}])})
    with pytest.raises(TypeError, match=r"column 's' is a struct.*vector_to_array"):
        to_chunk(struct, None)


def test_a_list_column_changing_width_between_batches_is_named() -> None:
    first = pa.RecordBatch.from_pydict({"l": pa.array([[1, 2]])})
    second = pa.RecordBatch.from_pydict({"l": pa.array([[1, 2, 3]])})
    with pytest.raises(ValueError, match=r"column 'l' changes shape.*\(2,\) and \(3,\)"):
        list(feed([first, second], batch_size=2))


# equal steps -----------------------------------------------------------------

def test_uneven_shares_yield_equal_step_counts_and_the_leftover_is_logged(caplog: Any) -> None:
    shares = [record_batches(0, [400, 600]), record_batches(1000, [300, 70])]
    gang = Gang(2)

    def rank(r: int) -> list[int]:
        batches = Batches(lambda: iter(shares[r]), FeedOptions(batch_size=64), agree=gang.agree(r), rank=r)
        return [len(b["id"]) for b in batches]

    with caplog.at_level(logging.INFO, logger="sparkhydrogen.data"):
        sizes = gang.run(rank)
    assert sizes[0] == [64] * 6 and sizes[1] == [64] * 5 + [50]  # rank 1's short last batch is a step
    assert gang.calls == [1, 1]  # rank 1 made all its 6 batches within the first window of 8: one agreement
    messages = [r.getMessage() for r in caplog.records]
    assert any("rank 0: 6 batches (384 rows) of its 1000 rows; 616 rows left unused" in m for m in messages)


def test_equal_steps_with_drop_last_counts_only_full_batches() -> None:
    shares = [record_batches(0, [256]), record_batches(1000, [100])]
    gang = Gang(2)

    def rank(r: int) -> int:
        options = FeedOptions(batch_size=64, drop_last=True)
        return sum(1 for _ in Batches(lambda: iter(shares[r]), options, agree=gang.agree(r), rank=r))

    assert gang.run(rank) == [1, 1]


def test_a_rank_with_no_rows_stops_every_rank_at_once() -> None:
    shares = [record_batches(0, [500]), []]
    gang = Gang(2)

    def rank(r: int) -> int:
        return sum(1 for _ in Batches(lambda: iter(shares[r]), FeedOptions(batch_size=10), agree=gang.agree(r)))

    assert gang.run(rank) == [0, 0] and gang.calls == [1, 1]


def test_without_equal_steps_every_row_reaches_exactly_one_rank() -> None:
    shares = [record_batches(0, [400, 600]), record_batches(1000, [300, 77])]
    seen = [np.concatenate([b["id"] for b in feed(shares[r], batch_size=64)]) for r in range(2)]
    assert sorted(np.concatenate(seen).tolist()) == list(range(1377))


# shuffle ---------------------------------------------------------------------

def test_shuffle_is_a_permutation_deterministic_per_seed_and_rank() -> None:
    def ids(seed: int, rank: int = 0) -> list[int]:
        options = FeedOptions(batch_size=50, shuffle=True, shuffle_buffer=200, equal_steps=False, seed=seed)
        return np.concatenate([b["id"] for b in Batches(lambda: iter(record_batches(0, [300] * 5)), options,
                                                         rank=rank)]).tolist()

    first = ids(7)
    assert sorted(first) == list(range(1500)) and first != list(range(1500))
    assert ids(7) == first and ids(8) != first and ids(7, rank=1) != first


def test_shuffle_keeps_columns_of_a_row_together() -> None:
    options = FeedOptions(batch_size=32, shuffle=True, shuffle_buffer=100, equal_steps=False)
    for b in Batches(lambda: iter(record_batches(0, [90, 90, 90])), options):
        assert np.array_equal(b["x"], b["id"] / 2.0) and np.array_equal(b["v"][:, 0], b["id"].astype(np.float32))


def test_the_shuffle_buffer_bounds_the_rows_read_ahead() -> None:
    pulled = [0]

    def source() -> Iterator[dict[str, Any]]:
        for i in range(100):
            pulled[0] += 10
            yield {"id": np.arange(i * 10, i * 10 + 10)}

    out = shuffle(source(), 50, np.random.default_rng(0))
    emitted = 0
    for chunk in out:
        emitted += len(chunk["id"])
        assert pulled[0] - emitted <= 50  # what was read but not yet emitted sits in the buffer
    assert emitted == 1000


# passes and caching ----------------------------------------------------------

def test_a_second_pass_without_cache_is_refused_with_the_fix() -> None:
    batches = feed(record_batches(0, [10]), batch_size=4)
    list(batches)
    with pytest.raises(LaunchError, match=r"one-pass stream.*cache=True"):
        iter(batches)


def test_cache_replays_every_row_each_epoch_reshuffled() -> None:
    batches = feed(record_batches(0, [30, 30]), batch_size=8, shuffle=True, shuffle_buffer=16, cache=True)
    epochs = [np.concatenate([b["id"] for b in batches]).tolist() for _ in range(3)]
    assert all(sorted(e) == list(range(60)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_cached_epochs_keep_the_agreed_step_count_without_asking_again() -> None:
    shares = [record_batches(0, [200]), record_batches(1000, [90])]
    gang = Gang(2)

    def rank(r: int) -> list[int]:
        options = FeedOptions(batch_size=20, cache=True, shuffle=True, shuffle_buffer=50)
        batches = Batches(lambda: iter(shares[r]), options, agree=gang.agree(r), rank=r)
        return [sum(1 for _ in batches) for _ in range(3)]

    assert gang.run(rank) == [[5, 5, 5], [5, 5, 5]]
    assert gang.calls == [1, 1]  # one window in the first epoch; none later


def test_a_cache_left_incomplete_by_an_early_stop_is_refused() -> None:
    batches = feed(record_batches(0, [100]), batch_size=10, cache=True)
    for _ in zip(range(2), batches, strict=False):
        pass
    with pytest.raises(LaunchError, match="stopped before the end"):
        iter(batches)


def test_peek_shows_the_first_rows_without_taking_them() -> None:
    batches = feed([record_batches(0, [0])[0], *record_batches(0, [5])], batch_size=5)
    first = batches.peek()
    assert first is not None and first["id"].tolist() == list(range(5))
    assert [b["id"].tolist() for b in batches] == [list(range(5))]
    assert feed([], batch_size=5).peek() is None


# options, imports, context ---------------------------------------------------

@pytest.mark.parametrize(("options", "error", "match"), [
    ({"batch_size": 0}, ValueError, "batch_size must be at least 1, got 0"),
    ({"batch_size": 2.5}, TypeError, "batch_size must be an int, got float"),
    ({"batch_size": 4, "columns": "x"}, TypeError, "columns must be a list of column names, got 'x'"),
    ({"batch_size": 4, "columns": []}, ValueError, "columns must name at least one column"),
    ({"batch_size": 4, "columns": ["x", "x"]}, ValueError, "names a column twice"),
    ({"batch_size": 4, "shuffle": "yes"}, TypeError, "shuffle must be True or False"),
    ({"batch_size": 4, "shuffle_buffer": 0}, ValueError, "shuffle_buffer must be at least 1"),
    ({"batch_size": 4, "seed": -1}, ValueError, "seed must be an int >= 0, got -1"),
])
def test_options_are_checked(options: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        FeedOptions(**options)


def test_numpy_batches_outside_a_rank_says_where_to_call_it() -> None:
    with pytest.raises(NotInGangError, match="outside a spark-hydrogen barrier task"):
        h2data.numpy_batches(8)


def test_torch_loader_refuses_workers_before_touching_the_stream() -> None:
    pytest.importorskip("torch.utils.data")  # not plain "torch": tests/torch is a namespace package here
    from sparkhydrogen.data.torch_feed import data_loader

    with pytest.raises(ValueError, match="num_workers must be 0, got 2: the rank's data stream lives in this process"):
        data_loader(8, num_workers=2)
    with pytest.raises(TypeError, match="sets collate_fn itself"):
        data_loader(8, collate_fn=list)


def test_importing_the_package_imports_no_framework() -> None:
    code = ("import sys, sparkhydrogen.data, sparkhydrogen.data.jax_feed; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_all_lists_the_public_names() -> None:
    assert set(h2data.__all__) == {"DEFAULT_SHUFFLE_BUFFER", "Batches", "FeedOptions", "numpy_batches"}
    assert all(getattr(h2data, name) is not None for name in h2data.__all__)


# the hot path: batches cut from Arrow buffers ---------------------------------

def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rebatch_yields_every_row_once_in_order_with_the_chunks_dtypes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = [int(s) for s in rng.integers(0, 40, size=30)]
    starts = np.cumsum([0, *sizes])
    chunks = [{"i": np.arange(a, b, dtype=np.int32), "v": np.arange(a, b, dtype=np.float32).repeat(2).reshape(-1, 2)}
              for a, b in zip(starts[:-1], starts[1:], strict=True)]
    for batch_size in (1, 7, 16, 64):
        out = list(rebatch(chunks, batch_size))
        assert [len(b["i"]) for b in out[:-1]] == [batch_size] * (len(out) - 1) and 0 < len(out[-1]["i"]) <= batch_size
        assert np.concatenate([b["i"] for b in out]).tolist() == list(range(int(starts[-1])))
        assert all(b["i"].dtype == np.int32 and b["v"].dtype == np.float32 and b["v"].shape[1:] == (2,) for b in out)
        assert np.array_equal(np.concatenate([b["v"] for b in out])[:, 1], np.arange(starts[-1], dtype=np.float32))
        assert all(b["i"].flags.writeable and b["v"].flags.c_contiguous for b in out)


def test_a_batch_inside_one_chunk_is_its_own_copy_of_the_arrow_rows() -> None:
    rb = record_batches(0, [10])[0]
    chunk = to_chunk(rb, None)
    out = list(rebatch([chunk], 4))
    assert [b["id"].tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    out[0]["id"][0] = 99  # the batch owns its rows: the chunk (the Arrow buffer) is untouched
    assert chunk["id"][0] == 0 and rb.column(0)[0].as_py() == 0
    assert not any(np.shares_memory(b["id"], chunk["id"]) for b in out)


def test_numbers_and_fixed_size_lists_are_views_of_the_arrow_buffers() -> None:
    rb = record_batches(5, [8])[0].slice(2, 5)  # an offset into the buffers
    chunk = to_chunk(rb, None)
    assert chunk["id"].tolist() == [7, 8, 9, 10, 11] and chunk["x"].tolist() == [3.5, 4.0, 4.5, 5.0, 5.5]
    assert chunk["v"].shape == (5, 3) and chunk["v"][:, 0].tolist() == [7.0, 8.0, 9.0, 10.0, 11.0]
    ids = rb.column(0)
    assert _address(chunk["id"]) == ids.buffers()[1].address + ids.offset * 8  # no copy
    values = rb.column(2).flatten()
    assert _address(chunk["v"]) == values.buffers()[1].address + values.offset * 4  # one reshaped buffer
    assert not chunk["id"].flags.writeable  # a view of Arrow's buffer: rebatch copies before anyone may write


def test_chunked_arrays_convert_joined_or_as_their_one_chunk() -> None:
    from sparkhydrogen.data._convert import to_numpy

    two = pa.chunked_array([pa.array([1.0, 2.0]), pa.array([3.0])])
    assert to_numpy(two, "x").tolist() == [1.0, 2.0, 3.0]
    one = pa.chunked_array([pa.array([[1, 2], [3, 4]], type=pa.list_(pa.int64(), 2))])
    assert to_numpy(one, "l").tolist() == [[1, 2], [3, 4]]
    empty = pa.chunked_array([], type=pa.float32())
    assert to_numpy(empty, "e").shape == (0,)


def test_other_column_types_keep_their_numpy_form() -> None:
    rb = pa.RecordBatch.from_pydict({"b": pa.array([True, False]), "s": pa.array(["a", "bc"]),
                                     "d": pa.array([[1, 2], [3, 4]], type=pa.list_(pa.int16())),
                                     "k": pa.array(["x", "y"]).dictionary_encode(),
                                     "h": pa.array(np.array([1.5, 2.5], dtype=np.float16))})
    chunk = to_chunk(rb, None)
    assert chunk["b"].dtype == np.bool_ and chunk["b"].tolist() == [True, False]
    assert chunk["s"].tolist() == ["a", "bc"] and chunk["k"].tolist() == ["x", "y"]
    assert chunk["d"].dtype == np.int16 and chunk["d"].tolist() == [[1, 2], [3, 4]]
    assert chunk["h"].dtype == np.float16


def test_a_column_missing_from_a_later_batch_is_named() -> None:
    first = pa.RecordBatch.from_pydict({"a": [1, 2], "b": [1, 2]})
    second = pa.RecordBatch.from_pydict({"a": [3]})
    with pytest.raises(ValueError, match=r"column\(s\) 'b' are missing from part of this rank's data"):
        list(feed([first, second], batch_size=2))


def test_arrow_messages_decode_to_the_batches_they_were_made_from() -> None:
    from sparkhydrogen.task.data import record_batches as decode

    batches = record_batches(0, [3, 0, 4])
    messages = [b.serialize().to_pybytes() for b in batches]
    out = list(decode(batches[0].schema.serialize().to_pybytes(), messages))
    assert [b.num_rows for b in out] == [3, 0, 4] and all(a.equals(b) for a, b in zip(out, batches, strict=True))


def test_only_spark_types_whose_arrow_form_is_fixed_travel_as_messages() -> None:
    types = pytest.importorskip("pyspark.sql.types")
    from sparkhydrogen.launch.data import fixed_arrow_type

    fixed = [types.LongType(), types.FloatType(), types.StringType(), types.DateType(), types.BinaryType(),
             types.ArrayType(types.DoubleType()), types.StructType([types.StructField("a", types.IntegerType())])]
    assert all(fixed_arrow_type(t) for t in fixed)
    session_dependent = [types.TimestampType(), types.DecimalType(10, 2), types.ArrayType(types.TimestampType()),
                         types.MapType(types.StringType(), types.LongType()), types.DayTimeIntervalType()]
    assert not any(fixed_arrow_type(t) for t in session_dependent)


def test_torch_tensors_share_the_batch_memory_and_odd_columns_are_refused() -> None:
    pytest.importorskip("torch.utils.data")
    from sparkhydrogen.data.torch_feed import _tensor

    array = np.arange(6, dtype=np.float32).reshape(3, 2)
    tensor = _tensor("x", array)
    assert tensor.data_ptr() == _address(array) and tuple(tensor.shape) == (3, 2)
    with pytest.raises(TypeError, match=r"column 's' holds <U1 values, which a torch tensor cannot"):
        _tensor("s", np.array(["a"]))
