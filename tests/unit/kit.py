"""What the coordinator's unit tests share: real loopback clients run as a gang, and ways to wait.

No mocks of the network: every client is a real :class:`CoordinatorClient` on a
loopback socket, one thread per rank, joined with a timeout. Tests wait for
conditions (the server's own state, events), never for a fixed sleep. Servers come
from the ``make_server`` / ``server`` fixtures of ``conftest.py``.

Example:
    >>> handle = server.add_gang(3)                               # doctest: +SKIP
    >>> run_gang(handle, gather_body(lambda r, i: bytes([r])))     # doctest: +SKIP
    {0: [b'\\x00', b'\\x01', b'\\x02'], 1: [...], 2: [...]}
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sparkhydrogen.coordinator.client import CoordinatorClient
from sparkhydrogen.coordinator.handles import GangHandle
from sparkhydrogen.coordinator.peer import Peer
from sparkhydrogen.coordinator.protocol import Frame, FrameDecoder, Limits
from sparkhydrogen.coordinator.server import CoordinatorServer

LOOPBACK = "127.0.0.1"
HOST = "unit-host"
JOIN_TIMEOUT = 30.0

Body = Callable[[CoordinatorClient, int], Any]


def connect(handle: GangHandle, *, address: tuple[str, int] | None = None, gang_id: str | None = None,
            secret: bytes | None = None, timeout: float = 10.0) -> CoordinatorClient:
    """A client authenticated to ``handle``'s coordinator (over TLS when the handle says so)."""
    return CoordinatorClient.connect(address or (handle.host, handle.port),
                                     handle.gang_id if gang_id is None else gang_id,
                                     handle.secret if secret is None else secret, timeout=timeout,
                                     tls_fingerprint=handle.tls_fingerprint)


def joined(handle: GangHandle, rank: int, *, address: tuple[str, int] | None = None,
           **register: Any) -> CoordinatorClient:
    """A client registered as ``rank`` (host :data:`HOST` unless given)."""
    client = connect(handle, address=address)
    register.setdefault("host", HOST)
    try:
        world = client.register(rank, **register)
    except BaseException:
        client.close()
        raise
    if world != handle.world_size:
        client.close()
        raise AssertionError(f"register returned world size {world}, the gang has {handle.world_size}")
    return client


@dataclass
class Outcome:
    """What one rank's body returned or raised, and when (``time.monotonic()``)."""

    value: Any = None
    error: BaseException | None = None
    at: float = 0.0

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value

    def result(self) -> Any:
        """The value, or the exception itself."""
        return self.error if self.error is not None else self.value


@dataclass
class Ranks:
    """Ranks running ``body(client, rank)`` on threads; each registers, runs, finishes and closes."""

    handle: GangHandle
    body: Body
    ranks: Sequence[int]
    finish: bool = True
    address: tuple[str, int] | None = None
    register: dict[str, Any] = field(default_factory=dict)
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        for rank in self.ranks:
            thread = threading.Thread(target=self._run, args=(rank,), name=f"rank-{rank}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, rank: int) -> None:
        try:
            client = joined(self.handle, rank, address=self.address, **self.register)
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.outcomes[rank] = Outcome(error=exc, at=time.monotonic())
            return
        try:
            value = self.body(client, rank)
            self.outcomes[rank] = Outcome(value=value, at=time.monotonic())
            if self.finish:
                client.finish()
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.outcomes[rank] = Outcome(error=exc, at=time.monotonic())
        finally:
            client.close()

    def join(self, timeout: float = JOIN_TIMEOUT) -> dict[int, Outcome]:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            raise AssertionError(f"threads still running after {timeout} s: {alive}")
        return self.outcomes

    def values(self, timeout: float = JOIN_TIMEOUT) -> dict[int, Any]:
        """Every rank's value; re-raises the first rank's error."""
        return {rank: outcome.get() for rank, outcome in sorted(self.join(timeout).items())}

    def results(self, timeout: float = JOIN_TIMEOUT) -> dict[int, Any]:
        """Every rank's value or exception."""
        return {rank: outcome.result() for rank, outcome in sorted(self.join(timeout).items())}


class in_thread:  # noqa: N801 - reads as a function at the call site
    """``fn()`` on a thread; :meth:`get` joins it and returns its value or raises its exception in the test.

    (An assertion that fails on a thread of its own is lost; this brings it back.)
    """

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.outcome = Outcome()

        def run() -> None:
            try:
                self.outcome.value = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised by get()
                self.outcome.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def get(self, timeout: float = JOIN_TIMEOUT) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"still running after {timeout} s")
        return self.outcome.get()


