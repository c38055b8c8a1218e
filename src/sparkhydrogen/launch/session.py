"""Which Spark the driver talks to, and the one place its conf is read.

A gang is launched into a :class:`SparkTarget`: a classic SparkContext (the
coordinator runs here, in the driver) or a Spark Connect session (the client is not
reachable from executors, so the coordinator runs inside rank 0's task). Every
``spark.*`` setting spark-hydrogen reads goes through this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import HydrogenConfig

__all__ = ["SparkTarget", "resolve", "is_connect", "read_config", "encryption_required_by", "ENCRYPTION_KEYS",
           "task_cpus", "dynamic_allocation_enabled"]

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
