"""The rank's data as batches: :class:`FeedOptions`, :class:`Batches` and :func:`numpy_batches`."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import LaunchError
from ._batching import equal_steps, rebatch, shuffle
from ._convert import Chunk, chunk_rows, to_chunk

if TYPE_CHECKING:
    from ..context import BarrierTaskContext

__all__ = ["DEFAULT_SHUFFLE_BUFFER", "Batches", "FeedOptions", "gang_agree", "numpy_batches"]

log = logging.getLogger("sparkhydrogen.data")

#: Rows the shuffle buffer holds unless told otherwise.
DEFAULT_SHUFFLE_BUFFER = 10_000


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if int(value) < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


@dataclass(frozen=True)
class FeedOptions:
    """How a rank's rows become batches; checked when made.

    Attributes:
        batch_size: rows per batch.
        columns: the columns to keep, in this order (``None``: all, in the schema's order).
        shuffle: shuffle rows through a buffer of ``shuffle_buffer`` rows.
        shuffle_buffer: rows the shuffle buffer holds (memory: this many rows, whatever the data's size).
        drop_last: drop the last, shorter batch.
        equal_steps: every rank yields the same number of batches (as many as the rank with the fewest).
        seed: seeds the shuffle, with the rank and the epoch.
        cache: keep this rank's rows in memory so the batches can be iterated again (epochs).
    """

    batch_size: int
    columns: Sequence[str] | None = None
    shuffle: bool = False
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    drop_last: bool = False
    equal_steps: bool = True
    seed: int = 0
    cache: bool = False

    def __post_init__(self) -> None:
        _positive_int("batch_size", self.batch_size)
        _positive_int("shuffle_buffer", self.shuffle_buffer)
        if self.columns is not None:
            if isinstance(self.columns, str) or not isinstance(self.columns, Sequence):
                raise TypeError(f"columns must be a list of column names, got {self.columns!r}")
            columns = tuple(self.columns)
            if not columns:
                raise ValueError("columns must name at least one column (None: all of them)")
            for name in columns:
                if not isinstance(name, str):
                    raise TypeError(f"columns must be names (str), got {name!r} in {list(columns)!r}")
            if len(set(columns)) != len(columns):
                raise ValueError(f"columns names a column twice: {list(columns)!r}")
            object.__setattr__(self, "columns", columns)
        for flag in ("shuffle", "drop_last", "equal_steps", "cache"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")


class Batches:
    """This rank's rows as batches (``dict`` of column name -> ``numpy.ndarray``), streamed.

    The rank's data is a one-pass stream: iterating a second time needs ``cache=True``,
    which keeps the rank's rows (as numpy) in memory during the first pass and replays
    them, reshuffled per epoch with ``shuffle=True``. With ``equal_steps`` every rank
    yields the same number of batches: ``agree(has_batch)`` is called once per step (and
    once at the end) and must return whether every rank has one; a later cached epoch
    replays the first epoch's step count without asking.

    Made by :func:`numpy_batches` in a rank; ``source`` (a callable giving the
    ``pyarrow.RecordBatch`` es) and ``agree`` let tests feed it directly.
    """

    def __init__(self, source: Callable[[], Iterable[Any]], options: FeedOptions, *,
                 agree: Callable[[bool], bool] | None = None, rank: int = 0) -> None:
        self.options = options
        self.rank = rank
        self._source = source
        self._agree = agree if options.equal_steps else None
        self._raw: Iterator[Any] | None = None
        self._converted: Iterator[Chunk] | None = None
        self._peeked: list[Chunk] = []
        self._cache: list[Chunk] | None = [] if options.cache else None
        self._rows_in = 0
        self._passes = 0
        self._complete = False
        #: batches per epoch, known once a first pass reached its end
        self.steps: int | None = None

    # the stream ------------------------------------------------------------
    def _open(self) -> Iterator[Chunk]:
        if self._converted is None:
            self._raw = iter(self._source())
            self._converted = self._convert(self._raw)
        return self._converted

    def _convert(self, raw: Iterator[Any]) -> Iterator[Chunk]:
        for batch in raw:
            self._rows_in += int(batch.num_rows)
            chunk = to_chunk(batch, self.options.columns)
            if self._cache is not None:
                self._cache.append(chunk)
            yield chunk

    def _drain(self) -> None:
        """Read the rest of the stream (into the cache, or just counting rows), for the epoch's tally."""
        if self._cache is not None and self._converted is not None:
            for _ in self._converted:
                pass
        elif self._raw is not None:
            for batch in self._raw:
                self._rows_in += int(batch.num_rows)

    def peek(self) -> Chunk | None:
        """The first non-empty chunk of rows (as numpy), without taking it from the first pass; ``None``: no rows.

        Loaders use it to learn the columns' types and shapes before iterating.
        """
        if self._cache and self._complete:
            return next((c for c in self._cache if chunk_rows(c)), None)
        if self._passes:
            raise LaunchError("peek() must come before the first pass over this rank's batches")
        if not self._peeked:
            for chunk in self._open():
                if chunk_rows(chunk):
                    self._peeked.append(chunk)
                    break
        return self._peeked[0] if self._peeked else None

    # passes ----------------------------------------------------------------
    def __iter__(self) -> Iterator[Chunk]:
        if self._passes == 0:
            self._passes = 1
            return self._first_pass()
        if self._cache is None:
            raise LaunchError(
                "this rank's data is a one-pass stream and was already iterated: pass cache=True to keep the "
                "rank's rows in memory for more epochs, or launch the gang again"
            )
        if not self._complete:
            raise LaunchError(
                "the first pass over this rank's batches stopped before the end of its data, so the cache is "
                "incomplete: finish the first epoch (iterate until the batches run out) before starting another"
            )
        self._passes += 1
        return self._replay(self._cache, self._passes - 1)

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.options.seed, self.rank, epoch])

    def _pipeline(self, chunks: Iterable[Chunk], epoch: int) -> Generator[Chunk, None, None]:
        opts = self.options
        if opts.shuffle:
            chunks = shuffle(chunks, opts.shuffle_buffer, self._rng(epoch))
        return rebatch(chunks, opts.batch_size, drop_last=opts.drop_last)

    def _first_pass(self) -> Iterator[Chunk]:
        converted = self._open()
        peeked, self._peeked = self._peeked, []
        stream = self._pipeline(_chain(peeked, converted), 0)
        if self._agree is None:
            steps = rows = 0
            for batch in stream:
                steps += 1
                rows += chunk_rows(batch)
                yield batch
            self._end_of_pass(steps, rows, equal=False)
            return
        yield from equal_steps(stream, self._agree, lambda steps, rows: self._end_of_pass(steps, rows, equal=True))

    def _end_of_pass(self, steps: int, rows: int, *, equal: bool) -> None:
        self._drain()
        self._complete = True
        self.steps = steps
        unused = self._rows_in - rows
        level = logging.INFO if unused and equal else logging.DEBUG
        log.log(level, "rank %d: %d batches (%d rows) of its %d rows; %d rows left unused%s", self.rank, steps,
                rows, self._rows_in, unused, " to keep the ranks' step counts equal" if equal else "")

    def _replay(self, cache: list[Chunk], epoch: int) -> Iterator[Chunk]:
        chunks = list(cache)
        if self.options.shuffle:
            chunks = [chunks[i] for i in self._rng(epoch).permutation(len(chunks))]
        stream = self._pipeline(chunks, epoch)
        limit = self.steps if self._agree is not None else None
        try:
            for taken, batch in enumerate(stream):
                if limit is not None and taken >= limit:
                    break
                yield batch
        finally:
            stream.close()


