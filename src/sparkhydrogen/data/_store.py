"""The rank's cached share (``cache=True``): in memory up to a budget, the rest spilled to an Arrow IPC file.

The file lives in a directory of its own under Spark's local dirs (``SPARK_LOCAL_DIRS``, as the
executor gives them to its Python workers; the system's temporary directory elsewhere) and is
removed when the store closes (the rank's end, failed or not); a worker killed outright leaves
it to the next store on the host (which removes the directories of workers that are gone) or
to Spark, which removes its local dirs when the executor stops. Spilled batches are read
back one at a time with plain file reads, so a later epoch holds one batch of them, never the file.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from typing import Any

from ._convert import Chunk, chunk_rows, to_batch, to_chunk

__all__ = ["PREFIX", "ShareStore", "spill_root", "sweep"]

log = logging.getLogger("sparkhydrogen.data")


def spill_root(environ: dict[str, str] | None = None) -> str:
    """Where spill files go: the first usable directory of ``SPARK_LOCAL_DIRS``, else the temp directory.

    >>> spill_root({"SPARK_LOCAL_DIRS": "/nonexistent-a,/nonexistent-b"}) == tempfile.gettempdir()
    True
    """
    env = os.environ if environ is None else environ
    for path in env.get("SPARK_LOCAL_DIRS", "").split(","):
        path = path.strip()
        if path and os.path.isdir(path) and os.access(path, os.W_OK):
            return path
    return tempfile.gettempdir()


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


#: Spill directories are named ``<PREFIX><pid>-<random>``: the pid of the worker that wrote them.
PREFIX = "sparkhydrogen-spill-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep(root: str) -> list[str]:
    """Remove the spill directories under ``root`` whose worker process is gone (killed before its cleanup).

    Returns the directories removed. A worker killed outright (``SIGKILL``, ``os._exit``) cannot
    remove its own file; the next store on the host does.
    """
    removed: list[str] = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(os.path.join(root, name))
            removed.append(name)
    return removed


def _nbytes(chunk: Chunk) -> int:
    return sum(int(a.nbytes) for a in chunk.values())


class ShareStore:
    """Chunks appended in stream order, read back by index: the first ones in memory, the rest on disk.

    Chunks stay in memory while their total stays within ``budget`` bytes; from the first one
    that does not fit, every chunk goes to the spill file instead (as the Arrow record batch
    it came from). ``chunk(i)`` returns chunk ``i`` either way, with the same rows.

    Example:
        >>> import numpy as np, pyarrow as pa
        >>> store = ShareStore(budget=0)
        >>> rb = pa.RecordBatch.from_pydict({"x": np.arange(3)})
        >>> store.append(rb, {"x": np.arange(3)}); store.finish()
        >>> store.chunk(0)["x"].tolist(), store.spilled_chunks
        ([0, 1, 2], 1)
        >>> store.close()
    """

    def __init__(self, budget: int, directory: str | None = None) -> None:
        if budget < 0:
            raise ValueError(f"the cache's memory budget must be >= 0 bytes, got {budget}")
        self.budget = budget
        self._root = directory
        self._memory: list[Chunk] = []
        self.memory_bytes = 0
        self.spilled_chunks = 0
        self.spilled_bytes = 0
        #: rows appended
        self.rows = 0
        self._dir: str | None = None
        self._path: str | None = None
        self._sink: Any = None
        self._writer: Any = None
        self._reader: Any = None
        self._file: Any = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def __len__(self) -> int:
        return len(self._memory) + self.spilled_chunks

    @property
    def path(self) -> str | None:
        """The spill file (``None``: nothing spilled)."""
        return self._path

    def append(self, batch: Any, chunk: Chunk) -> None:
        """Keep ``chunk`` (the converted form of the ``pyarrow.RecordBatch`` ``batch``, same rows and columns).

        ``batch`` may be ``None``: it is then made from ``chunk`` if the chunk must be spilled.
        """
        size = _nbytes(chunk)
        self.rows += chunk_rows(chunk)
        if self._writer is None and self.memory_bytes + size <= self.budget:
            self._memory.append(chunk)
            self.memory_bytes += size
            return
        if batch is None:
            batch = to_batch(chunk)
        if self._writer is None:
            self._open_writer(batch.schema)
        self._writer.write_batch(batch)
        self.spilled_chunks += 1
        self.spilled_bytes += int(batch.nbytes)

    def _open_writer(self, schema: Any) -> None:
        import pyarrow as pa

        root = self._root or spill_root()
        for name in sweep(root):
            log.info("removed %s under %s: left by a worker that was killed", name, root)
        self._dir = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root)
        self._finalizer = weakref.finalize(self, _remove, self._dir)
        self._path = os.path.join(self._dir, "share.arrow")
        self._sink = pa.OSFile(self._path, "wb")
        self._writer = pa.ipc.new_file(self._sink, schema)
        log.info("the cached share passed its memory budget (%d bytes): spilling the rest to %s",
                 self.budget, self._path)

    def finish(self) -> None:
        """The share is complete: close the spill file for writing (reads may start)."""
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def chunk(self, index: int) -> Chunk:
        """Chunk ``index`` (in append order): from memory, or read from the spill file."""
        if index < len(self._memory):
            return self._memory[index]
        if self._path is None or not 0 <= index < len(self):
            raise IndexError(f"chunk {index} of a store of {len(self)}")
        if self._reader is None:
            import pyarrow as pa

            self.finish()
            self._file = pa.OSFile(self._path, "rb")  # plain reads: RSS holds a batch, not the mapped file
            self._reader = pa.ipc.open_file(self._file)
        return to_chunk(self._reader.get_batch(index - len(self._memory)), None)

    def iter_chunks(self) -> Iterator[Chunk]:
        """Every chunk in append order, through a file handle of its own (so threads may each iterate once the
        store is finished)."""
        yield from list(self._memory)
        if self._path is None or not self.spilled_chunks:
            return
        import pyarrow as pa

        self.finish()
        with pa.OSFile(self._path, "rb") as file:
            reader = pa.ipc.open_file(file)
            for index in range(reader.num_record_batches):
                yield to_chunk(reader.get_batch(index), None)

    def close(self) -> None:
        """Drop the cached chunks and remove the spill file and its directory."""
        self._memory = []
        self.memory_bytes = 0
        for closable in (self._writer, self._sink, self._file):
            if closable is not None:
                try:
                    closable.close()
                except OSError:  # removed just below anyway
                    pass
        self._writer = self._sink = self._file = self._reader = None
        if self._finalizer is not None:
            self._finalizer()
