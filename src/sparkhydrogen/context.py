"""Task side: :class:`BarrierTaskContext`, a pyspark-compatible context served by our coordinator.

Inside a function launched by :func:`sparkhydrogen.barrier` or :func:`sparkhydrogen.run`::

    ctx = BarrierTaskContext.get()
    ctx.barrier()                                  # ~sub-millisecond, not ~1 s
    hosts = ctx.allGather(socket.gethostname())    # list of str in rank order, like pyspark
    stats = ctx.allGather({"n": 10}, timeout=30)   # any picklable object, with a timeout
    cfg = ctx.broadcast(config if ctx.rank() == 0 else None, root=0)
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from typing import Any, ClassVar, Optional

from . import serde
from .coordinator.client import CoordinatorClient
from .errors import NotInGangError, PayloadError

__all__ = ["BarrierTaskContext", "BarrierTaskInfo"]


class _StateFile:
    """What a checkpoint commits when the state itself went to ``spark.hydrogen.checkpoint.dir``."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (_StateFile, (self.path,))

    def load(self) -> Any:
        try:
            with open(self.path, "rb") as fh:
                return serde.loads(fh.read(), f"checkpoint file {self.path}")
        except OSError as exc:
            raise PayloadError(
                f"cannot read checkpoint file {self.path}: {exc}; spark.hydrogen.checkpoint.dir must be "
                "storage every executor can read (a shared or distributed file system)"
            ) from exc


def _write_state_file(directory: str, gang_id: str, rank: int, state: Any) -> str:
    folder = os.path.join(directory.removeprefix("file://"), f"gang-{gang_id}")
    data = serde.dumps(state, "checkpoint state")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"rank{rank}-", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        path = tmp[: -len(".tmp")] + ".pkl"
        os.replace(tmp, path)
    except OSError as exc:
        raise PayloadError(f"cannot write checkpoint state to {folder}: {exc}") from exc
    return path


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class BarrierTaskInfo:
    """Address (``host:port``) of the executor a rank runs on, as in pyspark."""

    __slots__ = ("address",)

    def __init__(self, address: str) -> None:
        self.address = address

    def __repr__(self) -> str:
        return f"BarrierTaskInfo(address={self.address!r})"


def _check_timeout(timeout: Optional[float]) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds or None, got {type(timeout).__name__}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    return float(timeout)


