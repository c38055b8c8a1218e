"""Later epochs of a share cached in memory, without Arrow: the share prepared once, each batch cut or gathered.

A cached epoch used to re-cut, copy and convert every batch from the cached Arrow chunks. When
the whole share sits in memory, the loader prepares it once, when the second pass starts, as
one of these (if that fits the cache's memory budget beside the cache):

* :class:`InOrder` (``shuffle=False``): every later epoch hands out the same batches, made
  once. Nothing is copied per batch, so a :class:`Form` decides how they are protected: numpy
  batches are read-only views of the cached chunks themselves (:meth:`InOrder.views`); torch
  has no read-only tensors, so the share is copied once into one contiguous tensor per column
  and the batches are views of those, whose version counters are checked before each epoch
  (:meth:`InOrder.copied`, :meth:`InOrder.changed`).
* :class:`Gathered` (``shuffle=True``): the scalar columns of each dtype side by side in one
  row-major block (a row's values in one cache line or two), other columns as they are;
  each batch is one gather per block (``numpy.take`` with the epoch's order) and one
  transpose, a fresh batch the consumer owns. The order is exactly the one the
  Arrow path's chunk permutation and shuffle buffer give (:func:`shuffled_order`): the
  shuffle draws depend on the rows' counts only, never on their values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ._batching import rebatch, shuffle
from ._convert import Chunk, chunk_rows

__all__ = ["NUMPY", "Form", "Gathered", "InOrder", "batch_bounds", "joinable", "shuffled_order"]


class Form(Protocol):
    """How a loader hands out a batch (numpy arrays, torch tensors, ...) made from numpy columns."""

    #: later unshuffled epochs may hand out read-only views of the cached chunks themselves (no copy)
    share_views: bool

    def batch(self, chunk: Chunk) -> Any:
        """A batch the consumer owns (fresh arrays) in this form; may share the arrays' memory."""

    def columns(self, share: Chunk) -> dict[str, Any]:
        """The share's contiguous columns in this form, to be cut into batches shared by every later epoch."""

    def version(self, column: Any) -> int:
        """A counter that changes when ``column`` (or a view of it) is changed in place (0: it cannot be)."""


class _Numpy:
    """numpy batches (also what JAX and tf.data take): shared columns are read-only."""

    share_views = True

    def batch(self, chunk: Chunk) -> Chunk:
        return chunk

    def columns(self, share: Chunk) -> dict[str, Any]:
        for array in share.values():
            array.flags.writeable = False  # and so every view cut from it: a write raises, later epochs stay intact
        return dict(share)

    def version(self, column: Any) -> int:
        return 0


#: The numpy form: what :class:`~sparkhydrogen.data.Batches` yields when iterated.
NUMPY: Form = _Numpy()


def joinable(chunks: Sequence[Chunk]) -> list[Chunk] | None:
    """The chunks with rows, if their columns can be joined into one array each; else ``None``.

    ``None`` when there are no rows, or when the columns, a column's dtype or its row shape
    differ between chunks (the Arrow path then runs as before and names the problem).

    >>> len(joinable([{"x": np.arange(2)}, {"x": np.arange(0)}])), joinable([{"x": np.arange(2)}, {"x": np.ones(1)}])
    (1, None)
    """
    full = [c for c in chunks if chunk_rows(c)]
    if not full:
        return None
    first = full[0]
    for chunk in full[1:]:
        if list(chunk) != list(first):
            return None
        for name, array in chunk.items():
            if array.dtype != first[name].dtype or array.shape[1:] != first[name].shape[1:]:
                return None
    return full


def batch_bounds(rows: int, batch_size: int, drop_last: bool) -> list[tuple[int, int]]:
    """``(start, stop)`` of each batch over ``rows`` rows in order (the last one shorter, or dropped).

    >>> batch_bounds(5, 2, False), batch_bounds(5, 2, True)
    ([(0, 2), (2, 4), (4, 5)], [(0, 2), (2, 4)])
    """
    stops = range(batch_size, rows + (0 if drop_last else batch_size - 1) + 1, batch_size)
    return [(stop - batch_size, min(stop, rows)) for stop in stops]


class InOrder:
    """Unshuffled later epochs: the same batches every epoch, made once (see :meth:`copied` and :meth:`views`).

    Example:
        >>> replay = InOrder.views([{"x": np.arange(3)}, {"x": np.arange(3, 5)}], 2, drop_last=False)
        >>> [b["x"].tolist() for b in replay.batches(0, None)], replay.changed(), replay.nbytes
        ([[0, 1], [2, 3], [4]], False, 16)
    """

    def __init__(self, batches: list[dict[str, Any]], bases: list[Any], form: Form, nbytes: int) -> None:
        """``batches`` in order; ``bases``: the arrays they view, whose versions :meth:`changed` compares."""
        self.form = form
        self._batches = batches
        self._bases = bases
        self._versions = self._read_versions()
        #: memory held beside the cached chunks
        self.nbytes = nbytes

    @classmethod
    def copied(cls, chunks: Sequence[Chunk], form: Form, batch_size: int, *, drop_last: bool) -> InOrder:
        """One contiguous copy of each column (``chunks``: with rows, one layout, see :func:`joinable`),
        in ``form``; every batch a set of views of those, made once (torch: they share the columns'
        version counters, so an in-place change to any batch shows in :meth:`changed`)."""
        share = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
        columns = form.columns(share)
        rows = chunk_rows(share)
        cuts = {name: _cut(column, rows, batch_size, drop_last) for name, column in columns.items()}
        batches = [dict(zip(cuts, views, strict=True)) for views in zip(*cuts.values(), strict=True)]
        return cls(batches, list(columns.values()), form, sum(int(a.nbytes) for a in share.values()))

    @classmethod
    def views(cls, chunks: Sequence[Chunk], batch_size: int, *, drop_last: bool) -> InOrder:
        """numpy batches that are read-only views of the cached chunks (a batch spanning two: one joined copy).

        The chunks' own arrays are made read-only too, so no view of them can be made writable again.
        """
        for chunk in chunks:
            for array in chunk.values():
                array.flags.writeable = False
        batches = list(rebatch(chunks, batch_size, drop_last=drop_last, copy=False))
        joined = 0
        for batch in batches:
            for array in batch.values():
                if array.base is None:  # a join of two chunks' rows: memory of its own
                    joined += int(array.nbytes)
                    array.flags.writeable = False
        return cls(batches, [], NUMPY, joined)

    def _read_versions(self) -> list[int]:
        return [self.form.version(base) for base in self._bases]

    def changed(self) -> bool:
        """Whether a column was changed in place since the batches were made (by a consumer, through a batch)."""
        return self._read_versions() != self._versions

    def batches(self, skip: int, limit: int | None) -> Iterator[Any]:
        """Batches ``skip`` to ``limit`` (``None``: the last), each a new ``dict`` of the shared views."""
        for batch in self._batches[skip:limit]:
            yield dict(batch)


