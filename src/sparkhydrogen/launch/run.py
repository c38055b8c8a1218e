"""``sparkhydrogen.run(fn, num_tasks)``: run a function as a gang and get every rank's return value."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..logstream import LogPrinter
from .data import gang_data, session_of
from .elastic import SizeRange, size_range
from .placement import Placement, placement_for
from .resize import AttemptSizer
from .resources import stage_resources
from .runner import attempts, check_retries
from .session import SparkTarget, resolve
from .stage import RankCall

__all__ = ["run", "run_gang"]

log = logging.getLogger("sparkhydrogen.launch")


def run(fn: Callable[..., Any], num_tasks: int | tuple[int, int], *, args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None, max_retries: int = 0, retry_backoff: float = 0.5,
        spark: Any = None, stream_logs: bool = False, resources: Any = None, data: Any = None,
        grow: str = "attempt") -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``num_tasks`` gang-scheduled tasks; return the results by rank.

    Inside ``fn``, :meth:`BarrierTaskContext.get` gives the rank, world size and
    collectives. If any rank raises (or its process dies, or it stops answering),
    every other rank's collectives raise :class:`GangAbortedError` at once. With
    ``max_retries`` the whole gang is then launched again (after ``retry_backoff``
    seconds, doubling), up to that many times; ``ctx.restore()`` gives each rank
    its last checkpointed state. Finally this raises :class:`GangFailedError`
    naming each attempt's failing rank, its exception and traceback.

    ``spark`` is a SparkSession (classic or Spark Connect) or SparkContext; by
    default the active one. Under Spark Connect the coordinator runs inside rank
    0's task (see ``docs/connect.md``).

    With ``stream_logs=True`` every rank's stdout and stderr (``print``, ``logging``,
    output of C extensions and child processes) is printed on the driver as it is
    written, each line prefixed ``[rank N]`` (classic Spark).

    ``resources`` launches the gang's stage with its own task resources (Spark's
    stage-level scheduling, on standalone, YARN and Kubernetes): a dict such as
    ``{"gpu": 1, "cpus": 2}`` or a ``pyspark.resource.ResourceProfile``; the slot
    preflight counts slots for it. See ``docs/gpus.md``.

    ``data`` is a DataFrame (or RDD) streamed into the ranks: every row goes to exactly
    one rank, and inside ``fn`` :meth:`BarrierTaskContext.batches` yields this rank's
    share as Arrow record batches, read as the task's own input (never via the driver).
    See ``docs/data.md``.

    ``num_tasks=(min, max)`` makes the gang *elastic*: every attempt starts with as many
    ranks as the cluster has free slots for, between ``min`` and ``max``; after a lost
    rank the next attempt starts at once at the size the cluster still holds, and the
    gang grows back at the next attempt boundary (with ``grow="checkpoint"``: at its next
    ``ctx.checkpoint`` when slots are free). ``ctx.worldSize()`` is the attempt's size,
    ``ctx.restored()`` says the size a checkpoint was written at, and ``data=`` is cut
    anew for each size. See ``docs/elastic.md``.

    Example:
        >>> def hello():                                              # doctest: +SKIP
        ...     ctx = sparkhydrogen.BarrierTaskContext.get()
        ...     return ctx.allGather(ctx.rank() * 10)
        >>> sparkhydrogen.run(hello, num_tasks=2)                     # doctest: +SKIP
        [[0, 10], [0, 10]]
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    wanted = size_range(num_tasks, "num_tasks", grow)
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise TypeError(f"args must be a tuple or list, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a dict or None, got {type(kwargs).__name__}")
    if not isinstance(stream_logs, bool):
        raise TypeError(f"stream_logs must be a bool, got {type(stream_logs).__name__}")
    check_retries(max_retries, retry_backoff)
    target = resolve(session_of(data, spark))
    return run_gang(RankCall(fn, tuple(args), dict(kwargs or {})), wanted, target=target,
                    max_retries=max_retries, retry_backoff=retry_backoff, stream_logs=stream_logs,
                    resources=resources, data=data)


def run_gang(call: RankCall, num_tasks: int | tuple[int, int] | SizeRange, *, target: SparkTarget,
             max_retries: int = 0, retry_backoff: float = 0.5, stream_logs: bool = False, name: str | None = None,
             placement: Placement | None = None, resources: Any = None, data: Any = None,
             grow: str = "attempt") -> list[Any]:
    """``run()`` after validation, for launchers: ``call`` on ``num_tasks`` ranks with retries; results by rank.

    ``num_tasks`` is a size, a ``(min, max)`` range or a :class:`~.elastic.SizeRange`: the
    size of every attempt is an attempt parameter (:class:`~.resize.AttemptSizer`), and
    the placement and the data's shares are those of that size. ``resources`` and
    ``data`` are ``run()``'s, checked here for every launcher; a launcher's own
    ``placement`` takes neither.
    """
    wanted = num_tasks if isinstance(num_tasks, SizeRange) else size_range(num_tasks, "num_tasks", grow)
    stage_wanted = stage_resources(resources)
    if placement is not None and (stage_wanted is not None or data is not None):
        raise ValueError(f"{placement.name} runs ranks outside Spark tasks: resources= and data= need ranks in "
                         "Spark tasks (drop local_mode=True)")
    if wanted.elastic and (placement is not None or target.connect):
        where = placement.name if placement is not None else "Spark Connect"
        raise ValueError(f"an elastic gang ({wanted.describe()}) sizes each attempt by the executors' free slots, "
                         f"which the driver reads from classic Spark's scheduler; {where} cannot: pass a fixed size")
    shares = {wanted.high: gang_data(data, target, wanted.high)}  # checked before anything is launched
    label = name or call.name
    sizer = AttemptSizer(target, wanted, label)

    def placed(size: int) -> Placement:
        if placement is not None:
            return placement
        if size not in shares:
            shares[size] = gang_data(data, target, size)  # every row still goes to exactly one of ``size`` ranks
        return placement_for(target, stage_wanted, shares[size])

    fixed = placed(wanted.high) if not wanted.elastic else None
    printer = LogPrinter() if stream_logs and (placement is not None or not target.connect) else None
    log.debug("gang %s: %s on %s", label, wanted.describe(), fixed.name if fixed is not None else "per attempt")

    def action() -> list[Any]:
        size = sizer.current
        chosen = fixed if fixed is not None else placed(size)
        return chosen.run(call, size, name=label, on_log=printer)

    try:
        return attempts(action, max_retries=max_retries, retry_backoff=retry_backoff, target=target, sizer=sizer)
    finally:
        if printer is not None:
            printer.close()
