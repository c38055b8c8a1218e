"""Fuzzing the coordinator itself: the handshake and the request handling, then hostile traffic
against a running gang over real loopback sockets.

The hypothesis tests drive the server's real connection protocol object on the server's
own event loop through an in-memory transport (fast, no sockets), and compare a
snapshot of everything the coordinator knows before and after: unauthenticated bytes
must change nothing and get nothing but the HELLO; an authenticated peer can change
its own gang only; no exception may escape into the event loop.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit import MemoryPeer, connect

from sparkhydrogen.config import CoordinatorConfig
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
)
from sparkhydrogen.coordinator.server import CoordinatorServer, GangHandle

pytestmark = pytest.mark.timeout(180)

LOOPBACK = "127.0.0.1"
FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def snapshot(server: CoordinatorServer, only: set[str] | None = None) -> Any:
    """Everything the coordinator knows about its gangs (of ``only``), as plain comparable values."""

    def read() -> Any:
        gangs = {}
        for gid, gang in server.registry.gangs.items():
            if only is not None and gid not in only:
                continue
            attempts = {
                key: (attempt.state, attempt.buffered_bytes, attempt.abort_error,
                      sorted((r, m.info, m.next_seq, m.finished, m.connected, m.last_heard)
                             for r, m in attempt.members.items()),
                      sorted((seq, rnd.op, sorted(rnd.arrivals)) for seq, rnd in attempt.rounds.items()))
                for key, attempt in gang.attempts.items()
            }
            gangs[gid] = (gang.world_size, gang.secret, gang.checkpoint, list(gang.failures), attempts,
                          (gang.budget.receiving, gang.budget.sending),
                          sorted(r for a in gang.attempts.values() for r in server.roster.endpoints(a)))
        return gangs

    return server._on_loop(read)


def auth_frame(handle: GangHandle, server_nonce: bytes, *, gang_id: str | None = None,
               secret: bytes | None = None, client_nonce: bytes | None = None) -> bytes:
    nonce = client_nonce if client_nonce is not None else secrets.token_bytes(NONCE_BYTES)
    gid = handle.gang_id if gang_id is None else gang_id
    proof = client_proof(handle.secret if secret is None else secret, gid, server_nonce, nonce)
    return encode_frame(Kind.AUTH, {"gang": gid, "nonce": nonce.hex(), "proof": proof})


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[tuple[CoordinatorServer, GangHandle, GangHandle]]:
    """A server with an honest gang mid-round (rank 0 waits in a barrier) and a gang for authenticated fuzz."""
    server = CoordinatorServer(CoordinatorConfig(host=LOOPBACK, liveness_timeout=None, max_payload_bytes=4096,
                                                 max_gang_buffer_bytes=64 * 1024))
    server.start()
    honest = server.add_gang(world_size=2, name="honest")
    fuzzed = server.add_gang(world_size=3, name="fuzzed")
    rank0 = connect(honest, timeout=5)
    rank0.register(0, host="honest")
    waiting = threading.Thread(target=lambda: _collect(rank0), daemon=True)
    waiting.start()
    deadline = time.monotonic() + 10
    while not snapshot(server, {honest.gang_id})[honest.gang_id][4].get((0, 0, 0), [None] * 5)[4]:
        assert time.monotonic() < deadline, "rank 0 never reached its barrier"
        time.sleep(0.01)
    yield server, honest, fuzzed
    server.stop()
    waiting.join(10)
    rank0.close()


_collected: list[Any] = []


def _collect(client: CoordinatorClient) -> None:
    try:
        _collected.append(client.collective("barrier"))
    except Exception as exc:  # noqa: BLE001 - the server stops at the end of the module
        _collected.append(exc)


# ------------------------------------------------------------ unauthenticated


hostile_chunks = st.lists(
    st.one_of(
        st.binary(max_size=300),
        st.builds(lambda k, h, b, tail: PREFIX.pack(MAGIC, VERSION, k, h, b) + tail,
                  st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=64)),
        st.builds(lambda k, hdr, payload: encode_frame(Kind(k), hdr, payload),
                  st.sampled_from([int(k) for k in Kind]),
                  st.dictionaries(st.sampled_from(["gang", "nonce", "proof", "op", "rank", "x"]),
                                  st.one_of(st.text(max_size=70), st.integers(), st.none(), st.lists(st.integers())),
                                  max_size=4),
                  st.binary(max_size=32)),
    ),
    min_size=1, max_size=6,
)


@FUZZ
@given(chunks=hostile_chunks)
def test_unauthenticated_bytes_change_nothing_and_get_only_the_hello(
    fuzz_server: tuple[CoordinatorServer, GangHandle, GangHandle], chunks: list[bytes],
) -> None:
    server, _, _ = fuzz_server
    before, errors = snapshot(server), server.internal_errors
    peer = MemoryPeer(server)
    peer.feed(*chunks)
    peer.close()
    assert snapshot(server) == before
    assert server.internal_errors == errors
    assert [f.kind for f in peer.transport.frames()] == [Kind.HELLO]


MUTATIONS = ["wrong secret", "replayed proof", "other gang's id", "short nonce", "long nonce", "proof upper-case",
             "proof truncated", "not AUTH", "numbers for strings", "extra fields", "honest"]


@FUZZ
@given(mutation=st.sampled_from(MUTATIONS), data=st.data())
def test_handshake_mutations_are_refused_silently_and_change_nothing(
    fuzz_server: tuple[CoordinatorServer, GangHandle, GangHandle], mutation: str, data: st.DataObject,
) -> None:
    server, honest, fuzzed = fuzz_server
    before, errors = snapshot(server), server.internal_errors
    peer = MemoryPeer(server)
    nonce = peer.nonce
    if mutation == "wrong secret":
        frame = auth_frame(honest, nonce, secret=data.draw(st.binary(min_size=1, max_size=64)))
    elif mutation == "replayed proof":  # a proof recorded on another connection (another server nonce)
        frame = auth_frame(honest, secrets.token_bytes(NONCE_BYTES))
    elif mutation == "other gang's id":  # the honest gang's secret, claiming the fuzzed gang
        frame = auth_frame(honest, nonce, gang_id=fuzzed.gang_id)
    elif mutation in ("short nonce", "long nonce"):
        sizes = st.integers(0, NONCE_BYTES - 1) if mutation == "short nonce" else st.integers(NONCE_BYTES + 1, 200)
        size = data.draw(sizes)
        frame = auth_frame(honest, nonce, client_nonce=secrets.token_bytes(size))
    elif mutation in ("proof upper-case", "proof truncated"):
        header = json.loads(auth_frame(honest, nonce)[PREFIX.size:])
        header["proof"] = header["proof"].upper() if mutation == "proof upper-case" else header["proof"][:63]
        frame = encode_frame(Kind.AUTH, header)
    elif mutation == "not AUTH":
        good = auth_frame(honest, nonce)
        kind = data.draw(st.sampled_from([k for k in Kind if k is not Kind.AUTH]))
        frame = good[:3] + bytes([int(kind)]) + good[4:]
    elif mutation == "numbers for strings":
        frame = encode_frame(Kind.AUTH, {"gang": data.draw(st.integers()), "nonce": data.draw(st.integers()),
                                         "proof": data.draw(st.one_of(st.integers(), st.none(), st.lists(st.text())))})
    elif mutation == "extra fields":
        header = json.loads(auth_frame(honest, nonce, secret=b"x" * 32)[PREFIX.size:])
        header.update(data.draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)))
        frame = encode_frame(Kind.AUTH, header)
    else:
        frame = auth_frame(honest, nonce)
    cuts = data.draw(st.lists(st.integers(0, len(frame)), max_size=3))
    points = [0, *sorted(cuts), len(frame)]
    peer.feed(*[frame[a:b] for a, b in zip(points, points[1:], strict=False)])
    kinds = [f.kind for f in peer.transport.frames()]
    peer.close()
    assert snapshot(server) == before
    assert server.internal_errors == errors
    if mutation == "honest":
        assert kinds == [Kind.HELLO, Kind.WELCOME]
    else:
        assert kinds == [Kind.HELLO] and peer.transport.closed


# ------------------------------------------------------------ authenticated


ops = st.sampled_from(["register", "call", "fail", "finish", "ping", "log", "metrics", "restore", "???", None])
values = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.integers(),
                   st.floats(allow_nan=False, allow_infinity=False),
                   st.text(max_size=20), st.lists(st.integers(), max_size=3),
                   st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), st.integers(),
                                                                  st.lists(st.integers())), max_size=3))
requests = st.builds(
    lambda op, fields, payload, kind: (kind, {**({} if op is None else {"op": op}), **fields}, payload),
    ops,
    st.dictionaries(st.sampled_from(["gang_attempt", "stage_id", "rank", "host", "pid", "task_attempt_id", "kind",
                                     "seq", "root", "timeout", "error", "stream", "dropped"]), values, max_size=7),
    st.binary(max_size=600),
    st.sampled_from([Kind.REQUEST] * 6 + [Kind.AUTH, Kind.REPLY]),
)


@FUZZ
@given(frames=st.lists(requests, min_size=1, max_size=8))
def test_authenticated_garbage_touches_its_own_gang_only_and_never_breaks_the_server(
    fuzz_server: tuple[CoordinatorServer, GangHandle, GangHandle], frames: list[tuple[Kind, dict[str, Any], bytes]],
) -> None:
    server, honest, fuzzed = fuzz_server
    others, errors = snapshot(server, {honest.gang_id}), server.internal_errors
    peer = MemoryPeer(server)
    peer.feed(auth_frame(fuzzed, peer.nonce))
    peer.feed(b"".join(encode_frame(kind, header, payload) for kind, header, payload in frames))
    peer.close()
    assert snapshot(server, {honest.gang_id}) == others
    assert server.internal_errors == errors, "an exception escaped the request handling"
    for frame in peer.transport.frames()[2:]:
        assert frame.kind in (Kind.REPLY, Kind.ERROR)


# ------------------------------------------------------------ hostile traffic vs a running gang


def hostile_worker(address: tuple[str, int], fuzz_gang: GangHandle, seed: int, stop: threading.Event,
                   counts: dict[str, int]) -> None:
    """Opens connection after connection and misbehaves on each, until told to stop."""
    rng = random.Random(seed)
    recorded_auth: bytes | None = None
    while not stop.is_set():
        style = rng.choice(["garbage", "huge prefix", "slow partial", "replay", "bad proof", "authenticated junk",
                            "silent", "half frame then close"])
        try:
            with socket.create_connection(address, timeout=5) as sock:
                sock.settimeout(5)
                hello = _read_frame(sock)
                nonce = bytes.fromhex(hello.header["nonce"])
                if style == "garbage":
                    sock.sendall(rng.randbytes(rng.randint(1, 3000)))
                elif style == "huge prefix":
                    sock.sendall(PREFIX.pack(MAGIC, VERSION, rng.choice([2, 4]), rng.randint(5000, 2**32 - 1),
                                             rng.randint(0, 2**32 - 1)))
                elif style == "slow partial":
                    for byte in PREFIX.pack(MAGIC, VERSION, 2, 100, 0)[: rng.randint(1, 11)]:
                        sock.sendall(bytes([byte]))
                elif style == "replay" and recorded_auth is not None:
                    sock.sendall(recorded_auth)  # a valid AUTH from an earlier connection
                elif style == "bad proof":
                    sock.sendall(auth_frame(fuzz_gang, nonce, secret=rng.randbytes(32)))
                elif style == "authenticated junk":
                    frame = auth_frame(fuzz_gang, nonce)
                    recorded_auth = frame
                    sock.sendall(frame)
                    _read_frame(sock)  # WELCOME
                    for _ in range(rng.randint(1, 20)):
                        header = {"op": rng.choice(["call", "register", "log", "fail", "nope"]),
                                  "seq": rng.randint(-2, 5), "rank": rng.randint(-1, 4), "kind": "allGather",
                                  "gang_attempt": 0, "stage_id": 0, "error": rng.choice([{}, [], "x", {"extra": []}])}
                        sock.sendall(encode_frame(Kind.REQUEST, header, rng.randbytes(rng.randint(0, 2000))))
                elif style == "half frame then close":
                    sock.sendall(auth_frame(fuzz_gang, nonce)[: rng.randint(1, 60)])
                counts[style] = counts.get(style, 0) + 1
        except OSError:
            counts["reset"] = counts.get("reset", 0) + 1


def _read_frame(sock: socket.socket) -> Frame:
    decoder = FrameDecoder(Limits(1 << 16, 1 << 16))
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        frames = list(decoder.feed(data))
        if frames:
            return frames[0]


def test_an_honest_gang_completes_with_correct_results_while_hostile_traffic_runs() -> None:
    server = CoordinatorServer(CoordinatorConfig(host=LOOPBACK, handshake_timeout=0.5, max_payload_bytes=1 << 16,
                                                 max_gang_buffer_bytes=1 << 20))
    server.start()
    try:
        honest = server.add_gang(world_size=6, name="honest")
        fuzz_gang = server.add_gang(world_size=4, name="fuzz")
        stop = threading.Event()
        counts: dict[str, int] = {}
        workers = [threading.Thread(target=hostile_worker, args=(server.address, fuzz_gang, seed, stop, counts),
                                    daemon=True) for seed in range(4)]
        for worker in workers:
            worker.start()
        results: dict[int, Any] = {}

        def rank(r: int) -> None:
            try:
                client = connect(honest, timeout=10)
                client.register(r)
                client.start_heartbeat(0.2)
                digest = hashlib.sha256()
                for step in range(1000):
                    parts = client.collective("allGather", f"{r}:{step}".encode() * (1 + step % 7), timeout=30)
                    expected = [f"{i}:{step}".encode() * (1 + step % 7) for i in range(6)]
                    assert [bytes(p) for p in parts] == expected
                    digest.update(b"".join(parts))
                [root] = client.collective("broadcast", b"from 3" if r == 3 else b"", root=3, timeout=30)
                client.finish()
                client.close()
                results[r] = (digest.hexdigest(), bytes(root))
            except BaseException as exc:  # noqa: BLE001 - asserted below
                results[r] = exc

        ranks = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(6)]
        for thread in ranks:
            thread.start()
        for thread in ranks:
            thread.join(120)
        stop.set()
        for worker in workers:
            worker.join(30)
        assert not any(t.is_alive() for t in ranks + workers)
        assert len({v for v in results.values() if isinstance(v, tuple)}) == 1, results
        assert all(isinstance(v, tuple) and v[1] == b"from 3" for v in results.values()), results
        assert sum(counts.values()) > 50, counts
        assert server.internal_errors == 0
        deadline = time.monotonic() + 10
        while not server.gang_settled(honest.gang_id):  # the ranks' finish notices are on their way
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gang = server.registry.get(honest.gang_id)
        assert gang is not None and [a.state.value for a in gang.attempts.values()] == ["finished"]
        deadline = time.monotonic() + 10
        while server.stats()["connections"]:
            assert time.monotonic() < deadline, server.stats()
            time.sleep(0.02)
    finally:
        server.stop()
