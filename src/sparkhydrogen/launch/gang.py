"""Declaring a gang on the driver: coordinator, preflight and the task spec, in one step."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from ..coordinator.server import GangHandle
from ..errors import ErrorInfo, GangFailedError, LaunchError
from .preflight import ensure_slots
from .service import DriverService, service_for
from .task import TaskSpec

__all__ = ["DeclaredGang", "declare_gang", "job_error"]

log = logging.getLogger("sparkhydrogen.launch")


@dataclass(frozen=True)
class DeclaredGang:
    service: DriverService
    handle: GangHandle
    name: str

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
        )

    def last_failure(self) -> Optional[ErrorInfo]:
        return self.service.server.last_failure(self.handle.gang_id)

    def release(self) -> None:
        if self.service.server.running:
            self.service.server.remove_gang(self.handle.gang_id)


def declare_gang(sc: Any, world_size: int, name: str) -> DeclaredGang:
    """Check slots, make sure the coordinator runs, and register a gang of ``world_size`` ranks."""
    service = service_for(sc)
    report = ensure_slots(sc, world_size, service.config.launch.slot_wait_timeout)
    handle = service.server.add_gang(world_size, name)
    log.info("gang %s (%s): %d ranks, %d slots free, coordinator %s:%d",
             handle.gang_id[:8], name, world_size, report.slots, handle.host, handle.port)
    return DeclaredGang(service, handle, name)


def job_error(gang: DeclaredGang, exc: BaseException) -> LaunchError:
    """Translate a failed Spark job into our error, naming the rank that failed first."""
    failure = gang.last_failure()
    if failure is not None:
        text = f"gang {gang.name!r} failed: {failure.describe()}"
        if failure.traceback:
            text += f"\n--- traceback of rank {failure.rank} ---\n{failure.traceback.rstrip()}"
        return GangFailedError(text, failure.rank, failure)
    first = str(exc).strip().splitlines()
    return LaunchError(f"gang {gang.name!r} failed in Spark before any rank reported an error: "
                       f"{first[0] if first else type(exc).__name__}")
