"""Limits of the coordinator: beyond each, the caller gets a clear error and everyone else is unaffected.

* payload per call (``maxPayload``): refused by the client before sending;
* bytes buffered per gang (``maxGangBuffer``): payloads being received, held for a round
  or queued for sending;
* gangs running at once (``maxGangs``) and open connections (``maxConnections``);
* a peer that stops reading its replies stops being read (bounded memory per connection).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
from kit import connect, gang_bytes, joined, pending_ranks, start_ranks, wait_until

from sparkhydrogen.config import CoordinatorConfig, HydrogenConfig
from sparkhydrogen.coordinator.client import CoordinatorClient, PayloadTooLargeError
from sparkhydrogen.coordinator.peer import READ_PAUSE_BYTES, Outgoing
from sparkhydrogen.coordinator.protocol import NONCE_BYTES, FrameDecoder, Kind, Limits, client_proof, encode_frame
from sparkhydrogen.coordinator.server import CoordinatorServer
from sparkhydrogen.coordinator.state import Budget
from sparkhydrogen.errors import (
    CoordinatorConnectionError,
    GangAbortedError,
    PayloadError,
    RegistrationError,
)

pytestmark = pytest.mark.timeout(60)

LOOPBACK = "127.0.0.1"
KiB = 1024
MiB = 1024 * KiB


def gather_body(size: int, rounds: int = 3) -> Callable[[CoordinatorClient, int], Any]:
    def body(client: CoordinatorClient, rank: int) -> Any:
        parts: list[bytes] = []
        for i in range(rounds):
            parts = [bytes(p) for p in client.collective("allGather", bytes([rank, i]) * (size // 2), timeout=20)]
        return parts

    return body


# ------------------------------------------------------------------ settings


def test_limit_settings_are_read_from_spark_conf() -> None:
    cfg = HydrogenConfig.from_conf({"spark.hydrogen.coordinator.maxGangBuffer": "64m",
                                    "spark.hydrogen.coordinator.maxGangs": "8",
                                    "spark.hydrogen.coordinator.maxConnections": "100"}.get, LOOPBACK).coordinator
    assert (cfg.max_gang_buffer_bytes, cfg.max_gangs, cfg.max_connections) == (64 * MiB, 8, 100)
    defaults = CoordinatorConfig()
    assert (defaults.max_gang_buffer_bytes, defaults.max_gangs, defaults.max_connections) == (2048 * MiB, 256, 4096)


@pytest.mark.parametrize(("key", "value"), [("maxGangBuffer", "0"), ("maxGangs", "0"), ("maxConnections", "-1"),
                                            ("maxGangs", "lots")])
def test_bad_limit_settings_name_the_key(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"spark\.hydrogen\.coordinator\.{key}"):
        HydrogenConfig.from_conf({f"spark.hydrogen.coordinator.{key}": value}.get, LOOPBACK)


# ------------------------------------------------------------------ payload per call


def test_a_payload_over_the_limit_is_refused_before_sending_and_the_connection_stays_usable(
    make_server: Callable[..., CoordinatorServer],
) -> None:
    server = make_server(max_payload_bytes=64 * KiB)
    handle = server.add_gang(2)
    refused: dict[int, Any] = {}

    def body(client: CoordinatorClient, rank: int) -> Any:
        assert client.max_payload == 64 * KiB  # the coordinator says so in its WELCOME
        if rank == 1:
            with pytest.raises(PayloadError) as info:
                client.collective("allGather", b"x" * (64 * KiB + 1))
            refused[rank] = info.value
        return [bytes(p) for p in client.collective("allGather", bytes([rank]) * (64 * KiB))]

    out = start_ranks(handle, body).results()
    assert out == {r: [b"\0" * 64 * KiB, b"\1" * 64 * KiB] for r in range(2)}
    error = refused[1]
    assert isinstance(error, PayloadTooLargeError) and isinstance(error, CoordinatorConnectionError)
    assert str(error) == ("allGather payload of 65537 bytes exceeds the limit of 65536 bytes per call "
                          "(spark.hydrogen.coordinator.maxPayload): send less per call (e.g. in several calls), "
                          "keep large data in shared storage and send its path, or raise the limit")


# ------------------------------------------------------------------ bytes per gang


def test_a_gang_over_its_buffer_limit_fails_clearly_and_other_gangs_run_on(
    make_server: Callable[..., CoordinatorServer],
) -> None:
    server = make_server(max_gang_buffer_bytes=1 * MiB, max_payload_bytes=1 * MiB)
    big = server.add_gang(3, name="big")
    other = server.add_gang(2, name="other")
    first = start_ranks(big, lambda c, r: c.collective("allGather", b"a" * (400 * KiB), timeout=20), ranks=[0, 1])
    wait_until(lambda: pending_ranks(server, big.gang_id) == {0, 1}, "ranks 0 and 1 wait with 800 KiB buffered")
    assert gang_bytes(server, big.gang_id) == 800 * KiB

    third = joined(big, 2)
    with pytest.raises(PayloadError, match=r"a 'call' request with 409600 bytes of payload would take gang "
                                           rf"{big.gang_id[:8]} over its buffer limit in the coordinator: 819200 "
                                           r"bytes are buffered already and the limit is 1048576 "
                                           r"\(spark\.hydrogen\.coordinator\.maxGangBuffer\)"):
        third.collective("allGather", b"c" * (400 * KiB), timeout=20)
    third.close()
    for outcome in first.results().values():
        assert isinstance(outcome, GangAbortedError), outcome
        assert outcome.failed_rank == 2 and outcome.cause is not None and outcome.cause.type == "PayloadError"
    assert gang_bytes(server, big.gang_id) == 0  # everything it held is released
    failure = server.last_failure(big.gang_id)
    assert failure is not None and failure.type == "PayloadError" and failure.rank == 2

    # the other gang, on the same coordinator, moves as much as its own limit allows
    out = start_ranks(other, gather_body(400 * KiB, rounds=5)).results()
    assert out == {r: [bytes([i, 4]) * (200 * KiB) for i in range(2)] for r in range(2)}


def test_queued_replies_count_once_however_many_ranks_they_go_to(
    make_server: Callable[..., CoordinatorServer],
) -> None:
    """A 4-rank allGather of 256 KiB each: a 1 MiB reply to 4 ranks is held once, not four times."""
    server = make_server(max_gang_buffer_bytes=3 * MiB, max_payload_bytes=1 * MiB)
    handle = server.add_gang(4)
    out = start_ranks(handle, gather_body(256 * KiB, rounds=10)).results()
    assert out == {r: [bytes([i, 9]) * (128 * KiB) for i in range(4)] for r in range(4)}
    assert gang_bytes(server, handle.gang_id) == 0


# ------------------------------------------------------------------ gangs and connections


def test_gangs_beyond_max_gangs_are_refused_with_the_setting_to_change(
    make_server: Callable[..., CoordinatorServer],
) -> None:
    server = make_server(max_gangs=2)
    running = [server.add_gang(2, name=f"running-{i}") for i in range(2)]
    late = server.add_gang(2, name="late")
    go = threading.Event()
    first = [start_ranks(h, lambda c, r: (go.wait(10), c.collective("barrier"))[1] == []) for h in running]
    wait_until(lambda: all(len(server.registry.gangs[h.gang_id].attempts) == 1 for h in running), "two gangs run")
    with pytest.raises(RegistrationError, match=rf"gang {late.gang_id[:8]} \(late\) cannot start: the coordinator "
                                                r"already runs 2 gangs, its limit \(spark\.hydrogen\.coordinator\."
                                                r"maxGangs=2\); wait for other gang jobs to finish or raise the limit"):
        joined(late, 0)
    failure = server.last_failure(late.gang_id)
    assert failure is not None and "maxGangs=2" in failure.message  # the driver can name the cause
    go.set()
    assert [r.results() for r in first] == [{0: True, 1: True}] * 2  # the running gangs were unaffected
    assert start_ranks(late, lambda c, r: c.collective("barrier") == []).results() == {0: True, 1: True}  # now it fits


def test_connections_beyond_max_connections_get_a_clear_error(make_server: Callable[..., CoordinatorServer]) -> None:
    server = make_server(max_connections=3)
    handle = server.add_gang(2)
    idle = socket.create_connection(server.address, timeout=5)  # an unauthenticated peer holds a slot
    try:
        members = [joined(handle, 0), joined(handle, 1)]
        with pytest.raises(CoordinatorConnectionError,
                           match=r"the coordinator already has 3 open connections, its limit "
                                 r"\(spark\.hydrogen\.coordinator\.maxConnections=3\)"):
            connect(handle, timeout=5)
        done = [threading.Thread(target=lambda c=c: c.collective("barrier")) for c in members]
        for thread in done:
            thread.start()
        for thread in done:
            thread.join(10)
        for client in members:
            client.finish()
            client.close()
    finally:
        idle.close()
    wait_until(lambda: server.stats()["connections"] == 0, "every connection closed")
    joined(server.add_gang(1), 0).close()  # slots are free again


# ------------------------------------------------------------------ a peer that does not read


def test_a_peer_that_stops_reading_stops_being_read_and_others_run_on(
    make_server: Callable[..., CoordinatorServer],
) -> None:
    server = make_server(liveness_timeout=None)
    hoarder = server.add_gang(1, name="hoarder")
    state = b"s" * (64 * KiB)
    sock = socket.create_connection(server.address, timeout=5)  # a raw peer: it decides when to read
    try:
        decoder = FrameDecoder(Limits(1 << 20, 1 << 30))
        hello = _next_frame(sock, decoder)
        nonce = b"n" * NONCE_BYTES
        proof = client_proof(hoarder.secret, hoarder.gang_id, bytes.fromhex(hello.header["nonce"]), nonce)
        sock.sendall(encode_frame(Kind.AUTH, {"gang": hoarder.gang_id, "nonce": nonce.hex(), "proof": proof}))
        assert _next_frame(sock, decoder).kind is Kind.WELCOME
        sock.sendall(encode_frame(Kind.REQUEST, {"op": "register", "gang_attempt": 1, "stage_id": 0, "rank": 0,
                                                 "task_attempt_id": 100}))
        assert _next_frame(sock, decoder).kind is Kind.REPLY
        sock.sendall(encode_frame(Kind.REQUEST, {"op": "call", "kind": "checkpoint", "seq": 0}, state))
        assert _next_frame(sock, decoder).kind is Kind.REPLY
        # 2,000 restores (128 MiB of replies) sent without reading a byte of the answers
        requests = 2000
        sock.sendall(encode_frame(Kind.REQUEST, {"op": "restore"}) * requests)

        def hoarding() -> Any | None:
            def read() -> Any:
                conns = [c for c in server._connections if c.gang is not None and c.gang.gang_id == hoarder.gang_id]
                return (conns[0].read_paused, conns[0].queued) if conns else None

            return server._on_loop(read)

        wait_until(lambda: (hoarding() or (False, 0))[0], "the coordinator stops reading the hoarder")
        paused, queued = hoarding()  # type: ignore[misc]
        assert queued <= READ_PAUSE_BYTES + len(state) + 1024  # bounded, not 128 MiB

        # meanwhile another gang is served normally
        other = server.add_gang(3)
        assert start_ranks(other, gather_body(10 * KiB, rounds=20)).results() == {
            r: [bytes([i, 19]) * (5 * KiB) for i in range(3)] for r in range(3)}

        # once the hoarder reads, every one of its requests is answered, in order
        sock.settimeout(20)
        replies = 0
        while replies < requests:
            data = sock.recv(1 << 20)
            assert data, "the coordinator closed the hoarder's connection"
            for frame in decoder.feed(data):
                assert frame.kind is Kind.REPLY
                assert frame.header == {"op": "restore", "found": True, "world_size": 1, "of": 0}
                assert frame.payload == state
                replies += 1
    finally:
        sock.close()
    assert server.internal_errors == 0


def _next_frame(sock: socket.socket, decoder: FrameDecoder) -> Any:
    while True:
        for frame in decoder.feed(sock.recv(65536)):
            return frame


def test_a_frame_being_received_counts_before_it_has_arrived(make_server: Callable[..., CoordinatorServer]) -> None:
    """A peer announcing a large payload and trickling it holds its reservation; others feel the limit at once."""
    server = make_server(max_gang_buffer_bytes=1 * MiB, max_payload_bytes=1 * MiB, liveness_timeout=None)
    handle = server.add_gang(2)
    sock = socket.create_connection(server.address, timeout=5)
    try:
        decoder = FrameDecoder(Limits(1 << 20, 1 << 20))
        hello = _next_frame(sock, decoder)
        nonce = b"t" * NONCE_BYTES
        proof = client_proof(handle.secret, handle.gang_id, bytes.fromhex(hello.header["nonce"]), nonce)
        sock.sendall(encode_frame(Kind.AUTH, {"gang": handle.gang_id, "nonce": nonce.hex(), "proof": proof}))
        assert _next_frame(sock, decoder).kind is Kind.WELCOME
        sock.sendall(encode_frame(Kind.REQUEST, {"op": "register", "gang_attempt": 0, "stage_id": 0, "rank": 0}))
        assert _next_frame(sock, decoder).kind is Kind.REPLY
        frame = encode_frame(Kind.REQUEST, {"op": "call", "kind": "allGather", "seq": 0}, b"p" * (900 * KiB))
        sock.sendall(frame[: len(frame) // 2])  # half of it, and then nothing
        wait_until(lambda: gang_bytes(server, handle.gang_id) == 900 * KiB, "the announced payload is reserved")
        other = joined(handle, 1)
        with pytest.raises(PayloadError, match=r"921600 bytes are buffered already and the limit is 1048576"):
            other.collective("allGather", b"q" * (200 * KiB), timeout=10)
        other.close()
    finally:
        sock.close()
    wait_until(lambda: gang_bytes(server, handle.gang_id) == 0, "the reservation is released with the connection")


def test_a_reply_going_to_many_ranks_is_counted_once_while_any_still_sends_it() -> None:
    budget = Budget()
    reply = Outgoing(b"r" * 1000, budget)
    for _ in range(64):
        reply.hold()
    assert budget.sending == 1000
    for _ in range(63):
        reply.release()
    assert budget.sending == 1000
    reply.release()
    assert budget.sending == 0
