"""Load harness: the coordinator in one process, simulated ranks in another, the real protocol on loopback.

Two child processes, each run as ``python loadkit.py serve`` / ``python loadkit.py ranks``:

* **serve** runs a :class:`~sparkhydrogen.coordinator.CoordinatorServer` exactly as the
  driver does and answers one JSON command per stdin line (``gangs``, ``remove``,
  ``stats``, ``stop``) with one JSON line. ``stats`` reads the process's resident
  memory and open file descriptors from ``/proc/self``, so the figures are the
  coordinator's alone.
* **ranks** reads a spec (gang handles, rounds, op) from its first stdin line and
  drives every rank of every gang over its own socket, multiplexed with a selector:
  the HELLO/AUTH/WELCOME handshake (checking the server's proof), ``register``,
  sequenced ``call`` requests and ``finish`` - the real wire protocol, built with
  :mod:`sparkhydrogen.coordinator.protocol`. Every reply is checked byte for byte
  against the frame the coordinator must send (all ranks' payloads in rank order, each
  payload naming its gang, rank and round), so a misrouted or corrupted byte fails
  the run. One JSON line per finished gang, then one with the totals.

Ranks and coordinator never share a GIL, as on a real cluster. Every wait is bounded:
a round that makes no progress for ``stall_s`` seconds ends the run with an error.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import selectors
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sparkhydrogen.coordinator.protocol import (
    NONCE_BYTES,
    PREFIX,
    Frame,
    FrameDecoder,
    Kind,
    Limits,
    client_proof,
    encode_frame,
    server_proof,
)

HERE = os.path.abspath(__file__)
_LIMITS = Limits(max_header_bytes=1 << 20, max_payload_bytes=1 << 30)
_PAYLOAD = struct.Struct("!HHI")  # gang index, rank, round: 8 bytes


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def proc_stats() -> dict[str, int]:
    """Resident memory (KiB), open file descriptors and threads of this process, from /proc."""
    rss = threads = 0
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return {"rss_kib": rss, "fds": len(os.listdir("/proc/self/fd")), "threads": threads}


# ------------------------------------------------------------------ serve


def serve() -> None:
    from sparkhydrogen.config import CoordinatorConfig, TlsConfig
    from sparkhydrogen.coordinator import CoordinatorServer

    options = json.loads(sys.stdin.readline())
    raise_fd_limit(int(options.pop("fd_limit", 8192)))
    tls = TlsConfig(enabled=bool(options.pop("tls", False)))
    server = CoordinatorServer(CoordinatorConfig(tls=tls, **options))
    host, port = server.start()
    _reply({"host": host, "port": port, "tls_fingerprint": server.tls_fingerprint, **proc_stats()})
    for line in sys.stdin:
        cmd = json.loads(line)
        what = cmd["cmd"]
        if what == "gangs":
            handles = [server.add_gang(int(cmd["world_size"])) for _ in range(int(cmd["count"]))]
            _reply({"gangs": [{"gang_id": h.gang_id, "secret": h.secret.hex(), "world_size": h.world_size,
                               "host": h.host, "port": h.port, "tls_fingerprint": h.tls_fingerprint}
                              for h in handles]})
        elif what == "remove":
            for gang_id in cmd["gang_ids"]:
                server.remove_gang(gang_id)
            _reply({"ok": True})
        elif what == "stats":
            usage = resource.getrusage(resource.RUSAGE_SELF)
            _reply({**server.stats(), **proc_stats(), "internal_errors": server.internal_errors,
                    "cpu_s": usage.ru_utime + usage.ru_stime})
        elif what == "stop":
            server.stop()
            _reply({"ok": True})
            return
        else:
            _reply({"error": f"unknown command {what!r}"})


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------ ranks


class SimError(RuntimeError):
    pass


@dataclass
class GangRun:
    index: int
    gang_id: str
    secret: bytes
    world: int
    address: tuple[str, int]
    fingerprint: str | None
    op: str
    rounds: int
    progress_every: int = 0
    ranks: list[SimRank] = field(default_factory=list)
    registered: int = 0
    finished: int = 0
    started_at: dict[int, float] = field(default_factory=dict)
    replies: dict[int, int] = field(default_factory=dict)
    expected: dict[int, bytes] = field(default_factory=dict)
    spans_ms: list[float] = field(default_factory=list)
    t0: float = 0.0
    t1: float = 0.0

    def payload(self, rank: int, seq: int) -> bytes:
        return _PAYLOAD.pack(self.index & 0xFFFF, rank, seq) if self.op == "allGather" else b""

    def request(self, rank: int, seq: int) -> bytes:
        return encode_frame(Kind.REQUEST, {"op": "call", "kind": self.op, "seq": seq, "root": None,
                                           "timeout": None}, self.payload(rank, seq))

    def reply(self, seq: int) -> bytes:
        """The exact REPLY frame every rank must get for round ``seq``."""
        frame = self.expected.get(seq)
        if frame is None:
            payloads = [self.payload(r, seq) for r in range(self.world)] if self.op == "allGather" else []
            frame = encode_frame(Kind.REPLY, {"op": self.op, "seq": seq, "sizes": [len(p) for p in payloads]},
                                 b"".join(payloads))
            self.expected[seq] = frame
        return frame

    def got_reply(self, seq: int, now: float) -> None:
        count = self.replies.get(seq, 0) + 1
        if count == self.world:
            self.spans_ms.append((now - self.started_at.pop(seq)) * 1e3)
            if self.progress_every and len(self.spans_ms) % self.progress_every == 0:
                _reply({"progress": self.gang_id, "rounds": len(self.spans_ms)})
            self.replies.pop(seq, None)
            self.expected.pop(seq, None)
        else:
            self.replies[seq] = count


class SimRank:
    """One rank: its socket, the protocol step it is at, and bytes received but not yet consumed."""

    def __init__(self, gang: GangRun, rank: int) -> None:
        self.gang = gang
        self.rank = rank
        sock = socket.create_connection(gang.address, timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if gang.fingerprint is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            sock = ctx.wrap_socket(sock)
            der = sock.getpeercert(binary_form=True) or b""
            import hashlib

            if hashlib.sha256(der).hexdigest() != gang.fingerprint:
                raise SimError(f"rank {rank}: the coordinator's certificate does not match the pinned fingerprint")
        self.sock = sock
        self.decoder = FrameDecoder(_LIMITS)
        self.buf = bytearray()
        self.got = 0
        self.step = "hello"
        self.seq = 0
        self.server_nonce = b""
        self.nonce = secrets.token_bytes(NONCE_BYTES)

    def read(self) -> None:
        if self.step == "run":
            self._read_reply()
            return
        data = self.sock.recv(1 << 16)
        if not data:
            raise SimError(f"gang {self.gang.index} rank {self.rank}: the coordinator closed the connection "
                           f"at step {self.step}")
        for frame in self.decoder.feed(data):
            self._on_frame(frame)
        if self.step == "run" and self.decoder.buffered():
            raise SimError(f"rank {self.rank}: unexpected bytes after registering")

    def _read_reply(self) -> None:
        """Receive straight into a buffer the size of the expected reply; compare when it is full."""
        gang = self.gang
        expected = gang.reply(self.seq)
        need = len(expected)
        if len(self.buf) != need:
            self.buf = bytearray(need)
        view = memoryview(self.buf)
        while True:
            n = self.sock.recv_into(view[self.got :], need - self.got)
            if n == 0:
                raise SimError(f"gang {gang.index} rank {self.rank}: the coordinator closed the connection "
                               f"in round {self.seq}")
            before, self.got = self.got, self.got + n
            if before < PREFIX.size <= self.got and view[: PREFIX.size] != expected[: PREFIX.size]:
                rest = self.sock.recv(1 << 16) if self.got < need else b""
                frames = list(FrameDecoder(_LIMITS).feed(bytes(view[: self.got]) + rest))
                what = dict(frames[0].header) if frames else bytes(view[: self.got])
                raise SimError(f"gang {gang.index} rank {self.rank} round {self.seq}: unexpected reply {what}")
            if self.got < need and not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
                return
            if self.got == need:
                break
        view.release()
        self.got = 0
        if self.buf != expected:
            raise SimError(f"gang {gang.index} rank {self.rank} round {self.seq}: the reply's bytes differ "
                           "from every rank's payloads in rank order")
        gang.got_reply(self.seq, time.perf_counter())
        self.seq += 1
        if self.seq < gang.rounds:
            self.send_call()
        else:
            self.sock.sendall(encode_frame(Kind.REQUEST, {"op": "finish"}))
            self.step = "done"
            gang.finished += 1
            if gang.finished == gang.world:
                gang.t1 = time.perf_counter()

    def _on_frame(self, frame: Frame) -> None:
        gang = self.gang
        if frame.kind is Kind.ERROR:
            raise SimError(f"gang {gang.index} rank {self.rank} at step {self.step}: {dict(frame.header)}")
        if self.step == "hello" and frame.kind is Kind.HELLO:
            self.server_nonce = bytes.fromhex(frame.header["nonce"])
            proof = client_proof(gang.secret, gang.gang_id, self.server_nonce, self.nonce)
            self.sock.sendall(encode_frame(Kind.AUTH, {"gang": gang.gang_id, "nonce": self.nonce.hex(),
                                                       "proof": proof}))
            self.step = "welcome"
        elif self.step == "welcome" and frame.kind is Kind.WELCOME:
            if frame.header.get("proof") != server_proof(gang.secret, gang.gang_id, self.server_nonce, self.nonce):
                raise SimError(f"rank {self.rank}: the coordinator's proof does not match")
            self.sock.sendall(encode_frame(Kind.REQUEST, {
                "op": "register", "gang_attempt": 0, "stage_id": 0, "rank": self.rank, "host": "sim",
                "pid": os.getpid(), "task_attempt_id": self.rank}))
            self.step = "register"
        elif self.step == "register" and frame.kind is Kind.REPLY:
            if frame.header.get("world_size") != gang.world:
                raise SimError(f"rank {self.rank}: registered into a gang of {frame.header.get('world_size')}")
            self.step = "run"
            gang.registered += 1
            if gang.registered == gang.world:
                gang.t0 = time.perf_counter()
                for sim in gang.ranks:
                    sim.send_call()
        else:
            raise SimError(f"rank {self.rank}: unexpected {frame.kind.name} at step {self.step}")

    def send_call(self) -> None:
        gang = self.gang
        gang.started_at.setdefault(self.seq, time.perf_counter())
        self.sock.sendall(gang.request(self.rank, self.seq))


def run_gangs(gangs: list[GangRun], stall_s: float) -> None:
    """Drive ``gangs`` concurrently until every rank has finished every round."""
    sel = selectors.DefaultSelector()
    try:
        for gang in gangs:
            for rank in range(gang.world):
                sim = SimRank(gang, rank)
                gang.ranks.append(sim)
                sel.register(sim.sock, selectors.EVENT_READ, sim)
        pending = len(gangs)
        while pending:
            events = sel.select(timeout=stall_s)
            if not events:
                stuck = [(g.index, g.registered, min((r.seq for r in g.ranks), default=0)) for g in gangs
                         if g.finished < g.world]
                raise SimError(f"no progress for {stall_s:g} s; (gang, registered, round) still running: {stuck[:8]}")
            for key, _ in events:
                sim: SimRank = key.data
                sim.read()
                if sim.step == "done":
                    sel.unregister(sim.sock)
                    sim.sock.close()
                    if sim.gang.finished == sim.gang.world:
                        pending -= 1
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()


def ranks() -> None:
    spec = json.loads(sys.stdin.readline())
    handles = spec["gangs"]
    raise_fd_limit(sum(h["world_size"] for h in handles) + 256)
    runs = [GangRun(i, h["gang_id"], bytes.fromhex(h["secret"]), h["world_size"], (h["host"], h["port"]),
                    h.get("tls_fingerprint"), spec["op"], int(spec["rounds"]), int(spec.get("progress_every", 0)))
            for i, h in enumerate(handles)]
    stall = float(spec.get("stall_s", 30.0))
    groups = [[r] for r in runs] if spec.get("sequential") else [runs]
    started = time.perf_counter()
    total_spans: list[float] = []
    try:
        for group in groups:
            run_gangs(group, stall)
            for gang in group:
                total_spans += gang.spans_ms
                _reply({"done": gang.gang_id, "seconds": gang.t1 - gang.t0, "rounds": len(gang.spans_ms)})
    except SimError as exc:
        _reply({"error": str(exc)})
        return
    _reply({"result": {"seconds": time.perf_counter() - started, "rounds": len(total_spans),
                       "spans_ms": _percentiles(total_spans), **proc_stats()}})


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))], 3)

    return {"p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1], 3),
            "mean": round(sum(ordered) / len(ordered), 3)}


# ------------------------------------------------------------------ parent side


class Child:
    """A child process spoken to in JSON lines; every read is bounded, and :meth:`stop` ends it by pid."""

    def __init__(self, mode: str, first: dict[str, Any], timeout: float = 60.0) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, HERE, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self._stderr: list[str] = []
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        self.send(first)
        self.timeout = timeout

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)
            del self._stderr[:-200]

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float | None = None) -> dict[str, Any]:
        """The next JSON line, waiting at most ``timeout`` seconds."""
        assert self.proc.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(self.timeout if timeout is None else timeout)
        if reader.is_alive() or not box or not box[0]:
            self.stop()
            raise AssertionError(f"child {self.proc.args[-1]} gave no answer (exit {self.proc.poll()}); "
                                 f"stderr: {''.join(self._stderr)[-3000:]}")
        return json.loads(box[0])

    def ask(self, obj: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        self.send(obj)
        return self.read(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by pid: Popen.kill signals exactly this child
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._drain.join(timeout=5)


if __name__ == "__main__":
    {"serve": serve, "ranks": ranks}[sys.argv[1]]()
