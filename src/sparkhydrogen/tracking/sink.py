"""Driver side: which MLflow run a gang's metrics go to, and the thread that logs them there.

The run is chosen once, when the gang is declared, in the thread that launches it
(:func:`sink_for_launch`, called by the runner): the run a :func:`~.run.fit_run` of
that thread opened, else that thread's active MLflow run (MLflow keeps the active run
per thread), else none (the ranks' metrics are dropped, with one debug line). So two
gangs launched at once from two threads (a ``CrossValidator`` with ``parallelism=2``)
log into their own runs. Points reach the :class:`MlflowSink` on the coordinator's
loop, which must stay quick: they are queued (bounded; the oldest dropped and
counted) and a writer thread logs them with ``MlflowClient.log_batch`` and the run's
explicit id, never through MLflow's thread-local active run.

``mlflow`` is imported only once it is already in ``sys.modules`` (a run can be active
only then) or a :func:`~.run.fit_run` asked for a run.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..coordinator.handles import MetricRecord
from .points import MAX_POINTS_PER_FRAME, MetricPoint

__all__ = ["MlflowSink", "sink_for_launch", "tracked_run", "DEFAULT_MAX_QUEUED", "FLUSH_TIMEOUT"]

log = logging.getLogger("sparkhydrogen.mlflow")

#: Points a gang's sink may hold before the oldest are dropped (and counted).
DEFAULT_MAX_QUEUED = 100_000
#: How long releasing a gang waits for its sink to log what it holds.
FLUSH_TIMEOUT = 60.0

# the run gangs launched in this context log into (set by fit_run): (run id, tracking URI)
_TRACKED: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "sparkhydrogen_tracked_run", default=None)


@contextlib.contextmanager
def tracked_run(run_id: str, tracking_uri: str) -> Iterator[None]:
    """Gangs launched in this thread (context) while inside send their ranks' metrics to ``run_id``."""
    token = _TRACKED.set((run_id, tracking_uri))
    try:
        yield
    finally:
        _TRACKED.reset(token)


def sink_for_launch(gang_name: str = "") -> MlflowSink | None:
    """The sink for a gang launched now from this thread, or ``None`` (its ranks' metrics are dropped)."""
    tracked = _TRACKED.get()
    if tracked is not None:
        return MlflowSink(*tracked)
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:  # no run can be active: mlflow was never imported here
        return None
    active = mlflow.active_run()
    if active is None:
        log.debug("gang %s: no MLflow run is active in the launching thread; its ranks' metrics are dropped",
                  gang_name or "?")
        return None
    return MlflowSink(active.info.run_id, mlflow.get_tracking_uri())


class MlflowSink:
    """Logs a gang's metric points into one MLflow run, by its id, from a writer thread.

    Called with each :class:`MetricRecord` on the coordinator's loop: never blocks
    there. :meth:`close` (the gang is released) logs what is queued, bounded.
    """

    def __init__(self, run_id: str, tracking_uri: str, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.max_queued = max_queued
        self._points: collections.deque[MetricPoint] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.dropped = 0  # here (queue full) or on the ranks (their queues full)
        self.failed = 0  # points MLflow refused or could not take
        self.logged = 0

    def __call__(self, record: MetricRecord) -> None:
        with self._cond:
            if self._closed:
                self.dropped += len(record.points)
                return
            if record.dropped:
                self.dropped += record.dropped
                log.warning("rank %d of a gang dropped %d metric point(s): it logged faster than they could be "
                            "sent (MLflow run %s)", record.rank, record.dropped, self.run_id)
            for point in record.points:
                if len(self._points) >= self.max_queued:
                    self._points.popleft()
                    self.dropped += 1
                self._points.append(point)
            if self._thread is None:
                self._thread = threading.Thread(target=self._write, name="sparkhydrogen-mlflow-writer", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _write(self) -> None:
        from mlflow.entities import Metric

        client = self._client()
        while True:
            with self._cond:
                while not self._points and not self._closed:
                    self._cond.wait()
                if not self._points:
                    return
                batch = [self._points.popleft() for _ in range(min(len(self._points), MAX_POINTS_PER_FRAME))]
                self._busy = True
            try:
                client.log_batch(self.run_id, metrics=[Metric(p.key, p.value, p.timestamp_ms, p.step)
                                                       for p in batch], synchronous=True)
                logged, failed = len(batch), 0
            except Exception as exc:  # a down server must not take the driver down: say so, count, go on
                logged, failed = 0, len(batch)
                log.warning("could not log %d metric point(s) to MLflow run %s: %s", len(batch), self.run_id, exc)
            with self._cond:
                self._busy = False
                self.logged += logged
                self.failed += failed
                self._cond.notify_all()

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Wait (at most ``timeout`` s) until every queued point has been logged; whether it was."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._points or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Log what is queued (bounded), then stop the writer; later points are dropped."""
        done = self.flush(timeout)
        with self._cond:
            self._closed = True
            left = len(self._points)
            self._cond.notify_all()
        if not done and left:
            log.warning("MLflow run %s: %d metric point(s) were not logged within %g s", self.run_id, left, timeout)
