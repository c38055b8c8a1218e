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
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..frameworks import Framework, GangLayout, run_rank
from ..launch.data import session_of
from ..launch.run import run_gang
from ..launch.runner import check_retries
from ..launch.session import resolve
from ..launch.stage import RankCall
from .rendezvous import RendezvousServer
from .topology import HorovodLayout, layout
from .topology import layout as topology_layout

__all__ = ["run", "layout", "HorovodLayout", "HorovodGloo", "RendezvousServer"]

log = logging.getLogger("sparkhydrogen.horovod")


def run(fn: Callable[..., Any], args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
        num_proc: int | None = None, *, env: Mapping[str, str] | None = None, max_retries: int = 0,
        retry_backoff: float = 0.5, gloo_timeout: int = 60, spark: Any = None, resources: Any = None,
        data: Any = None) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``num_proc`` gang-scheduled ranks with Horovod ready; results by rank.

    Mirrors ``horovod.spark.run``: ``num_proc`` defaults to Spark's default
    parallelism, ``env`` adds variables for every rank. A rank that fails aborts
    the gang; with ``max_retries`` the whole gang is relaunched with a fresh
    rendezvous token (stragglers of the failed attempt are refused). ``resources``
    and ``data`` are :func:`sparkhydrogen.run`'s.
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
    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f"num_proc must be a positive int, got {num_proc!r}")
    extra = dict(env or {})
    extra["HOROVOD_GLOO_TIMEOUT_SECONDS"] = str(gloo_timeout)
    call = RankCall(_horovod_rank, (fn, tuple(args), dict(kwargs or {}), extra))
    name = f"horovod.run({getattr(fn, '__qualname__', type(fn).__name__)})"
    return run_gang(call, num_proc, target=target, max_retries=max_retries, retry_backoff=retry_backoff, name=name,
                    resources=resources, data=data)


def _default_parallelism(target: Any) -> int:
    value = int(target.default_parallelism)
    if value < 1:
        raise ValueError("num_proc is required under Spark Connect (spark.default.parallelism is not set)")
    return value


class HorovodGloo(Framework):
    """Horovod's gloo controller as a framework environment: ``HOROVOD_*`` layout variables and rendezvous.

    Rank 0 starts the token-guarded rendezvous store in :meth:`offer` (its address and
    token reach every rank in the gang's one ``allGather``); :meth:`environment` is
    pure; :meth:`stop` shuts Horovod down and rank 0's store after the gang's final
    barrier.

    >>> env = HorovodGloo().environment(GangLayout(rank=1, hosts=("a", "a"), offers=(("a:4000/t", 4000), None)))
    >>> env["HOROVOD_RANK"], env["HOROVOD_LOCAL_RANK"], env["HOROVOD_GLOO_RENDEZVOUS_ADDR"]
    ('1', '1', 'a:4000/t')
    """

    name = "horovod"

    def __init__(self, extra: Mapping[str, str] | None = None) -> None:
        self.extra = dict(extra or {})
        self._server: RendezvousServer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"extra": self.extra, "_server": None}  # a rank's own server never travels

    def offer(self, rank: int, host: str) -> Any:
        if rank != 0:
            return None
        server = RendezvousServer(host)
        server.start()
        self._server = server
        return server.address_for_tasks(server.new_attempt())

    def withdraw(self, rank: int) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def environment(self, layout: GangLayout) -> dict[str, str]:
        addr, port = layout.offers[0]
        return {
            **topology_layout(list(layout.hosts), layout.rank).env(),
            "HOROVOD_GLOO_RENDEZVOUS_ADDR": addr,
            "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
            "HOROVOD_CONTROLLER": "gloo",
            "HOROVOD_CPU_OPERATIONS": "gloo",
            **self.extra,
        }

    def local_environment(self, layout: GangLayout) -> dict[str, str]:
        iface = interface_for(layout.host)
        return {"HOROVOD_GLOO_IFACE": iface} if iface else {}

    def stop(self, layout: GangLayout, failed: bool) -> None:
        try:
            _shutdown_horovod()
        finally:
            self.withdraw(layout.rank)


def _horovod_rank(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                  extra: dict[str, str]) -> Any:
    """Task body: rank 0 serves the rendezvous; export Horovod's environment, run ``fn``, clean up."""
    return run_rank(HorovodGloo(extra), fn, args, kwargs, return_all=True)


def _shutdown_horovod() -> None:
    """Leave no Horovod state behind in a (possibly reused) Python worker."""
    import sys

    hvd = sys.modules.get("horovod.torch")
    if hvd is not None and hvd.is_initialized():
        hvd.shutdown()


def interface_for(host: str) -> str | None:
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
