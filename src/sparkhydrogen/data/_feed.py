"""The rank's data as batches: :class:`FeedOptions`, :class:`Batches` and :func:`numpy_batches`."""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import DEFAULT_CACHE_MEMORY
from ..errors import LaunchError
from ._batching import Agree, agreed, equal_steps, rebatch, shuffle
from ._convert import Chunk, chunk_rows, to_chunk
from ._exchange import Exchange, Received, exchange_host, gang_exchange
from ._replay import NUMPY, Form, Gathered, InOrder, joinable, shuffled_order
from ._state import Fingerprint, LoaderState, check_same_feed, share_changed
from ._store import ShareStore

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
        cache: keep this rank's rows so the batches can be iterated again (epochs): in memory up to
            ``spark.hydrogen.data.cacheMemoryBudget``, the rest in a spill file on local disk. A share
            held in memory is prepared once for the later epochs, if that fits the budget too (see
            :mod:`sparkhydrogen.data._replay`; unshuffled, their numpy batches are read-only).
        cache_memory: this loader's memory budget in bytes instead of that key's (0: spill it all).
        global_shuffle: from the second epoch on, redistribute the cached rows across the ranks each epoch
            (peer to peer, seeded by ``(seed, epoch)``), then shuffle them in the rank; needs ``cache`` and
            implies ``shuffle``.
    """

    batch_size: int
    columns: Sequence[str] | None = None
    shuffle: bool = False
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    drop_last: bool = False
    equal_steps: bool = True
    seed: int = 0
    cache: bool = False
    cache_memory: int | None = None
    global_shuffle: bool = False

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
        for flag in ("shuffle", "drop_last", "equal_steps", "cache", "global_shuffle"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        memory = self.cache_memory
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, numbers.Integral)
                                   or memory < 0):
            raise ValueError(f"cache_memory must be a number of bytes >= 0 (or None: the Spark conf's), got {memory!r}")
        if self.global_shuffle:
            if not self.cache:
                raise ValueError("global_shuffle=True redistributes the cached rows across the ranks each epoch: "
                                 "pass cache=True too")
            object.__setattr__(self, "shuffle", True)  # the rows received are shuffled in the rank


class Batches:
    """This rank's rows as batches (``dict`` of column name -> ``numpy.ndarray``), streamed; resumable.

    The rank's data is a one-pass stream: iterating a second time needs ``cache=True``,
    which keeps the rank's rows during the first pass (in memory up to ``memory_budget``
    bytes, the rest in a spill file on local disk) and replays them, reshuffled per epoch
    with ``shuffle=True``. With ``equal_steps`` every rank yields the same number of
    batches: ``agree(ready, ended)`` is one collective per window of steps (see
    :func:`~sparkhydrogen.data._batching.equal_steps`), and a later cached epoch replays
    the first epoch's step count without asking.

    :meth:`state_dict` says where the loader stands (epoch, batches handed out in it, what
    decides the order); a new loader given it by :meth:`load_state_dict` (after a gang
    retry) continues with the very next batch, in the order an uninterrupted run has.

    With ``global_shuffle``, each epoch after the first replays the rows ``exchange(epoch,
    store)`` brought to this rank (see :mod:`sparkhydrogen.data._exchange`) instead of its own.

    A later epoch of a share held wholly in memory comes from the share prepared once when the
    second pass starts, if that fits the budget too (:mod:`sparkhydrogen.data._replay`):
    unshuffled, the same batches every epoch (numpy: read-only views of the cache); shuffled,
    one gather per batch, in exactly the order the Arrow path gives.

    Made by :func:`numpy_batches` in a rank; ``source`` (a callable giving the
    ``pyarrow.RecordBatch`` es), ``agree`` and ``exchange`` let tests feed it directly.
    """

    def __init__(self, source: Callable[[], Iterable[Any]], options: FeedOptions, *,
                 agree: Agree | None = None, rank: int = 0, world_size: int = 1,
                 memory_budget: int = DEFAULT_CACHE_MEMORY, spill_dir: str | None = None,
                 exchange: Exchange | None = None) -> None:
        self.options = options
        self.rank = rank
        self.world_size = world_size
        self._source = source
        self._agree = agree if options.equal_steps else None
        self._exchange = exchange if options.global_shuffle else None
        self._received: Received | None = None
        self._raw: Iterator[Any] | None = None
        self._converted: Iterator[Chunk] | None = None
        self._peeked: list[Chunk] = []
        budget = memory_budget if options.cache_memory is None else int(options.cache_memory)
        self.store: ShareStore | None = ShareStore(budget, spill_dir) if options.cache else None
        self._fingerprint = Fingerprint()
        self._expect: LoaderState | None = None  # a loaded state whose share is still to be compared
        self._resume: LoaderState | None = None  # a loaded state the next pass starts from
        self._rows_in = 0
        self._passes = 0
        self._complete = False
        self._next_epoch = 0
        self._epoch = 0
        self._position = 0
        self._open_pass = False
        #: batches per epoch, known once a first pass reached its end
        self.steps: int | None = None
        self._fast: InOrder | Gathered | None = None  # later epochs without Arrow (see _replay)
        self._fast_off = False  # the share cannot be held twice, or a consumer changes shared batches

    # the stream ------------------------------------------------------------
    def _open(self) -> Iterator[Chunk]:
        if self._converted is None:
            self._raw = iter(self._source())
            self._converted = self._convert(self._raw)
        return self._converted

    def _convert(self, raw: Iterator[Any]) -> Iterator[Chunk]:
        columns = self.options.columns
        for batch in raw:
            self._rows_in += int(batch.num_rows)
            chunk = to_chunk(batch, columns)
            self._fingerprint.add(chunk)
            if self._expect is not None:
                self._compare(ended=False)
            if self.store is not None:
                self.store.append(batch.select(list(columns)) if columns is not None else batch, chunk)
            yield chunk
        if self._expect is not None:
            self._compare(ended=True)
        if self.store is not None:
            self.store.finish()

    def _compare(self, *, ended: bool) -> None:
        """Compare the share read so far with the loaded state's fingerprint once as much was read."""
        expect, print_ = self._expect, self._fingerprint
        if expect is None:
            return
        if print_.chunks < expect.chunks and not ended:
            return
        same = (print_.chunks == expect.chunks and print_.rows == expect.rows
                and (expect.chunks == 0 or print_.hexdigest() == expect.digest))
        if expect.complete and same and not ended:
            return  # all of it must match: wait for the end of the stream
        if not same or (expect.complete and print_.chunks != expect.chunks):
            raise share_changed(expect, print_.chunks, print_.rows, print_.hexdigest(), ended=ended)
        self._expect = None
        log.info("rank %d: the share read again matches the saved loader state (%d rows in %d batches)",
                 self.rank, print_.rows, print_.chunks)

    def _drain(self) -> None:
        """Read the rest of the stream (into the cache, or just counting rows), for the epoch's tally."""
        if self.store is not None and self._converted is not None:
            for _ in self._converted:
                pass
        elif self._raw is not None:
            for batch in self._raw:
                self._rows_in += int(batch.num_rows)

    def peek(self) -> Chunk | None:
        """The first non-empty chunk of rows (as numpy), without taking it from the first pass; ``None``: no rows.

        Loaders use it to learn the columns' types and shapes before iterating.
        """
        if self.store is not None and self._complete:
            return next((c for c in map(self.store.chunk, range(len(self.store))) if chunk_rows(c)), None)
        if self._passes:
            raise LaunchError("peek() must come before the first pass over this rank's batches")
        if not self._peeked:
            for chunk in self._open():
                if chunk_rows(chunk):
                    self._peeked.append(chunk)
                    break
        return self._peeked[0] if self._peeked else None

    def close(self) -> None:
        """Drop the cache and its spill file (the rank's end does this too)."""
        self._drop_received()
        self._fast = None
        if self.store is not None:
            self.store.close()

    def _drop_received(self) -> None:
        if self._received is not None:
            self._received.close()
            self._received = None

    # state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where this loader stands, as plain values for ``ctx.checkpoint(...)``: epoch, position, seed, share.

        ``position`` batches of epoch ``epoch`` (counted from 0) were handed out; after a
        finished epoch it is the next epoch at position 0. Keys: ``epoch``, ``position``,
        ``seed``, ``rank``, ``world_size``, ``batch_size``, ``shuffle``, ``drop_last``,
        ``equal_steps``, ``steps`` (batches per epoch, once known), ``chunks``/``rows``/``digest``
        (a fingerprint of the share read so far), ``complete``, ``version``.

        Example:
            >>> state = ctx.restore()                                        # doctest: +SKIP
            >>> if state: loader.load_state_dict(state["loader"])            # doctest: +SKIP
            >>> for batch in loader:                                         # doctest: +SKIP
            ...     step(batch); ctx.checkpoint({"model": ..., "loader": loader.state_dict()})
        """
        if self._resume is not None:
            epoch, position = self._resume.epoch, self._resume.position
        elif self._open_pass:
            epoch, position = self._epoch, self._position
        else:
            epoch, position = self._next_epoch, 0
        print_ = self._fingerprint
        return self._describe(epoch, position, print_.chunks, print_.rows, print_.hexdigest()).to_dict()

    def _describe(self, epoch: int, position: int, chunks: int, rows: int, digest: str) -> LoaderState:
        opts = self.options
        return LoaderState(epoch=epoch, position=position, seed=opts.seed, rank=self.rank,
                           world_size=self.world_size, batch_size=opts.batch_size, shuffle=opts.shuffle,
                           drop_last=opts.drop_last, equal_steps=opts.equal_steps,
                           global_shuffle=opts.global_shuffle, steps=self.steps,
                           chunks=chunks, rows=rows, digest=digest,
                           complete=self.store is not None and self._complete)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where ``state`` (a :meth:`state_dict` of the same loader in an earlier attempt) stood.

        Call it before iterating. The next pass is epoch ``state["epoch"]`` from its batch
        ``state["position"]``: the share is read again from Spark (the batches before the
        position are made and dropped; in a later epoch the whole share is read into the
        cache first), compared with the state's fingerprint (a share that came back
        different raises :class:`~sparkhydrogen.errors.LaunchError`), and the batches then
        follow in the order the uninterrupted run had.
        """
        saved = LoaderState.from_dict(state)
        check_same_feed(saved, self._describe(0, 0, 0, 0, ""))
        if self._passes:
            raise LaunchError("load_state_dict() must come before the first pass over this rank's batches (make "
                              "the loader, load its state, then iterate)")
        if saved.epoch > 0 and self.store is None:
            raise ValueError(f"the loader state is in epoch {saved.epoch}, which only a loader with cache=True has "
                             "(a loader without it reads its share once): make this one with cache=True too")
        if saved.epoch > 0 and saved.equal_steps and saved.steps is None and self._agree is not None:
            raise ValueError("the loader state is past its first epoch but holds no step count: it is damaged")
        self._expect = saved
        self._compare(ended=False)  # a peek may already have read as much
        self._resume = saved
        self._next_epoch = saved.epoch

    # passes ----------------------------------------------------------------
    def __iter__(self) -> Iterator[Chunk]:
        return self.iterate(NUMPY)

    def iterate(self, form: Form) -> Iterator[Any]:
        """One pass (an epoch), each batch in ``form`` (:data:`~sparkhydrogen.data._replay.NUMPY` when iterated).

        The framework loaders pass their own form (torch tensors) so that a later epoch of a
        share held in memory hands out batches converted once (see :mod:`sparkhydrogen.data._replay`).
        """
        resume, self._resume = self._resume, None
        epoch, skip = (resume.epoch, resume.position) if resume is not None else (self._next_epoch, 0)
        if self._passes == 0:
            if epoch == 0:
                stream = self._first_pass(skip, form)
            elif resume is not None:  # a loaded state past the first epoch
                stream = self._resumed_replay(resume, form)
            else:
                raise LaunchError(f"epoch {epoch} before a first pass: the loader's state is inconsistent")
        else:
            if self.store is None:
                raise LaunchError(
                    "this rank's data is a one-pass stream and was already iterated: pass cache=True to keep the "
                    "rank's rows (in memory, spilling to local disk above the budget) for more epochs, or launch "
                    "the gang again"
                )
            if not self._complete:
                raise LaunchError(
                    "the first pass over this rank's batches stopped before the end of its data, so the cache is "
                    "incomplete: finish the first epoch (iterate until the batches run out) before starting another"
                )
            stream = self._replay(epoch, skip, form)
        self._passes += 1
        self._next_epoch = epoch + 1
        self._epoch, self._position, self._open_pass = epoch, skip, True
        return self._track(stream, self._passes)

    def _track(self, stream: Iterator[Any], token: int) -> Iterator[Any]:
        """``stream``, counting the batches handed out while it is the current pass (``token``)."""
        try:
            for batch in stream:
                if self._passes == token:
                    self._position += 1
                yield batch
        finally:
            if self._passes == token:  # an older pass closed late leaves the current one alone
                self._open_pass = False

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.options.seed, self.rank, epoch])

    def _pipeline(self, chunks: Iterable[Chunk], epoch: int) -> Generator[Chunk, None, None]:
        opts = self.options
        if opts.shuffle:
            chunks = shuffle(chunks, opts.shuffle_buffer, self._rng(epoch))
        return rebatch(chunks, opts.batch_size, drop_last=opts.drop_last)

    def _skip(self, stream: Iterator[Chunk], count: int) -> int:
        """Make and drop the first ``count`` batches of ``stream`` (a resumed pass); the rows they held."""
        rows = 0
        for _ in range(count):
            batch = next(stream, None)
            if batch is None:
                print_ = self._fingerprint
                raise share_changed(self._expect or self._describe(0, count, 0, 0, ""), print_.chunks,
                                    print_.rows, print_.hexdigest(), ended=True)
            rows += chunk_rows(batch)
        return rows

    def _first_pass(self, skip: int, form: Form) -> Iterator[Any]:
        batch = form.batch
        for chunk in self._first_chunks(skip):
            yield batch(chunk)

    def _first_chunks(self, skip: int) -> Iterator[Chunk]:
        converted = self._open()
        peeked, self._peeked = self._peeked, []
        stream = self._pipeline(_chain(peeked, converted), 0)
        skipped = self._skip(stream, skip)
        if self._agree is None:
            steps, rows = skip, skipped
            for batch in stream:
                steps += 1
                rows += chunk_rows(batch)
                yield batch
            self._end_of_pass(steps, rows, equal=False)
            return
        yield from equal_steps(stream, self._agree,
                               lambda steps, rows: self._end_of_pass(skip + steps, skipped + rows, equal=True))

    def _end_of_pass(self, steps: int, rows: int, *, equal: bool) -> None:
        self._drain()
        self._complete = True
        self.steps = steps  # later epochs convert the complete share once when the first of them starts (_replay)
        unused = self._rows_in - rows
        level = logging.INFO if unused and equal else logging.DEBUG
        log.log(level, "rank %d: %d batches (%d rows) of its %d rows; %d rows left unused%s", self.rank, steps,
                rows, self._rows_in, unused, " to keep the ranks' step counts equal" if equal else "")

    def _resumed_replay(self, resume: LoaderState, form: Form) -> Iterator[Any]:
        """A loaded state past the first epoch: read the whole share into the cache, then replay from there."""
        started = time.monotonic()
        for _ in _chain(self._peeked, self._open()):
            pass
        self._peeked = []
        self._complete = True
        opts = self.options
        own = self._rows_in // opts.batch_size if opts.drop_last else -(-self._rows_in // opts.batch_size)
        if self._agree is not None and resume.steps is not None:
            if own < resume.steps:
                print_ = self._fingerprint
                raise share_changed(resume, print_.chunks, print_.rows, print_.hexdigest(), ended=True)
            self.steps = resume.steps  # agreed by the gang in the first attempt: nothing to ask
        else:
            self.steps = own
        log.info("rank %d: resuming epoch %d at batch %d after reading its %d rows again (%.2f s)", self.rank,
                 resume.epoch, resume.position, self._rows_in, time.monotonic() - started)
        yield from self._replay(resume.epoch, resume.position, form)

    def _fast_replay(self, form: Form) -> InOrder | Gathered | None:
        """The share converted once for later epochs in ``form`` (made now if need be), or ``None``: use Arrow.

        Only for a complete share held wholly in memory whose conversion fits the cache's
        memory budget beside it (a second copy, or for unshuffled numpy batches only the
        batches that span two cached chunks), and not with a global shuffle (each epoch
        brings other rows).
        """
        store = self.store
        if self._fast is not None and self._fast.form is form:
            return self._fast
        self._fast = None
        if (self._fast_off or store is None or not self._complete or store.spilled_chunks
                or self._exchange is not None):
            return None
        opts = self.options
        copies = opts.shuffle or not form.share_views
        if copies and 2 * store.memory_bytes > store.budget:
            self._no_fast(store.memory_bytes)
            return None
        started = time.monotonic()
        chunks = joinable([store.chunk(i) for i in range(len(store))])
        if chunks is None:
            self._fast_off = True
            return None
        fast: InOrder | Gathered
        if opts.shuffle:
            fast = Gathered(chunks, form, opts.batch_size, drop_last=opts.drop_last)
        elif copies:
            fast = InOrder.copied(chunks, form, opts.batch_size, drop_last=opts.drop_last)
        else:
            fast = InOrder.views(chunks, opts.batch_size, drop_last=opts.drop_last)
            if store.memory_bytes + fast.nbytes > store.budget:
                self._no_fast(fast.nbytes)
                return None
        self._fast = fast
        log.debug("rank %d: the share converted once for later epochs (%s, %d rows, %d bytes beside the cache, "
                  "%.3f s)", self.rank, type(fast).__name__, store.rows, fast.nbytes, time.monotonic() - started)
        return fast

    def _no_fast(self, extra: int) -> None:
        self._fast_off = True
        budget = self.store.budget if self.store is not None else 0
        log.info("rank %d: later epochs cut batches from the cached Arrow rows: the share converted for them "
                 "(%d bytes) does not fit the cache's memory budget (%d bytes) beside the cache", self.rank, extra,
                 budget)

    def _replay(self, epoch: int, skip: int, form: Form) -> Iterator[Any]:
        store = self.store
        if store is None:  # __iter__ checked it
            raise LaunchError("a replay needs cache=True")
        self._drop_received()
        limit = self.steps if self._agree is not None else None
        fast = self._fast_replay(form)
        if isinstance(fast, InOrder) and fast.changed():
            log.warning("rank %d: a batch the loader hands out again in every epoch was changed in place; from epoch "
                        "%d on the loader makes each epoch's batches afresh from its cache (to keep the faster "
                        "replay, change a copy: x = batch['x'].clone())", self.rank, epoch)
            self._fast, self._fast_off, fast = None, True, None
        if isinstance(fast, InOrder):
            yield from fast.batches(skip, limit)
            return
        if isinstance(fast, Gathered):
            rows = [chunk_rows(store.chunk(i)) for i in range(len(store))]
            chunk_order = self._rng(epoch).permutation(len(store)).tolist()
            order = shuffled_order(rows, chunk_order, self.options.shuffle_buffer, self._rng(epoch))
            yield from fast.batches(order, skip, limit)
            return
        yield from map(form.batch, self._arrow_replay(epoch, skip, limit))

    def _arrow_replay(self, epoch: int, skip: int, limit: int | None) -> Iterator[Chunk]:
        """A later epoch cut from the cached Arrow chunks (or from the rows a global shuffle brought)."""
        store = self.store
        if store is None:  # __iter__ checked it
            raise LaunchError("a replay needs cache=True")
        source: ShareStore | Received = store
        if self._exchange is not None and epoch > 0:
            self._received = source = self._exchange(epoch, store)
            opts = self.options
            limit = source.steps(opts.batch_size, opts.drop_last) if opts.equal_steps else None
        order: Iterable[int] = range(len(source))
        if self.options.shuffle:
            order = self._rng(epoch).permutation(len(source)).tolist()
        stream = self._pipeline(map(source.chunk, order), epoch)
        try:
            self._skip(stream, skip)
            taken = skip
            for batch in stream:
                if limit is not None and taken >= limit:
                    break
                taken += 1
                yield batch
        finally:
            stream.close()


