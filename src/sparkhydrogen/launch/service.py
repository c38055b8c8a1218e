"""One coordinator per application: started lazily on first use, stopped with the SparkContext.

Classic PySpark: one per SparkContext, bound to ``spark.driver.host``. Under Spark
Connect the driver side only needs one for ranks that run on this machine (the
torch launcher's local mode); gangs on executors bring their own (see
:mod:`sparkhydrogen.task.embedded`).
"""

from __future__ import annotations

import atexit
import functools
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import HydrogenConfig
from ..coordinator.server import CoordinatorServer
from .jobs import stage_canceller
from .session import SparkTarget, encryption_required_by, read_config, resolve

__all__ = ["DriverService", "service_for", "running_services", "stop_all", "read_config", "encryption_required_by"]

log = logging.getLogger("sparkhydrogen.launch")

_lock = threading.Lock()
_services: dict[str, DriverService] = {}

#: How long a released gang may take for its last ranks' reports to arrive before it is removed anyway.
SETTLE_TIMEOUT = 10.0


@dataclass(frozen=True)
class DriverService:
    """The running coordinator of one application and the settings read from its conf."""

    app_id: str
    config: HydrogenConfig
    server: CoordinatorServer
    releaser: _Releaser | None = field(default=None, repr=False, compare=False)

    def release(self, gang_id: str, checkpoint_dir: str | None = None) -> None:
        """Forget a gang once its ranks have all reported (bounded), and remove its checkpoint folder.

        Safe from any thread, including a garbage-collector finalizer: the work is
        done on the service's releaser thread.
        """
        if self.releaser is not None:
            self.releaser.put(gang_id, checkpoint_dir)
        else:
            self.release_now(gang_id, checkpoint_dir)

    def release_now(self, gang_id: str, checkpoint_dir: str | None = None) -> None:
        """Forget a gang at once (the caller has waited for it to settle) and remove its checkpoint folder."""
        _forget(self.server, gang_id, checkpoint_dir)


def _forget(server: CoordinatorServer, gang_id: str, checkpoint_dir: str | None) -> None:
    try:
        if server.running:
            server.remove_gang(gang_id)
    except Exception as exc:  # the coordinator is stopping: nothing left to release
        log.debug("could not release gang %s: %s", gang_id[:8], exc)
    if checkpoint_dir is not None:
        shutil.rmtree(_gang_folder(checkpoint_dir, gang_id), ignore_errors=True)


class _Releaser:
    """A daemon thread removing released gangs after they settle (no spurious aborts of late finishes)."""

    def __init__(self, server: CoordinatorServer) -> None:
        self._server = server
        self._queue: queue.SimpleQueue[tuple[str, str | None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sparkhydrogen-releaser", daemon=True)
        self._thread.start()

    def put(self, gang_id: str, checkpoint_dir: str | None) -> None:
        self._queue.put((gang_id, checkpoint_dir))

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        pause = threading.Event()
        while True:
            item = self._queue.get()
            if item is None:
                return
            gang_id, checkpoint_dir = item
            deadline = time.monotonic() + SETTLE_TIMEOUT
            try:
                while self._server.running and not self._server.gang_settled(gang_id) \
                        and time.monotonic() < deadline:
                    pause.wait(0.01)
            except Exception as exc:  # the coordinator is stopping: _forget says so too
                log.debug("could not wait for gang %s to settle: %s", gang_id[:8], exc)
            _forget(self._server, gang_id, checkpoint_dir)


def _gang_folder(checkpoint_dir: str, gang_id: str) -> str:
    import os

    return os.path.join(checkpoint_dir.removeprefix("file://"), f"gang-{gang_id}")


def service_for(spark: Any) -> DriverService:
    """The coordinator of ``spark`` (a SparkContext, SparkSession or :class:`SparkTarget`), starting it once."""
    target = spark if isinstance(spark, SparkTarget) else resolve(spark)
    if target.stopped:
        raise ValueError("the SparkContext has been stopped; create a new SparkSession first")
    app_id = target.key
    with _lock:
        service = _services.get(app_id)
        if service is not None and service.server.running:
            return service
        if target.sc is not None:
            for other in [s for a, s in _services.items() if a != app_id and not a.startswith("connect-")]:
                _stop(other)  # contexts stopped without stop()
        config = read_config(target)
        if target.connect:  # only ranks on this machine (local mode) connect to a Connect client's coordinator
            config = replace(config, coordinator=replace(config.coordinator, host="127.0.0.1", advertise_host=None))
        server = CoordinatorServer(config.coordinator)
        if target.sc is not None:  # a gated stage gang that aborts has its Spark stage cancelled
            server.stage_abort_hook = stage_canceller(target)
        server.start()
        service = DriverService(app_id, config, server, _Releaser(server))
        _services[app_id] = service
        _stop_with(target.sc if target.sc is not None else target.spark, app_id)
        return service


def running_services() -> list[DriverService]:
    """The coordinators this process runs now (normally one: the active application's), started by use only."""
    with _lock:
        return [s for s in _services.values() if s.server.running]


def _stop_with(owner: Any, app_id: str) -> None:
    """Make ``owner.stop()`` (a SparkContext's, so also ``SparkSession.stop()``) stop our coordinator first."""
    original = owner.stop
    if getattr(original, "_sparkhydrogen_app", None) == app_id:
        return

    @functools.wraps(original)
    def stop(*args: Any, **kwargs: Any) -> Any:
        with _lock:
            service = _services.pop(app_id, None)
        if service is not None:
            _shutdown(service)
        return original(*args, **kwargs)

    stop._sparkhydrogen_app = app_id  # type: ignore[attr-defined]
    owner.stop = stop


def _shutdown(service: DriverService) -> None:
    if service.releaser is not None:
        service.releaser.close()
    service.server.stop()


def _stop(service: DriverService) -> None:
    _services.pop(service.app_id, None)
    _shutdown(service)


def stop_all() -> None:
    """Stop every coordinator this process started (also registered with ``atexit``)."""
    with _lock:
        for service in list(_services.values()):
            _stop(service)


atexit.register(stop_all)
