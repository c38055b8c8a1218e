"""Coordinated placement: a gang as an ordinary Spark stage, all-or-nothing enforced by the coordinator.

Spark refuses barrier stages under dynamic allocation (SPARK-24942). A coordinated gang
runs as an ordinary (non-barrier) stage of N tasks instead; its pending tasks make
dynamic allocation add executors, and every rank waits at the coordinator's *start
gate* (during registration) until all N have joined, so no rank's code runs before all
are there. What the coordinator adds (see :mod:`sparkhydrogen.coordinator.state`):

* the start wait is bounded (``spark.hydrogen.launch.startTimeout``), counted from the
  submission; at the bound the attempt aborts, its job is cancelled, and the error names
  the missing ranks, the cluster's numbers and any other gang holding slots;
* a re-launched single task of an aborted attempt is refused (never a mixed gang); the
  runner relaunches the whole gang with ``max_retries``;
* a speculative copy of a live rank is held aside, never joins and never fails the job.

While the gang waits, the driver logs its progress (ranks joined of N, executors alive
and requested, time waited) and keeps the coordinator's note on the cluster current.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

from ..coordinator.state import START_TIMEOUT_TYPE
from ..errors import ErrorInfo, InsufficientSlotsError
from ..task.data import fed, fed_messages
from ..task.partition import Join
from .data import GangData
from .jobs import stage_canceller
from .preflight import cluster_snapshot
from .progress import LaunchState, ProgressView, progress_view
from .resources import StageResources, stage_profile
from .runner import DeclaredGang, declare, translate
from .session import SparkTarget
from .stage import (
    RESULT_SCHEMA,
    FrameSource,
    RankCall,
    RddSource,
    build_stage,
    checked,
    rank_results,
    result_batches,
    result_rows,
)

__all__ = ["CoordinatedStage", "GateMonitor", "stage_canceller", "start_failure"]

log = logging.getLogger("sparkhydrogen.launch")

#: How often the driver refreshes the cluster's numbers while a gang waits at its start gate.
POLL_INTERVAL = 1.0
#: How often it logs the gang's progress when nothing changed (a change is logged at once, at most once a second).
LOG_INTERVAL = 10.0


def start_failure(gang: DeclaredGang, gang_attempt: int) -> ErrorInfo | None:
    """The attempt's failure if it was the start bound (ranks never all joined), else ``None``."""
    failure = gang.last_failure(gang_attempt)
    return failure if failure is not None and failure.type == START_TIMEOUT_TYPE else None


class GateMonitor:
    """Driver thread while a gang waits at its start gate: progress lines, and the coordinator's note on the cluster.

    It starts the gang's start bound (``open_window``) and stops when the gate opens, the
    gang's job ends, or :meth:`stop` is called.
    """

    def __init__(self, target: SparkTarget, gang: DeclaredGang, gang_attempt: int,
                 poll: float = POLL_INTERVAL, every: float = LOG_INTERVAL) -> None:
        self.target = target
        self.gang = gang
        self.gang_attempt = gang_attempt
        self.poll = poll
        self.every = every
        self.started = time.monotonic()
        #: Seconds from submission until the gate opened (``None`` until it did).
        self.gate_opened: float | None = None
        #: Seconds from submission until the first rank joined, and until the first executor was there.
        self.first_joined: float | None = None
        self.first_executor: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sparkhydrogen-gate-monitor", daemon=True)
        #: Where the wait shows its progress (a notebook bar, a terminal line when Spark shows its own, or nowhere).
        self.view: ProgressView = progress_view(target.conf("spark.ui.showConsoleProgress") == "true")

    def start(self) -> GateMonitor:
        server = self.gang.service.server
        server.open_window(self.gang.handle.gang_id, self.gang_attempt)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            self._watch()
        finally:
            self.view.close(f"all {self.gang.handle.world_size} ranks joined after {self.gate_opened:.1f} s"
                            if self.gate_opened is not None else "stopped waiting")

    def _watch(self) -> None:
        server = self.gang.service.server
        gang_id, world = self.gang.handle.gang_id, self.gang.handle.world_size
        label = f"gang {gang_id[:8]} ({self.gang.name}) attempt {self.gang_attempt}"
        bound = self.gang.service.config.launch.start_timeout
        last_line, last_joined = 0.0, -1
        while not self._stop.is_set():
            try:
                joined, opened = server.gate_status(gang_id, self.gang_attempt)
                snapshot = cluster_snapshot(self.target)
            except Exception as exc:  # the coordinator or the context is stopping
                log.debug("gate monitor of %s stops: %s", label, exc)
                return
            now = time.monotonic()
            waited = now - self.started
            if self.first_executor is None and snapshot.executors > 0:
                self.first_executor = waited
            if self.first_joined is None and joined > 0:
                self.first_joined = waited
            if opened:
                self.gate_opened = waited
                log.info("%s: all %d ranks joined after %.1f s; the gang runs", label, world, waited)
                return
            note = snapshot.describe()
            try:
                server.note_gang(gang_id, note)
            except Exception:
                return
            if waited >= 1.0:
                self.view.show(LaunchState(label, joined, world, waited, bound, snapshot.executors,
                                           snapshot.requested))
            changed = joined != last_joined
            if waited >= 1.0 and ((changed and now - last_line >= 1.0) or now - last_line >= self.every):
                log.warning("%s: %d of %d ranks joined the start gate after %.0f s (bound %.0f s); %s",
                            label, joined, world, waited, bound, note)
                last_line, last_joined = now, joined
            self._stop.wait(self.poll)