class BarrierTaskContext:
    """The context of one rank of a running gang.

    Mirrors :class:`pyspark.BarrierTaskContext` (``barrier``, ``allGather``,
    ``getTaskInfos``, ``partitionId`` ...) so code can switch by changing an
    import, and adds objects in ``allGather``, ``broadcast``, per-call timeouts
    and ``rank``/``worldSize``.

    Example:
        >>> def train(rows):                                     # doctest: +SKIP
        ...     ctx = BarrierTaskContext.get()
        ...     total = sum(ctx.allGather(sum(rows)))
        ...     yield ctx.rank(), total
    """

    _current: ClassVar[Optional["BarrierTaskContext"]] = None

    def __init__(self, client: CoordinatorClient, rank: int, world_size: int, native: Any = None,
                 gang_attempt: int = 0, default_timeout: Optional[float] = None,
                 checkpoint_dir: Optional[str] = None) -> None:
        self._client = client
        self._rank = rank
        self._world_size = world_size
        self._native = native
        self._gang_attempt = gang_attempt
        self._default_timeout = default_timeout
        self._checkpoint_dir = checkpoint_dir
        self._committed_file: Optional[str] = None

    # lookup --------------------------------------------------------------
    @classmethod
    def get(cls) -> "BarrierTaskContext":
        """The context of the running rank; raises :class:`NotInGangError` elsewhere."""
        current = cls._current
        if current is None:
            raise NotInGangError(
                "BarrierTaskContext.get() was called outside a spark-hydrogen barrier task. Call it inside a "
                "function launched by sparkhydrogen.barrier(rdd).mapPartitions(...) or sparkhydrogen.run(...)"
            )
        return current

    @classmethod
    def _set(cls, ctx: Optional["BarrierTaskContext"]) -> None:
        cls._current = ctx

    # identity ------------------------------------------------------------
    def rank(self) -> int:
        """This task's rank, ``0 .. worldSize() - 1`` (equal to its partition id)."""
        return self._rank

    def worldSize(self) -> int:
        """Number of ranks in the gang."""
        return self._world_size

    def gangAttempt(self) -> int:
        """Which launch of the gang this is (0 for the first)."""
        return self._gang_attempt

    def partitionId(self) -> int:
        return self._rank

    def _need_native(self, name: str) -> Any:
        if self._native is None:
            raise NotInGangError(f"{name}() needs a Spark task; this rank runs outside one")
        return self._native

    def stageId(self) -> int:
        return int(self._need_native("stageId").stageId())

    def attemptNumber(self) -> int:
        return int(self._need_native("attemptNumber").attemptNumber())

    def taskAttemptId(self) -> int:
        return int(self._need_native("taskAttemptId").taskAttemptId())

    def getLocalProperty(self, key: str) -> Optional[str]:
        return self._need_native("getLocalProperty").getLocalProperty(key)  # type: ignore[no-any-return]

    def resources(self) -> dict[str, Any]:
        return dict(self._need_native("resources").resources())

    def cpus(self) -> int:
        return int(self._need_native("cpus").cpus())

    def getTaskInfos(self) -> list[BarrierTaskInfo]:
        """Executor address of every rank, in partition (rank) order."""
        addresses = self.getLocalProperty("addresses") or ""
        return [BarrierTaskInfo(a.strip()) for a in addresses.split(",") if a.strip()]

    # collectives ---------------------------------------------------------
    def _timeout(self, timeout: Optional[float]) -> Optional[float]:
        return _check_timeout(timeout) if timeout is not None else self._default_timeout

    def barrier(self, timeout: Optional[float] = None) -> None:
        """Block until every rank has called ``barrier()`` (as its same-numbered collective).

        Raises :class:`CollectiveTimeoutError` naming the missing ranks after ``timeout``
        seconds, :class:`CollectiveMismatchError` if another rank made a different call,
        :class:`GangAbortedError` if another rank failed.
        """
        self._client.collective("barrier", b"", timeout=self._timeout(timeout))

    def allGather(self, message: Any = "", timeout: Optional[float] = None) -> list[Any]:
        """Every rank contributes ``message``; returns all of them in rank order.

        With strings this is pyspark's ``allGather``; any picklable object works too.
        """
        payload = serde.dumps(message, "allGather message")
        parts = self._client.collective("allGather", payload, timeout=self._timeout(timeout))
        return [serde.loads(p, "allGather message") for p in parts]

    def broadcast(self, obj: Any = None, root: int = 0, timeout: Optional[float] = None) -> Any:
        """Return rank ``root``'s ``obj`` on every rank (other ranks' ``obj`` is ignored)."""
        if isinstance(root, bool) or not isinstance(root, int):
            raise TypeError(f"root must be an int rank, got {type(root).__name__}")
        if not 0 <= root < self._world_size:
            raise ValueError(f"root={root} is not a rank of this gang (0..{self._world_size - 1})")
        payload = serde.dumps(obj, "broadcast object") if self._rank == root else b""
        parts = self._client.collective("broadcast", payload, root=root, timeout=self._timeout(timeout))
        return serde.loads(parts[0], "broadcast object")

    # resumable state -----------------------------------------------------
    def checkpoint(self, state: Any, timeout: Optional[float] = None) -> None:
        """Commit ``state`` for this rank as part of a gang-wide checkpoint (a collective).

        The checkpoint counts only once every rank has called ``checkpoint``: then the
        coordinator keeps all ranks' states on the driver, and a later attempt of the
        gang gets this rank's state back from :meth:`restore`.

        Example:
            >>> ctx = BarrierTaskContext.get()                       # doctest: +SKIP
            >>> step = ctx.restore() or 0
            >>> while step < 10:
            ...     train_one_step(step); step += 1
            ...     ctx.checkpoint(step)
        """
        if self._checkpoint_dir is None:
            self._client.collective("checkpoint", serde.dumps(state, "checkpoint state"),
                                    timeout=self._timeout(timeout))
            return
        path = _write_state_file(self._checkpoint_dir, self._client.gang_id, self._rank, state)
        try:
            self._client.collective("checkpoint", serde.dumps(_StateFile(path)), timeout=self._timeout(timeout))
        except BaseException:
            _remove(path)  # never committed
            raise
        if self._committed_file is not None and self._committed_file != path:
            _remove(self._committed_file)  # superseded by the commit that just completed
        self._committed_file = path

    def restore(self) -> Any:
        """This rank's state from the gang's last committed checkpoint, or ``None``."""
        data = self._client.restore()
        if data is None:
            return None
        state = serde.loads(data, "checkpoint state")
        if isinstance(state, _StateFile):
            self._committed_file = state.path
            return state.load()
        return state

    def __repr__(self) -> str:
        return f"BarrierTaskContext(rank={self._rank}, worldSize={self._world_size}, gangAttempt={self._gang_attempt})"
