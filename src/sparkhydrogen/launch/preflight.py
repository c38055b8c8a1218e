"""Slot preflight: fail in milliseconds, with numbers, where Spark would wait 10 minutes."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import InsufficientSlotsError, LaunchError
from .session import SparkTarget, dynamic_allocation_enabled, task_cpus

__all__ = ["SlotReport", "shortfall_message", "cluster_slots", "ensure_slots"]

log = logging.getLogger("sparkhydrogen.launch")


@dataclass(frozen=True)
class SlotReport:
    """What the cluster can run at once, as Spark's scheduler counts it."""

    slots: int
    executors: int
    task_cpus: int
    master: str


def shortfall_message(needed: int, report: SlotReport) -> Optional[str]:
    """``None`` when ``needed`` tasks fit at once, else an actionable explanation (pure).

    >>> shortfall_message(8, SlotReport(slots=4, executors=2, task_cpus=1, master="spark://m:7077"))[:52]
    'barrier job needs 8 slots but the cluster has 4 (2 e'
    """
    if needed <= report.slots:
        return None
    if report.slots == 0:
        return (
            f"barrier job needs {needed} slots but no executor has registered yet (master {report.master}); "
            "start executors, or set spark.hydrogen.launch.slotWaitTimeout to wait for them longer"
        )
    local = report.master.startswith("local") and not report.master.startswith("local-cluster")
    where = f"master {report.master}" if local else f"{report.executors} executor(s)"
    return (
        f"barrier job needs {needed} slots but the cluster has {report.slots} ({where}, "
        f"spark.task.cpus={report.task_cpus}): lower the number of tasks (or repartition the RDD to at "
        f"most {report.slots} partitions), or add executors/cores. To wait for executors that are still "
        "starting, set spark.hydrogen.launch.slotWaitTimeout"
    )


#: How long the preflight waits, at least, for executors that are expected but not registered yet.
STARTUP_WAIT = 60.0


def expected_slots(master: str, task_cpus: int) -> Optional[int]:
    """Slots a master promises once started, where the master string says (``local-cluster[N,C,M]``).

    >>> expected_slots("local-cluster[2,1,1024]", 1)
    2
    >>> expected_slots("spark://host:7077", 1) is None
    True
    """
    match = re.fullmatch(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]", master.strip())
    if match is None:
        return None
    return int(match.group(1)) * (int(match.group(2)) // max(task_cpus, 1))


def _startup_pending(needed: int, report: SlotReport) -> bool:
    """True while the shortfall is executors still starting, not a cluster that is too small."""
    if report.slots == 0:
        return True
    expected = expected_slots(report.master, report.task_cpus)
    return expected is not None and report.slots < expected and needed <= expected


def cluster_slots(target: Any) -> SlotReport:
    """Ask the JVM scheduler how many tasks of the default resource profile can run concurrently."""
    target = target if isinstance(target, SparkTarget) else SparkTarget(sc=target)
    sc = target.sc
    try:
        jsc = sc._jsc.sc()
        profile = jsc.resourceProfileManager().defaultResourceProfile()
        slots = int(jsc.maxNumConcurrentTasks(profile))
        executors = int(jsc.statusTracker().getExecutorInfos().__len__())
    except Exception as exc:  # Py4J errors: translate at the boundary
        raise LaunchError(f"could not ask Spark's scheduler for free slots: {exc}") from exc
    master = sc.master or "?"
    if not master.startswith("local") or master.startswith("local-cluster"):
        executors = max(executors - 1, 0)  # the driver is listed too
    return SlotReport(slots=slots, executors=executors, task_cpus=task_cpus(target), master=master)


def ensure_slots(target: Any, needed: int, wait: float = 0.0) -> SlotReport:
    """Raise :class:`InsufficientSlotsError` unless ``needed`` slots exist (waiting up to ``wait`` s)."""
    target = target if isinstance(target, SparkTarget) else SparkTarget(sc=target)
    if dynamic_allocation_enabled(target):
        raise LaunchError(
            "spark.dynamicAllocation.enabled=true: Spark refuses barrier stages under dynamic allocation "
            "(SPARK-24942); disable it for this application or use a fixed number of executors"
        )
    started = time.monotonic()
    deadline = started + wait
    pause = threading.Event()
    last_log = 0.0
    while True:
        report = cluster_slots(target)
        problem = shortfall_message(needed, report)
        if problem is None:
            return report
        now = time.monotonic()
        if _startup_pending(needed, report):
            deadline = max(deadline, started + STARTUP_WAIT)
        if now >= deadline:
            if now - started >= 0.5:
                problem += f" (waited {now - started:.0f} s)"
            raise InsufficientSlotsError(problem)
        if now - last_log >= 5.0:
            last_log = now
            log.warning("waiting up to %.0f s more for slots: %s", deadline - now, problem)
        pause.wait(min(0.25, deadline - now))
