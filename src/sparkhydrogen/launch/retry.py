"""Whole-gang retries: run an action again, as a new attempt of the same gangs, until it succeeds.

``retry(action, max_retries=2)`` runs ``action()`` (which launches one or more gang jobs
through :func:`sparkhydrogen.barrier` or :func:`sparkhydrogen.run`); when a job fails,
it runs ``action()`` again. Gangs declared inside keep their identity across attempts
(so ``checkpoint``/``restore`` carry state over) while each attempt gets a new number
(``BarrierTaskContext.gangAttempt()``) and stale tasks of an older attempt are refused.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

from ..errors import GangFailedError, InsufficientSlotsError, LaunchError

__all__ = ["retry", "backoff_delay", "current_scope", "RetryScope"]

log = logging.getLogger("sparkhydrogen.launch")
R = TypeVar("R")

_local = threading.local()


@dataclass
class RetryScope:
    """The attempts of one retried action on one driver thread."""

    scope_id: str
    attempt: int = 0
    gangs: list[Any] = field(default_factory=list)  # DeclaredGang, in declaration order
    next_index: int = 0
    pause: threading.Event = field(default_factory=threading.Event)  # never set: a bounded wait

    @property
    def job_group(self) -> str:
        return f"sparkhydrogen-{self.scope_id}-{self.attempt}"


def current_scope() -> Optional[RetryScope]:
    return getattr(_local, "scope", None)


def backoff_delay(attempt: int, base: float, cap: float = 30.0) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): ``base * 2**(attempt-1)``, capped.

    >>> [backoff_delay(a, 0.5) for a in (1, 2, 3)]
    [0.5, 1.0, 2.0]
    """
    if attempt <= 0 or base <= 0:
        return 0.0
    return float(min(base * (2 ** (attempt - 1)), cap))


def _check(max_retries: int, backoff: float) -> None:
    if isinstance(max_retries, bool) or not isinstance(max_retries, int):
        raise TypeError(f"max_retries must be an int, got {type(max_retries).__name__}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or backoff < 0:
        raise ValueError(f"retry_backoff must be a number of seconds >= 0, got {backoff!r}")


def retry(action: Callable[[], R], *, max_retries: int = 2, retry_backoff: float = 0.5, sc: Any = None) -> R:
    """Run ``action()`` and re-run it (a new attempt of every gang it launches) when a gang job fails.

    Example:
        >>> out = h2.retry(lambda: h2.barrier(rdd).mapPartitions(train).collect(),   # doctest: +SKIP
        ...                max_retries=2)

    After the last attempt, raises :class:`GangFailedError` listing every attempt's
    failing rank and cause.
    """
    if not callable(action):
        raise TypeError(f"action must be callable, got {type(action).__name__}")
    _check(max_retries, retry_backoff)
    if current_scope() is not None:
        return action()  # nested: the outer scope retries
    scope = RetryScope(scope_id=uuid.uuid4().hex[:12])
    _local.scope = scope
    errors: list[LaunchError] = []
    try:
        for attempt in range(max_retries + 1):
            scope.attempt, scope.next_index = attempt, 0
            if attempt:
                delay = backoff_delay(attempt, retry_backoff)
                log.warning("gang attempt %d of %d starts in %.1f s (attempt %d failed: %s)", attempt,
                            max_retries, delay, attempt - 1, str(errors[-1]).splitlines()[0])
                scope.pause.wait(delay)
            try:
                return _with_job_group(scope, action)
            except Exception as exc:
                if not scope.gangs or isinstance(exc, (TypeError, ValueError, InsufficientSlotsError)):
                    raise  # nothing was launched, or bad input: retrying would not help
                errors.append(exc if isinstance(exc, LaunchError) else _translate(scope, exc))
        if len(errors) == 1:
            raise errors[0]
        raise _exhausted(errors)
    finally:
        _local.scope = None
        for gang in scope.gangs:
            gang.release()


def _with_job_group(scope: RetryScope, action: Callable[[], R]) -> R:
    from pyspark import SparkContext

    sc = SparkContext._active_spark_context
    if sc is None:
        return action()
    previous = sc.getLocalProperty("spark.jobGroup.id")
    sc.setJobGroup(scope.job_group, f"spark-hydrogen attempt {scope.attempt}", interruptOnCancel=True)
    try:
        return action()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", previous)  # type: ignore[arg-type]


def _translate(scope: RetryScope, exc: BaseException) -> LaunchError:
    """A failed Spark action of this attempt, as our error naming the rank that failed first."""
    from .gang import job_error

    for gang in reversed(scope.gangs):
        if gang.last_failure(scope.attempt) is not None:
            return job_error(gang, exc, scope.attempt)
    return job_error(scope.gangs[-1], exc, scope.attempt)


def _exhausted(errors: list[LaunchError]) -> GangFailedError:
    summaries = tuple(str(err).splitlines()[0] for err in errors)
    lines = [f"gang failed on all {len(errors)} attempts:"]
    lines += [f"  attempt {number}: {summary}" for number, summary in enumerate(summaries)]
    last = errors[-1]
    detail = str(last).split("\n", 1)
    if len(detail) > 1:
        lines.append(detail[1])
    error = GangFailedError("\n".join(lines), getattr(last, "failed_rank", None), getattr(last, "cause", None),
                            attempts=summaries)
    error.__cause__ = last
    return error
