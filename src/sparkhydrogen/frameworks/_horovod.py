"""Horovod's gloo controller as a framework environment (see :class:`HorovodGloo`)."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from .api import Framework, GangLayout
from .horovod_rendezvous import RendezvousServer
from .horovod_topology import layout as topology_layout

__all__ = ["HorovodGloo", "interface_for"]


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
