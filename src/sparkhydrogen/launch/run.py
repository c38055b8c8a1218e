"""``sparkhydrogen.run(fn, num_tasks)``: run a function as a gang and get every rank's return value."""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

from .. import serde
from ..logstream import LogPrinter
from .gang import DeclaredGang, declare_gang, job_error
from .retry import retry
from .task import run_rank

__all__ = ["run"]

log = logging.getLogger("sparkhydrogen.launch")


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], index: int,
          rows: Iterable[Any]) -> Iterator[tuple[int, bytes]]:
    result = fn(*args, **kwargs)
    yield index, serde.dumps(result, f"return value of rank {index}")


def run(fn: Callable[..., Any], num_tasks: int, *, args: Sequence[Any] = (),
        kwargs: Optional[Mapping[str, Any]] = None, max_retries: int = 0, retry_backoff: float = 0.5,
        spark: Any = None, stream_logs: bool = False) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``num_tasks`` gang-scheduled tasks; return the results by rank.

    Inside ``fn``, :meth:`BarrierTaskContext.get` gives the rank, world size and
    collectives. If any rank raises (or its process dies, or it stops answering),
    every other rank's collectives raise :class:`GangAbortedError` at once. With
    ``max_retries`` the whole gang is then launched again (after ``retry_backoff``
    seconds, doubling), up to that many times; ``ctx.restore()`` gives each rank
    its last checkpointed state. Finally this raises :class:`GangFailedError`
    naming each attempt's failing rank, its exception and traceback.

    With ``stream_logs=True`` every rank's stdout and stderr (``print``, ``logging``,
    output of C extensions and child processes) is printed on the driver as it is
    written, each line prefixed ``[rank N]``.

    Example:
        >>> def hello():                                              # doctest: +SKIP
        ...     ctx = sparkhydrogen.BarrierTaskContext.get()
        ...     return ctx.allGather(ctx.rank() * 10)
        >>> sparkhydrogen.run(hello, num_tasks=2)                     # doctest: +SKIP
        [[0, 10], [0, 10]]
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int):
        raise TypeError(f"num_tasks must be an int, got {type(num_tasks).__name__}")
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise TypeError(f"args must be a tuple or list, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a dict or None, got {type(kwargs).__name__}")
    if not isinstance(stream_logs, bool):
        raise TypeError(f"stream_logs must be a bool, got {type(stream_logs).__name__}")
    sc = _spark_context(spark)
    frozen_args, frozen_kwargs = tuple(args), dict(kwargs or {})
    printer = LogPrinter() if stream_logs else None
    try:
        return retry(lambda: _run_once(fn, num_tasks, args=frozen_args, kwargs=frozen_kwargs, sc=sc, on_log=printer),
                     max_retries=max_retries, retry_backoff=retry_backoff)
    finally:
        if printer is not None:
            printer.close()


def settle_logs(gang: DeclaredGang, timeout: float = 5.0) -> None:
    """Return once every rank's 'finish' has reached the coordinator (bounded by ``timeout``).

    A rank streams its output before it reports 'finish' on the same connection, so
    by then the log hook has been handed every line: none is lost when the gang is released.
    """
    server = gang.service.server
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while server.running and not server.gang_settled(gang.handle.gang_id) and time.monotonic() < deadline:
        pause.wait(0.005)


def _spark_context(spark: Any) -> Any:
    if spark is not None:
        return getattr(spark, "sparkContext", spark)
    from pyspark import SparkContext

    sc = SparkContext._active_spark_context
    if sc is None:
        raise ValueError("no active SparkContext: create a SparkSession first, or pass spark=")
    return sc


def _run_once(fn: Callable[..., Any], num_tasks: int, *, args: tuple[Any, ...], kwargs: dict[str, Any],
              sc: Any, on_log: Optional[LogPrinter] = None) -> list[Any]:
    name = getattr(fn, "__qualname__", type(fn).__name__)
    gang, attempt = declare_gang(sc, num_tasks, name, on_log=on_log)
    body = functools.partial(run_rank, gang.spec(attempt), functools.partial(_call, fn, args, kwargs))
    rdd = sc.parallelize(range(num_tasks), num_tasks).barrier().mapPartitionsWithIndex(body)
    try:
        pairs = rdd.collect()
    except Exception as exc:
        raise job_error(gang, exc, attempt) from exc
    if on_log is not None:
        settle_logs(gang)
    return [serde.loads(payload, "return value") for _, payload in sorted(pairs, key=lambda kv: kv[0])]