def _chain(first: list[Chunk], rest: Iterator[Chunk]) -> Iterator[Chunk]:
    yield from first
    yield from rest


def gang_agree(ctx: BarrierTaskContext) -> Agree:
    """``agree(ready, ended)`` over the gang: one ``allGather`` of every rank's report, then :func:`agreed`."""

    def agree(ready: int, ended: bool) -> tuple[int, bool]:
        return agreed(ctx.allGather((int(ready), bool(ended))))

    return agree


def from_context(options: FeedOptions) -> Batches:
    """:class:`Batches` over the running rank's ``ctx.batches()``, agreeing over the gang.

    The cache's memory budget is ``spark.hydrogen.data.cacheMemoryBudget`` (carried to the
    rank in its task spec); the cache and its spill file go when the rank ends.
    """
    from ..context import BarrierTaskContext
    from ..task.data import at_rank_end
    from ..task.lifecycle import rank_spec

    ctx = BarrierTaskContext.get()
    world = ctx.worldSize()
    spec = rank_spec()
    budget = spec.data_cache_memory if spec is not None else DEFAULT_CACHE_MEMORY
    if options.cache_memory is not None:
        budget = int(options.cache_memory)
    agree = gang_agree(ctx) if options.equal_steps and world > 1 else None
    exchange = None
    if options.global_shuffle and world > 1:
        exchange = gang_exchange(ctx.allGather, rank=ctx.rank(), world_size=world, seed=options.seed,
                                 host=exchange_host(spec.host if spec is not None else None), memory_budget=budget)
    batches = Batches(ctx.batches, options, agree=agree, rank=ctx.rank(), world_size=world, memory_budget=budget,
                      exchange=exchange)
    if batches.store is not None:
        at_rank_end(batches.close)
    return batches


