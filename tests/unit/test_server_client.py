"""The asyncio coordinator and the blocking client over real loopback sockets (no Spark).

Every rank is a thread with its own :class:`CoordinatorClient`; every thread is
joined with a timeout and every server is stopped by the ``server`` fixture.
Tests wait for conditions (events, barriers, the server's own state), never for
a fixed sleep.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import pytest

from sparkhydrogen.config import CoordinatorConfig
from sparkhydrogen.context import BarrierTaskContext
from sparkhydrogen.coordinator.client import CoordinatorClient
from sparkhydrogen.coordinator.protocol import (
    MAGIC,
    NONCE_BYTES,
    PREFIX,
    VERSION,
    Frame,
    FrameDecoder,
    Kind,
    Limits,
    client_proof,
    encode_frame,
    server_proof,
)
from sparkhydrogen.coordinator.server import CoordinatorServer, GangHandle
from sparkhydrogen.errors import (
    AuthenticationError,
    CollectiveMismatchError,
    CollectiveTimeoutError,
    CoordinatorConnectionError,
    ErrorInfo,
    GangAbortedError,
    HydrogenError,
    NotInGangError,
    PayloadError,
    ProtocolError,
    RegistrationError,
)

pytestmark = pytest.mark.timeout(30)

LOOPBACK = "127.0.0.1"
JOIN_TIMEOUT = 15.0
HOST = "unit-host"


# ------------------------------------------------------------------ helpers


@pytest.fixture
def make_server() -> Iterator[Callable[..., CoordinatorServer]]:
    servers: list[CoordinatorServer] = []

    def make(**config: Any) -> CoordinatorServer:
        server = CoordinatorServer(CoordinatorConfig(host=LOOPBACK, port=0, **config))
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., CoordinatorServer]) -> CoordinatorServer:
    return make_server()


def connect(handle: GangHandle, *, gang_id: Optional[str] = None, secret: Optional[bytes] = None,
            timeout: float = 5.0) -> CoordinatorClient:
    return CoordinatorClient.connect((handle.host, handle.port), handle.gang_id if gang_id is None else gang_id,
                                     handle.secret if secret is None else secret, timeout=timeout)


def joined(handle: GangHandle, rank: int, **register: Any) -> CoordinatorClient:
    client = connect(handle)
    register.setdefault("host", HOST)
    assert client.register(rank, **register) == handle.world_size
    return client


@dataclass
class Outcome:
    value: Any = None
    error: Optional[BaseException] = None
    at: float = 0.0  # time.monotonic() when the body returned or raised

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


@dataclass
class Ranks:
    """Ranks running ``body(client, rank)`` on threads; each registers, runs, finishes and closes."""

    handle: GangHandle
    body: Callable[[CoordinatorClient, int], Any]
    ranks: Sequence[int]
    finish: bool = True
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        for rank in self.ranks:
            thread = threading.Thread(target=self._run, args=(rank,), name=f"rank-{rank}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, rank: int) -> None:
        try:
            client = joined(self.handle, rank)
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
        assert not alive, f"threads still running after {timeout} s: {alive}"
        return self.outcomes

    def values(self, timeout: float = JOIN_TIMEOUT) -> dict[int, Any]:
        return {rank: outcome.get() for rank, outcome in sorted(self.join(timeout).items())}


def start_ranks(handle: GangHandle, body: Callable[[CoordinatorClient, int], Any],
                ranks: Optional[Sequence[int]] = None, finish: bool = True) -> Ranks:
    return Ranks(handle, body, list(range(handle.world_size)) if ranks is None else list(ranks), finish)


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


# --- raw sockets, for peers that do not follow the protocol

def raw_connect(server: CoordinatorServer) -> tuple[socket.socket, Frame]:
    sock = socket.create_connection(server.address, timeout=5.0)
    hello = read_frame(sock)
    return sock, hello


def read_frame(sock: socket.socket) -> Frame:
    decoder = FrameDecoder(Limits(1 << 20, 1 << 20))
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before a whole frame arrived")
        frames = list(decoder.feed(data))
        if frames:
            return frames[0]


def assert_closed_by_server(sock: socket.socket) -> bytes:
    """Read until the server closes the connection; returns what it sent before closing."""
    received = b""
    sock.settimeout(5.0)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return received
            received += data
    except ConnectionResetError:
        return received
    except socket.timeout:
        raise AssertionError("the coordinator kept the connection open") from None


def raw_authenticate(server: CoordinatorServer, handle: GangHandle) -> socket.socket:
    sock, hello = raw_connect(server)
    server_nonce = bytes.fromhex(hello.header["nonce"])
    client_nonce = b"n" * NONCE_BYTES
    proof = client_proof(handle.secret, handle.gang_id, server_nonce, client_nonce)
    sock.sendall(encode_frame(Kind.AUTH, {"gang": handle.gang_id, "nonce": client_nonce.hex(), "proof": proof}))
    welcome = read_frame(sock)
    assert welcome.kind is Kind.WELCOME
    assert welcome.header["proof"] == server_proof(handle.secret, handle.gang_id, server_nonce, client_nonce)
    return sock


def hang_up_quietly(conn: socket.socket) -> None:
    """Wait until the client hangs up (it may reset the connection)."""
    try:
        conn.recv(1)
    except OSError:
        pass


def error_frames(data: bytes) -> list[ErrorInfo]:
    frames = FrameDecoder(Limits(1 << 20, 1 << 20)).feed(data)
    return [ErrorInfo.from_json(f.header["error"]) for f in frames if f.kind is Kind.ERROR]


# ------------------------------------------------------------- lifecycle


def test_start_returns_a_loopback_address_and_is_idempotent(server: CoordinatorServer) -> None:
    host, port = server.address
    assert host == LOOPBACK and 0 < port < 65536
    assert server.start() == (host, port)
    assert server.running
    handle = server.add_gang(world_size=3, name="job")
    assert (handle.host, handle.port, handle.world_size) == (LOOPBACK, port, 3)
    assert len(handle.gang_id) == 32 and len(handle.secret) == 32
    assert server.stats() == {"gangs": 1, "attempts": 0, "connections": 0}


@pytest.mark.parametrize("world_size", [0, -1, 2.0, "4", None])
def test_add_gang_validates_world_size(server: CoordinatorServer, world_size: Any) -> None:
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        server.add_gang(world_size)


def test_address_and_driver_api_need_a_running_server() -> None:
    server = CoordinatorServer(CoordinatorConfig(host=LOOPBACK))
    with pytest.raises(RuntimeError, match="coordinator is not running"):
        server.address  # noqa: B018
    with pytest.raises(HydrogenError, match="coordinator is not running"):
        server.add_gang(2)
    server.stop()  # stopping a server that never started is a no-op


def test_stop_is_idempotent_and_ends_the_driver_api(make_server: Callable[..., CoordinatorServer]) -> None:
    server = make_server()
    server.stop()
    server.stop()
    assert not server.running
    with pytest.raises(HydrogenError, match="coordinator is not running"):
        server.stats()


def test_connect_to_a_closed_port_is_a_connection_error() -> None:
    with socket.socket() as placeholder:  # bound but not listening: connections are refused
        placeholder.bind((LOOPBACK, 0))
        port = placeholder.getsockname()[1]
        with pytest.raises(CoordinatorConnectionError, match=rf"cannot reach the spark-hydrogen coordinator at "
                                                             rf"127\.0\.0\.1:{port}"):
            CoordinatorClient.connect((LOOPBACK, port), "gang", b"secret", timeout=2.0)


# --------------------------------------------------------- collectives


def test_four_ranks_barrier_allgather_and_broadcast(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=4)

    def body(client: CoordinatorClient, rank: int) -> tuple[Any, ...]:
        barrier = client.collective("barrier")
        gathered = [bytes(p) for p in client.collective("allGather", f"rank-{rank}".encode() * (rank + 1))]
        empty = [bytes(p) for p in client.collective("allGather", b"")]
        cast = [bytes(p) for p in client.collective("broadcast", b"from-2" if rank == 2 else b"", root=2)]
        for _ in range(20):
            client.collective("barrier", timeout=5.0)
        return barrier, gathered, empty, cast

    results = start_ranks(handle, body).values()
    expected_gather = [f"rank-{r}".encode() * (r + 1) for r in range(4)]
    assert results == {r: ([], expected_gather, [b""] * 4, [b"from-2"]) for r in range(4)}


def test_large_allgather_payloads(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=3)
    blobs = [bytes([r]) * (3 << 20) for r in range(3)]  # 3 MiB each, several socket reads

    def body(client: CoordinatorClient, rank: int) -> bool:
        return [bytes(p) for p in client.collective("allGather", blobs[rank])] == blobs

    assert start_ranks(handle, body).values() == {0: True, 1: True, 2: True}


def test_mismatched_calls_fail_every_rank_with_a_mismatch(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=2)

    def body(client: CoordinatorClient, rank: int) -> None:
        client.collective("barrier" if rank == 0 else "allGather", b"x")

    outcomes = start_ranks(handle, body).join()
    for rank in (0, 1):
        with pytest.raises(CollectiveMismatchError,
                           match=r"rank\(s\) 0 called barrier; rank\(s\) 1 called allGather"):
            outcomes[rank].get()


def test_rank_finishing_early_is_a_mismatch_for_the_waiting_peer(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=2)
    waiter = start_ranks(handle, lambda c, r: c.collective("barrier"), ranks=[0])
    wait_pending(server, handle, {0})
    quitter = joined(handle, 1)
    quitter.finish()
    with pytest.raises(CollectiveMismatchError,
                       match=r"rank 1 finished its task after 0 collective call\(s\), but rank\(s\) 0 called barrier"):
        waiter.join()[0].get()
    quitter.close()


# ---------------------------------------------------------- registration


def test_register_errors(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=2)
    first = joined(handle, 0, task_attempt_id=7)
    try:
        dup = connect(handle)  # a second connection claiming the same rank
        with pytest.raises(RegistrationError, match=r"rank 0 is already registered .* by task 7"):
            dup.register(0, host=HOST, task_attempt_id=7)
        dup.close()

        outside = connect(handle)
        with pytest.raises(RegistrationError, match=r"rank 2 is outside 0\.\.1"):
            outside.register(2, host=HOST)
        outside.close()

        early = connect(handle)
        with pytest.raises(RegistrationError, match="'call' before 'register'"):
            early.collective("barrier")
        early.close()

        with pytest.raises(RegistrationError, match="this connection has already registered a rank"):
            first.register(1, host=HOST)
    finally:
        first.close()


# -------------------------------------------------------- authentication


def test_wrong_secret_and_unknown_gang_are_refused_while_an_honest_gang_runs(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=3)
    other = server.add_gang(world_size=1)
    started = threading.Barrier(handle.world_size + 1, timeout=10)
    go = threading.Event()

    def body(client: CoordinatorClient, rank: int) -> list[bytes]:
        client.collective("barrier")
        started.wait()
        assert go.wait(10)
        return [bytes(p) for p in client.collective("allGather", str(rank * 10).encode())]

    honest = start_ranks(handle, body)
    started.wait()  # the honest gang is connected, registered and past its first barrier

    with pytest.raises(AuthenticationError, match=rf"refused this task's credentials for gang {handle.gang_id[:8]}"):
        connect(handle, secret=b"x" * 32)
    with pytest.raises(AuthenticationError, match=rf"refused this task's credentials for gang {handle.gang_id[:8]}"):
        connect(handle, secret=other.secret)  # another gang's secret does not open this gang
    with pytest.raises(AuthenticationError, match="refused this task's credentials for gang ffffffff"):
        connect(handle, gang_id="f" * 32)
    assert server.stats()["connections"] == handle.world_size  # every refused peer is gone

    go.set()
    assert honest.values() == {r: [b"0", b"10", b"20"] for r in range(3)}


def test_removed_gang_refuses_new_connections_and_aborts_waiting_ranks(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=2)
    waiter = start_ranks(handle, lambda c, r: c.collective("barrier"), ranks=[0])
    wait_pending(server, handle, {0})
    server.remove_gang(handle.gang_id)
    with pytest.raises(GangAbortedError, match="the driver removed the gang"):
        waiter.join()[0].get()
    with pytest.raises(AuthenticationError, match="unknown there or was removed"):
        connect(handle)


def test_client_refuses_a_peer_that_does_not_know_the_secret() -> None:
    """Mutual authentication: a fake coordinator that cannot compute the server proof is refused."""
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(10)
    got_auth = threading.Event()

    def fake_coordinator() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(encode_frame(Kind.HELLO, {"nonce": (b"z" * NONCE_BYTES).hex()}))
            read_frame(conn)
            got_auth.set()
            conn.sendall(encode_frame(Kind.WELCOME, {"proof": "0" * 64}))
            hang_up_quietly(conn)

    thread = threading.Thread(target=fake_coordinator, daemon=True)
    thread.start()
    try:
        with pytest.raises(AuthenticationError, match="could not prove it knows gang abcdefgh's secret"):
            CoordinatorClient.connect(listener.getsockname(), "abcdefgh" * 4, b"s" * 32, timeout=5.0)
        assert got_auth.is_set()
    finally:
        thread.join(JOIN_TIMEOUT)
        listener.close()
    assert not thread.is_alive()


def test_client_refuses_a_peer_that_does_not_speak_the_protocol() -> None:
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(10)

    def http_server() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            hang_up_quietly(conn)

    thread = threading.Thread(target=http_server, daemon=True)
    thread.start()
    try:
        with pytest.raises(ProtocolError, match="bad magic b'HT'"):
            CoordinatorClient.connect(listener.getsockname(), "g" * 32, b"s" * 32, timeout=5.0)
    finally:
        thread.join(JOIN_TIMEOUT)
        listener.close()
    assert not thread.is_alive()


# ------------------------------------------------------------- hostile bytes


def test_hostile_peers_are_cut_off_and_an_honest_gang_completes(
    make_server: Callable[..., CoordinatorServer],
) -> None:
    server = make_server(max_payload_bytes=1 << 20)
    handle = server.add_gang(world_size=3)
    started = threading.Barrier(handle.world_size + 1, timeout=10)
    go = threading.Event()

    def body(client: CoordinatorClient, rank: int) -> tuple[list[bytes], list[bytes]]:
        client.collective("barrier")
        started.wait()
        assert go.wait(10)
        gathered = [bytes(p) for p in client.collective("allGather", bytes([rank]) * 1000)]
        cast = [bytes(p) for p in client.collective("broadcast", b"root" if rank == 1 else b"", root=1)]
        return gathered, cast

    honest = start_ranks(handle, body)
    started.wait()

    # 1. garbage instead of an AUTH frame
    sock, hello = raw_connect(server)
    assert hello.kind is Kind.HELLO and len(bytes.fromhex(hello.header["nonce"])) == NONCE_BYTES
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert assert_closed_by_server(sock) == b""
    sock.close()

    # 2. unauthenticated prefix announcing a 4 GiB payload: cut off on the 12 bytes alone
    sock, _ = raw_connect(server)
    sock.sendall(PREFIX.pack(MAGIC, VERSION, int(Kind.AUTH), 16, 2**32 - 1))
    assert assert_closed_by_server(sock) == b""
    sock.close()

    # 3. authenticated peer announcing a payload over maxPayload: told why, then cut off
    sock = raw_authenticate(server, handle)
    sock.sendall(PREFIX.pack(MAGIC, VERSION, int(Kind.REQUEST), 16, (1 << 20) + 1))
    [error] = error_frames(assert_closed_by_server(sock))
    assert error.type == "ProtocolError"
    assert f"payload of {(1 << 20) + 1} bytes exceeds the limit of {1 << 20} bytes" in error.message
    sock.close()

    # 4. authenticated peer announcing a huge control header
    sock = raw_authenticate(server, handle)
    sock.sendall(PREFIX.pack(MAGIC, VERSION, int(Kind.REQUEST), 2**31, 0))
    [error] = error_frames(assert_closed_by_server(sock))
    assert f"control header of {2**31} bytes exceeds the limit" in error.message
    sock.close()

    # 5. authenticated peer sending a header that is not JSON, and one with an unknown op
    sock = raw_authenticate(server, handle)
    sock.sendall(PREFIX.pack(MAGIC, VERSION, int(Kind.REQUEST), 5, 0) + b"nope!")
    [error] = error_frames(assert_closed_by_server(sock))
    assert "control header is not valid UTF-8 JSON" in error.message
    sock.close()
    sock = raw_authenticate(server, handle)
    sock.sendall(encode_frame(Kind.REQUEST, {"op": "format-disk"}))
    refusal = read_frame(sock)  # refused, but the connection stays open for a proper register
    assert refusal.kind is Kind.ERROR
    assert refusal.header["error"]["type"] == "RegistrationError"
    assert "'format-disk' before 'register'" in refusal.header["error"]["message"]
    sock.sendall(encode_frame(Kind.REQUEST, {"op": "register", "gang_attempt": 0, "stage_id": 0, "rank": 0}))
    assert read_frame(sock).kind is Kind.ERROR  # rank 0 is taken by the honest gang
    sock.sendall(encode_frame(Kind.AUTH, {"gang": handle.gang_id}))  # a second AUTH is a protocol error
    [error] = error_frames(assert_closed_by_server(sock))
    assert "expected a REQUEST frame, got AUTH" in error.message
    sock.close()

    # every hostile connection is gone; only the honest ranks remain
    assert server.stats()["connections"] == handle.world_size

    go.set()
    results = honest.values()
    assert results == {r: ([bytes([i]) * 1000 for i in range(3)], [b"root"]) for r in range(3)}


def test_silent_peer_is_dropped_after_the_handshake_timeout(make_server: Callable[..., CoordinatorServer]) -> None:
    server = make_server(handshake_timeout=0.2)
    sock, _ = raw_connect(server)
    started = time.monotonic()
    assert assert_closed_by_server(sock) == b""
    assert time.monotonic() - started < 3.0
    sock.close()


def test_oversized_payload_from_a_client_fails_it_and_aborts_its_gang(
    make_server: Callable[..., CoordinatorServer],
) -> None:
    server = make_server(max_payload_bytes=64 << 10)
    handle = server.add_gang(world_size=2)
    waiter = start_ranks(handle, lambda c, r: c.collective("barrier"), ranks=[0])
    wait_pending(server, handle, {0})
    big = joined(handle, 1)
    with pytest.raises(CoordinatorConnectionError,
                       match=r"exceeds the limit of 65536 bytes|lost the connection|closed the connection"):
        big.collective("allGather", b"x" * (1 << 20))
    big.close()
    with pytest.raises(GangAbortedError, match="rank 1 raised ConnectionLost") as info:
        waiter.join()[0].get()
    assert info.value.failed_rank == 1


# ------------------------------------------------------------- failures


def test_failing_rank_aborts_waiting_peers_within_a_second(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=4)
    peers = start_ranks(handle, lambda c, r: c.collective("allGather", b"x"), ranks=[1, 2, 3])
    failing = joined(handle, 0)
    wait_pending(server, handle, {1, 2, 3})
    cause = ErrorInfo.from_exception(ValueError("bad shard 17"), rank=0, traceback="Traceback...\nValueError")
    failed_at = time.monotonic()
    failing.fail(cause)
    outcomes = peers.join()
    failing.close()
    for rank in (1, 2, 3):
        with pytest.raises(GangAbortedError, match=r"aborted: rank 0 raised ValueError: bad shard 17") as info:
            outcomes[rank].get()
        assert info.value.failed_rank == 0
        assert info.value.cause is not None and info.value.cause.type == "ValueError"
        assert info.value.cause.message == "bad shard 17"
        assert outcomes[rank].at - failed_at < 1.0
    last = server.last_failure(handle.gang_id)
    assert last is not None and (last.type, last.message, last.rank) == ("ValueError", "bad shard 17", 0)


def test_abruptly_closed_client_aborts_waiting_peers(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=3)
    peers = start_ranks(handle, lambda c, r: c.collective("barrier"), ranks=[0, 1])
    doomed = joined(handle, 2)
    wait_pending(server, handle, {0, 1})
    closed_at = time.monotonic()
    doomed.close()  # no finish(): the worker died
    outcomes = peers.join()
    for rank in (0, 1):
        with pytest.raises(GangAbortedError,
                           match=r"rank 2 raised ConnectionLost: rank 2 \(host unit-host, pid \d+\) lost its "
                                 r"connection to the coordinator before finishing") as info:
            outcomes[rank].get()
        assert info.value.failed_rank == 2
        assert outcomes[rank].at - closed_at < 1.0
    last = server.last_failure(handle.gang_id)
    assert last is not None and last.type == "ConnectionLost" and last.rank == 2


def test_closing_after_finish_is_not_a_failure(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=2)
    results = start_ranks(handle, lambda c, r: [bytes(p) for p in c.collective("allGather", b"%d" % r)]).values()
    assert results == {0: [b"0", b"1"], 1: [b"0", b"1"]}
    assert server.last_failure(handle.gang_id) is None


def test_timeout_names_the_rank_that_never_called(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=3)
    silent = joined(handle, 2)
    try:
        started = time.monotonic()
        waiting = start_ranks(handle, lambda c, r: c.collective("barrier", timeout=0.3), ranks=[0, 1])
        outcomes = waiting.join()
    finally:
        silent.close()
    for rank in (0, 1):
        with pytest.raises(CollectiveTimeoutError,
                           match=r"barrier \(collective call #1\) timed out after 0\.3 s on rank [01]; rank\(s\) 2 "
                                 r"never arrived: rank 2 \(host unit-host, pid \d+\) last heard"):
            outcomes[rank].get()
        assert 0.3 <= outcomes[rank].at - started < 3.0


def test_timeout_says_when_a_rank_never_connected(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=2)
    outcomes = start_ranks(handle, lambda c, r: c.collective("allGather", b"", timeout=0.3), ranks=[0]).join()
    with pytest.raises(CollectiveTimeoutError, match=r"rank\(s\) 1 never arrived: rank 1 never connected"):
        outcomes[0].get()


def test_two_gangs_on_one_server_are_isolated(server: CoordinatorServer) -> None:
    failing = server.add_gang(world_size=2)
    healthy = server.add_gang(world_size=2)
    started = threading.Barrier(healthy.world_size + 1, timeout=10)
    failed = threading.Event()

    def healthy_body(client: CoordinatorClient, rank: int) -> list[bytes]:
        client.collective("barrier")
        started.wait()
        assert failed.wait(10)
        return [bytes(p) for p in client.collective("allGather", b"ok%d" % rank)]

    good = start_ranks(healthy, healthy_body)
    started.wait()  # the healthy gang uses the same rank numbers, concurrently
    bad = start_ranks(failing, lambda c, r: c.collective("barrier"), ranks=[0])
    wait_pending(server, failing, {0})
    culprit = joined(failing, 1)
    culprit.fail(ErrorInfo("RuntimeError", "only this gang", rank=1))
    with pytest.raises(GangAbortedError, match="rank 1 raised RuntimeError: only this gang"):
        bad.join()[0].get()
    culprit.close()
    failed.set()
    assert good.values() == {0: [b"ok0", b"ok1"], 1: [b"ok0", b"ok1"]}
    assert server.last_failure(healthy.gang_id) is None
    failure = server.last_failure(failing.gang_id)
    assert failure is not None and failure.message == "only this gang"


def test_stop_fails_pending_clients_instead_of_hanging(make_server: Callable[..., CoordinatorServer]) -> None:
    server = make_server()
    handle = server.add_gang(world_size=3)
    pending = start_ranks(handle, lambda c, r: c.collective("barrier"), ranks=[0, 1])
    idle = joined(handle, 2)
    wait_pending(server, handle, {0, 1})
    server.stop()
    outcomes = pending.join()
    for rank in (0, 1):
        assert isinstance(outcomes[rank].error, HydrogenError), outcomes[rank]
        with pytest.raises(GangAbortedError, match="the coordinator is stopping"):
            outcomes[rank].get()
    with pytest.raises(CoordinatorConnectionError):
        idle.collective("barrier", timeout=1.0)  # its connection is gone too
    idle.close()
    with pytest.raises(CoordinatorConnectionError, match="cannot reach"):
        connect(handle, timeout=2.0)


def test_abort_attempts_fails_waiting_ranks(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=2)
    waiter = start_ranks(handle, lambda c, r: c.collective("barrier"), ranks=[0])
    wait_pending(server, handle, {0})
    server.abort_attempts(handle.gang_id, "the driver cancelled job 12")
    with pytest.raises(GangAbortedError, match="was aborted: the driver cancelled job 12"):
        waiter.join()[0].get()


def test_stats_count_gangs_attempts_and_connections(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=2)
    client = joined(handle, 0)
    assert server.stats() == {"gangs": 1, "attempts": 1, "connections": 1}
    client.close()
    server.remove_gang(handle.gang_id)
    wait_until(lambda: server.stats()["connections"] == 0, "the closed connection is gone")
    assert server.stats()["gangs"] == 0


# ------------------------------------------------------------ task context


def context_ranks(server: CoordinatorServer, world_size: int,
                  body: Callable[[BarrierTaskContext], Any], **ctx_kwargs: Any) -> dict[int, Outcome]:
    handle = server.add_gang(world_size=world_size)

    def run(client: CoordinatorClient, rank: int) -> Any:
        return body(BarrierTaskContext(client, rank, world_size, **ctx_kwargs))

    return start_ranks(handle, run).join()


def values(outcomes: dict[int, Outcome]) -> dict[int, Any]:
    return {rank: outcome.get() for rank, outcome in sorted(outcomes.items())}


def test_context_allgather_objects_strings_and_broadcast(server: CoordinatorServer) -> None:
    def body(ctx: BarrierTaskContext) -> tuple[Any, ...]:
        r = ctx.rank()
        ctx.barrier()
        dicts = ctx.allGather({"rank": r, "square": r * r, "tags": [r] * r})
        names = ctx.allGather(f"host-{r}")
        default = ctx.allGather()
        cfg = ctx.broadcast({"lr": 0.1, "from": r} if r == 2 else None, root=2)
        first = ctx.broadcast(f"rank {r}")
        return dicts, names, default, cfg, first, (ctx.worldSize(), ctx.partitionId(), ctx.gangAttempt())

    results = values(context_ranks(server, 3, body))
    for rank, (dicts, names, default, cfg, first, ident) in results.items():
        assert dicts == [{"rank": r, "square": r * r, "tags": [r] * r} for r in range(3)]
        assert names == ["host-0", "host-1", "host-2"] and all(type(n) is str for n in names)
        assert default == ["", "", ""]
        assert cfg == {"lr": 0.1, "from": 2}
        assert first == "rank 0"
        assert ident == (3, rank, 0)


def test_context_unpicklable_payload_raises_payload_error_and_keeps_the_gang_usable(
    server: CoordinatorServer,
) -> None:
    def body(ctx: BarrierTaskContext) -> list[int]:
        with pytest.raises(PayloadError, match=r"allGather message of type _thread\.lock cannot be pickled"):
            ctx.allGather(threading.Lock())
        with pytest.raises(PayloadError, match=r"broadcast object of type _thread\.lock cannot be pickled"):
            ctx.broadcast(threading.Lock(), root=ctx.rank())  # only the root serialises
        return ctx.allGather(ctx.rank())  # nothing was sent: the call sequence is intact

    assert values(context_ranks(server, 2, body)) == {0: [0, 1], 1: [0, 1]}


def test_context_lambdas_travel_via_cloudpickle(server: CoordinatorServer) -> None:
    def body(ctx: BarrierTaskContext) -> int:
        fn = ctx.broadcast(lambda x: x * 7 if True else None, root=0)
        return fn(ctx.rank() + 1)

    assert values(context_ranks(server, 2, body)) == {0: 7, 1: 14}


@pytest.mark.parametrize(
    ("timeout", "error", "match"),
    [
        ("5", TypeError, "timeout must be a number of seconds or None, got str"),
        (True, TypeError, "timeout must be a number of seconds or None, got bool"),
        ([1], TypeError, "got list"),
        (0, ValueError, "timeout must be a finite number of seconds > 0, got 0"),
        (-1.5, ValueError, "timeout must be a finite number of seconds > 0, got -1.5"),
        (float("nan"), ValueError, "timeout must be a finite number of seconds > 0, got nan"),
    ],
)
def test_context_rejects_bad_timeouts_before_sending(server: CoordinatorServer, timeout: Any,
                                                      error: type[Exception], match: str) -> None:
    def body(ctx: BarrierTaskContext) -> list[Any]:
        with pytest.raises(error, match=match):
            ctx.barrier(timeout=timeout)
        with pytest.raises(error, match=match):
            ctx.allGather("x", timeout=timeout)
        with pytest.raises(error, match=match):
            ctx.broadcast("x", timeout=timeout)
        return ctx.allGather("still in step", timeout=5)

    assert values(context_ranks(server, 1, body)) == {0: ["still in step"]}


def test_context_rejects_an_infinite_timeout(server: CoordinatorServer) -> None:
    def body(ctx: BarrierTaskContext) -> None:
        with pytest.raises(ValueError, match="timeout"):
            ctx.barrier(timeout=float("inf"))

    values(context_ranks(server, 1, body))


@pytest.mark.parametrize(
    ("root", "error", "match"),
    [
        (2, ValueError, r"root=2 is not a rank of this gang \(0\.\.1\)"),
        (-1, ValueError, r"root=-1 is not a rank of this gang \(0\.\.1\)"),
        ("0", TypeError, "root must be an int rank, got str"),
        (True, TypeError, "root must be an int rank, got bool"),
        (None, TypeError, "root must be an int rank, got NoneType"),
    ],
)
def test_context_rejects_bad_broadcast_roots(server: CoordinatorServer, root: Any,
                                              error: type[Exception], match: str) -> None:
    def body(ctx: BarrierTaskContext) -> Any:
        with pytest.raises(error, match=match):
            ctx.broadcast("x", root=root)
        return ctx.broadcast(ctx.rank(), root=1)

    assert values(context_ranks(server, 2, body)) == {0: 1, 1: 1}


def test_context_default_timeout_applies_to_every_call(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=2)
    client = joined(handle, 0)
    try:
        ctx = BarrierTaskContext(client, 0, 2, default_timeout=0.3)
        with pytest.raises(CollectiveTimeoutError, match=r"timed out after 0\.3 s on rank 0; rank\(s\) 1 never arrived"):
            ctx.barrier()
    finally:
        client.close()


def test_context_surfaces_a_peer_failure(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=2)

    def body(client: CoordinatorClient, rank: int) -> Any:
        ctx = BarrierTaskContext(client, rank, 2)
        if rank == 1:
            client.fail(ErrorInfo.from_exception(KeyError("weights"), rank=1))
            return None
        return ctx.allGather("x")

    outcomes = start_ranks(handle, body, finish=False).join()
    with pytest.raises(GangAbortedError, match="rank 1 raised KeyError: 'weights'") as info:
        outcomes[0].get()
    assert info.value.failed_rank == 1


def test_context_get_outside_a_gang_raises_not_in_gang() -> None:
    assert BarrierTaskContext._current is None
    with pytest.raises(NotInGangError, match=r"BarrierTaskContext\.get\(\) was called outside a spark-hydrogen "
                                             r"barrier task"):
        BarrierTaskContext.get()


def test_context_get_returns_the_current_context_and_native_calls_need_spark(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=1)
    client = joined(handle, 0)
    ctx = BarrierTaskContext(client, 0, 1, gang_attempt=2)
    BarrierTaskContext._set(ctx)
    try:
        assert BarrierTaskContext.get() is ctx
        assert repr(ctx) == "BarrierTaskContext(rank=0, worldSize=1, gangAttempt=2)"
        for name in ("stageId", "attemptNumber", "taskAttemptId", "cpus", "resources"):
            with pytest.raises(NotInGangError, match=rf"{name}\(\) needs a Spark task"):
                getattr(ctx, name)()
        with pytest.raises(NotInGangError, match=r"getLocalProperty\(\) needs a Spark task"):
            ctx.getTaskInfos()
    finally:
        BarrierTaskContext._set(None)
        client.close()
    with pytest.raises(NotInGangError):
        BarrierTaskContext.get()


def test_log_records_reach_the_driver_hook_in_order() -> None:
    from sparkhydrogen.coordinator import LogRecord

    server = CoordinatorServer(CoordinatorConfig(host="127.0.0.1"))
    host, port = server.start()
    records: list[LogRecord] = []
    got = threading.Event()

    def hook(record: LogRecord) -> None:
        records.append(record)
        if len(records) == 3:
            got.set()

    try:
        gang = server.add_gang(1, on_log=hook)
        client = CoordinatorClient.connect((host, port), gang.gang_id, gang.secret)
        client.register(0)
        client.log("stdout", "epoch 1\n")
        client.log("stderr", "warning: slow\n", dropped=0)
        client.log("stdout", "épоch 2\n", dropped=7)
        assert got.wait(10)
        assert [(r.rank, r.stream, r.text, r.dropped) for r in records] == [
            (0, "stdout", "epoch 1\n", 0), (0, "stderr", "warning: slow\n", 0), (0, "stdout", "épоch 2\n", 7)]
        client.finish()
        client.close()
    finally:
        server.stop()
