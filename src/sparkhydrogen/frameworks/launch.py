"""Driver side: run a function on a gang inside any :class:`Framework` (what the JAX and TensorFlow launchers are)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..launch.data import session_of
from ..launch.elastic import SizeRange, size_range
from ..launch.run import run_gang
from ..launch.runner import check_retries
from ..launch.session import resolve
from ..launch.stage import RankCall
from .api import Framework
from .gang import run_rank

__all__ = ["run", "check_count"]


def check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def run(framework: Framework, fn: Callable[..., Any], *args: Any, num_tasks: int | tuple[int, int] | SizeRange,
        return_all: bool = False,
        max_retries: int = 0, retry_backoff: float = 0.5, stream_logs: bool = True, spark: Any = None,
        env: Mapping[str, str] | None = None, resources: Any = None, data: Any = None, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on ``num_tasks`` gang-scheduled ranks set up for ``framework``.

    Each rank reserves the ports the framework asks for, the gang shares them in one
    ``allGather``, the framework's variables are set (and ``env`` after them), its init
    call runs, then ``fn``; afterwards the framework is undone and the variables
    restored, even when ``fn`` raised. Returns rank 0's result, or every rank's in rank
    order with ``return_all=True``. Failures, retries, output streaming, Spark
    Connect, ``resources`` and ``data`` behave as in :func:`sparkhydrogen.run`
    (``data`` needs a framework that runs ``fn`` in the task's process). ``num_tasks=(min, max)``
    (or a :class:`~sparkhydrogen.SizeRange`) makes the gang elastic (``docs/elastic.md``):
    the framework is set up anew, at the attempt's size, in every attempt.

    Example:
        >>> from sparkhydrogen.frameworks import run, TorchDistributed     # doctest: +SKIP
        >>> run(TorchDistributed(), lambda: os.environ["RANK"], num_tasks=2, return_all=True)
        ['0', '1']
    """
    if not isinstance(framework, Framework):
        raise TypeError(f"framework must be a sparkhydrogen.frameworks.Framework, got {type(framework).__name__}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    wanted = size_range(num_tasks, "num_tasks")
    for flag, value in (("return_all", return_all), ("stream_logs", stream_logs)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise TypeError("env must map str to str")
    check_retries(max_retries, retry_backoff)
    if data is not None and framework.fresh_process:
        raise ValueError(f"{framework.name} runs fn in a fresh process of each rank, which data= cannot reach (the "
                         "share streams into the task's own worker): use sparkhydrogen.run(fn, n, data=...) and read "
                         "it with sparkhydrogen.data loaders there")
    target = resolve(session_of(data, spark))
    label = f"{framework.name}.run({getattr(fn, '__qualname__', type(fn).__name__)})"
    call = RankCall(run_rank, (framework, fn, tuple(args), dict(kwargs), return_all, dict(env or {})))
    results = run_gang(call, wanted, target=target, max_retries=max_retries, retry_backoff=retry_backoff,
                       stream_logs=stream_logs, name=label, resources=resources, data=data)
    return results if return_all else results[0]
