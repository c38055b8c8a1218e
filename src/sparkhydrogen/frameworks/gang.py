"""Task side: form a :class:`GangLayout` (reserve ports, one ``allGather``) and run code inside a framework.

1. :func:`form` -- every rank reserves the ports its framework asks for on its own
   host (listening sockets it keeps open), runs the framework's :meth:`offer`, and one
   ``allGather`` shares ports, GPUs and offers: every rank now holds the same layout.
2. :func:`activated` -- the framework's variables are set, the reservations are
   handed over (closed right before the framework binds them, or passed as sockets),
   the init call runs, the body runs; then a barrier (on success), the undo, the
   variables restored. A failure is reported to the coordinator *before* the undo,
   so peers that lose their connection to this rank are not blamed for it.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..context import BarrierTaskContext
from ..errors import NotInGangError
from ..task.lifecycle import environment, report_failure
from .api import Framework, FrameworkError, GangLayout, PortSource, host_of

__all__ = ["PortHold", "reserve_ports", "task_hosts", "form", "activated", "run_rank"]


class PortHold:
    """A port this rank reserved: a listening socket on its host, held until the framework takes the port.

    ``take()`` hands the listening socket's file descriptor over (the caller owns it
    then); ``release()`` closes it so the framework can bind the port itself.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock
        self.port: int = int(sock.getsockname()[1])

    @property
    def held(self) -> bool:
        return self._sock is not None

    def take(self) -> int:
        if self._sock is None:
            raise FrameworkError(f"port {self.port} was already taken or released")
        sock, self._sock = self._sock, None
        return sock.detach()

    def release(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __repr__(self) -> str:
        return f"PortHold(port={self.port}, held={self.held})"


def _listen(host: str) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, 0), family=family, backlog=1024)
    except OSError as exc:
        try:
            return socket.create_server(("", 0), backlog=1024)  # the address is not local here (NAT): any
        except OSError:
            raise FrameworkError(f"could not reserve a port on {host}: {exc}") from exc


def reserve_ports(host: str, count: int) -> list[PortHold]:
    """``count`` distinct free ports on ``host``, each held by a listening socket."""
    holds: list[PortHold] = []
    try:
        for _ in range(count):
            holds.append(PortHold(_listen(host)))
    except BaseException:
        for hold in holds:
            hold.release()
        raise
    return holds


def task_hosts(ctx: BarrierTaskContext) -> list[str]:
    """Host of every rank's executor, in rank order (the address other executors reach it at)."""
    infos = ctx.getTaskInfos()
    if len(infos) != ctx.worldSize():
        raise FrameworkError(f"Spark listed {len(infos)} task addresses for a gang of {ctx.worldSize()} ranks")
    return [host_of(info.address) for info in infos]


def _task_gpus(ctx: BarrierTaskContext) -> list[str]:
    try:
        info = ctx.resources().get("gpu")
    except NotInGangError:  # a rank outside a Spark task (local mode)
        return []
    return [str(a) for a in info.addresses] if info is not None else []


def form(framework: Framework, ctx: BarrierTaskContext | None = None, *, hosts: Sequence[str] | None = None,
         gpus: Sequence[str] | None = None) -> tuple[GangLayout, list[PortHold]]:
    """Reserve this rank's ports, gather every rank's, and return the layout and this rank's holds.

    ``hosts`` overrides the hosts Spark reports (ranks outside Spark tasks); ``gpus``
    what this rank contributes as its GPUs (default: its task's GPU addresses).
    """
    ctx = ctx if ctx is not None else BarrierTaskContext.get()
    rank, world = ctx.rank(), ctx.worldSize()
    all_hosts = list(hosts) if hosts is not None else task_hosts(ctx)
    wanted = framework.ports(rank, world)
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 0:
        raise FrameworkError(f"{framework.name}: ports({rank}, {world}) must be an int >= 0, got {wanted!r}")
    holds = reserve_ports(all_hosts[rank], wanted)
    offered = False
    try:
        own_gpus = list(gpus) if gpus is not None else _task_gpus(ctx)
        offer = framework.offer(rank, all_hosts[rank])
        offered = True
        peers = ctx.allGather({"ports": [h.port for h in holds], "gpus": own_gpus, "offer": offer})
        client = getattr(ctx, "_client", None)
        layout = GangLayout(rank=rank, hosts=tuple(all_hosts), ports=tuple(tuple(p["ports"]) for p in peers),
                            gpus=tuple(tuple(p["gpus"]) for p in peers), offers=tuple(p["offer"] for p in peers),
                            attempt=ctx.gangAttempt(), run_id=str(getattr(client, "gang_id", ""))[:16])
    except BaseException:
        for hold in holds:
            hold.release()
        if offered:
            framework.withdraw(rank)
        raise
    return layout, holds


@contextlib.contextmanager
def activated(framework: Framework, layout: GangLayout, holds: Sequence[PortHold] = (), *,
              ctx: BarrierTaskContext | None = None, extra: dict[str, str] | None = None,
              final_barrier: bool = True) -> Iterator[GangLayout]:
    """The framework is set up for the ``with`` body, and undone after (even when the body raises).

    ``extra`` variables are set after the framework's own (a user's ``env=``). With
    ``final_barrier`` a successful body ends with a gang barrier, so no rank undoes what
    peers may still use (rank 0's coordination service).
    """
    env = {**framework.environment(layout), **framework.local_environment(layout), **(extra or {})}
    failed = False
    with environment(env):
        try:
            if framework.port_handover == PortSource.RELEASE:
                for hold in holds:
                    hold.release()
            try:
                if not framework.fresh_process:  # else the rank's child process starts it
                    framework.start(layout, holds)
                yield layout
                if final_barrier:
                    (ctx if ctx is not None else BarrierTaskContext.get()).barrier()
            except BaseException as exc:
                failed = True
                report_failure(exc)  # before the undo: peers losing this rank must not be blamed
                raise
            finally:
                if not framework.fresh_process:
                    framework.stop(layout, failed)
        finally:
            for hold in holds:
                hold.release()


def run_rank(framework: Framework, fn: Callable[..., Any], args: tuple[Any, ...] = (),
             kwargs: dict[str, Any] | None = None, return_all: bool = False,
             extra: dict[str, str] | None = None) -> Any:
    """One rank of a framework launch: form the layout, run ``fn`` inside the framework, return its result.

    Ranks other than 0 return ``None`` unless ``return_all`` (their results need not travel).
    """
    ctx = BarrierTaskContext.get()
    layout, holds = form(framework, ctx)
    with activated(framework, layout, holds, ctx=ctx, extra=extra):
        if framework.fresh_process:
            from ._child import run_in_child

            result = run_in_child(framework, layout, fn, args, dict(kwargs or {}))
        else:
            result = _call(framework, fn, args, kwargs or {})
    return result if layout.rank == 0 or return_all else None


def _call(framework: Framework, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        better = framework.explain(exc)
        if better is not None:
            raise better from exc
        raise
