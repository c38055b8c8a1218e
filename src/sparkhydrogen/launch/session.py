"""Which Spark the driver talks to: the one boundary to Spark.

A gang is launched into a :class:`SparkTarget`: a classic SparkContext (the
coordinator runs here, in the driver) or a Spark Connect session (the client is not
reachable from executors, so the coordinator runs inside rank 0's task). Every
``spark.*`` setting spark-hydrogen reads, every Py4J call into the scheduler and every
job-control call (tags, local properties, cancelling a stage) goes through its methods,
so everything above it (placement choice, preflight, retries, failure translation) is
unit-tested with a small fake target (``tests/unit/fakespark.py``), no JVM needed.
Py4J errors are translated here into :class:`~sparkhydrogen.errors.LaunchError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import HydrogenConfig
from ..errors import LaunchError

__all__ = ["SparkTarget", "resolve", "is_connect", "read_config", "encryption_required_by", "ENCRYPTION_KEYS",
           "task_cpus", "dynamic_allocation_enabled", "INTERRUPT_ON_CANCEL"]

#: The local property that makes cancelling a job interrupt its task threads.
INTERRUPT_ON_CANCEL = "spark.job.interruptOnCancel"

#: Spark settings that say the application's network traffic must be encrypted. When one
#: is true, the coordinator serves TLS too (and refuses to be told otherwise).
ENCRYPTION_KEYS = (
    "spark.network.crypto.enabled",  # AES-based RPC encryption
    "spark.authenticate.enableSaslEncryption",  # SASL-encrypted RPC (legacy)
    "spark.ssl.rpc.enabled",  # TLS for RPC (Spark 4)
    "spark.ssl.enabled",  # TLS for every Spark protocol that supports it
)


def is_connect(obj: Any) -> bool:
    """Whether ``obj`` (a DataFrame or SparkSession) belongs to Spark Connect."""
    return type(obj).__module__.startswith("pyspark.sql.connect")


def encryption_required_by(get: Callable[[str], str | None]) -> str | None:
    """The first of :data:`ENCRYPTION_KEYS` set to true, as ``"key=true"``; ``None`` if none is."""
    for key in ENCRYPTION_KEYS:
        value = get(key)
        if value is not None and str(value).strip().lower() == "true":
            return f"{key}=true"
    return None


@dataclass(frozen=True)
class SparkTarget:
    """A classic SparkContext (``sc``) or a Spark Connect session (``spark``), with conf access."""

    sc: Any = None
    spark: Any = None

    @property
    def connect(self) -> bool:
        return self.sc is None

    @property
    def key(self) -> str:
        """Identifies the application (classic) or the Connect session."""
        if self.sc is not None:
            return str(self.sc.applicationId)
        return f"connect-{self.spark.session_id}"

    def conf(self, key: str) -> str | None:
        """One Spark conf value, or ``None`` when unset (classic: no copy of the whole conf over Py4J)."""
        if self.sc is not None:
            value = self.sc._conf.get(key)
        else:
            value = self.spark.conf.get(key, None)
        return None if value is None else str(value)

    # -- the scheduler (Py4J) ----------------------------------------------------------------
    @property
    def master(self) -> str:
        """The master URL (``local[4]``, ``spark://...``, ``yarn``; Connect: its ``spark.master``)."""
        if self.sc is not None:
            return str(self.sc.master or "")
        return self.conf("spark.master") or ""

    @property
    def default_parallelism(self) -> int:
        if self.sc is not None:
            return int(self.sc.defaultParallelism)
        return int(self.conf("spark.default.parallelism") or 0)

    def scheduler_slots(self, java_profile: Any = None) -> tuple[int, int]:
        """(tasks of ``java_profile``, default the application's, that can run at once; executors listed).

        The executors listed include the driver on a cluster (not in local mode).
        """
        try:
            jsc = self.sc._jsc.sc()
            profile = java_profile if java_profile is not None else \
                jsc.resourceProfileManager().defaultResourceProfile()
            return int(jsc.maxNumConcurrentTasks(profile)), int(jsc.statusTracker().getExecutorInfos().__len__())
        except Exception as exc:  # Py4J errors: translated at the boundary
            raise LaunchError(f"could not ask Spark's scheduler for free slots: {exc}") from exc

    def executor_load(self) -> tuple[int | None, int]:
        """(executors requested by dynamic allocation, ``None`` where nothing is requested; tasks running)."""
        jsc = self.sc._jsc.sc()
        requested: int | None = None
        busy = 0
        try:
            totals = jsc.schedulerBackend().getRequestedTotalExecutors().valuesIterator()
            requested = 0
            while totals.hasNext():
                requested += int(totals.next())
        except Exception:  # not a coarse-grained backend (local mode): nothing is requested
            requested = None
        try:
            for info in jsc.statusTracker().getExecutorInfos():
                busy += int(info.numRunningTasks())
        except Exception:  # the context is stopping
            busy = 0
        return requested, busy

    def register_profile(self, java_profile: Any) -> None:
        """Register a JVM resource profile with the scheduler (idempotent by id)."""
        try:
            self.sc._jsc.sc().resourceProfileManager().addResourceProfile(java_profile)
        except Exception as exc:  # Py4J: Spark refused the profile (cluster manager, dynamic allocation rules)
            text = str(exc).strip().splitlines()
            raise LaunchError(f"Spark refused the gang's resource profile: {text[0] if text else exc}") from exc

    def parallelize(self, count: int) -> Any:
        """``range(count)`` in ``count`` partitions: the source of a gang stage that reads nothing."""
        if self.sc is not None:
            return self.sc.parallelize(range(count), count)
        return self.spark.range(0, count, 1, count)

    # -- job control ---------------------------------------------------------------------------
    def tag_jobs(self, tag: str) -> str | None:
        """Tag the jobs this thread starts with ``tag`` (and make their cancellation interrupt task threads).

        Returns what :meth:`untag_jobs` needs to put the thread's local property back.
        """
        if self.sc is None:
            self.spark.addTag(tag)
            return None
        previous = self.sc.getLocalProperty(INTERRUPT_ON_CANCEL)
        self.sc.addJobTag(tag)
        self.sc.setLocalProperty(INTERRUPT_ON_CANCEL, "true")
        return None if previous is None else str(previous)

    def untag_jobs(self, tag: str, previous: str | None) -> None:
        if self.sc is None:
            self.spark.removeTag(tag)
            return
        self.sc.removeJobTag(tag)
        self.sc.setLocalProperty(INTERRUPT_ON_CANCEL, previous)  # None removes it

    def cancel_tagged(self, tag: str) -> None:
        """Cancel every running job carrying ``tag`` (from any thread)."""
        if self.sc is not None:
            self.sc.cancelJobsWithTag(tag)
        else:
            self.spark.interruptTag(tag)

    def cancel_stage(self, stage_id: int, reason: str) -> bool:
        """Cancel a running stage (classic only); ``False`` when the context is gone."""
        if self.sc is None or getattr(self.sc, "_jsc", None) is None:
            return False
        self.sc._jsc.sc().cancelStage(stage_id, reason)
        return True

    @property
    def stopped(self) -> bool:
        return self.sc is not None and getattr(self.sc, "_jsc", None) is None

    def config(self) -> HydrogenConfig:
        return read_config(self)


def resolve(spark: Any = None) -> SparkTarget:
    """The target of a launch: ``spark`` (a SparkSession, Connect session or SparkContext), else the active one."""
    if spark is None:
        from pyspark import SparkContext

        sc = SparkContext._active_spark_context
        if sc is not None:
            return SparkTarget(sc=sc)
        active = _active_connect_session()
        if active is None:
            raise ValueError("no active SparkSession: create one first, or pass spark=")
        return SparkTarget(spark=active)
    if is_connect(spark):
        return SparkTarget(spark=spark)
    sc = getattr(spark, "sparkContext", spark)
    if not hasattr(sc, "applicationId"):
        raise TypeError(f"spark must be a SparkSession or SparkContext, got {type(spark).__module__}."
                        f"{type(spark).__qualname__}")
    if getattr(sc, "_jsc", None) is None:
        raise ValueError("the SparkContext has been stopped; create a new SparkSession first")
    return SparkTarget(sc=sc, spark=spark if sc is not spark else None)


def _active_connect_session() -> Any:
    try:
        from pyspark.sql import SparkSession

        session = SparkSession.getActiveSession()
    except Exception:  # no Connect client installed
        return None
    return session if session is not None and is_connect(session) else None


def read_config(target: SparkTarget) -> HydrogenConfig:
    """All ``spark.hydrogen.*`` settings of the target's conf, and whether Spark requires encryption.

    Under Spark Connect the same keys are read from the session's conf, so
    ``spark.conf.set("spark.hydrogen.collective.timeout", "30s")`` works there too.
    """
    if target.sc is not None:
        conf = target.sc.getConf()  # one copy: the coordinator reads ~20 keys
        get: Callable[[str], str | None] = conf.get
        driver_host = conf.get("spark.driver.host") or "127.0.0.1"
    else:
        get = target.conf
        driver_host = "127.0.0.1"  # replaced by rank 0's executor address when the coordinator starts there
    return HydrogenConfig.from_conf(get, driver_host=driver_host, encryption_required_by=encryption_required_by(get))


def task_cpus(target: SparkTarget) -> int:
    """``spark.task.cpus`` (default 1)."""
    return int(target.conf("spark.task.cpus") or 1)


def dynamic_allocation_enabled(target: SparkTarget) -> bool:
    return str(target.conf("spark.dynamicAllocation.enabled") or "false").strip().lower() == "true"