def _cut(column: Any, rows: int, batch_size: int, drop_last: bool) -> list[Any]:
    """``column`` (numpy array or tensor) cut into batches: views, made by one reshape for the full batches."""
    full = rows // batch_size
    shape = tuple(column.shape[1:])
    views = list(column[:full * batch_size].reshape(full, batch_size, *shape))  # a tensor iterates by unbind(0)
    if rows > full * batch_size and not drop_last:
        views.append(column[full * batch_size:])
    return views


def shuffled_order(rows: Sequence[int], chunk_order: Sequence[int], buffer_rows: int,
                   rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """The row order a shuffled epoch hands out: chunks (of ``rows[i]`` rows) in ``chunk_order``, then the buffer.

    Runs :func:`~sparkhydrogen.data._batching.shuffle` over the rows' indices, so it draws
    from ``rng`` exactly as the shuffle over the rows themselves would, and gives the same order.

    >>> order = shuffled_order([2, 3], [1, 0], 2, np.random.default_rng(0))
    >>> sorted(order.tolist())
    [0, 1, 2, 3, 4]
    """
    starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
    pieces = ({"i": np.arange(starts[c], starts[c + 1], dtype=np.int64)} for c in chunk_order)
    out = [piece["i"] for piece in shuffle(pieces, buffer_rows, rng)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class Gathered:
    """Shuffled later epochs: each batch gathered from row-major blocks of the share by the epoch's order.

    Scalar columns of one dtype share a block of shape ``(rows, columns)``: a batch's gather
    reads each row once (whole cache lines), then one transpose gives every column its own
    contiguous array. Columns with more than one value per row are their own block.

    Example:
        >>> share = {"a": np.arange(4.0), "b": np.arange(4.0) * 10, "v": np.arange(8).reshape(4, 2)}
        >>> gathered = Gathered([share], NUMPY, 3, drop_last=False)
        >>> [{k: v.tolist() for k, v in b.items()} for b in gathered.batches(np.array([3, 0, 2, 1]), 0, None)][0]
        {'a': [3.0, 0.0, 2.0], 'b': [30.0, 0.0, 20.0], 'v': [[6, 7], [0, 1], [4, 5]]}
    """

    def __init__(self, chunks: Sequence[Chunk], form: Form, batch_size: int, *, drop_last: bool) -> None:
        """``chunks``: the share's chunks with rows, of one layout (:func:`joinable`)."""
        self.form = form
        self.batch_size, self.drop_last = batch_size, drop_last
        first = chunks[0]
        self.names = list(first)
        rows = sum(chunk_rows(c) for c in chunks)
        scalars: dict[np.dtype[Any], list[str]] = {}
        self._blocks: list[tuple[npt.NDArray[Any], Callable[[npt.NDArray[Any]], Chunk]]] = []
        for name, array in first.items():
            if array.ndim == 1 and array.dtype.kind in "biufc":
                scalars.setdefault(array.dtype, []).append(name)
            else:
                self._blocks.append((np.concatenate([c[name] for c in chunks]), _whole(name)))
        for dtype, names in scalars.items():
            block = np.empty((rows, len(names)), dtype=dtype)
            at = 0
            for chunk in chunks:  # a chunk's tile at a time: the transposing writes stay in cache
                end = at + chunk_rows(chunk)
                block[at:end].T[...] = np.stack([chunk[name] for name in names])
                at = end
            self._blocks.append((block, _split(names)))

    @property
    def nbytes(self) -> int:
        """Memory the blocks hold."""
        return sum(int(block.nbytes) for block, _ in self._blocks)

    def batches(self, order: npt.NDArray[np.int64], skip: int, limit: int | None) -> Iterator[Any]:
        """Batches ``skip`` to ``limit`` (``None``: the last) of the rows in ``order``, each fresh, in the form."""
        for start, stop in batch_bounds(len(order), self.batch_size, self.drop_last)[skip:limit]:
            index = order[start:stop]
            parts: Chunk = {}
            for block, split in self._blocks:
                parts.update(split(np.take(block, index, axis=0)))
            yield self.form.batch({name: parts[name] for name in self.names})


def _whole(name: str) -> Callable[[npt.NDArray[Any]], Chunk]:
    return lambda rows: {name: rows}


def _split(names: list[str]) -> Callable[[npt.NDArray[Any]], Chunk]:
    def split(rows: npt.NDArray[Any]) -> Chunk:
        columns = np.ascontiguousarray(rows.T)  # one copy: each column's values side by side
        return {name: columns[j] for j, name in enumerate(names)}
    return split
