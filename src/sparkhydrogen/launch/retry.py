"""Whole-gang retries: run an action again, as a new attempt of the same gangs, until it succeeds.

``retry(action, max_retries=2)`` runs ``action()`` (which launches one or more gang jobs
through :func:`sparkhydrogen.barrier` or :func:`sparkhydrogen.run`); when a job fails,
it runs ``action()`` again. Gangs declared inside keep their identity across attempts
(so ``checkpoint``/``restore`` carry state over) while each attempt gets a new number
(``BarrierTaskContext.gangAttempt()``) and stale tasks of an older attempt are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .runner import attempts, backoff_delay
from .session import resolve

__all__ = ["retry", "backoff_delay"]

R = TypeVar("R")


def retry(action: Callable[[], R], *, max_retries: int = 2, retry_backoff: float = 0.5, sc: Any = None) -> R:
    """Run ``action()`` and re-run it (a new attempt of every gang it launches) when a gang job fails.

    Example:
        >>> out = h2.retry(lambda: h2.barrier(rdd).mapPartitions(train).collect(),   # doctest: +SKIP
        ...                max_retries=2)

    After the last attempt, raises :class:`GangFailedError` listing every attempt's
    failing rank and cause. A job cancelled from outside (the user's job group, tag or
    ``cancelAllJobs``) raises :class:`GangCancelledError` at once and is not retried.
    ``sc`` is the SparkContext or SparkSession (default: the active one).
    """
    if not callable(action):
        raise TypeError(f"action must be callable, got {type(action).__name__}")
    try:
        target = resolve(sc)
    except ValueError:
        target = None  # no Spark yet: the action will say so
    return attempts(action, max_retries=max_retries, retry_backoff=retry_backoff, target=target)
