"""Driver side of elastic gangs: each attempt's size from the cluster's slots, and growth offered at checkpoints.

:class:`AttemptSizer` is what the runner (:func:`~.runner.attempts`) asks for the size of
every attempt of a run: a fixed-size gang gets its size at once (the slot preflight does
what it always did); an elastic one reads a slot snapshot (:func:`~.preflight.cluster_snapshot`)
and sizes the attempt by the pure rule of :mod:`.elastic`, waiting below ``min``, bounded
by ``spark.hydrogen.launch.startTimeout``. Every choice is logged with its arithmetic and
kept in the run's :class:`~.elastic.SizeHistory`.

With ``grow="checkpoint"`` a :class:`GrowthWatcher` runs beside each attempt smaller than
``max``: when slots are free it offers the coordinator a larger size, and the gang's next
committed checkpoint ends the attempt so that the runner relaunches it larger.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import InsufficientSlotsError
from .elastic import SizeChoice, SizeHistory, SizeRange, SizeStep, SlotSnapshot, choose_size, growth
from .preflight import cluster_snapshot
from .session import SparkTarget

__all__ = ["AttemptSizer", "GrowthWatcher", "snapshot_of"]

log = logging.getLogger("sparkhydrogen.launch")

#: How often the driver reads the cluster's slots while an elastic gang waits below min or may grow.
POLL_INTERVAL = 0.5
#: After an attempt ended, how long the next one's size waits, at most, for the ended attempt's tasks to leave
#: their slots (Spark kills them asynchronously); only while waiting could make the gang larger.
SETTLE = 3.0
#: The same after a gang ended its attempt to grow at a checkpoint: the slots it grows into are known to be there.
SETTLE_GROWING = 15.0
#: Relaunches to grow that found no more slots, after which a gang stops growing at checkpoints.
MAX_IDLE_GROWS = 3


def snapshot_of(target: SparkTarget) -> SlotSnapshot:
    """The slots the cluster has now and the tasks running on them (a few Py4J calls)."""
    snap = cluster_snapshot(target)
    return SlotSnapshot(slots=snap.slots, busy=snap.busy, executors=snap.executors)


class AttemptSizer:
    """The size of each attempt of one run of a gang of ``wanted`` ranks (a fixed size, or a range)."""

    def __init__(self, target: SparkTarget | None, wanted: SizeRange, name: str, *,
                 wait: float | None = None, snapshot: Callable[[], SlotSnapshot] | None = None,
                 poll: float = POLL_INTERVAL) -> None:
        self.target = target
        self.wanted = wanted
        self.name = name
        self.history = SizeHistory(wanted)
        self.poll = poll
        self._wait = wait
        self._snapshot = snapshot
        #: The size of the running (or last) attempt.
        self.current = wanted.high
        #: Relaunches to grow that did not get a larger size (the slots were taken meanwhile); growth stops at
        #: :data:`MAX_IDLE_GROWS` of them, so that a gang never relaunches in a loop at the same size.
        self.idle_grows = 0

    @property
    def elastic(self) -> bool:
        return self.wanted.elastic

    def snapshot(self) -> SlotSnapshot:
        if self._snapshot is not None:
            return self._snapshot()
        if self.target is None:
            raise InsufficientSlotsError("an elastic gang needs a Spark session to read the cluster's slots")
        return snapshot_of(self.target)

    def bound(self) -> float:
        if self._wait is not None:
            return self._wait
        return self.target.config().launch.start_timeout if self.target is not None else 0.0

    def next(self, attempt: int, cause: str, growing: bool = False) -> int:
        """The size of attempt ``attempt`` (logged and recorded); waits below ``min``, bounded by the start timeout.

        ``growing``: the previous attempt ended to grow at a checkpoint (its tasks are given
        longer to leave the slots, so that the relaunch is not at the same size again).
        """
        if not self.elastic:
            self.current = self.wanted.high
            self.history.record(SizeStep(attempt, self.current, cause))
            return self.current
        choice = self._choose(settle=(SETTLE_GROWING if growing else SETTLE) if attempt else 0.0)
        self.current = choice.size
        previous = self.history.last
        if growing and previous is not None and choice.size <= previous:
            self.idle_grows += 1
            if self.idle_grows >= MAX_IDLE_GROWS:
                log.warning("elastic gang %s: %d relaunches to grow found no more slots; it grows at attempt "
                            "boundaries only from now on", self.name, self.idle_grows)
        self.history.record(SizeStep(attempt, choice.size, cause, choice.arithmetic))
        change = "" if previous is None or previous == choice.size else f" (was {previous}: {cause})"
        log_at = log.warning if previous is not None and previous != choice.size else log.info
        log_at("elastic gang %s (%s) attempt %d runs at %d ranks%s: %s", self.name, self.wanted.describe(), attempt,
               choice.size, change, choice.arithmetic)
        return choice.size

    def _choose(self, settle: float = 0.0) -> SizeChoice:
        started = time.monotonic()
        deadline = started + self.bound()
        pause = threading.Event()
        last_log = started
        while True:
            snapshot = self.snapshot()
            choice = choose_size(self.wanted, snapshot)
            now = time.monotonic()
            settling = snapshot.busy > 0 and choice.size < self.wanted.high and now < started + settle
            if choice.fits and (not settling or now >= deadline):
                return choice
            if now >= deadline:
                raise InsufficientSlotsError(
                    f"elastic gang {self.name} ({self.wanted.describe()}) did not start: {choice.arithmetic}, "
                    f"waited {now - started:.0f} s (spark.hydrogen.launch.startTimeout={self.bound():.0f} s); "
                    "add executors or lower min")
            if now - last_log >= 10.0:
                last_log = now
                log.warning("elastic gang %s waits for slots (up to %.0f s more): %s", self.name, deadline - now,
                            choice.arithmetic)
            pause.wait(min(self.poll, max(deadline - now, 0.0)))

    @contextmanager
    def watching(self, offer: Callable[[], Callable[[int], None] | None]) -> Iterator[None]:
        """While the attempt runs: offer growth through ``offer()`` (``None`` until the gang is declared)."""
        if self.idle_grows >= MAX_IDLE_GROWS or growth(self.wanted, self.current,
                                                       SlotSnapshot(slots=self.wanted.high)) is None:
            yield  # a fixed size, grow="attempt", or already at max: nothing to watch
            return
        watcher = GrowthWatcher(self, offer).start()
        try:
            yield
        finally:
            watcher.stop()


class GrowthWatcher:
    """Driver thread beside an attempt of a ``grow="checkpoint"`` gang: offers a larger size when slots are free."""

    def __init__(self, sizer: AttemptSizer, offer: Callable[[], Callable[[int], None] | None]) -> None:
        self.sizer = sizer
        self.offer = offer
        self.offered: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sparkhydrogen-growth-watcher", daemon=True)

    def start(self) -> GrowthWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        sizer = self.sizer
        while not self._stop.wait(sizer.poll):
            try:
                target = growth(sizer.wanted, sizer.current, sizer.snapshot())
                send = self.offer()
                if target is not None and send is not None and target != self.offered:
                    send(target)
                    self.offered = target
                    log.info("elastic gang %s: %d free slot(s) beside its %d ranks; it grows to %d at its next "
                             "checkpoint", sizer.name, target - sizer.current, sizer.current, target)
            except Exception as exc:  # the context or the coordinator is stopping
                log.debug("growth watcher of %s stops: %s", sizer.name, exc)
                return

