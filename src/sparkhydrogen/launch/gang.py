"""Declaring a gang on the driver: coordinator, preflight and the task spec, in one step."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..coordinator.server import GangHandle, LogRecord
from ..coordinator.state import AttemptKey
from ..errors import ErrorInfo, GangFailedError, LaunchError
from .preflight import STARTUP_WAIT, ensure_slots
from .retry import RetryScope, current_scope
from .service import DriverService, service_for
from .task import TaskSpec

__all__ = ["DeclaredGang", "declare_gang", "job_error"]

log = logging.getLogger("sparkhydrogen.launch")


@dataclass(frozen=True)
class DeclaredGang:
    service: DriverService
    handle: GangHandle
    name: str
    stream_logs: bool = False

    def spec(self, gang_attempt: int = 0) -> TaskSpec:
        launch = self.service.config.launch
        return TaskSpec(
            gang_id=self.handle.gang_id,
            secret=self.handle.secret,
            host=self.handle.host,
            port=self.handle.port,
            world_size=self.handle.world_size,
            gang_attempt=gang_attempt,
            connect_timeout=launch.connect_timeout,
            collective_timeout=launch.collective_timeout,
            heartbeat_interval=launch.heartbeat_interval,
            checkpoint_dir=launch.checkpoint_dir,
            stream_logs=self.stream_logs,
            tls_fingerprint=self.handle.tls_fingerprint,
        )

    def last_failure(self, gang_attempt: Optional[int] = None) -> Optional[ErrorInfo]:
        return self.service.server.last_failure(self.handle.gang_id, gang_attempt)

    def release(self) -> None:
        if self.service.server.running:
            self.service.server.remove_gang(self.handle.gang_id)


def declare_gang(sc: Any, world_size: int, name: str,
                 on_log: Optional[Callable[[LogRecord], None]] = None) -> tuple[DeclaredGang, int]:
    """Check slots, make sure the coordinator runs, and register a gang of ``world_size`` ranks.

    Inside :func:`~sparkhydrogen.retry`, the n-th gang an attempt declares is the
    n-th gang of the first attempt again (same id and checkpoints), so tasks learn
    which attempt they are in and stale tasks are refused. Returns the gang and
    the attempt number its tasks must use. With ``on_log``, the gang's tasks stream
    their output to it (see :mod:`sparkhydrogen.logstream`).
    """
    scope = current_scope()
    service = service_for(sc)
    wait = service.config.launch.slot_wait_timeout
    if scope is not None and scope.attempt > 0:
        wait = max(wait, STARTUP_WAIT)  # lost executors are usually being replaced
    if scope is not None and scope.next_index < len(scope.gangs):
        gang = scope.gangs[scope.next_index]
        if gang.handle.world_size == world_size:
            scope.next_index += 1
            ensure_slots(sc, world_size, wait)
            return gang, scope.attempt
    report = ensure_slots(sc, world_size, wait)
    on_abort = _canceller(sc, scope) if scope is not None else None
    handle = service.server.add_gang(world_size, name, on_abort=on_abort, on_log=on_log)
    log.info("gang %s (%s): %d ranks, %d slots free, coordinator %s:%d",
             handle.gang_id[:8], name, world_size, report.slots, handle.host, handle.port)
    gang = DeclaredGang(service, handle, name, stream_logs=on_log is not None)
    if scope is not None:
        scope.gangs.append(gang)
        scope.next_index = len(scope.gangs)
    return gang, scope.attempt if scope is not None else 0


def _canceller(sc: Any, scope: RetryScope) -> Callable[[AttemptKey, ErrorInfo], None]:
    """Cancel the Spark job of an aborted attempt so ranks busy outside collectives stop too."""

    def cancel(key: AttemptKey, cause: ErrorInfo) -> None:
        group = f"sparkhydrogen-{scope.scope_id}-{key[0]}"
        try:
            sc.cancelJobGroup(group)
            log.info("cancelled Spark job group %s after: %s", group, cause.describe())
        except Exception as exc:  # the context may be stopping; nothing else to cancel then
            log.debug("could not cancel job group %s: %s", group, exc)

    return cancel


def job_error(gang: DeclaredGang, exc: BaseException, gang_attempt: Optional[int] = None) -> LaunchError:
    """Translate a failed Spark job into our error, naming the rank that failed first."""
    failure = gang.last_failure(gang_attempt)
    if failure is not None:
        text = f"gang {gang.name!r} failed: {failure.describe()}"
        if failure.traceback:
            text += f"\n--- traceback of rank {failure.rank} ---\n{failure.traceback.rstrip()}"
        return GangFailedError(text, failure.rank, failure)
    first = str(exc).strip().splitlines()
    return LaunchError(f"gang {gang.name!r} failed in Spark before any rank reported an error: "
                       f"{first[0] if first else type(exc).__name__}")
