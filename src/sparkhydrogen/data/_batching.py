"""The pure stages of the feed: fixed-size batches, a bounded shuffle buffer, equal step counts across ranks.

Each stage is a generator over :data:`Chunk` s (column name -> numpy array, rows on the
first axis), so the whole pipeline holds at most one input chunk, the shuffle buffer and
one output batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import numpy as np

from ._convert import Chunk, chunk_rows

__all__ = ["rebatch", "shuffle", "equal_steps", "agreed", "Agree"]


def rebatch(chunks: Iterable[Chunk], batch_size: int, *, drop_last: bool = False,
            copy: bool = True) -> Generator[Chunk, None, None]:
    """Chunks of any sizes to batches of exactly ``batch_size`` rows; the last one shorter, or dropped.

    Every batch's arrays are contiguous, writable and its own (no other batch sees its rows),
    so a consumer may keep or change them. The full batches inside one chunk are cut from one
    copy per column of those rows (the chunk's arrays are views of the Arrow buffers: nothing
    else is copied; a kept batch keeps that copy alive); only a batch that spans chunks joins
    pieces. The columns' shapes are checked once per chunk. With ``copy=False`` a batch
    inside one chunk is views of the chunk's arrays instead.

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
            yield _join(pending, copy)
            pending, have, at = [], 0, need
        full = (rows - at) // batch_size
        if full:  # batches wholly inside this chunk: one copy per column for all of them
            end = at + full * batch_size
            source = {k: v[at:end].copy() if copy else v[at:end] for k, v in chunk.items()}
            for start in range(0, full * batch_size, batch_size):
                yield {k: v[start:start + batch_size] for k, v in source.items()}
            at = end
        if at < rows:
            pending.append({k: v[at:] for k, v in chunk.items()} if at else chunk)
            have = rows - at
    if have and not drop_last:
        yield _join(pending, copy)


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


def _join(pieces: list[Chunk], copy: bool = True) -> Chunk:
    """The pieces' rows as one new chunk (one copy; numpy's type promotion where the pieces' dtypes differ)."""
    if len(pieces) == 1:
        return {k: v.copy() if copy else v for k, v in pieces[0].items()}
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


#: ``agree(ready, ended) -> (steps, stop)``: one collective over the gang (see :func:`equal_steps`).
Agree = Callable[[int, bool], tuple[int, bool]]


def agreed(reports: Iterable[tuple[int, bool]]) -> tuple[int, bool]:
    """The gang's verdict on the ranks' ``(ready, ended)`` reports: steps every rank can take, and whether to stop.

    Each rank has ``ready`` batches made; ``ended`` says its share has no more. The gang
    takes the fewest, and stops after them when a rank that has run out set that figure.

    >>> agreed([(4, False), (2, True)]), agreed([(4, False), (6, True)]), agreed([(0, True), (3, False)])
    ((2, True), (4, False), (0, True))
    """
    listed = [(int(ready), bool(ended)) for ready, ended in reports]
    steps = min(ready for ready, _ in listed)
    return steps, any(ended and ready == steps for ready, ended in listed)


def equal_steps(batches: Iterable[Chunk], agree: Agree, on_end: Callable[[int, int], None], *,
                first_window: int = 8, max_window: int = 4096,
                max_bytes: int = 4 * 1024 * 1024) -> Iterator[Chunk]:
    """``batches`` for as long as every rank still has one, agreeing once per window of steps, not per step.

    Each rank makes up to a window of batches ahead (``first_window``, doubling each round to
    ``max_window``, and at most ``max_bytes`` of them, at least one), then one
    ``agree(ready, ended)`` call tells every rank how many steps the whole gang can take
    (see :func:`agreed`) and whether it stops after them. Every rank therefore stops at the
    same step, that of the rank with the fewest batches (DDP and the like deadlock
    otherwise), at a cost of a few collectives per epoch. ``on_end(steps, rows)`` is called
    once with the steps taken and the rows yielded (not when the consumer stops early).

    >>> import numpy as np
    >>> calls = []
    >>> def alone(ready, ended):
    ...     calls.append(ready); return ready, ended
    >>> out = list(equal_steps(({"x": np.arange(2)} for _ in range(20)), alone, lambda s, r: None))
    >>> len(out), calls
    (20, [8, 12])
    """
    source = iter(batches)
    ready: deque[tuple[Chunk, int]] = deque()  # batches made ahead, with their bytes
    held = 0
    ended = False
    window = max(1, first_window)
    steps = rows = 0
    while True:
        while not ended and len(ready) < window and (held < max_bytes or not ready):
            try:
                batch = next(source)
            except StopIteration:
                ended = True
                break
            size = _nbytes(batch)
            ready.append((batch, size))
            held += size
        allowed, stop = agree(len(ready), ended)
        for _ in range(allowed):
            batch, size = ready.popleft()
            held -= size
            steps += 1
            rows += chunk_rows(batch)
            yield batch
        if stop:
            break
        window = min(window * 2, max(1, max_window))
    on_end(steps, rows)


def _nbytes(chunk: Chunk) -> int:
    return sum(int(a.nbytes) for a in chunk.values())