def start_ranks(handle: GangHandle, body: Body, ranks: Sequence[int] | None = None, *, finish: bool = True,
                address: tuple[str, int] | None = None, **register: Any) -> Ranks:
    """Start ``body`` for ``ranks`` (default: every rank of the gang) on threads."""
    return Ranks(handle, body, list(range(handle.world_size)) if ranks is None else list(ranks), finish, address,
                 register)


def gather_body(payload: Callable[[int, int], bytes], rounds: int = 1, timeout: float = 20.0) -> Body:
    """``rounds`` allGathers of ``payload(rank, round)``; returns the last one's payloads."""

    def body(client: CoordinatorClient, rank: int) -> list[bytes]:
        parts: list[bytes] = []
        for i in range(rounds):
            parts = [bytes(p) for p in client.collective("allGather", payload(rank, i), timeout=timeout)]
        return parts

    return body


def run_gang(handle: GangHandle, body: Body | None = None, *, address: tuple[str, int] | None = None,
             timeout: float = JOIN_TIMEOUT) -> dict[int, Any]:
    """Run every rank of the gang (default body: one allGather of ``rank N``); each rank's value or exception."""
    return start_ranks(handle, body or gather_body(lambda r, i: f"rank {r}".encode()), address=address).results(
        timeout)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll a condition of the server's own state (a ready signal, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.005)


def pending_ranks(server: CoordinatorServer, gang_id: str) -> set[int]:
    """Ranks of a gang with a collective call waiting in the coordinator (read on its loop)."""

    def read() -> set[int]:
        gang = server.registry.get(gang_id)
        if gang is None:
            return set()
        return {r for a in gang.attempts.values() for rnd in a.rounds.values() for r in rnd.arrivals}

    return server._on_loop(read)


def wait_pending(server: CoordinatorServer, handle: GangHandle, ranks: set[int]) -> None:
    wait_until(lambda: pending_ranks(server, handle.gang_id) >= ranks, f"ranks {sorted(ranks)} are waiting")


def gang_bytes(server: CoordinatorServer, gang_id: str) -> int:
    """Bytes a gang has buffered in the coordinator (read on its loop)."""

    def read() -> int:
        gang = server.registry.get(gang_id)
        return 0 if gang is None else gang.buffered_bytes

    return server._on_loop(read)


class FakeClock:
    """A clock the test moves by hand (the server's ``clock=``); thread-safe enough for floats."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- a real server Peer on an in-memory transport, fed synchronously on the server's loop


class MemoryTransport(asyncio.Transport):
    """Collects what the server writes; records pause/resume and close."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: Any) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4242) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def frames(self) -> list[Frame]:
        return list(FrameDecoder(Limits(1 << 20, 1 << 30)).feed(bytes(self.written)))


class MemoryPeer:
    """A :class:`Peer` of the real server, fed from the test thread; every feed runs to its end on the loop."""

    def __init__(self, server: CoordinatorServer) -> None:
        self.server = server
        self.transport = MemoryTransport()

        def make() -> Peer:
            peer = Peer(server)
            peer.connection_made(self.transport)
            return peer

        self.peer = server._on_loop(make)

    @property
    def nonce(self) -> bytes:
        return self.peer.nonce

    def feed(self, *chunks: bytes) -> None:
        def run() -> None:
            for chunk in chunks:
                view = memoryview(chunk)
                while view and not self.transport.closed:
                    buf = self.peer.get_buffer(len(view))
                    n = min(len(buf), len(view))
                    buf[:n] = view[:n]
                    self.peer.buffer_updated(n)
                    view = view[n:]

        self.server._on_loop(run)

    def close(self) -> None:
        self.server._on_loop(lambda: self.peer.connection_lost(None))
