"""What runs inside each barrier task: join the gang, run the user's function, report the outcome."""

from __future__ import annotations

import contextlib
import logging
import socket
import traceback
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional

from ..context import BarrierTaskContext
from ..coordinator.client import CoordinatorClient
from ..errors import CollectiveError, ErrorInfo, LaunchError

__all__ = ["TaskSpec", "run_rank"]

log = logging.getLogger("sparkhydrogen.task")


@dataclass(frozen=True)
class TaskSpec:
    """Everything a task needs to join its gang; travels inside the task closure.

    The secret authenticates this gang's tasks to the coordinator; it is never
    sent on the coordinator's socket (only an HMAC of a fresh nonce is).
    """

    gang_id: str
    secret: bytes
    host: str
    port: int
    world_size: int
    gang_attempt: int = 0
    connect_timeout: float = 30.0
    collective_timeout: Optional[float] = None
    heartbeat_interval: Optional[float] = 1.0
    checkpoint_dir: Optional[str] = None
    stream_logs: bool = False
    tls_fingerprint: Optional[str] = None  # SHA-256 of the coordinator's TLS certificate; None: plaintext

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return (f"TaskSpec(gang_id={self.gang_id!r}, host={self.host!r}, port={self.port}, "
                f"world_size={self.world_size}, gang_attempt={self.gang_attempt})")


def _native_context() -> Any:
    from pyspark.taskcontext import BarrierTaskContext as NativeBarrierTaskContext
    from pyspark.taskcontext import TaskContext

    native = TaskContext.get()
    if not isinstance(native, NativeBarrierTaskContext):
        raise LaunchError(
            "spark-hydrogen tasks must run in a Spark barrier stage; this task is not in one "
            "(was the function called outside sparkhydrogen.barrier()/run()?)"
        )
    return native


def _streaming(client: CoordinatorClient, enabled: bool) -> ContextManager[Any]:
    """Capture this rank's stdout/stderr and stream it to the driver's log hook, if asked to."""
    if not enabled:
        return contextlib.nullcontext()
    from ..logstream import OutputCapture

    return OutputCapture(client.log)


def run_rank(spec: TaskSpec, fn: Callable[[int, Iterable[Any]], Iterable[Any]], index: int,
             rows: Iterable[Any]) -> Iterator[Any]:
    """Generator run as the body of one barrier task (``mapPartitionsWithIndex`` signature).

    Connects to the coordinator, installs the :class:`BarrierTaskContext` for the
    life of the partition (so narrow transformations chained after the barrier
    see it too), reports a raised exception as this rank's failure, and reports
    normal completion. With ``spec.stream_logs`` the rank's output is streamed to
    the driver while ``fn`` runs (and flushed before the outcome is reported).
    """
    native = _native_context()
    if native.partitionId() != index:
        raise LaunchError(f"partition index {index} differs from the task's partition id {native.partitionId()}")
    stage_tasks = len(native.getTaskInfos())
    if stage_tasks != spec.world_size:
        raise LaunchError(
            f"this barrier stage has {stage_tasks} tasks but the gang was declared with {spec.world_size} ranks "
            "(the query's partitioning changed after planning); pass num_tasks= to sparkhydrogen.barrier()"
        )
    client = CoordinatorClient.connect((spec.host, spec.port), spec.gang_id, spec.secret, spec.connect_timeout,
                                       tls_fingerprint=spec.tls_fingerprint)
    ctx: Optional[BarrierTaskContext] = None
    try:
        world = client.register(index, gang_attempt=spec.gang_attempt, stage_id=native.stageId(),
                                host=socket.gethostname(), task_attempt_id=native.taskAttemptId())
        if spec.heartbeat_interval is not None:
            client.start_heartbeat(spec.heartbeat_interval)
        ctx = BarrierTaskContext(client, index, world, native, spec.gang_attempt, spec.collective_timeout,
                                 spec.checkpoint_dir)
        BarrierTaskContext._set(ctx)
        try:
            with _streaming(client, spec.stream_logs):
                yield from fn(index, rows)
        except GeneratorExit:
            client.finish()  # the consumer stopped early: this rank is done, not failed
            raise
        except BaseException as exc:
            if not isinstance(exc, CollectiveError):  # a peer verdict is already known to the coordinator
                client.fail(ErrorInfo.from_exception(exc, index, traceback.format_exc()))
            raise
        else:
            client.finish()
    finally:
        if BarrierTaskContext._current is ctx:
            BarrierTaskContext._set(None)
        client.close()

