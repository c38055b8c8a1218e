"""The pure stages of the feed: fixed-size batches, a bounded shuffle buffer, equal step counts across ranks.

Each stage is a generator over :data:`Chunk` s (column name -> numpy array, rows on the
first axis), so the whole pipeline holds at most one input chunk, the shuffle buffer and
one output batch.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import numpy as np

from ._convert import Chunk, chunk_rows

__all__ = ["rebatch", "shuffle", "equal_steps"]


def rebatch(chunks: Iterable[Chunk], batch_size: int, *, drop_last: bool = False) -> Generator[Chunk, None, None]:
    """Chunks of any sizes to batches of exactly ``batch_size`` rows; the last one shorter, or dropped.

    Every batch owns its arrays (contiguous, writable copies), so a consumer may keep or
    change them. A batch that lies inside one chunk is one copy per column of the chunk's
    rows (the chunk's arrays are views of the Arrow buffers: nothing else is copied); only
    a batch that spans chunks joins pieces. The columns' shapes are checked once per chunk.

    >>> import numpy as np
    >>> [len(b["x"]) for b in rebatch([{"x": np.arange(5)}, {"x": np.arange(4)}], 4)]
    [4, 4, 1]
    """
    pending: list[Chunk] = []  # pieces of earlier chunks, fewer than batch_size rows in all
    have = 0
    shapes: dict[str, tuple[int, ...]] | None = None
    for chunk in chunks:
        rows = chunk_rows(chunk)
        if rows == 0:
            continue
        shapes = _check_shapes(chunk, shapes)
        at = 0
        if have:  # finish the batch the earlier pieces started
            need = batch_size - have
            if rows < need:
                pending.append(chunk)
                have += rows
                continue
            pending.append({k: v[:need] for k, v in chunk.items()})
            yield _join(pending)
            pending, have, at = [], 0, need
        while rows - at >= batch_size:  # batches wholly inside this chunk: one copy per column
            end = at + batch_size
            yield {k: v[at:end].copy() for k, v in chunk.items()}
            at = end
        if at < rows:
            pending.append({k: v[at:] for k, v in chunk.items()} if at else chunk)
            have = rows - at
    if have and not drop_last:
        yield _join(pending)


def _check_shapes(chunk: Chunk, shapes: dict[str, tuple[int, ...]] | None) -> dict[str, tuple[int, ...]]:
    """``chunk``'s row shape per column, checked against the earlier chunks' (``None``: this is the first)."""
    mine = {k: v.shape[1:] for k, v in chunk.items()}
    if shapes is None or mine == shapes:
        return mine
    for name, shape in mine.items():
        if name not in shapes:
            raise ValueError(f"column {name!r} appears in the middle of this rank's data (its columns were "
                             f"{', '.join(map(repr, shapes))}); every batch must have the same columns")
        if shape != shapes[name]:
            raise ValueError(
                f"column {name!r} changes shape within this rank's data (rows of shape "
                f"{' and '.join(str(s) for s in sorted([shapes[name], shape]))}); every row of a column must have "
                "the same shape"
            )
    missing = [name for name in shapes if name not in mine]
    raise ValueError(f"column(s) {', '.join(map(repr, missing))} are missing from part of this rank's data; every "
                     "batch must have the same columns")


def _join(pieces: list[Chunk]) -> Chunk:
    """The pieces' rows as one new chunk (one copy; numpy's type promotion where the pieces' dtypes differ)."""
    if len(pieces) == 1:
        return {k: v.copy() for k, v in pieces[0].items()}
    return {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}


def shuffle(chunks: Iterable[Chunk], buffer_rows: int, rng: np.random.Generator) -> Iterator[Chunk]:
    """Rows of ``chunks`` in random order, through a buffer of at most ``buffer_rows`` rows (like tf.data's).

    The buffer fills first; then each incoming piece of ``k`` rows swaps places with
    ``k`` rows drawn at random from the buffer, which go out; at the end the buffer goes
    out in random order. Memory: the buffer plus one chunk, whatever the data's size.
    """
    buffer: Chunk | None = None
    filled = 0
    for chunk in chunks:
        rows = chunk_rows(chunk)
        at = 0
        while at < rows:
            if buffer is None:
                buffer = {k: np.empty((buffer_rows, *v.shape[1:]), dtype=v.dtype) for k, v in chunk.items()}
            if filled < buffer_rows:
                take = min(buffer_rows - filled, rows - at)
                _put(buffer, slice(filled, filled + take), chunk, at, take)
                filled += take
                at += take
                continue
            take = min(buffer_rows, rows - at)
            index = rng.choice(buffer_rows, size=take, replace=False)
            out = {k: v[index] for k, v in buffer.items()}
            _put(buffer, index, chunk, at, take)
            at += take
            yield out
    if buffer is not None and filled:
        order = rng.permutation(filled)
        yield {k: v[:filled][order] for k, v in buffer.items()}


def _put(buffer: Chunk, where: Any, chunk: Chunk, at: int, take: int) -> None:
    for name, target in buffer.items():
        source = chunk[name][at:at + take]
        if source.shape[1:] != target.shape[1:]:
            raise ValueError(
                f"column {name!r} changes shape within this rank's data (rows of shape {target.shape[1:]} and "
                f"{source.shape[1:]}); every row of a column must have the same shape"
            )
        target[where] = source


def equal_steps(batches: Iterable[Chunk], agree: Callable[[bool], bool],
                on_end: Callable[[int, int], None]) -> Iterator[Chunk]:
    """``batches`` for as long as every rank still has one: one ``agree(has_batch)`` call per step.

    The next batch is made before asking, so each step costs exactly one agreement, and
    a rank that has run out says so at the step it would have missed; every rank then
    stops at the same step (DDP and the like deadlock otherwise). ``on_end(steps, rows)``
    is called once with the steps taken and the rows yielded.
    """
    steps = rows = 0
    stopped = False
    try:
        for batch in batches:
            if not agree(True):
                stopped = True
                return
            steps += 1
            rows += chunk_rows(batch)
            yield batch
        stopped = True
        agree(False)
    finally:
        if stopped:
            on_end(steps, rows)