def _chain(first: list[Chunk], rest: Iterator[Chunk]) -> Iterator[Chunk]:
    yield from first
    yield from rest


def gang_agree(ctx: BarrierTaskContext) -> Callable[[bool], bool]:
    """``agree(has_batch)`` over the gang: one ``allGather`` -- whether every rank has a batch."""

    def agree(has_batch: bool) -> bool:
        return all(ctx.allGather(bool(has_batch)))

    return agree


def from_context(options: FeedOptions) -> Batches:
    """:class:`Batches` over the running rank's ``ctx.batches()``, agreeing over the gang."""
    from ..context import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    agree = gang_agree(ctx) if options.equal_steps and ctx.worldSize() > 1 else None
    return Batches(ctx.batches, options, agree=agree, rank=ctx.rank())


def numpy_batches(batch_size: int, *, columns: Sequence[str] | None = None, shuffle: bool = False,
                  drop_last: bool = False, equal_steps: bool = True, seed: int = 0,
                  shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, cache: bool = False) -> Batches:
    """This rank's share of ``data=`` as batches of ``batch_size`` rows: ``dict`` column -> ``numpy.ndarray``.

    Call it inside a rank of ``sparkhydrogen.run(fn, n, data=df)`` (or a launcher with
    ``data=``). Fixed-length list columns (e.g. ``vector_to_array(features)``) become 2-D
    arrays. With ``equal_steps`` (the default) every rank yields the same number of
    batches, so collective training steps never wait for a rank that ran out; the rows
    a rank could not use are logged on ``sparkhydrogen.data``. ``shuffle`` mixes rows in a
    buffer of ``shuffle_buffer`` rows seeded by ``(seed, rank, epoch)``. ``cache=True``
    keeps the rank's rows in memory so the batches can be iterated for more epochs.

    Example:
        >>> def train():                                                       # doctest: +SKIP
        ...     batches = sparkhydrogen.data.numpy_batches(256, columns=["x", "y"], cache=True)
        ...     for epoch in range(3):
        ...         for batch in batches:
        ...             step(batch["x"], batch["y"])
        >>> sparkhydrogen.run(train, 2, data=df)                               # doctest: +SKIP
    """
    options = FeedOptions(batch_size=batch_size, columns=columns,
                          shuffle=shuffle, shuffle_buffer=shuffle_buffer, drop_last=drop_last,
                          equal_steps=equal_steps, seed=seed, cache=cache)
    return from_context(options)
