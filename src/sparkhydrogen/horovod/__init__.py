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
import os
import socket
from typing import Any, Callable, Mapping, Optional, Sequence

from ..context import BarrierTaskContext
from ..launch.placement import RankCall
from ..launch.run import run_gang
from ..launch.runner import check_retries
from ..launch.session import resolve
from .rendezvous import RendezvousServer
from .topology import HorovodLayout, layout

__all__ = ["run", "layout", "HorovodLayout", "RendezvousServer"]

log = logging.getLogger("sparkhydrogen.horovod")


def run(fn: Callable[..., Any], args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None,
        num_proc: Optional[int] = None, *, env: Optional[Mapping[str, str]] = None, max_retries: int = 0,
        retry_backoff: float = 0.5, gloo_timeout: int = 60, spark: Any = None) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``num_proc`` gang-scheduled ranks with Horovod ready; results by rank.

    Mirrors ``horovod.spark.run``: ``num_proc`` defaults to Spark's default
    parallelism, ``env`` adds variables for every rank. A rank that fails aborts
    the gang; with ``max_retries`` the whole gang is relaunched with a fresh
    rendezvous token (stragglers of the failed attempt are refused).
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
    target = resolve(spark)
    if num_proc is None:
        num_proc = _default_parallelism(target)
    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f"num_proc must be a positive int, got {num_proc!r}")
    extra = dict(env or {})
    extra["HOROVOD_GLOO_TIMEOUT_SECONDS"] = str(gloo_timeout)
    call = RankCall(_horovod_rank, (fn, tuple(args), dict(kwargs or {}), extra))
    name = f"horovod.run({getattr(fn, '__qualname__', type(fn).__name__)})"
    return run_gang(call, num_proc, target=target, max_retries=max_retries, retry_backoff=retry_backoff, name=name)


def _default_parallelism(target: Any) -> int:
    if target.sc is not None:
        return int(target.sc.defaultParallelism)
    value = target.conf("spark.default.parallelism")
    if value is None:
        raise ValueError("num_proc is required under Spark Connect (spark.default.parallelism is not set)")
    return int(value)


def _horovod_rank(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                  extra: dict[str, str]) -> Any:
    """Task body: rank 0 serves the rendezvous; export Horovod's environment, run ``fn``, clean up."""
    ctx = BarrierTaskContext.get()
    hosts = [info.address.rsplit(":", 1)[0] for info in ctx.getTaskInfos()]
    mine = layout(hosts, ctx.rank())
    server: Optional[RendezvousServer] = None
    offer: Optional[tuple[str, int]] = None
    if ctx.rank() == 0:
        server = RendezvousServer(hosts[0])
        server.start()
        offer = server.address_for_tasks(server.new_attempt())
    try:
        addr, port = ctx.broadcast(offer, root=0)
        result = _run_with_horovod(fn, args, kwargs, mine, addr, port, extra)
        ctx.barrier()  # every rank is done with the rendezvous before it goes away
        return result
    finally:
        if server is not None:
            server.stop()


def _run_with_horovod(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], mine: HorovodLayout,
                      addr: str, port: int, extra: dict[str, str]) -> Any:
    env = {
        **mine.env(),
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": addr,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
    }
    iface = interface_for(mine.hostname)
    if iface:
        env["HOROVOD_GLOO_IFACE"] = iface
    env.update(extra)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        return fn(*args, **kwargs)
    finally:
        _shutdown_horovod()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _shutdown_horovod() -> None:
    """Leave no Horovod state behind in a (possibly reused) Python worker."""
    import sys

    hvd = sys.modules.get("horovod.torch")
    if hvd is not None and hvd.is_initialized():
        hvd.shutdown()


def interface_for(host: str) -> Optional[str]:
    """Name of the local network interface that carries ``host``'s IPv4 address (Linux), if any.

    >>> interface_for("127.0.0.1")
    'lo'
    """
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return None
    try:
        import fcntl
        import struct
    except ImportError:  # not Linux: let gloo choose
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    return None
