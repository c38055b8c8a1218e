"""Where each cached row goes in an epoch of the global shuffle, and what each rank then holds (pure).

Rank ``r``'s cached share has rows ``0..n-1`` in stream order; a row's global id is
``(r, i)``. In epoch ``e`` a seeded permutation ``p`` of ``0..n-1`` (seeded by
``(seed, e, r)``) sends row ``i`` to rank ``(p[i] + r) % world_size``: every rank receives
``n // world_size`` or one more of rank ``r``'s rows, so the ranks' new shares are balanced
within ``world_size`` rows, and the whole assignment is a function of ``(seed, epoch)`` and
the shares, so a resumed run exchanges the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt

from ._convert import Chunk, chunk_rows

__all__ = ["batches_for", "destinations", "epoch_steps", "pieces", "split"]


def destinations(rows: int, world_size: int, seed: int, epoch: int, rank: int) -> npt.NDArray[np.int32]:
    """The rank each of rank ``rank``'s ``rows`` cached rows goes to in epoch ``epoch`` (in the share's order).

    >>> d = destinations(10, 3, seed=0, epoch=1, rank=0)
    >>> sorted(np.bincount(d, minlength=3).tolist()), bool((d == destinations(10, 3, 0, 1, 0)).all())
    ([3, 3, 4], True)
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not a rank of a gang of {world_size}")
    if world_size == 1:
        return np.zeros(rows, dtype=np.int32)
    order = np.random.default_rng([seed, epoch, rank, 0x6875]).permutation(rows)
    return ((order + rank) % world_size).astype(np.int32)


def split(chunk: Chunk, dest: npt.NDArray[np.int32], to: int) -> Chunk:
    """The rows of ``chunk`` whose destination (``dest``, one per row) is rank ``to``, in their order.

    >>> split({"x": np.arange(4)}, np.array([1, 0, 1, 1], dtype=np.int32), 1)["x"].tolist()
    [0, 2, 3]
    """
    if len(dest) != chunk_rows(chunk):
        raise ValueError(f"{len(dest)} destinations for a chunk of {chunk_rows(chunk)} rows")
    index = np.flatnonzero(dest == to)  # once per chunk: a boolean mask would be resolved again per column
    return {name: array.take(index, axis=0) for name, array in chunk.items()}


def pieces(chunks: Iterator[Chunk], dest: npt.NDArray[np.int32], to: int) -> Iterator[Chunk]:
    """The non-empty parts of ``chunks`` (the whole share, in order) that go to rank ``to``."""
    at = 0
    for chunk in chunks:
        rows = chunk_rows(chunk)
        part = split(chunk, dest[at:at + rows], to)
        at += rows
        if chunk_rows(part):
            yield part


def batches_for(rows: int, batch_size: int, drop_last: bool) -> int:
    """Batches ``rows`` rows make. ``batches_for(10, 4, False), batches_for(10, 4, True)`` -> ``(3, 2)``."""
    return rows // batch_size if drop_last else -(-rows // batch_size)


def epoch_steps(counts: Sequence[Sequence[int]], batch_size: int, drop_last: bool) -> tuple[list[int], int]:
    """Rows each rank holds after the exchange (``counts[s][d]``: rows rank ``s`` sends rank ``d``), and
    the batches every rank can take (those of the rank with the fewest).

    >>> epoch_steps([[3, 2], [4, 1]], 2, False)
    ([7, 3], 2)
    """
    held = [int(sum(row[d] for row in counts)) for d in range(len(counts))]
    return held, min(batches_for(rows, batch_size, drop_last) for rows in held)
