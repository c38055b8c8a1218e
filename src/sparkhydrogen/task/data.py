"""A rank's share of the gang's data (``run(fn, n, data=df)``), read through ``BarrierTaskContext.get().batches()``.

The share is the task's own input, streamed by Spark as the rank reads it: Arrow
record batches for a DataFrame (``spark.sql.execution.arrow.maxRecordsPerBatch`` rows
each), the elements of the partitions for an RDD. It is read once; nothing is kept.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import LaunchError

log = logging.getLogger("sparkhydrogen.data")

__all__ = ["RankData", "RDD_BATCH_ROWS", "as_record", "at_rank_end", "fed", "fed_messages", "record_batches"]

#: Rows per record batch that :meth:`RankData.batches` builds from an RDD's elements.
RDD_BATCH_ROWS = 10_000


def as_record(element: Any) -> dict[str, Any]:
    """One RDD element as a record for Arrow: a Row or dict as it is, a tuple as ``_1, _2, ...``, else ``value``.

    >>> as_record({"x": 1}), as_record((1, "a")), as_record(3.5)
    ({'x': 1}, {'_1': 1, '_2': 'a'}, {'value': 3.5})
    """
    as_dict = getattr(element, "asDict", None)
    if callable(as_dict):
        return dict(as_dict())
    if isinstance(element, dict):
        return element
    if isinstance(element, (tuple, list)):
        return {f"_{i + 1}": v for i, v in enumerate(element)}
    return {"value": element}


class RankData:
    """This rank's share of the gang's data: one pass, as Arrow record batches or as rows.

    ``arrow`` says the source yields ``pyarrow.RecordBatch`` (a DataFrame's), else it
    yields an RDD's elements.
    """

    def __init__(self, source: Iterable[Any], *, arrow: bool) -> None:
        self._source = source
        self.arrow = arrow
        self._taken: str | None = None
        self._stream: Iterator[Any] | None = None
        self.rows_read = 0
        self.closers: list[Callable[[], None]] = []  # run when the rank ends (loaders' caches and spill files)

    def close(self) -> None:
        """Run what was registered to run at the rank's end (every one, whatever the others raise)."""
        closers, self.closers = self.closers, []
        for closer in closers:
            try:
                closer()
            except Exception as exc:  # cleanup must not mask the rank's own outcome
                log.warning("rank-end cleanup %r failed: %s", closer, exc)

    def _take(self, method: str) -> Iterator[Any]:
        if self._taken is not None:
            raise LaunchError(
                f"this rank's data was already read by {self._taken}(): the share is streamed once and not kept; "
                "keep what you need from the first pass (e.g. list(ctx.batches())), or use a loader with cache=True"
            )
        self._taken = method
        self._stream = iter(self._source)
        return self._stream

    def drain(self) -> int:
        """Read and drop what the rank left unread; returns how many batches (or elements) that was.

        Spark reuses a task's Python worker only when the task consumed its whole input:
        a share left half-read would cost a new worker (about a second) on the next task.
        """
        stream = self._stream if self._stream is not None else iter(self._source)
        self._stream = stream
        self._taken = self._taken or "drain"
        return sum(1 for _ in stream)

    def batches(self) -> Iterator[Any]:
        """``pyarrow.RecordBatch`` after ``RecordBatch`` of this rank's share (a second read raises at once)."""
        return self._batches(self._take("batches"))

    def _batches(self, source: Iterator[Any]) -> Iterator[Any]:
        if self.arrow:
            for batch in source:
                self.rows_read += batch.num_rows
                yield batch
            return
        import pyarrow as pa

        while True:
            chunk = [as_record(e) for e in itertools.islice(source, RDD_BATCH_ROWS)]
            if not chunk:
                return
            self.rows_read += len(chunk)
            yield pa.RecordBatch.from_pylist(chunk)

    def rows(self) -> Iterator[Any]:
        """Row after row of this rank's share: an RDD's elements, or a DataFrame's rows as dicts."""
        return self._rows(self._take("rows"))

    def _rows(self, source: Iterator[Any]) -> Iterator[Any]:
        if not self.arrow:
            for element in source:
                self.rows_read += 1
                yield element
            return
        for batch in source:
            self.rows_read += batch.num_rows
            yield from batch.to_pylist()


def fed(fn: Callable[[int, Iterable[Any]], Iterable[Any]], arrow: bool, rank: int,
        rows: Iterable[Any]) -> Iterator[Any]:
    """Rank body: ``fn(rank, ())`` while the running context serves ``rows`` as this rank's data share.

    Placements hand it to Spark as ``functools.partial(fed, fn, arrow)``.
    """
    from ..context import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    data = ctx._data = RankData(rows, arrow=arrow)
    try:
        yield from fn(rank, ())
        data.drain()  # the worker is reused only after its whole input was read
    finally:
        ctx._data = None
        data.close()


def at_rank_end(closer: Callable[[], None]) -> None:
    """Run ``closer`` when the running rank's data share ends (its function returned or failed).

    Outside a rank fed by ``data=`` nothing is registered (the caller cleans up itself).
    """
    from ..context import BarrierTaskContext

    data = BarrierTaskContext.get()._data
    if isinstance(data, RankData):
        data.closers.append(closer)


def record_batches(schema: bytes, messages: Iterable[bytes]) -> Iterator[Any]:
    """Arrow record-batch messages (IPC, as ``Dataset.toArrowBatchRdd`` makes them) as ``pyarrow.RecordBatch`` es.

    Each batch's buffers are views of its message (no copy). ``schema`` is the serialized
    Arrow schema the messages were written with.

    >>> import pyarrow as pa
    >>> rb = pa.RecordBatch.from_pydict({"x": [1.0, 2.0]})
    >>> [b.to_pydict() for b in record_batches(rb.schema.serialize().to_pybytes(), [rb.serialize().to_pybytes()])]
    [{'x': [1.0, 2.0]}]
    """
    import pyarrow as pa

    arrow_schema = pa.ipc.read_schema(pa.py_buffer(schema))
    for message in messages:
        yield pa.ipc.read_record_batch(pa.py_buffer(message), arrow_schema)


def fed_messages(fn: Callable[[int, Iterable[Any]], Iterable[Any]], schema: bytes, rank: int,
                 messages: Iterable[bytes]) -> Iterator[Any]:
    """:func:`fed` over a share that comes as Arrow record-batch messages of ``schema`` (``GangData.arrow_schema``)."""
    return fed(fn, True, rank, record_batches(schema, messages))
