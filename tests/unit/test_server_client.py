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
from collections.abc import Callable
from typing import Any

import pytest
from kit import (
    HOST,
    JOIN_TIMEOUT,
    LOOPBACK,
    FakeClock,
    MemoryPeer,
    Outcome,
    connect,
    joined,
    start_ranks,
    wait_pending,
    wait_until,
)

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
    PartitionClosedError,
    PayloadError,
    ProtocolError,
    RegistrationError,
)

pytestmark = pytest.mark.timeout(30)

# ------------------------------------------------------------------ helpers
# servers: the ``make_server`` / ``server`` fixtures (conftest.py); ranks: kit.py


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
    except TimeoutError:
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
    with pytest.raises(GangAbortedError, match=r"aborted: rank 1's process died or lost its connection") as info:
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
                           match=r"aborted: rank 2's process died or lost its connection to the coordinator "
                                 r"\(host unit-host, pid \d+, last heard \d+\.\d s ago") as info:
            outcomes[rank].get()
        assert info.value.failed_rank == 2
        assert outcomes[rank].at - closed_at < 1.0
    last = server.last_failure(handle.gang_id)
    assert last is not None and last.type == "RankLostError" and last.rank == 2
    assert last.describe().startswith("rank 2's process died or lost its connection to the coordinator (host unit-host")


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
                           match=r"^rank 2 never reached barrier \(collective call #1\) within 0\.3 s \(ranks 0, 1 "
                                 r"waited\): rank 2 \(host unit-host, pid \d+\) last heard"):
            outcomes[rank].get()
        assert 0.3 <= outcomes[rank].at - started < 3.0


def test_timeout_says_when_a_rank_never_connected(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=2)
    outcomes = start_ranks(handle, lambda c, r: c.collective("allGather", b"", timeout=0.3), ranks=[0]).join()
    with pytest.raises(CollectiveTimeoutError, match=r"rank 1 never reached allGather \(collective call #1\) within "
                                                    r"0\.3 s \(rank 0 waited\): rank 1 never connected"):
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
        with pytest.raises(CollectiveTimeoutError,
                           match=r"rank 1 never reached barrier \(collective call #1\) within 0\.3 s "
                                 r"\(rank 0 waited\)"):
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
    server.start()
    records: list[LogRecord] = []
    got = threading.Event()

    def hook(record: LogRecord) -> None:
        records.append(record)
        if len(records) == 3:
            got.set()

    try:
        gang = server.add_gang(1, on_log=hook)
        client = connect(gang)
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


# ------------------------------------------------------- liveness while bytes arrive


def test_a_rank_uploading_a_large_payload_slowly_is_alive_on_every_chunk(make_server: Any) -> None:
    clock = FakeClock()
    server = make_server(clock=clock, liveness_timeout=1.0, tick_interval=3600.0)  # timeouts run on expire()
    handle = server.add_gang(world_size=1)
    rank = MemoryPeer(server)
    client_nonce = b"c" * NONCE_BYTES
    proof = client_proof(handle.secret, handle.gang_id, rank.nonce, client_nonce)
    rank.feed(encode_frame(Kind.AUTH, {"gang": handle.gang_id, "nonce": client_nonce.hex(), "proof": proof}),
              encode_frame(Kind.REQUEST, {"op": "register", "gang_attempt": 0, "stage_id": 0, "rank": 0}))
    payload = bytes(range(256)) * 4096  # 1 MiB, arriving in 16 chunks, 0.6 s apart (limit: 1 s of silence)
    frame = encode_frame(Kind.REQUEST, {"op": "call", "kind": "allGather", "seq": 0}, payload)
    step = len(frame) // 16 + 1
    for start in range(0, len(frame), step):
        rank.feed(frame[start:start + step])
        clock.advance(0.6)
        server.expire()
    replies = rank.transport.frames()
    assert [f.kind for f in replies] == [Kind.HELLO, Kind.WELCOME, Kind.REPLY, Kind.REPLY], \
        [f.header for f in replies if f.kind is Kind.ERROR]
    assert replies[-1].payload == payload
    assert server.last_failure(handle.gang_id) is None
    clock.advance(1.5)  # now it is silent for longer than the limit, its connection up: busy, not failed
    server.expire()
    assert server.last_failure(handle.gang_id) is None
    gang = server.registry.get(handle.gang_id)
    assert gang is not None
    assert server._on_loop(lambda: [a.busy_ranks(clock()) for a in gang.attempts.values()]) == [[0]]