class CoordinatedStage:
    """Classic Spark, any allocation: the gang is an ordinary stage of ``world_size`` tasks gated by the coordinator."""

    name = "coordinated stage"

    def __init__(self, target: SparkTarget, *, poll: float = POLL_INTERVAL, resources: StageResources | None = None,
                 data: GangData | None = None) -> None:
        self.target = target
        self.resources = resources  # None: the application's defaults
        self.data = data  # the shares the ranks read, or None
        self.poll = poll  # how often the driver polls the gate and the cluster while the gang waits
        #: The monitor of the last launch (its timings feed ``benchmarks/bench_dynamic.py``).
        self.last_monitor: GateMonitor | None = None

    def run(self, call: RankCall, world_size: int, *, name: str, on_log: Any = None) -> list[Any]:
        profile, asks = stage_profile(self.target, self.resources)
        gang, attempt = declare(self.target, world_size, name, on_log=on_log, gated=True,
                                on_abort=stage_canceller(self.target), profile=profile, resources=asks)
        if self.data is not None:
            log.info("gang %s (%s): data %s", gang.handle.gang_id[:8], name, self.data.how)
        collect = rank_results(self._stage(call, Join.gated(gang.spec(attempt)), world_size, profile))
        monitor = self.last_monitor = GateMonitor(self.target, gang, attempt, poll=self.poll).start()
        try:
            pairs = collect()
        except Exception as exc:
            timeout = start_failure(gang, attempt)
            if timeout is not None:  # the cluster never gave every rank a slot: retrying would not help
                raise InsufficientSlotsError(f"gang {name!r} did not start: {timeout.message}") from exc
            raise translate(gang, exc, attempt) from exc
        finally:
            monitor.stop()
        gang.settle()
        return checked(name, pairs, world_size)  # never silently short: exactly one result per rank

    def _stage(self, call: RankCall, join: Join, world_size: int, profile: Any) -> Any:
        """The gang's stage: ``world_size`` gated ranks over nothing, an RDD's shares or a DataFrame's."""
        data = self.data
        if data is not None and data.arrow and data.arrow_schema is None:
            rank_fn: Any = functools.partial(fed, functools.partial(result_batches, call), True)
            return build_stage(join, rank_fn, FrameSource(data.source, "mapInArrow", RESULT_SCHEMA), profile)
        rank_fn = functools.partial(result_rows, call)
        if data is not None and data.arrow_schema is not None:  # a DataFrame's share as Arrow messages in an RDD
            rank_fn = functools.partial(fed_messages, rank_fn, data.arrow_schema)
        elif data is not None:
            rank_fn = functools.partial(fed, rank_fn, False)
        source = data.source if data is not None else self.target.parallelize(world_size)
        return build_stage(join, rank_fn, RddSource(source), profile)
