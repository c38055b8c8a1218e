"""The framework-environment contract: a formed gang's layout, and what a framework makes of it.

A :class:`GangLayout` is everything a distributed framework may need to know about a
gang that has formed: every rank's host, the ports every rank reserved (and holds,
so no other process can take them before the framework does), every rank's GPUs,
and what each rank offered its peers. A :class:`Framework` is a small description
that turns a layout into the environment variables the framework reads
(:meth:`Framework.environment`, pure) and, where the framework wants a call instead
(``jax.distributed.initialize``), the call (:meth:`Framework.start`) and its undo
(:meth:`Framework.stop`).

Nothing in this module talks to Spark, the network or a framework.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import LaunchError
from ..netaddr import join_host_port, split_host_port

__all__ = ["FrameworkError", "GangLayout", "Framework", "PortSource", "host_of"]


class FrameworkError(LaunchError):
    """A framework could not be set up on a gang (bad layout, wrong framework settings, a failed init call)."""

    __module__ = "sparkhydrogen.frameworks"


def host_of(address: str) -> str:
    """The host of a Spark task address ``host:port`` (IPv6 in brackets or bare).

    >>> host_of("10.0.0.7:41233"), host_of("[::1]:41233"), host_of("worker-3")
    ('10.0.0.7', '::1', 'worker-3')
    """
    return split_host_port(address)[0]


@dataclass(frozen=True)
class GangLayout:
    """A formed gang, seen from rank ``rank``: hosts, reserved ports, GPUs and offers of every rank, in rank order.

    ``ports[r]`` are the ports rank ``r`` reserved on ``hosts[r]`` (as many as its
    framework asked for), ``gpus[r]`` the GPU addresses of its task, ``offers[r]``
    what its framework offered the others before the gang formed (a rendezvous
    address, say). ``attempt`` is the gang attempt (0, then 1, ... after retries);
    ``run_id`` is the same on every rank of one attempt.

    Local ranks count the ranks of one host in rank order; nodes are hosts, numbered
    in the order their first rank appears (so rank 0's host is node 0).

    >>> g = GangLayout(rank=2, hosts=("a", "b", "a"), ports=((7000,), (), ()))
    >>> g.world_size, g.local_rank, g.local_world_size, g.node_rank, g.num_nodes
    (3, 1, 2, 0, 2)
    >>> g.address(0)
    'a:7000'
    """

    rank: int
    hosts: tuple[str, ...]
    ports: tuple[tuple[int, ...], ...] = ()
    gpus: tuple[tuple[str, ...], ...] = ()
    offers: tuple[Any, ...] = ()
    attempt: int = 0
    run_id: str = ""

    def __post_init__(self) -> None:
        n = len(self.hosts)
        if n < 1:
            raise ValueError("a gang layout needs at least one host")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < n:
            raise ValueError(f"rank {self.rank!r} is outside 0..{n - 1}")
        if not all(isinstance(h, str) and h for h in self.hosts):
            raise ValueError(f"every host must be a non-empty string, got {list(self.hosts)}")
        object.__setattr__(self, "hosts", tuple(self.hosts))
        defaults: dict[str, Any] = {"ports": (), "gpus": (), "offers": None}
        for name, default in defaults.items():
            value: tuple[Any, ...] = tuple(getattr(self, name))
            if not value:
                value = (default,) * n
            if len(value) != n:
                raise ValueError(f"{name} lists {len(value)} ranks but the gang has {n} hosts")
            if name != "offers":
                value = tuple(tuple(v) for v in value)
            object.__setattr__(self, name, value)
        bad = [p for ps in self.ports for p in ps if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536]
        if bad:
            raise ValueError(f"ports must be in 1..65535, got {bad}")

    # who and where --------------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self.hosts)

    @property
    def host(self) -> str:
        return self.hosts[self.rank]

    @property
    def nodes(self) -> tuple[str, ...]:
        """Distinct hosts in the order their first rank appears."""
        return tuple(dict.fromkeys(self.hosts))

    def ranks_on(self, host: str) -> tuple[int, ...]:
        return tuple(r for r, h in enumerate(self.hosts) if h == host)

    @property
    def local_rank(self) -> int:
        return self.ranks_on(self.host).index(self.rank)

    @property
    def local_world_size(self) -> int:
        return len(self.ranks_on(self.host))

    @property
    def node_rank(self) -> int:
        return self.nodes.index(self.host)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def own_ports(self) -> tuple[int, ...]:
        return self.ports[self.rank]

    @property
    def own_gpus(self) -> tuple[str, ...]:
        return self.gpus[self.rank]

    def address(self, rank: int, index: int = 0) -> str:
        """``host:port`` of the ``index``-th port rank ``rank`` reserved (``[v6]:port`` for IPv6 hosts)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside 0..{self.world_size - 1}")
        ports = self.ports[rank]
        if not 0 <= index < len(ports):
            raise FrameworkError(f"rank {rank} reserved {len(ports)} port(s), so it has no port number {index}: "
                                 "the framework's ports() must ask for it")
        return join_host_port(self.hosts[rank], ports[index])

    def addresses(self, index: int = 0) -> list[str]:
        """``host:port`` of every rank's ``index``-th reserved port, in rank order."""
        return [self.address(r, index) for r in range(self.world_size)]


class PortSource:
    """How a rank's reserved ports reach the framework (set on a :class:`Framework` as ``port_handover``).

    * ``RELEASE``: the reservation is closed right before :meth:`Framework.start` (the
      framework binds the port itself: JAX, TensorFlow, LightGBM);
    * ``KEEP``: the framework takes the listening sockets in :meth:`Framework.start`
      (``hold.take()`` gives the file descriptor, as torch's ``TCPStore`` accepts); what
      it leaves is closed after :meth:`Framework.stop`.
    """

    RELEASE = "release"
    KEEP = "keep"


class Framework:
    """A framework's description: how many ports each rank holds, its variables, its init call and undo.

    Subclasses override what they need; a new framework is usually
    :meth:`ports` and :meth:`environment` alone. Instances travel to the ranks
    pickled (each rank has its own copy), so keep them small; frozen dataclasses suit.

    Example (LightGBM's socket-based distributed training)::

        @dataclass(frozen=True)
        class LightGBM(Framework):
            name = "lightgbm"

            def ports(self, rank, world_size):
                return 1                       # every worker listens

            def parameters(self, layout):      # pure: what lgb.train(params) needs
                return {"machines": ",".join(layout.addresses()), "num_machines": layout.world_size,
                        "local_listen_port": layout.own_ports[0]}
    """

    name = "framework"
    port_handover = PortSource.RELEASE
    #: Run each rank's ``start``/``fn``/``stop`` in a fresh Python process (frameworks that can be set
    #: up only once per process, such as TensorFlow's collective ops, in reused Python workers).
    fresh_process = False

    def ports(self, rank: int, world_size: int) -> int:
        """How many ports rank ``rank`` reserves on its host (and holds until the framework takes them)."""
        return 0

    def offer(self, rank: int, host: str) -> Any:
        """Task side, before the gang forms: a small picklable value for every peer (``layout.offers[rank]``)."""
        return None

    def withdraw(self, rank: int) -> None:
        """Undo what :meth:`offer` started when the gang never formed (and from :meth:`stop`); nothing by default."""

    def environment(self, layout: GangLayout) -> dict[str, str]:
        """Pure: the environment variables this rank needs; set for ``fn`` and restored after."""
        return {}

    def local_environment(self, layout: GangLayout) -> dict[str, str]:
        """Like :meth:`environment`, from facts of this machine (a network interface name); impure, so apart."""
        return {}

    def start(self, layout: GangLayout, holds: Sequence[Any]) -> None:
        """The init call, once the environment is set (``jax.distributed.initialize``); nothing by default."""

    def explain(self, exc: BaseException) -> BaseException | None:
        """A clearer error for a known framework failure ``fn`` raised (raised from it), or ``None``."""
        return None

    def stop(self, layout: GangLayout, failed: bool) -> None:
        """Undo :meth:`start` (and anything :meth:`offer` started); runs even when ``fn`` raised."""
