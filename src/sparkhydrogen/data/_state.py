"""Where a loader stands, as plain data: :class:`LoaderState` and the share's :class:`Fingerprint` (pure).

A loader's ``state_dict()`` is a :class:`LoaderState` as a ``dict`` of plain values (it goes into
``ctx.checkpoint(...)`` with the model); ``load_state_dict(sd)`` checks it against the loader's
own options and, once the share is read again after a retry, against the share itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import LaunchError
from ._convert import Chunk, chunk_rows

__all__ = ["STATE_VERSION", "Fingerprint", "LoaderState", "check_same_feed", "share_changed"]

#: Version of the ``state_dict()`` layout; a state of another version is refused.
STATE_VERSION = 1


class Fingerprint:
    """A running digest of the share as it streams in: chunk sizes, the first chunk, the edges of the others.

    Cheap (a few rows per chunk), yet it changes when the share's rows, their order or the
    cut into Arrow batches change between two attempts, which would make a resumed epoch
    repeat or skip rows.

    >>> import numpy as np
    >>> a, b = Fingerprint(), Fingerprint()
    >>> a.add({"x": np.arange(4)}); b.add({"x": np.arange(4)[::-1].copy()})
    >>> a.chunks, a.rows, a.hexdigest() == b.hexdigest()
    (1, 4, False)
    """

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=16)
        self.chunks = 0
        self.rows = 0

    def add(self, chunk: Chunk) -> None:
        """Fold one chunk of the share (in stream order) into the digest."""
        rows = chunk_rows(chunk)
        self._hash.update(rows.to_bytes(8, "little"))
        for name, array in chunk.items():
            self._hash.update(name.encode())
            if self.chunks == 0:
                self._hash.update(array.tobytes())
            elif rows:
                self._hash.update(array[:1].tobytes())
                self._hash.update(array[-1:].tobytes())
        self.chunks += 1
        self.rows += rows

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@dataclass(frozen=True)
class LoaderState:
    """A loader's place: ``position`` batches of epoch ``epoch`` were handed out (epochs count from 0).

    ``chunks``/``rows``/``digest`` fingerprint the part of the share read so far (``complete``:
    all of it); ``steps`` is the agreed batches per epoch once known. The rest are the
    options that decide the order, which a resumed loader must share.

    >>> s = LoaderState(epoch=1, position=7, seed=0, rank=0, world_size=2, batch_size=8, shuffle=True,
    ...                 drop_last=False, equal_steps=True, steps=12, chunks=3, rows=90, digest="ab", complete=True)
    >>> LoaderState.from_dict(s.to_dict()) == s
    True
    """

    epoch: int
    position: int
    seed: int
    rank: int
    world_size: int
    batch_size: int
    shuffle: bool
    drop_last: bool
    equal_steps: bool
    steps: int | None
    chunks: int
    rows: int
    digest: str
    complete: bool
    version: int = STATE_VERSION
    global_shuffle: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> LoaderState:
        """Check and rebuild a ``state_dict()``; a wrong layout raises ``ValueError`` naming what is wrong."""
        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict() takes the dict state_dict() returned, got {type(state).__name__}")
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"loader state of version {version!r}, this spark-hydrogen reads version "
                             f"{STATE_VERSION}: resume with the version that saved it")
        names = [f for f in cls.__dataclass_fields__ if f in state or f != "global_shuffle"]
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"loader state lacks {', '.join(missing)}: pass what loader.state_dict() returned")
        out = cls(**{n: state[n] for n in names})
        for name in ("epoch", "position", "chunks", "rows"):
            value = getattr(out, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"loader state: {name} must be an int >= 0, got {value!r}")
        return out


def check_same_feed(saved: LoaderState, now: LoaderState) -> None:
    """Raise ``ValueError`` if ``saved`` came from a loader whose order differs from ``now``'s (pure).

    >>> a = LoaderState(0, 0, 0, 0, 2, 8, True, False, True, None, 0, 0, "", False)
    >>> check_same_feed(a, a)
    >>> from dataclasses import replace
    >>> check_same_feed(a, replace(a, batch_size=16))
    Traceback (most recent call last):
    ...
    ValueError: the loader state was saved by a loader with batch_size=8, this one has batch_size=16: ...
    """
    for name in ("seed", "rank", "world_size", "batch_size", "shuffle", "drop_last", "equal_steps", "global_shuffle"):
        was, is_ = getattr(saved, name), getattr(now, name)
        if was != is_:
            raise ValueError(
                f"the loader state was saved by a loader with {name}={was!r}, this one has {name}={is_!r}: "
                "make the loader with the same options (and the gang with as many ranks) to resume it"
            )


def share_changed(saved: LoaderState, chunks: int, rows: int, digest: str, *, ended: bool) -> LaunchError:
    """The error for a share that came back different after a retry (the caller found the difference)."""
    what = (f"{rows} rows in {chunks} Arrow batches" + (" (all of it)" if ended else "")
            + f" where the saved state read {saved.rows} rows in {saved.chunks}")
    return LaunchError(
        f"rank {saved.rank}'s share of data= differs from the attempt that saved the loader state ({what}, or "
        "the same counts with other rows or another order): the source is not deterministic, so resuming "
        "mid-epoch would repeat or skip rows. Feed a deterministic source: a DataFrame read from files, or one "
        "written out (df.write.parquet(...)) and read back, not a shuffled plan (repartition, join, "
        "aggregation), whose row order differs between attempts"
    )
