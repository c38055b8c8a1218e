"""Stage-level resources per gang: ``run(..., resources={"gpu": 1})`` launches the gang's stage with them.

A gang's stage can ask for other task resources than the application's defaults
(``spark.task.cpus``, ``spark.task.resource.*``), so the data-prep stages of a
pipeline hold no GPUs and only the training gang does. Spark calls this stage-level
scheduling (pyspark >= 3.4 for task-only requests without dynamic allocation). It is
supported on standalone (``local-cluster`` included), YARN and Kubernetes masters, not
on ``local``/``local[N]``: there every task runs in the driver's JVM with its
resources.

* A dict names task resources: ``{"cpus": 2, "gpu": 1, "fpga": 0.5}``. Without
  dynamic allocation it becomes a *task* resource profile on the executors that run;
  with dynamic allocation it also asks new executors for the resources
  ``spark.executor.*`` configures (Spark needs executor requests to add executors).
* A :class:`pyspark.resource.ResourceProfile` is used as given.

Profiles built from dicts are cached per application and request: Spark keeps every
profile it is given for the life of the context, so a notebook calling ``run`` in a
loop adds one profile, not one per call.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import LaunchError
from .session import SparkTarget, dynamic_allocation_enabled

__all__ = ["StageResources", "stage_resources", "unsupported_reason", "profile_for", "java_profile",
           "executor_requests", "stage_profile", "with_profile", "arrow_profile_kwargs"]

log = logging.getLogger("sparkhydrogen.launch")

_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True)
class StageResources:
    """What each task of a gang's stage needs: CPUs and custom resources (``gpu``, ``fpga``, ...).

    ``profile`` is a user's own :class:`pyspark.resource.ResourceProfile`, used as given.

    >>> StageResources(cpus=1, amounts=(("gpu", 1.0),)).describe()
    'cpus=1, gpu=1'
    """

    cpus: int | None = None
    amounts: tuple[tuple[str, float], ...] = ()
    profile: Any = None

    def amount(self, name: str) -> float:
        return dict(self.amounts).get(name, 0.0)

    def describe(self) -> str:
        if self.profile is not None:
            return f"ResourceProfile {self.profile!r}"
        parts = [f"cpus={self.cpus}"] if self.cpus is not None else []
        parts += [f"{name}={amount:g}" for name, amount in self.amounts]
        return ", ".join(parts) or "defaults"

    def __hash__(self) -> int:
        return hash((self.cpus, self.amounts, id(self.profile)))


def _check_amount(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"resources[{name!r}] must be a number > 0, got {value!r}")
    amount = float(value)
    if amount > 0.5 and not amount.is_integer():  # Spark's rule: a share of one address, or whole addresses
        raise ValueError(
            f"resources[{name!r}]={value!r}: a task resource amount must be a whole number, or a fraction <= 0.5 "
            "(0.5 lets two tasks share one address, 0.25 four, ...)"
        )
    if amount < 1 and not (1 / amount).is_integer() and abs(1 / amount - round(1 / amount)) > 1e-9:
        raise ValueError(
            f"resources[{name!r}]={value!r}: a fractional amount must divide one address evenly (1/amount tasks "
            "share it): use 0.5, 0.25, 0.2, ..."
        )
    return amount


def stage_resources(value: Any) -> StageResources | None:
    """Validate ``resources=``: ``None``, a dict of task resources, or a pyspark ``ResourceProfile``.

    >>> stage_resources({"gpu": 1, "cpus": 2})
    StageResources(cpus=2, amounts=(('gpu', 1.0),), profile=None)
    >>> stage_resources({"gpu": 0.75})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: resources['gpu']=0.75: a task resource amount must be a whole number, or a fraction <= 0.5 ...
    """
    if value is None:
        return None
    if isinstance(value, StageResources):
        return value
    if type(value).__name__ == "ResourceProfile" and type(value).__module__.startswith("pyspark"):
        return StageResources(profile=value)
    if not isinstance(value, Mapping):
        raise TypeError("resources must be a dict such as {'gpu': 1, 'cpus': 1} or a pyspark.resource.ResourceProfile, "
                        f"got {type(value).__name__}")
    if not value:
        raise ValueError("resources is empty: name at least one resource, e.g. {'gpu': 1}, or pass None")
    cpus: int | None = None
    amounts: list[tuple[str, float]] = []
    for name, amount in value.items():
        if not isinstance(name, str) or not name or not set(name) <= _NAME_OK:
            raise ValueError(f"resource names are strings such as 'gpu' or 'cpus', got {name!r}")
        if name in ("cpus", "cpu"):
            if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
                raise ValueError(f"resources[{name!r}] must be a whole number of CPUs >= 1, got {amount!r}")
            cpus = amount
        else:
            amounts.append((name, _check_amount(name, amount)))
    return StageResources(cpus=cpus, amounts=tuple(sorted(amounts)))


def unsupported_reason(master: str) -> str | None:
    """Why ``master`` cannot run a stage with its own resources, or ``None`` where Spark supports it (pure).

    >>> unsupported_reason("local[4]")[:58]
    'stage-level resources (resources=) need a standalone, YARN'
    >>> unsupported_reason("local-cluster[2,2,1024]") is None, unsupported_reason("yarn") is None
    (True, True)
    """
    text = master.strip()
    if text == "local" or text.startswith("local["):
        return (f"stage-level resources (resources=) need a standalone, YARN or Kubernetes cluster; master {text} "
                "runs every task in the driver's JVM, where Spark does not support them. Set "
                "spark.task.cpus / spark.task.resource.<name>.amount for the application instead, or run on a "
                "cluster (local-cluster[N,C,M] works for tests)")
    if text.startswith(("spark://", "local-cluster", "yarn", "k8s://")) or not text:
        return None
    return f"stage-level resources (resources=) are not supported on master {text} (Spark supports standalone, YARN " \
           "and Kubernetes)"


def executor_requests(resources: StageResources, conf: Mapping[str, str | None]) -> dict[str, Any]:
    """The executor side of a profile under dynamic allocation, from ``spark.executor.*`` settings (pure).

    Spark adds executors for a stage's profile only when it says what those executors
    have; a dict names task needs, so the executors are the application's usual ones.

    >>> executor_requests(StageResources(amounts=(("gpu", 1.0),)), {"spark.executor.cores": "4",
    ...     "spark.executor.resource.gpu.amount": "2", "spark.executor.resource.gpu.discoveryScript": "/gpus.sh"})
    {'cores': 4, 'memory': None, 'resources': [('gpu', 2, '/gpus.sh', '')]}
    """
    cores = conf.get("spark.executor.cores")
    out: dict[str, Any] = {"cores": int(cores) if cores else None, "memory": conf.get("spark.executor.memory"),
                           "resources": []}
    for name, per_task in resources.amounts:
        raw = conf.get(f"spark.executor.resource.{name}.amount")
        if not raw:
            raise LaunchError(
                f"resources={{{name!r}: {per_task:g}}} under dynamic allocation needs executors with {name}: set "
                f"spark.executor.resource.{name}.amount (and .discoveryScript), or pass a "
                "pyspark.resource.ResourceProfile with executor requests"
            )
        out["resources"].append((name, int(float(raw)), conf.get(f"spark.executor.resource.{name}.discoveryScript")
                                 or "", conf.get(f"spark.executor.resource.{name}.vendor") or ""))
    return out


_profiles_lock = threading.Lock()
_profiles: dict[tuple[str, StageResources, bool], Any] = {}


def _task_requests(resources: StageResources, default_cpus: int) -> Any:
    from pyspark.resource import TaskResourceRequests

    requests = TaskResourceRequests().cpus(resources.cpus if resources.cpus is not None else default_cpus)
    for name, amount in resources.amounts:
        requests.resource(name, amount)
    return requests


def profile_for(target: SparkTarget, resources: StageResources) -> Any:
    """The pyspark ``ResourceProfile`` for ``resources`` on ``target`` (built once per application and request).

    Raises :class:`LaunchError` where the master does not support stage-level scheduling.
    """
    master = target.master
    problem = unsupported_reason(master)
    if problem is not None:
        raise LaunchError(problem)
    if resources.profile is not None:
        return resources.profile
    dynamic = dynamic_allocation_enabled(target)
    key = (target.key, resources, dynamic)
    with _profiles_lock:
        cached = _profiles.get(key)
        if cached is not None:
            return cached
        from pyspark.resource import ExecutorResourceRequests, ResourceProfileBuilder

        builder = ResourceProfileBuilder()
        builder.require(_task_requests(resources, int(target.conf("spark.task.cpus") or 1)))
        if dynamic:
            wanted = executor_requests(resources, {k: target.conf(k) for k in _executor_keys(resources)})
            executor = ExecutorResourceRequests()
            if wanted["cores"] is not None:
                executor.cores(wanted["cores"])
            if wanted["memory"]:
                executor.memory(wanted["memory"])
            for name, amount, script, vendor in wanted["resources"]:
                executor.resource(name, amount, script, vendor)
            builder.require(executor)
        profile = builder.build
        for stale in [k for k in _profiles if k[0] != target.key and not _alive(k[0])]:
            del _profiles[stale]  # profiles of stopped applications
        _profiles[key] = profile
    log.info("gang stage resources: %s (resource profile %s)", resources.describe(), _profile_id(profile))
    return profile


def _executor_keys(resources: StageResources) -> list[str]:
    keys = ["spark.executor.cores", "spark.executor.memory"]
    for name, _ in resources.amounts:
        keys += [f"spark.executor.resource.{name}.{part}" for part in ("amount", "discoveryScript", "vendor")]
    return keys


def _alive(app_key: str) -> bool:
    from pyspark import SparkContext

    sc = SparkContext._active_spark_context
    return sc is not None and str(sc.applicationId) == app_key


def _profile_id(profile: Any) -> str:
    try:
        return str(profile.id)
    except Exception:  # Connect builds the id lazily on the server
        return "?"


def java_profile(target: SparkTarget, profile: Any) -> Any:
    """The JVM profile registered with the scheduler (classic), for counting its slots before launching."""
    jrp = profile._java_resource_profile
    if jrp is None:
        raise LaunchError("this ResourceProfile was built without a SparkContext; build it on the classic driver")
    target.register_profile(jrp)  # idempotent by id; withResources does the same at launch
    return jrp


def with_profile(rdd: Any, profile: Any) -> Any:
    """``rdd`` whose stage runs with ``profile`` (stage-level resources); ``rdd`` itself without one."""
    return rdd if profile is None else rdd.withResources(profile)


def arrow_profile_kwargs(profile: Any) -> dict[str, Any]:
    """``mapInArrow`` keywords for a stage profile (pyspark >= 4.0 takes ``profile=``)."""
    if profile is None:
        return {}
    import inspect

    from pyspark.sql import DataFrame

    if "profile" not in inspect.signature(DataFrame.mapInArrow).parameters:
        raise LaunchError("resources= with a DataFrame stage (data=DataFrame, or Spark Connect) needs pyspark >= 4.0 "
                          "(DataFrame.mapInArrow(profile=)); pass an RDD as data=, or upgrade pyspark")
    return {"profile": profile}


def stage_profile(target: SparkTarget, resources: StageResources | None) -> tuple[Any, str]:
    """The pyspark profile of a gang stage and its description (``(None, "")`` for the application's defaults)."""
    if resources is None:
        return None, ""
    return profile_for(target, resources), resources.describe()
