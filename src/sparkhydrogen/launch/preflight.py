"""Slot preflight: fail in milliseconds, with numbers, where Spark would wait 10 minutes."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import InsufficientSlotsError, LaunchError
from .session import SparkTarget, dynamic_allocation_enabled, task_cpus

__all__ = ["SlotReport", "shortfall_message", "expected_slots", "startup_pending", "cluster_slots",
           "ensure_slots", "barrier_refused", "GangCapacity", "capacity_message", "gang_capacity", "ensure_gang_fits",
           "ClusterSnapshot", "cluster_snapshot"]

log = logging.getLogger("sparkhydrogen.launch")


@dataclass(frozen=True)
class SlotReport:
    """What the cluster can run at once, as Spark's scheduler counts it."""

    slots: int
    executors: int
    task_cpus: int
    master: str
    resources: str = ""  # the gang stage's own resources (stage-level scheduling), as "gpu=1"


def shortfall_message(needed: int, report: SlotReport) -> str | None:
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
    asks = (f"each task asking resources {report.resources}" if report.resources
            else f"spark.task.cpus={report.task_cpus}")
    return (
        f"barrier job needs {needed} slots but the cluster has {report.slots} ({where}, "
        f"{asks}): lower the number of tasks (or repartition the RDD to at "
        f"most {report.slots} partitions), or add executors/cores. To wait for executors that are still "
        "starting, set spark.hydrogen.launch.slotWaitTimeout"
    )


#: How long the preflight waits, at least, for executors that are expected but not registered yet.
STARTUP_WAIT = 60.0