# ------------------------------------------------------- fail() beside a pending collective


def test_fail_is_not_blocked_by_another_threads_pending_collective(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=3)
    peer = start_ranks(handle, lambda c, r: c.collective("barrier"), ranks=[1])
    idle = joined(handle, 2)  # registered, never arrives: the barrier cannot complete
    client = joined(handle, 0)
    stuck = Outcome()

    def in_barrier() -> None:
        try:
            stuck.value = client.collective("barrier", timeout=20)
        except BaseException as exc:  # noqa: BLE001 - checked below
            stuck.error = exc

    waiting = threading.Thread(target=in_barrier, daemon=True)
    waiting.start()
    wait_pending(server, handle, {0, 1})
    reporter = threading.Thread(target=client.fail, args=(ErrorInfo("RuntimeError", "boom", rank=0),), daemon=True)
    reporter.start()
    reporter.join(2.0)
    assert not reporter.is_alive(), "fail() waited behind another thread's pending barrier"
    with pytest.raises(GangAbortedError, match=r"aborted: rank 0 raised RuntimeError: boom") as info:
        peer.join()[1].get()
    assert info.value.failed_rank == 0
    waiting.join(JOIN_TIMEOUT)
    assert not waiting.is_alive()
    with pytest.raises(GangAbortedError, match=r"aborted: rank 0 raised RuntimeError: boom"):
        stuck.get()  # the failing rank's own pending call does not wait forever either
    with pytest.raises(GangAbortedError, match=r"aborted: rank 0 raised RuntimeError: boom"):
        idle.collective("barrier")
    for c in (client, idle):
        c.close()


# ------------------------------------------------------- partitions closed early


def test_a_partition_closed_early_fails_waiting_peers_with_that_reason(server: CoordinatorServer) -> None:
    aborts: list[ErrorInfo] = []
    handle = server.add_gang(world_size=3, on_abort=lambda key, cause: aborts.append(cause))

    def body(client: CoordinatorClient, rank: int) -> Any:
        client.collective("barrier")
        client.collective("barrier")
        return client.collective("allGather", b"x")

    peers = start_ranks(handle, body, ranks=[0, 2])
    early = joined(handle, 1)
    early.collective("barrier")
    early.collective("barrier")
    wait_pending(server, handle, {0, 2})
    early.finish(closed_early=True)  # a chained take() stopped reading rank 1's partition
    early.close()
    outcomes = peers.join()
    for rank in (0, 2):
        with pytest.raises(PartitionClosedError,
                           match=r"rank 1's partition was closed early by its consumer \(e.g. a chained "
                                 r"take\(\)/islice\) before its collective #3 \(allGather\)"):
            outcomes[rank].get()
    last = server.last_failure(handle.gang_id)
    assert last is not None and last.type == "PartitionClosedError" and "mismatch" not in last.describe()
    wait_until(lambda: len(aborts) == 1, "the driver's abort hook ran")


