"""Task side: :class:`BarrierTaskContext`, a pyspark-compatible context served by our coordinator.

Inside a function launched by :func:`sparkhydrogen.barrier` or :func:`sparkhydrogen.run`::

    ctx = BarrierTaskContext.get()
    ctx.barrier()                                  # ~sub-millisecond, not ~1 s
    hosts = ctx.allGather(socket.gethostname())    # list of str in rank order, like pyspark
    stats = ctx.allGather({"n": 10}, timeout=30)   # any picklable object, with a timeout
    cfg = ctx.broadcast(config if ctx.rank() == 0 else None, root=0)

The context **is** a :class:`pyspark.BarrierTaskContext` (a subclass instance), and while a
rank runs it is also what ``pyspark.TaskContext.get()`` and ``pyspark.BarrierTaskContext.get()``
return, so code written for pyspark (``isinstance`` checks included) gets it unchanged.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

from . import serde
from .coordinator.client import CoordinatorClient
from .errors import (
    CheckpointError,
    CollectiveMismatchError,
    GangAbortedError,
    GangResizing,
    LaunchError,
    NotInGangError,
)

__all__ = ["BarrierTaskContext", "BarrierTaskInfo", "Restored"]


@dataclass(frozen=True)
class Restored:
    """What :meth:`BarrierTaskContext.restored` gives back: a state and the size of the gang that wrote it.

    ``world_size`` is the number of ranks of the attempt that committed the checkpoint,
    ``rank`` the rank whose state ``state`` is. An elastic gang (``num_tasks=(min, max)``)
    may resume at another size than it checkpointed at: compare ``world_size`` with
    ``ctx.worldSize()`` and re-shard (``ctx.restoreRank(r)`` reads any rank's state).

    Example:
        >>> r = ctx.restored()                                           # doctest: +SKIP
        >>> r.world_size, ctx.worldSize(), r.rank
        (4, 3, 0)
    """

    state: Any
    world_size: int
    rank: int



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
            raise CheckpointError(
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
        raise CheckpointError(
            f"cannot write checkpoint state to {folder}: {exc}; spark.hydrogen.checkpoint.dir must be writable "
            "storage every executor can reach"
        ) from exc
    return path


def _never_committed(exc: BaseException) -> bool:
    """Whether a failed checkpoint call certainly left no commit of this round on the coordinator.

    Only then may the state file be deleted. ``ValueError``/``TypeError`` (``PayloadError``)
    are refusals before anything is sent, or the coordinator's own "too large to keep"
    verdict; a mismatch or an abort is the coordinator's verdict on an incomplete round.
    Anything else (a lost connection or reply, a timeout with no verdict, an interrupt
    while waiting) may have come after the commit: the file stays.
    """
    return isinstance(exc, (ValueError, TypeError, CollectiveMismatchError, GangAbortedError))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


if TYPE_CHECKING:
    from pyspark.taskcontext import BarrierTaskContext as _ContextBase
    from pyspark.taskcontext import BarrierTaskInfo as _InfoBase
else:
    # Importing sparkhydrogen (and its coordinator) must not import pyspark, so the two classes below start on
    # these stand-ins and are rebased onto pyspark's classes by _pyspark_classes() -- at import when pyspark is
    # already loaded, else before the first context is built or installed. Every instance is a pyspark one.
    class _ContextBase:
        """Stands in for ``pyspark.BarrierTaskContext`` until pyspark is loaded."""

    class _InfoBase:
        """Stands in for ``pyspark.BarrierTaskInfo`` until pyspark is loaded."""


class BarrierTaskInfo(_InfoBase):
    """Address (``host:port``) of the executor a rank runs on; a :class:`pyspark.BarrierTaskInfo`."""

    def __init__(self, address: str) -> None:
        self.address = address

    def __repr__(self) -> str:
        return f"BarrierTaskInfo(address={self.address!r})"


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds or None, got {type(timeout).__name__}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    return float(timeout)


# What pyspark keeps on its classes while one of our contexts is installed in its place.
_MISSING = object()
_PYSPARK_SLOT = "_taskContext"
# pyspark's per-task fields, copied from the native context so pyspark's own (unbound) methods work on ours
_PYSPARK_FIELDS = ("_stageId", "_partitionId", "_attemptNumber", "_taskAttemptId", "_localProperties", "_cpus",
                   "_cpuAmount", "_resources")


class BarrierTaskContext(_ContextBase):
    """The context of one rank of a running gang; a :class:`pyspark.BarrierTaskContext`.

    Every pyspark method behaves as pyspark documents it (``barrier``, ``allGather``
    of strings returning ``list[str]`` in partition order, ``getTaskInfos``,
    ``partitionId``, ``stageId``, ``attemptNumber``, ``taskAttemptId``,
    ``getLocalProperty``, ``resources``, ``cpus`` and, where the running pyspark has
    them, newer ones such as ``cpuAmount``), served by spark-hydrogen's coordinator
    instead of Spark's ~1 s polling. On top: any picklable object in ``allGather``,
    ``broadcast``, per-call timeouts, ``checkpoint``/``restore`` and
    ``rank``/``worldSize``/``gangAttempt``.

    While a rank runs, the same object is what ``pyspark.TaskContext.get()`` and
    ``pyspark.BarrierTaskContext.get()`` return.

    Example:
        >>> def train(rows):                                     # doctest: +SKIP
        ...     ctx = BarrierTaskContext.get()
        ...     total = sum(ctx.allGather(sum(rows)))
        ...     yield ctx.rank(), total
    """

    _current: ClassVar[BarrierTaskContext | None] = None
    # what pyspark's TaskContext / BarrierTaskContext held before the first _set(ctx); None when nothing is installed
    _displaced: ClassVar[tuple[Any, Any] | None] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> BarrierTaskContext:
        # pyspark's __new__ hands back its per-process singleton: every context of ours is a new object
        _pyspark_classes()
        ctx: BarrierTaskContext = object.__new__(cls)
        return ctx

    def __init__(self, client: CoordinatorClient, rank: int, world_size: int, native: Any = None,
                 gang_attempt: int = 0, default_timeout: float | None = None,
                 checkpoint_dir: str | None = None, *, task_infos: Sequence[str] | None = None) -> None:
        self._client = client
        self._rank = rank
        self._world_size = world_size
        self._native = native
        self._gang_attempt = gang_attempt
        self._default_timeout = default_timeout
        self._checkpoint_dir = checkpoint_dir
        self._task_infos = None if task_infos is None else tuple(str(a) for a in task_infos)
        self._committed_file: str | None = None
        self._uncertain_files: list[str] = []
        self._data: Any = None  # this rank's share of run(..., data=) (a sparkhydrogen.task.data.RankData)
        if isinstance(native, _pyspark_classes()[0]):
            for name in _PYSPARK_FIELDS:
                value = getattr(native, name, None)
                if value is not None:
                    setattr(self, name, value)

    # lookup --------------------------------------------------------------
    @classmethod
    def get(cls) -> BarrierTaskContext:
        """The context of the running rank; raises :class:`NotInGangError` elsewhere."""
        current: BarrierTaskContext | None = BarrierTaskContext._current
        if current is not None and vars(_pyspark_classes()[0]).get(_PYSPARK_SLOT) is not current:
            # pyspark replaced ours (its worker ends every task by clearing the slot): a rank that was
            # never closed in a reused worker must not leak into the next task
            BarrierTaskContext._current = BarrierTaskContext._displaced = None
            current = None
        if current is None:
            raise NotInGangError(
                "BarrierTaskContext.get() was called outside a spark-hydrogen barrier task. Call it inside a "
                "function launched by sparkhydrogen.barrier(rdd).mapPartitions(...) or sparkhydrogen.run(...)"
            )
        return cast(BarrierTaskContext, current)

    @classmethod
    def _set(cls, ctx: BarrierTaskContext | None) -> None:
        """Install ``ctx`` as the running rank's context (``None``: remove it), here and in pyspark.

        pyspark keeps its task context in a class attribute that ``TaskContext.get()`` and
        ``BarrierTaskContext.get()`` read through the MRO, so ``ctx`` goes on both classes.
        The first install remembers what pyspark had there; ``_set(None)`` puts exactly that
        back (an attribute that was absent is removed again), unless pyspark has meanwhile
        replaced our context itself (a new task on a reused worker): then pyspark's is kept.
        """
        if ctx is not None and not isinstance(ctx, BarrierTaskContext):
            raise TypeError(f"_set() takes a sparkhydrogen BarrierTaskContext or None, got {type(ctx).__name__}")
        owners = _pyspark_classes()[:2]
        previous = BarrierTaskContext._current
        if ctx is not None:
            if BarrierTaskContext._displaced is None:
                BarrierTaskContext._displaced = (vars(owners[0]).get(_PYSPARK_SLOT, _MISSING),
                                                 vars(owners[1]).get(_PYSPARK_SLOT, _MISSING))
            for owner in owners:
                setattr(owner, _PYSPARK_SLOT, ctx)
            BarrierTaskContext._current = ctx
            return
        BarrierTaskContext._current = None
        displaced, BarrierTaskContext._displaced = BarrierTaskContext._displaced, None
        if displaced is None:
            return
        for owner, value in zip(owners, displaced, strict=True):
            if previous is None or owner.__dict__.get(_PYSPARK_SLOT, _MISSING) is not previous:
                continue  # not ours any more: leave pyspark's own value alone
            if value is _MISSING:
                delattr(owner, _PYSPARK_SLOT)
            else:
                setattr(owner, _PYSPARK_SLOT, value)

    # data ----------------------------------------------------------------
    def batches(self) -> Iterator[Any]:
        """This rank's share of the gang's ``data=``, as ``pyarrow.RecordBatch`` es, streamed (read once).

        Every row of the DataFrame (or RDD) goes to exactly one rank; the share is the
        task's own input, so it never passes through the driver. An RDD's elements are
        turned into batches of up to 10,000 records (Rows and dicts by field, tuples as
        ``_1, _2, ...``, anything else as ``value``).

        Example:
            >>> def count():                                              # doctest: +SKIP
            ...     ctx = sparkhydrogen.BarrierTaskContext.get()
            ...     return sum(batch.num_rows for batch in ctx.batches())
            >>> sparkhydrogen.run(count, 2, data=spark.range(1000))      # doctest: +SKIP
            [500, 500]
        """
        if self._data is None:
            raise _no_data_error("batches")
        return cast(Iterator[Any], self._data.batches())

    def rows(self) -> Iterator[Any]:
        """This rank's share of ``data=`` row by row: an RDD's elements, or a DataFrame's rows as dicts (read once)."""
        if self._data is None:
            raise _no_data_error("rows")
        return cast(Iterator[Any], self._data.rows())

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
        """The partition this rank computes (its rank), as pyspark's ``partitionId()``."""
        return self._rank

    def _need_native(self, name: str) -> Any:
        if self._native is None:
            raise NotInGangError(f"{name}() needs a Spark task; this rank runs outside one")
        return self._native

    def stageId(self) -> int:
        """The Spark stage this rank's task belongs to."""
        return int(self._need_native("stageId").stageId())

    def attemptNumber(self) -> int:
        """How many times Spark has attempted this task before (0 for the first attempt)."""
        return int(self._need_native("attemptNumber").attemptNumber())

    def taskAttemptId(self) -> int:
        """Spark's id of this task attempt (unique within the SparkContext)."""
        return int(self._need_native("taskAttemptId").taskAttemptId())

    def getLocalProperty(self, key: str) -> str | None:
        """A local property set on the driver (``sc.setLocalProperty``), or ``None``."""
        return self._need_native("getLocalProperty").getLocalProperty(key)  # type: ignore[no-any-return]

    def resources(self) -> dict[str, Any]:
        """Resources (GPUs, ...) Spark allocated to this task: name -> ``ResourceInformation``."""
        return dict(self._need_native("resources").resources())

    def cpus(self) -> int:
        """CPUs allocated to this task."""
        return int(self._need_native("cpus").cpus())

    def getTaskInfos(self) -> list[_InfoBase]:
        """Executor address (``host:port``) of every rank, in partition (rank) order."""
        if self._task_infos is not None:
            return [BarrierTaskInfo(a) for a in self._task_infos]
        addresses = self.getLocalProperty("addresses") or ""
        return [BarrierTaskInfo(a.strip()) for a in addresses.split(",") if a.strip()]

    # collectives ---------------------------------------------------------
    def _timeout(self, timeout: float | None) -> float | None:
        return _check_timeout(timeout) if timeout is not None else self._default_timeout

    def barrier(self, timeout: float | None = None) -> None:
        """Block until every rank has called ``barrier()`` (as its same-numbered collective).

        Raises :class:`CollectiveTimeoutError` naming the missing ranks after ``timeout``
        seconds, :class:`CollectiveMismatchError` if another rank made a different call,
        :class:`GangAbortedError` if another rank failed.
        """
        self._client.collective("barrier", b"", timeout=self._timeout(timeout))

    def allGather(self, message: Any = "", timeout: float | None = None) -> list[Any]:
        """Every rank contributes ``message``; returns all of them in rank order.

        With strings this is pyspark's ``allGather`` (``list[str]``); any picklable object works too.
        """
        payload = serde.dumps(message, "allGather message")
        parts = self._client.collective("allGather", payload, timeout=self._timeout(timeout))
        return [serde.loads(p, "allGather message") for p in parts]

    def broadcast(self, obj: Any = None, root: int = 0, timeout: float | None = None) -> Any:
        """Return rank ``root``'s ``obj`` on every rank (other ranks' ``obj`` is ignored)."""
        if isinstance(root, bool) or not isinstance(root, int):
            raise TypeError(f"root must be an int rank, got {type(root).__name__}")
        if not 0 <= root < self._world_size:
            raise ValueError(f"root={root} is not a rank of this gang (0..{self._world_size - 1})")
        payload = serde.dumps(obj, "broadcast object") if self._rank == root else b""
        parts = self._client.collective("broadcast", payload, root=root, timeout=self._timeout(timeout))
        return serde.loads(parts[0], "broadcast object")

    # resumable state -----------------------------------------------------
    def checkpoint(self, state: Any, timeout: float | None = None) -> None:
        """Commit ``state`` for this rank as part of a gang-wide checkpoint (a collective).

        The checkpoint counts only once every rank has called ``checkpoint``: then the
        coordinator keeps all ranks' states on the driver, and a later attempt of the
        gang gets this rank's state back from :meth:`restore`. With
        ``spark.hydrogen.checkpoint.dir`` the state goes to a file there and the
        coordinator keeps its path; writing or reading it raises :class:`CheckpointError`.

        Example:
            >>> ctx = BarrierTaskContext.get()                       # doctest: +SKIP
            >>> step = ctx.restore() or 0
            >>> while step < 10:
            ...     train_one_step(step); step += 1
            ...     ctx.checkpoint(step)
        """
        timeout = self._timeout(timeout)
        if self._checkpoint_dir is None:
            self._client.collective("checkpoint", serde.dumps(state, "checkpoint state"), timeout=timeout)
            self._grow_here()
            return
        path = _write_state_file(self._checkpoint_dir, self._client.gang_id, self._rank, state)
        try:
            self._client.collective("checkpoint", serde.dumps(_StateFile(path)), timeout=timeout)
        except BaseException as exc:
            if _never_committed(exc):
                _remove(path)
            else:
                self._uncertain_files.append(path)  # the commit may have happened: a restore may need it
            raise
        # this commit supersedes every earlier file of this rank, committed or perhaps committed
        for old in (self._committed_file, *self._uncertain_files):
            if old is not None and old != path:
                _remove(old)
        self._uncertain_files.clear()
        self._committed_file = path
        self._grow_here()

    def _grow_here(self) -> None:
        """An elastic gang offered a larger size at this committed checkpoint: end the attempt to relaunch larger."""
        grow = getattr(self._client, "grow_offer", None)
        if grow is not None and grow > self._world_size:
            raise GangResizing(f"the elastic gang grows from {self._world_size} to {grow} ranks at this checkpoint "
                               "(grow='checkpoint'): it is relaunched at once and resumes from this checkpoint")

    def restore(self) -> Any:
        """This rank's state from the gang's last committed checkpoint, or ``None``.

        An elastic gang may resume at another size than it checkpointed at: a rank the
        checkpoint has no state for gets rank 0's (right for data-parallel training, where
        every rank holds the same model); :meth:`restored` says the size it was written at.
        """
        restored = self.restored()
        return None if restored is None else restored.state

    def restored(self) -> Restored | None:
        """This rank's state from the last committed checkpoint with the world size it was written at, or ``None``.

        Example:
            >>> r = ctx.restored()                                        # doctest: +SKIP
            >>> if r is not None and r.world_size != ctx.worldSize():
            ...     shards = [ctx.restoreRank(i) for i in range(r.world_size)]   # re-shard
        """
        return self._restored(None)

    def restoreRank(self, rank: int) -> Any:
        """Rank ``rank``'s state in the last committed checkpoint (a rank of the size it was written at), or None."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be an int >= 0, got {rank!r}")
        restored = self._restored(rank)
        return None if restored is None else restored.state

    def _restored(self, of: int | None) -> Restored | None:
        data, written, source = self._client.restored(of)
        if data is None or source is None:
            return None
        state = serde.loads(data, "checkpoint state")
        if isinstance(state, _StateFile):
            if source == self._rank:
                self._committed_file = state.path
            state = state.load()
        return Restored(state, written, source)

    def __repr__(self) -> str:
        return f"BarrierTaskContext(rank={self._rank}, worldSize={self._world_size}, gangAttempt={self._gang_attempt})"


_bind_lock = threading.Lock()
_bound: tuple[type, type] | None = None  # pyspark's TaskContext and BarrierTaskContext, once rebased onto them


def _pyspark_classes() -> tuple[type, type]:
    """pyspark's ``TaskContext`` and ``BarrierTaskContext``; rebases our classes onto pyspark's on first use."""
    global _bound
    if _bound is None:
        with _bind_lock:
            if _bound is None:
                from pyspark.taskcontext import BarrierTaskContext as PySparkContext
                from pyspark.taskcontext import BarrierTaskInfo as PySparkInfo
                from pyspark.taskcontext import TaskContext as PySparkTaskContext

                BarrierTaskContext.__bases__ = (PySparkContext,)
                BarrierTaskInfo.__bases__ = (PySparkInfo,)
                # pyspark methods this module does not serve itself (cpuAmount() on pyspark 4.3, anything newer)
                # answer from the task's native context, never from pyspark's unset class defaults
                for name in _pyspark_task_methods(PySparkContext, PySparkTaskContext):
                    if name not in vars(BarrierTaskContext):
                        setattr(BarrierTaskContext, name, _delegate(name))
                _bound = (PySparkTaskContext, PySparkContext)
    return _bound


def _pyspark_task_methods(*owners: type) -> list[str]:
    """Public instance methods of pyspark's task contexts (the set grows between pyspark versions)."""
    names: list[str] = []
    for owner in owners:
        for name, value in vars(owner).items():
            if not name.startswith("_") and callable(value) and name not in names:
                names.append(name)  # classmethods (get, from_json) are not callable in vars(): skipped
    return names


def _delegate(name: str) -> Callable[..., Any]:
    def method(self: BarrierTaskContext, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._need_native(name), name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"pyspark's ``{name}()`` of the Spark task this rank runs in."
    return method


if "pyspark" in sys.modules:  # the usual case: a Spark program imported pyspark first
    _pyspark_classes()


def _no_data_error(method: str) -> LaunchError:
    return LaunchError(
        f"BarrierTaskContext.{method}() has no data to read: this gang was launched without data=; pass "
        "data=<DataFrame or RDD> to sparkhydrogen.run (or a launcher) to stream it into the ranks"
    )
