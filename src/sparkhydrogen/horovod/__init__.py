"""Horovod on spark-hydrogen: ``sparkhydrogen.horovod.run(fn, num_proc=4)``.

Each barrier task runs ``fn`` in its own Python worker with everything Horovod's gloo
controller needs already in the environment, so ``fn`` just calls ``hvd.init()``.
The rendezvous gloo performs is served by a token-guarded key-value store that rank 0
hosts for the attempt (:mod:`.rendezvous`), so it works the same on classic Spark and
on Spark Connect; ranks, local ranks and cross ranks come from where Spark placed the
tasks (:mod:`.topology`).

Example:
    >>> def train():                                                   # doctest: +SKIP
    ...     import horovod.torch as hvd, torch
    ...     hvd.init()
    ...     return hvd.allreduce(torch.tensor([hvd.rank()]), op=hvd.Sum).item()
    >>> sparkhydrogen.horovod.run(train, num_proc=2)                   # doctest: +SKIP
    [1.0, 1.0]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..frameworks import HorovodGloo, run_rank
from ..frameworks.horovod_rendezvous import RendezvousServer
from ..frameworks.horovod_topology import HorovodLayout, layout
from ..launch.data import session_of
from ..launch.elastic import SizeRange, size_range
from ..launch.run import run_gang
from ..launch.runner import check_retries
from ..launch.session import resolve
from ..launch.stage import RankCall

__all__ = ["run", "layout", "HorovodLayout", "HorovodGloo", "RendezvousServer"]

log = logging.getLogger("sparkhydrogen.horovod")


def run(fn: Callable[..., Any], args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
        num_proc: int | tuple[int, int] | SizeRange | None = None, *, env: Mapping[str, str] | None = None,
        max_retries: int = 0,
        retry_backoff: float = 0.5, gloo_timeout: int = 60, spark: Any = None, resources: Any = None,
        data: Any = None) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``num_proc`` gang-scheduled ranks with Horovod ready; results by rank.

    Mirrors ``horovod.spark.run``: ``num_proc`` defaults to Spark's default
    parallelism, ``env`` adds variables for every rank. A rank that fails aborts
    the gang; with ``max_retries`` the whole gang is relaunched with a fresh
    rendezvous token (stragglers of the failed attempt are refused). ``resources``
    and ``data`` are :func:`sparkhydrogen.run`'s. ``num_proc=(min, max)`` is an elastic gang
    (``docs/elastic.md``): every attempt is a new Horovod ring of the attempt's size.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise TypeError(f"args must be a tuple or list, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a dict or None, got {type(kwargs).__name__}")
    if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise TypeError("env must map str to str")
    if isinstance(gloo_timeout, bool) or not isinstance(gloo_timeout, int) or gloo_timeout < 1:
        raise ValueError(f"gloo_timeout must be a positive number of seconds, got {gloo_timeout!r}")
    check_retries(max_retries, retry_backoff)
    target = resolve(session_of(data, spark))
    if num_proc is None:
        num_proc = _default_parallelism(target)
    if isinstance(num_proc, bool) or not isinstance(num_proc, (int, tuple, list, SizeRange)):
        raise ValueError(f"num_proc must be a positive int or a (min, max) pair, got {num_proc!r}")
    if isinstance(num_proc, int) and num_proc < 1:
        raise ValueError(f"num_proc must be a positive int, got {num_proc!r}")
    wanted = size_range(num_proc, "num_proc")
    extra = dict(env or {})
    extra["HOROVOD_GLOO_TIMEOUT_SECONDS"] = str(gloo_timeout)
    call = RankCall(_horovod_rank, (fn, tuple(args), dict(kwargs or {}), extra))
    name = f"horovod.run({getattr(fn, '__qualname__', type(fn).__name__)})"
    return run_gang(call, wanted, target=target, max_retries=max_retries, retry_backoff=retry_backoff, name=name,
                    resources=resources, data=data)


def _default_parallelism(target: Any) -> int:
    value = int(target.default_parallelism)
    if value < 1:
        raise ValueError("num_proc is required under Spark Connect (spark.default.parallelism is not set)")
    return value


def _horovod_rank(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                  extra: dict[str, str]) -> Any:
    """Task body: rank 0 serves the rendezvous; export Horovod's environment, run ``fn``, clean up."""
    return run_rank(HorovodGloo(extra), fn, args, kwargs, return_all=True)