def test_every_partition_closed_early_with_nobody_waiting_completes_without_an_abort(
    server: CoordinatorServer,
) -> None:
    aborts: list[ErrorInfo] = []
    handle = server.add_gang(world_size=2, on_abort=lambda key, cause: aborts.append(cause))
    clients = {}
    for rank in (0, 1):
        clients[rank] = joined(handle, rank)
    done = start_ranks(handle, lambda c, r: None, ranks=[])  # nothing else runs
    threads = [threading.Thread(target=clients[r].collective, args=("barrier",), daemon=True) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    for rank in (0, 1):
        clients[rank].finish(closed_early=True)
        clients[rank].close()
    done.join()
    wait_until(lambda: server.gang_settled(handle.gang_id), "the attempt ends")
    assert server.last_failure(handle.gang_id) is None
    assert server._on_loop(lambda: [a.state.value for a in server.registry.gangs[handle.gang_id].attempts.values()]) \
        == ["finished"]
    assert aborts == []


# ------------------------------------------------------- state per gang: ephemeral gangs, removal


def _run_one(handle: GangHandle, checkpoint: bytes = b"") -> list[bytes]:
    client = joined(handle, 0)
    try:
        if checkpoint:
            client.collective("checkpoint", checkpoint)
        parts = [bytes(p) for p in client.collective("allGather", b"solo")]
        client.log("stdout", "one line\n")
        client.finish()
        return parts
    finally:
        client.close()


def test_an_ephemeral_gang_holds_no_checkpoint_or_attempt_after_success_and_can_run_again(
    server: CoordinatorServer,
) -> None:
    ephemeral = server.add_gang(world_size=1, ephemeral=True)
    durable = server.add_gang(world_size=1)
    assert _run_one(ephemeral, checkpoint=b"s" * 4096) == [b"solo"]
    assert _run_one(durable, checkpoint=b"d" * 1000) == [b"solo"]
    wait_until(lambda: server.footprint()["connections"] == 0, "both ranks hung up")
    wait_until(lambda: server.footprint()["attempts"] == 1, "the ephemeral gang forgot its attempt")
    foot = server.footprint()
    assert (foot["gangs"], foot["checkpoints"], foot["checkpoint_bytes"]) == (2, 1, 1000)  # the durable gang's
    assert _run_one(ephemeral) == [b"solo"]  # a re-evaluation joins the dormant gang as a new generation
    wait_until(lambda: server.footprint()["attempts"] == 1, "the ephemeral gang forgot its second attempt")


def test_thousands_of_gangs_declared_run_and_removed_leave_nothing_behind(server: CoordinatorServer) -> None:
    logs: list[Any] = []
    before = server.footprint()
    assert set(before.values()) == {0}
    for n in range(2000):
        handle = server.add_gang(world_size=1, name=f"job-{n}", ephemeral=n % 2 == 0,
                                 on_abort=lambda key, cause: None, on_log=logs.append)
        if n % 100 == 0:  # now and then a gang that fails, one that checkpoints, one left running
            client = joined(handle, 0)
            client.collective("checkpoint", b"c" * 100)
            client.fail(ErrorInfo("ValueError", "failed on purpose", rank=0))
            client.close()
        elif n % 100 == 1:
            client = joined(handle, 0)
            client.collective("barrier")
            server.remove_gang(handle.gang_id)  # removed while its rank is still connected
            client.close()
            continue
        else:
            assert _run_one(handle, checkpoint=b"c" * 10 if n % 7 == 0 else b"") == [b"solo"]
        gang_id = handle.gang_id
        wait_until(lambda: server.gang_settled(gang_id), f"gang {n} finished or aborted")  # noqa: B023 - now
        server.remove_gang(handle.gang_id)
    wait_until(lambda: server.footprint()["connections"] == 0, "every rank hung up", timeout=30)
    assert server.footprint() == before
    assert len(logs) == 2000 - 2 * 20 and server.internal_errors == 0


def test_a_loop_call_that_times_out_raises_a_hydrogen_error_saying_what(
    server: CoordinatorServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sparkhydrogen.coordinator import server as server_module

    release = threading.Event()
    blocked = threading.Event()

    def block() -> None:
        blocked.set()
        release.wait(20)

    server._loop.call_soon_threadsafe(block)  # type: ignore[union-attr]
    blocked.wait(10)
    monkeypatch.setattr(server_module, "LOOP_CALL_TIMEOUT", 0.2)
    try:
        with pytest.raises(HydrogenError, match=r"did not run stats\(\) within 0\.2 s: its loop is blocked"):
            server.stats()
    finally:
        release.set()