def numpy_batches(batch_size: int, *, columns: Sequence[str] | None = None, shuffle: bool = False,
                  drop_last: bool = False, equal_steps: bool = True, seed: int = 0,
                  shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, cache: bool = False,
                  cache_memory: int | None = None, global_shuffle: bool = False) -> Batches:
    """This rank's share of ``data=`` as batches of ``batch_size`` rows: ``dict`` column -> ``numpy.ndarray``.

    Call it inside a rank of ``sparkhydrogen.run(fn, n, data=df)`` (or a launcher with
    ``data=``). Fixed-length list columns (e.g. ``vector_to_array(features)``) become 2-D
    arrays. With ``equal_steps`` (the default) every rank yields the same number of
    batches, so collective training steps never wait for a rank that ran out; the rows
    a rank could not use are logged on ``sparkhydrogen.data``. ``shuffle`` mixes rows in a
    buffer of ``shuffle_buffer`` rows seeded by ``(seed, rank, epoch)``. ``cache=True``
    keeps the rank's rows so the batches can be iterated for more epochs: in memory up to
    ``cache_memory`` bytes (default: ``spark.hydrogen.data.cacheMemoryBudget``, 1 GiB), the
    rest in an Arrow file under Spark's local dirs, read back a batch at a time. With
    ``shuffle=False``, later epochs of a share held in memory hand out the same read-only
    arrays every epoch (copy one before changing it in place; see docs/data.md). The
    batches have :meth:`Batches.state_dict` / :meth:`Batches.load_state_dict` to resume
    mid-epoch after a gang retry.
    ``global_shuffle=True`` (with ``cache=True``) also moves rows between ranks: from the
    second epoch on, each epoch every rank's cached rows are redistributed across the ranks
    peer to peer (never through the driver), by a seeded function of ``(seed, epoch)``, and
    shuffled in the rank; see docs/data.md, "Global shuffle", for its cost.

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
                          equal_steps=equal_steps, seed=seed, cache=cache, cache_memory=cache_memory,
                          global_shuffle=global_shuffle)
    return from_context(options)