def _local_cluster(master: str) -> tuple[int, int] | None:
    """``(executors, cores each)`` of a ``local-cluster[N,C,M]`` master, else ``None`` (pure)."""
    match = re.fullmatch(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]", master.strip())
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def expected_slots(master: str, task_cpus: int) -> int | None:
    """Slots a master promises once started, where the master string says (``local-cluster[N,C,M]``).

    >>> expected_slots("local-cluster[2,1,1024]", 1)
    2
    >>> expected_slots("spark://host:7077", 1) is None
    True
    """
    shape = _local_cluster(master)
    return None if shape is None else shape[0] * (shape[1] // max(task_cpus, 1))


def startup_pending(needed: int, report: SlotReport) -> bool:
    """True while the shortfall is executors still starting, not a cluster that is too small (pure).

    Only a master that says how many executors it starts (``local-cluster``) is waited for,
    and only until they are all there: a gang stage whose own resources leave fewer slots
    on every executor (two GPUs a task) is short for good once every executor is up.

    >>> startup_pending(4, SlotReport(slots=2, executors=1, task_cpus=1, master="local-cluster[2,2,1024]"))
    True
    >>> startup_pending(4, SlotReport(slots=2, executors=2, task_cpus=1, master="local-cluster[2,2,1024]"))
    False
    """
    if report.slots == 0:
        return True
    shape = _local_cluster(report.master)
    expected = expected_slots(report.master, report.task_cpus)
    return (shape is not None and expected is not None and report.executors < shape[0]
            and report.slots < expected and needed <= expected)


def cluster_slots(target: Any, profile: Any = None, resources: str = "") -> SlotReport:
    """Ask the JVM scheduler how many tasks of a resource profile (default: the application's) can run at once.

    ``profile`` is a JVM profile registered with the scheduler, ``resources`` its description for messages.
    """
    target = target if isinstance(target, SparkTarget) else SparkTarget(sc=target)
    slots, executors = target.scheduler_slots(profile)
    master = target.master or "?"
    if not master.startswith("local") or master.startswith("local-cluster"):
        executors = max(executors - 1, 0)  # the driver is listed too
    return SlotReport(slots=slots, executors=executors, task_cpus=task_cpus(target), master=master,
                      resources=resources)


def barrier_refused(master: str, dynamic_allocation: bool) -> bool:
    """Whether Spark refuses a barrier stage: dynamic allocation on, and a master that honours it (pure).

    Spark ignores dynamic allocation on ``local``/``local[N]`` masters (not ``local-cluster``).

    >>> barrier_refused("spark://m:7077", True), barrier_refused("local[4]", True), barrier_refused("yarn", False)
    (True, False, False)
    """
    text = master.strip()
    local = text == "local" or text.startswith("local[")
    return dynamic_allocation and not local


def ensure_slots(target: Any, needed: int, wait: float = 0.0, *, coordinated: bool = False, profile: Any = None,
                 resources: str = "") -> SlotReport:
    """Raise :class:`InsufficientSlotsError` unless ``needed`` slots exist (waiting up to ``wait`` s).

    ``coordinated``: the slots are for an ordinary stage gated by the coordinator, which
    Spark accepts under dynamic allocation too (see :func:`ensure_gang_fits` for that case).
    ``profile``: count slots for the gang stage's own JVM resource profile (``resources`` describes it).
    """
    target = target if isinstance(target, SparkTarget) else SparkTarget(sc=target)
    if not coordinated and barrier_refused(target.master, dynamic_allocation_enabled(target)):
        raise LaunchError(
            "spark.dynamicAllocation.enabled=true: Spark refuses barrier stages under dynamic allocation "
            "(SPARK-24942); leave spark.hydrogen.launch.placement at auto (or set it to coordinated) to run the "
            "gang as a coordinated stage, or disable dynamic allocation for this application"
        )
    started = time.monotonic()
    deadline = started + wait
    pause = threading.Event()
    last_log = 0.0
    while True:
        report = cluster_slots(target, profile, resources)
        problem = shortfall_message(needed, report)
        if problem is None:
            return report
        now = time.monotonic()
        if startup_pending(needed, report):
            deadline = max(deadline, started + STARTUP_WAIT)
        if now >= deadline:
            if now - started >= 0.5:
                problem += f" (waited {now - started:.0f} s)"
            raise InsufficientSlotsError(problem)
        if now - last_log >= 5.0:
            last_log = now
            log.warning("waiting up to %.0f s more for slots: %s", deadline - now, problem)
        pause.wait(min(0.25, deadline - now))


# -- coordinated gangs under dynamic allocation -------------------------------------------

#: Custom resources whose per-task and per-executor amounts bound the slots of an executor.
RESOURCES = ("gpu", "fpga")


@dataclass(frozen=True)
class GangCapacity:
    """The most tasks the cluster can ever run at once under dynamic allocation, from its settings."""

    max_executors: int | None  # spark.dynamicAllocation.maxExecutors (None: unbounded)
    executor_cores: int | None  # spark.executor.cores (None: unknown, e.g. standalone's whole worker)
    task_cpus: int
    resources: tuple[tuple[str, float, float], ...] = ()  # (name, per executor, per task)
    profile: str = ""  # the gang stage's own resource profile, described ("": the application's)

    @property
    def slots_per_executor(self) -> int | None:
        if self.executor_cores is None:
            return None
        slots = self.executor_cores // max(self.task_cpus, 1)
        for _, per_executor, per_task in self.resources:
            if per_task > 0:
                slots = min(slots, int(per_executor // per_task + 1e-9))
        return slots

    @property
    def slots(self) -> int | None:
        """``maxExecutors x slots per executor``; ``None`` when either is unbounded or unknown."""
        per = self.slots_per_executor
        if self.max_executors is None or per is None:
            return None
        return self.max_executors * per


def capacity_message(needed: int, cap: GangCapacity) -> str | None:
    """``None`` when ``needed`` ranks can ever run at once, else why not, with the numbers (pure).

    >>> capacity_message(5, GangCapacity(max_executors=2, executor_cores=2, task_cpus=1))[:60]
    'coordinated gang needs 5 slots at once but the cluster can n'
    """
    slots = cap.slots
    if slots is None or needed <= slots:
        return None
    task = "the gang's tasks' " if cap.profile else "spark.task."
    arithmetic = (f"spark.dynamicAllocation.maxExecutors={cap.max_executors} x "
                  f"(spark.executor.cores={cap.executor_cores} / {task}cpus={cap.task_cpus}")
    for name, per_executor, per_task in cap.resources:
        arithmetic += (f", limited by spark.executor.resource.{name}.amount={per_executor:g} / "
                       f"{task}resource.{name}.amount={per_task:g}")
    arithmetic += f") = {slots} slots" + (f" for the gang's resources ({cap.profile})" if cap.profile else "")
    return (f"coordinated gang needs {needed} slots at once but the cluster can never hold more than {slots} "
            f"under dynamic allocation: {arithmetic}. Lower the number of tasks to at most {slots}, or raise "
            "spark.dynamicAllocation.maxExecutors (or the cores/resources per executor)")


def _number(text: str | None, key: str) -> float | None:
    if text is None or not str(text).strip():
        return None
    try:
        return float(str(text).strip())
    except ValueError:
        raise ValueError(f"{key}={text!r} is not a number") from None


def gang_capacity(target: SparkTarget, profile: Any = None, described: str = "") -> GangCapacity:
    """Read the settings that bound a coordinated gang under dynamic allocation (through the target's conf).

    ``profile``: the gang stage's own pyspark ``ResourceProfile``; its task requests
    replace ``spark.task.*`` and its executor requests (where it has them)
    ``spark.executor.*``.
    """
    max_executors = _number(target.conf("spark.dynamicAllocation.maxExecutors"), "spark.dynamicAllocation.maxExecutors")
    cores = _number(target.conf("spark.executor.cores"), "spark.executor.cores")
    cpus = task_cpus(target)

    def per_executor(name: str) -> float:
        return _number(target.conf(f"spark.executor.resource.{name}.amount"),
                       f"spark.executor.resource.{name}.amount") or 0.0

    resources = []
    if profile is None:
        for name in RESOURCES:
            per_task = _number(target.conf(f"spark.task.resource.{name}.amount"), f"spark.task.resource.{name}.amount")
            if per_task:
                resources.append((name, per_executor(name), per_task))
    else:
        tasks, executors = dict(profile.taskResources), dict(profile.executorResources)
        if "cpus" in tasks:
            cpus = int(tasks.pop("cpus").amount)
        if "cores" in executors:
            cores = float(executors["cores"].amount)
        for name, request in sorted(tasks.items()):
            own = executors.get(name)
            has = float(own.amount) if own is not None else per_executor(name)
            resources.append((name, has, float(request.amount)))
    unbounded = max_executors is None or max_executors >= 2**31 - 1
    return GangCapacity(max_executors=None if unbounded else int(max_executors),  # type: ignore[arg-type]
                        executor_cores=None if cores is None else int(cores), task_cpus=cpus,
                        resources=tuple(resources), profile=described if profile is not None else "")


def ensure_gang_fits(target: SparkTarget, needed: int, wait: float = 0.0, *, profile: Any = None,
                     resources: str = "", stage_profile: Any = None) -> SlotReport | None:
    """The coordinated placement's preflight, in milliseconds.

    Under dynamic allocation: refuse a gang the cluster can never hold (its settings'
    arithmetic, :func:`capacity_message`); executors that are not there yet are what
    the start gate waits for. Without dynamic allocation: the slots must be there now,
    as for a barrier stage (:func:`ensure_slots`). ``profile`` is the gang stage's JVM
    profile (for the scheduler's count), ``stage_profile`` the same as pyspark's
    ``ResourceProfile`` (for the arithmetic), ``resources`` its description.
    """
    if not dynamic_allocation_enabled(target):
        return ensure_slots(target, needed, wait, coordinated=True, profile=profile, resources=resources)
    problem = capacity_message(needed, gang_capacity(target, stage_profile, resources))
    if problem is not None:
        raise InsufficientSlotsError(problem)
    return None


@dataclass(frozen=True)
class ClusterSnapshot:
    """What the cluster has right now, for progress lines and start-timeout errors."""

    executors: int
    requested: int | None
    slots: int
    busy: int = 0  # tasks running on those executors (this gang's waiting ranks included)

    def describe(self) -> str:
        requested = f", {self.requested} requested" if self.requested is not None else ""
        return (f"{self.executors} executor(s) alive{requested}, {self.slots} slot(s), "
                f"{self.busy} task(s) running")


def cluster_snapshot(target: SparkTarget) -> ClusterSnapshot:
    """Executors alive and requested (dynamic allocation's target), slots and running tasks (Py4J)."""
    report = cluster_slots(target)
    requested, busy = target.executor_load()
    return ClusterSnapshot(executors=report.executors, requested=requested, slots=report.slots, busy=busy)
