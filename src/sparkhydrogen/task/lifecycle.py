"""One rank's life in its gang, the same for every entry point.

Every way spark-hydrogen runs a rank (an RDD or DataFrame barrier task, a rank of
``run()``, a torch or Horovod rank, a local-mode process on the driver) goes
through :class:`RankSession`: connect to the coordinator, register, start the
heartbeat, install the :class:`~sparkhydrogen.BarrierTaskContext`, stream output
if asked, run the body, and report its outcome to the coordinator exactly once
(finished, closed early by its consumer, or failed), then clean up.

A rank in a Spark task that was given GPUs runs with ``CUDA_VISIBLE_DEVICES`` set to
exactly those devices (composed with the executor's own value, see
:mod:`sparkhydrogen.task.gpus`), put back when the rank ends: Python workers are reused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from ..context import BarrierTaskContext
from ..coordinator.client import CoordinatorClient
from ..coordinator.protocol import StageGangInfo
from ..coordinator.stackchannel import StackResponder
from ..errors import CollectiveError, ErrorInfo, LaunchError
from ..tracking.rank import RankMetrics
from ..tracking.rank import install as install_metrics
from ..tracking.rank import uninstall as uninstall_metrics
from .gpus import GpuPlacementError, RankGpus, place, task_gpu_addresses
from .spec import TaskSpec

__all__ = ["RankSession", "report_failure", "gang_body", "is_gang_body", "native_barrier_context", "task_context",
           "stage_world_size", "launch_window_id", "rank_gpus", "rank_spec"]

log = logging.getLogger("sparkhydrogen.task")
F = TypeVar("F", bound=Callable[..., Any])

_MARK = "_sparkhydrogen_gang_body"
_VISIBLE = "CUDA_VISIBLE_DEVICES"


def gang_body(fn: F) -> F:
    """Mark ``fn`` as a task body spark-hydrogen hands to Spark (transparent mode passes such bodies through)."""
    setattr(fn, _MARK, True)
    return fn


def is_gang_body(fn: Any) -> bool:
    """Whether ``fn`` is a task body built by spark-hydrogen itself (see :func:`gang_body`)."""
    return bool(getattr(fn, _MARK, False))


def launch_window_id(gang_attempt: int, world_size: int, rank: int) -> int:
    """Task id of a rank launched outside Spark (local-mode processes): one window of ``world_size`` ids per attempt.

    The coordinator tells launches apart by task ids: the ranks of one launch have ids
    from one window of ``world_size`` consecutive numbers, later launches higher ones
    (as Spark numbers the tasks of a barrier stage attempt).

    >>> [launch_window_id(1, 2, r) for r in (0, 1)]
    [2, 3]
    """
    return gang_attempt * world_size + rank


class _CudaStart:
    """What ``CUDA_VISIBLE_DEVICES`` CUDA saw when it initialised in this (reused) Python worker, once known."""

    known: ClassVar[bool] = False
    saw: ClassVar[str | None] = None

    @staticmethod
    def started() -> bool:
        """Whether torch has initialised CUDA in this process (never imports torch)."""
        torch = sys.modules.get("torch")
        cuda = getattr(torch, "cuda", None)
        is_initialized = getattr(cuda, "is_initialized", None)
        return bool(is_initialized()) if callable(is_initialized) else False

    @classmethod
    def note(cls, saw: str | None) -> None:
        if not cls.known:
            cls.known, cls.saw = True, saw


class RankSession:
    """Context manager: this process is rank ``rank`` of the gang ``spec`` describes, for the ``with`` body.

    With a Spark task (``native``) that has GPUs, the body runs with
    ``CUDA_VISIBLE_DEVICES`` set to the task's devices (:attr:`gpus`); without
    ``native`` (ranks a launcher started outside Spark) the environment is left alone.

    Example:
        >>> with RankSession(spec, rank=0, native=native) as ctx:     # doctest: +SKIP
        ...     result = train()
    """

    _active: ClassVar[RankSession | None] = None

    def __init__(self, spec: TaskSpec, rank: int, *, native: Any = None, stage_id: int = 0,
                 task_attempt_id: int | None = None, task_infos: Sequence[str] | None = None) -> None:
        self.spec = spec
        self.rank = rank
        self.native = native
        self.stage_id = stage_id
        self.task_attempt_id = (launch_window_id(spec.gang_attempt, spec.world_size, rank)
                                if task_attempt_id is None else task_attempt_id)
        self.task_infos = task_infos
        self.client: CoordinatorClient | None = None
        self.context: BarrierTaskContext | None = None
        self._capture: Any = None
        self._reported = False
        self.gpus: RankGpus | None = None
        self._restore_visible = False
        self._stacks: StackResponder | None = None
        self._metrics: RankMetrics | None = None

    def __enter__(self) -> BarrierTaskContext:
        spec = self.spec
        client = CoordinatorClient.connect((spec.host, spec.port), spec.gang_id, spec.secret, spec.connect_timeout,
                                           tls_fingerprint=spec.tls_fingerprint)
        self.client = client
        try:
            stage = (StageGangInfo(spec.world_size, spec.name, spec.gated, spec.start_timeout if spec.gated else None)
                     if spec.stage_gang else None)
            world = client.register(self.rank, gang_attempt=spec.gang_attempt, stage_id=self.stage_id,
                                    host=socket.gethostname(), task_attempt_id=self.task_attempt_id,
                                    address=client.local_address if spec.gated else "",
                                    gate_timeout=spec.start_timeout if spec.gated else None, stage=stage)
            if spec.heartbeat_interval is not None:
                client.start_heartbeat(spec.heartbeat_interval)
            self._stacks = StackResponder(
                client, (spec.host, spec.port), spec.gang_id, spec.secret, rank=self.rank,
                gang_attempt=spec.gang_attempt, stage_id=self.stage_id, task_attempt_id=self.task_attempt_id,
                tls_fingerprint=spec.tls_fingerprint, connect_timeout=spec.connect_timeout,
                dump_after=spec.stack_dump_after).start()
            infos = self.task_infos if self.task_infos is not None else client.addresses  # gated: from the gate
            extra = {"task_infos": list(infos)} if infos is not None else {}
            self.context = BarrierTaskContext(client, self.rank, world, self.native, spec.gang_attempt,
                                              spec.collective_timeout, spec.checkpoint_dir, **extra)
            BarrierTaskContext._set(self.context)
            RankSession._active = self
            self._place_gpus()
            # sparkhydrogen.mlflow.log_metric: to the driver's run, or dropped here if the gang logs nowhere
            self._metrics = install_metrics(self.rank, client.metrics if spec.track_metrics else None,
                                            spec.system_metrics_interval)
            if spec.stream_logs:
                from ..logstream import OutputCapture

                self._capture = OutputCapture(client.log).start()
        except BaseException as exc:
            if isinstance(exc, GpuPlacementError):  # the rank's own failure: the driver names it
                self.report_failure(exc)
            self._teardown()
            raise
        return self.context

    def _place_gpus(self) -> None:
        """Narrow ``CUDA_VISIBLE_DEVICES`` to this task's GPUs (none: leave it alone)."""
        resources = getattr(self.native, "resources", None)
        if not callable(resources):
            return
        executor_visible = os.environ.get(_VISIBLE)
        started = _CudaStart.started()
        if started:
            _CudaStart.note(executor_visible)  # it started outside any rank: with the worker's own value
        gpus = place(task_gpu_addresses(resources()), executor_visible, cuda_started=started,
                     cuda_saw=_CudaStart.saw)
        if gpus is None:
            return
        if started:
            log.info("rank %d: CUDA was initialised earlier in this Python worker (with CUDA_VISIBLE_DEVICES=%r); "
                     "this process keeps that numbering, child processes see only GPU(s) %s",
                     self.rank, gpus.cuda_saw, gpus.visible)
        self.gpus = gpus
        self._restore_visible = True
        os.environ[_VISIBLE] = gpus.visible

    def _restore_gpus(self) -> None:
        gpus = self.gpus
        if not self._restore_visible or gpus is None:
            return
        self._restore_visible = False
        if not gpus.cuda_started_before and _CudaStart.started():
            _CudaStart.note(gpus.visible)  # CUDA started during this rank: it saw this rank's devices
        if gpus.executor_visible is None:
            os.environ.pop(_VISIBLE, None)
        else:
            os.environ[_VISIBLE] = gpus.executor_visible

    def report_failure(self, exc: BaseException, text: str | None = None,
                       settle: float | None = None) -> ErrorInfo | None:
        """Tell the coordinator this rank failed with ``exc`` (once; later reports are ignored).

        Call it before tearing down what peers depend on (a process group, a store),
        so that peers who then lose their connections are not blamed for the failure.
        A :class:`CollectiveError` is the coordinator's own verdict: nothing to report.

        ``settle`` (seconds): wait, at most that long, for the other ranks to report,
        finish or go, and return the attempt's failure as the coordinator has it (its
        root cause, other ranks' later reports in ``others``); else ``None``.
        """
        if self._reported or self.client is None:
            return None
        self._reported = True
        if isinstance(exc, CollectiveError):
            return None
        info = ErrorInfo.from_exception(exc, self.rank, text if text is not None else traceback.format_exc())
        return self.client.fail(info, settle=settle)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self._stop_metrics()  # every metric point reaches the driver before the outcome does
            self._stop_capture()  # every line too
            if self.client is not None and not self._reported:
                if exc is None:
                    self._reported = True
                    self.client.finish()
                elif isinstance(exc, GeneratorExit):  # the consumer stopped reading: done, not failed
                    self._reported = True
                    self.client.finish(closed_early=True)
                else:
                    self.report_failure(exc, "".join(traceback.format_exception(kind, exc, tb)))
        finally:
            self._teardown()

    def _stop_capture(self) -> None:
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.stop()

    def _stop_metrics(self) -> None:
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            uninstall_metrics(metrics)

    def _teardown(self) -> None:
        self._stop_metrics()
        self._stop_capture()
        self._restore_gpus()
        if RankSession._active is self:
            RankSession._active = None
        if self.context is not None and BarrierTaskContext._current is self.context:
            BarrierTaskContext._set(None)
        stacks, self._stacks = self._stacks, None
        if stacks is not None:  # before the client: its answers go there
            stacks.close()
        if self.client is not None:
            self.client.close()


