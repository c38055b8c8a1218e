"""Simulated ranks: one process drives N authenticated coordinator connections.

Run by :mod:`coordinator_bench` as a child process, so the ranks never share a
GIL with the coordinator they load.  It speaks the real wire protocol with the
helpers of :mod:`sparkhydrogen.coordinator.protocol` (HELLO/AUTH/WELCOME
handshake, ``register``, sequenced ``call`` requests, ``finish``), but with
non-blocking multiplexing instead of one blocking client (and thread) per rank.

Conversation with the parent, one JSON line each way:

1. parent -> child: ``{"host", "port", "gang_id", "secret", "ranks", "op", "size", "warmup", "rounds"}``
   (the secret travels on the pipe, never on the command line);
2. child -> parent: ``{"connected": ranks, "setup_s": ...}`` once every rank has registered;
3. parent -> child: ``go`` (after it has read the coordinator's CPU clock);
4. child -> parent: ``{"spans_ms": [...], ...}``: per measured round, the time from
   the first rank's send to the last rank's reply, and its phases (see :func:`run_rounds`).
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import select
import socket
import sys
import time
from collections import deque
from typing import Any

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

_LIMITS = Limits(max_header_bytes=1 << 20, max_payload_bytes=1 << 40)


def raise_fd_limit(needed: int) -> None:
    """Raise this process's soft open-files limit to ``needed`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if target < needed:
            raise SystemExit(f"need {needed} open files but the hard limit is {hard}: raise it with ulimit -Hn")
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class SimRank:
    """One simulated rank: a socket, its frame decoder and frames decoded but not yet consumed."""

    def __init__(self, rank: int, address: tuple[str, int]) -> None:
        self.rank = rank
        self.sock = socket.create_connection(address, timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder(_LIMITS)
        self.frames: deque[Frame] = deque()
        # receive path of the measured rounds (see run_rounds)
        self.buf = bytearray(256)
        self.view = memoryview(self.buf)
        self.got = 0
        self.fallback = False

    def receive(self, expected: Expected) -> int:
        return _receive(self, expected)

    def read_frame(self) -> Frame:
        """Block until one frame has arrived (handshake only)."""
        while not self.frames:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError(f"rank {self.rank}: the coordinator closed the connection")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.popleft()

    def expect(self, kind: Kind) -> Frame:
        frame = self.read_frame()
        if frame.kind is not kind:
            raise RuntimeError(f"rank {self.rank}: expected {kind.name}, got {frame.kind.name} {dict(frame.header)}")
        return frame


def connect_all(spec: dict[str, Any]) -> list[SimRank]:
    """Connect, authenticate and register every rank, one handshake phase at a time for all ranks."""
    address = (spec["host"], int(spec["port"]))
    gang_id, secret = spec["gang_id"], bytes.fromhex(spec["secret"])
    ranks = [SimRank(r, address) for r in range(int(spec["ranks"]))]
    nonces: list[tuple[bytes, bytes]] = []
    for sim in ranks:
        server_nonce = bytes.fromhex(sim.expect(Kind.HELLO).header["nonce"])
        nonce = secrets.token_bytes(NONCE_BYTES)
        nonces.append((server_nonce, nonce))
        proof = client_proof(secret, gang_id, server_nonce, nonce)
        sim.sock.sendall(encode_frame(Kind.AUTH, {"gang": gang_id, "nonce": nonce.hex(), "proof": proof}))
    for sim, (server_nonce, nonce) in zip(ranks, nonces, strict=True):
        welcome = sim.expect(Kind.WELCOME)
        if welcome.header.get("proof") != server_proof(secret, gang_id, server_nonce, nonce):
            raise RuntimeError(f"rank {sim.rank}: the coordinator's proof does not match")
        sim.sock.sendall(encode_frame(Kind.REQUEST, {
            "op": "register", "gang_attempt": 0, "stage_id": 0, "rank": sim.rank,
            "host": "simulated", "pid": os.getpid(), "task_attempt_id": sim.rank,
        }))
    for sim in ranks:
        reply = sim.expect(Kind.REPLY)
        if reply.header.get("world_size") != len(ranks):
            raise RuntimeError(f"rank {sim.rank}: registered into a gang of {reply.header.get('world_size')}")
        sim.sock.settimeout(None)
    return ranks


def run_rounds(ranks: list[SimRank], op: str, size: int, warmup: int, rounds: int,
               stall_timeout: float = 60.0) -> dict[str, list[float]]:
    """``warmup + rounds`` collective rounds; returns, per measured round, in ms:

    ``spans_ms`` (first send to last reply), and its phases: ``send_ms`` (first to
    last send), ``wait_ms`` (last send to first reply bytes) and ``fanout_ms`` (first
    to last reply).

    The simulator's own cost is part of every span, so its receive path is lean:
    epoll directly, and each rank receives straight into a preallocated buffer
    the size of the reply it expects (one copy, no decoder); a complete reply is
    accepted when its prefix and header match the expected frame byte for byte.
    Anything unexpected (an ERROR frame, another length) is handed to the general
    decoder, which reports it.
    """
    poller = select.epoll()
    by_fd = {sim.sock.fileno(): sim for sim in ranks}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    payload = b"x" * size if op == "allGather" else b""
    world = len(ranks)
    sizes = [size] * world if op == "allGather" else []
    reply_payload = payload * world
    out: dict[str, list[float]] = {"spans_ms": [], "send_ms": [], "wait_ms": [], "fanout_ms": []}
    try:
        for seq in range(warmup + rounds):
            frame = encode_frame(Kind.REQUEST, {"op": "call", "kind": op, "seq": seq, "root": None, "timeout": None},
                                 payload)
            expected = Expected(encode_frame(Kind.REPLY, {"op": op, "seq": seq, "sizes": sizes}, reply_payload),
                                seq, op, world, size)
            t0 = time.monotonic_ns()
            for sim in ranks:
                sim.sock.sendall(frame)
            t_sent = time.monotonic_ns()
            t_first = 0
            pending = world
            while pending:
                events = poller.poll(stall_timeout)
                if not events:
                    raise TimeoutError(f"call #{seq + 1}: {pending} rank(s) got no reply within {stall_timeout:g} s")
                for fd, _ in events:
                    sim = by_fd[fd]
                    done = sim.receive(expected)
                    if not t_first:
                        t_first = time.monotonic_ns()
                    pending -= done
            t1 = time.monotonic_ns()
            if seq >= warmup:
                for key, (a, b) in (("spans_ms", (t0, t1)), ("send_ms", (t0, t_sent)),
                                    ("wait_ms", (t_sent, t_first)), ("fanout_ms", (t_first, t1))):
                    out[key].append((b - a) / 1e6)
    finally:
        poller.close()
    return out


class Expected:
    """The reply every rank should get for one round, and what to check it against."""

    def __init__(self, frame: bytes, seq: int, op: str, world: int, size: int) -> None:
        self.frame = frame
        self.head_end = PREFIX.size + PREFIX.unpack_from(frame)[3]
        self.head = frame[: self.head_end]
        self.seq, self.op, self.world, self.size = seq, op, world, size


def _receive(sim: SimRank, exp: Expected) -> int:
    """Read what is available for ``sim``; return how many replies it completed (0 or 1)."""
    if sim.fallback:
        return _decode(sim, sim.sock.recv(1 << 20), exp)
    need = len(exp.frame)
    if len(sim.buf) < need:
        sim.buf = bytearray(max(need, 2 * len(sim.buf)))
        sim.view = memoryview(sim.buf)
    got = sim.sock.recv_into(sim.view[sim.got:need])
    if got == 0:
        raise ConnectionError(f"rank {sim.rank}: the coordinator closed the connection")
    before, sim.got = sim.got, sim.got + got
    if before < PREFIX.size <= sim.got:
        magic, version, kind, head_len, body_len = PREFIX.unpack_from(sim.buf)
        if (magic, version, kind) != (MAGIC, VERSION, Kind.REPLY) or PREFIX.size + head_len + body_len != need:
            return _switch_to_decoder(sim, exp)
    if sim.got < need:
        return 0
    if sim.view[: exp.head_end] != exp.head:
        return _switch_to_decoder(sim, exp)
    sim.got = 0
    return 1


def _switch_to_decoder(sim: SimRank, exp: Expected) -> int:
    data, sim.got, sim.fallback = bytes(sim.view[: sim.got]), 0, True
    return _decode(sim, data, exp)


def _decode(sim: SimRank, data: bytes, exp: Expected) -> int:
    if not data:
        raise ConnectionError(f"rank {sim.rank}: the coordinator closed the connection")
    done = 0
    for reply in sim.decoder.feed(data):
        _check_reply(sim, reply, exp.seq, exp.op, exp.world, exp.size)
        done += 1
    return done


def _check_reply(sim: SimRank, reply: Frame, seq: int, op: str, world: int, size: int) -> None:
    if reply.kind is not Kind.REPLY:
        raise RuntimeError(f"rank {sim.rank}: call #{seq + 1} failed: {dict(reply.header)}")
    if reply.header.get("seq") != seq:
        raise RuntimeError(f"rank {sim.rank}: reply for call #{reply.header.get('seq')} while waiting for #{seq}")
    if op == "allGather" and len(reply.payload) != world * size:
        raise RuntimeError(f"rank {sim.rank}: allGather reply of {len(reply.payload)} bytes, expected {world * size}")


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    raise_fd_limit(int(spec["ranks"]) + 64)
    started = time.perf_counter()
    ranks = connect_all(spec)
    print(json.dumps({"connected": len(ranks), "setup_s": time.perf_counter() - started}), flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("parent did not say go")
    measured = run_rounds(ranks, spec["op"], int(spec["size"]), int(spec["warmup"]), int(spec["rounds"]))
    print(json.dumps(measured), flush=True)
    sys.stdin.readline()  # the parent closes stdin once it has read the coordinator's CPU clock
    finish = encode_frame(Kind.REQUEST, {"op": "finish"})
    for sim in ranks:
        sim.sock.sendall(finish)
        sim.sock.close()


if __name__ == "__main__":
    main()