def report_failure(exc: BaseException, settle: float | None = None) -> ErrorInfo | None:
    """Report ``exc`` as the failure of the rank running in this process, if one is.

    See :meth:`RankSession.report_failure`.
    """
    session = RankSession._active
    return session.report_failure(exc, settle=settle) if session is not None else None


def rank_gpus() -> RankGpus | None:
    """The GPUs the session of the rank running in this process placed (``None``: none, or no rank runs).

    Launchers read it rather than ``CUDA_VISIBLE_DEVICES``, which the session has narrowed.
    """
    session = RankSession._active
    return session.gpus if session is not None else None


def rank_spec() -> TaskSpec | None:
    """The task spec of the rank running in this process (``None``: no rank runs): rank-side settings live there."""
    session = RankSession._active
    return session.spec if session is not None else None


def native_barrier_context() -> Any:
    """pyspark's own context of the running barrier task; :class:`LaunchError` outside one."""
    from pyspark.taskcontext import BarrierTaskContext as NativeBarrierTaskContext
    from pyspark.taskcontext import TaskContext

    native = TaskContext.get()
    if isinstance(native, BarrierTaskContext):  # transparent mode installed ours over pyspark's
        native = native._native
    if not isinstance(native, NativeBarrierTaskContext):
        raise LaunchError(
            "spark-hydrogen tasks must run in a Spark barrier stage; this task is not in one "
            "(was the function called outside sparkhydrogen.barrier()/run()?)"
        )
    return native


def task_context(barrier: bool) -> Any:
    """pyspark's context of the running task (a barrier task's when ``barrier``); :class:`LaunchError` outside one."""
    if barrier:
        return native_barrier_context()
    from pyspark import TaskContext

    native = TaskContext.get()
    if isinstance(native, BarrierTaskContext):  # transparent mode installed ours over pyspark's
        native = native._native
    if native is None:
        raise LaunchError("spark-hydrogen coordinated tasks must run in a Spark task; this code runs outside one")
    return native


def stage_world_size(declared: int | None, stage_tasks: int) -> int:
    """The gang's size in a barrier stage of ``stage_tasks`` tasks: the stage's, which a declared size must match.

    >>> stage_world_size(0, 4), stage_world_size(None, 2), stage_world_size(3, 3)
    (4, 2, 3)
    """
    if not declared:
        return stage_tasks
    if declared != stage_tasks:
        raise LaunchError(
            f"this barrier stage has {stage_tasks} tasks but the gang was declared with {declared} ranks "
            "(the query's partitioning changed after planning); pass num_tasks= to sparkhydrogen.barrier()"
        )
    return declared


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (Python workers are reused: put them back after)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
