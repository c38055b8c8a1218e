"""The coordinator service: an asyncio loop on a daemon thread that moves frames.

All rules live in :mod:`.state`; this module authenticates peers, decodes
frames, feeds the state machine and writes the frames its actions call for.
It imports nothing from pyspark, so it can run in the driver or inside a task.

Example:
    >>> server = CoordinatorServer(CoordinatorConfig(host="127.0.0.1"))
    >>> host, port = server.start()
    >>> gang = server.add_gang(world_size=2)
    >>> server.stop()
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

from ..config import CoordinatorConfig
from ..errors import ErrorInfo, HydrogenError, ProtocolError, RegistrationError
from .protocol import (
    NONCE_BYTES,
    PREAUTH_LIMITS,
    Frame,
    FrameDecoder,
    Kind,
    Limits,
    client_proof,
    encode_frame,
    server_proof,
)
from .state import Action, Attempt, AttemptKey, AttemptState, Call, Complete, Gang, Log, MemberInfo, Op, Registry, Reject

__all__ = ["CoordinatorServer", "GangHandle", "LogRecord"]

log = logging.getLogger("sparkhydrogen.coordinator")
T = TypeVar("T")


@dataclass(frozen=True)
class LogRecord:
    """Output a rank streamed to the driver: ``text`` (whole lines) from ``stream``.

    ``dropped`` counts lines the rank had to discard before this record because
    its bounded buffer overflowed.
    """

    gang_attempt: int
    rank: int
    stream: str
    text: str
    dropped: int = 0


@dataclass(frozen=True)
class GangHandle:
    """What the driver hands to tasks so they can join a gang."""

    gang_id: str
    secret: bytes
    world_size: int
    host: str
    port: int


class _Connection(asyncio.Protocol):
    """One peer. Unauthenticated until its AUTH frame proves the gang's secret."""

    def __init__(self, server: "CoordinatorServer") -> None:
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.peer = "?"
        self.decoder = FrameDecoder(PREAUTH_LIMITS)
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self.gang: Optional[Gang] = None
        self.attempt: Optional[Attempt] = None
        self.rank: Optional[int] = None
        self._handshake_timer: Optional[asyncio.TimerHandle] = None

    # asyncio callbacks -----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server._connections.add(self)
        transport.write(encode_frame(Kind.HELLO, {"nonce": self.nonce.hex(), "server": "sparkhydrogen"}))
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(self.server.config.handshake_timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        try:
            for frame in self.decoder.feed(data):
                self._handle(frame)
                if self.transport is None or self.transport.is_closing():
                    return
        except ProtocolError as exc:
            self._refuse(f"protocol error: {exc}", tell_peer=self.gang is not None, error=exc)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.server._connections.discard(self)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self.attempt is not None and self.rank is not None:
            self.server._detach(self)
        self.transport = None

    # frames ----------------------------------------------------------------
    def _handle(self, frame: Frame) -> None:
        if self.gang is None:
            self._authenticate(frame)
            return
        if frame.kind is not Kind.REQUEST:
            raise ProtocolError(f"expected a REQUEST frame, got {frame.kind.name}")
        op = frame.header.get("op")
        try:
            if op == "register":
                self._register(frame.header)
            elif self.attempt is None or self.rank is None:
                raise RegistrationError(f"'{op}' before 'register'")
            elif op == "log":
                self.attempt.heard(self.rank, self.server.now())
                self.server._forward_log(self.attempt, self.rank, frame)
            elif op == "ping":
                self.attempt.heard(self.rank, self.server.now())
            elif op == "restore":
                state = self.gang.restore(self.rank)
                header = {"op": "restore", "found": state is not None}
                self.send(encode_frame(Kind.REPLY, header, state or b""))
            elif op == "call":
                self.server._dispatch(self.attempt, self.attempt.call(self.rank, _parse_call(frame), self.server.now()))
            elif op == "fail":
                info = ErrorInfo.from_json(_dict(frame.header.get("error")))
                info = ErrorInfo(info.type, info.message, self.rank, info.traceback, info.extra)
                self.server._dispatch(self.attempt, self.attempt.fail(self.rank, info, self.server.now()))
            elif op == "finish":
                self.server._dispatch(self.attempt, self.attempt.finish(self.rank, self.server.now()))
            else:
                raise ProtocolError(f"unknown request op {op!r}")
        except (RegistrationError, ValueError, TypeError, KeyError) as exc:
            error = exc if isinstance(exc, HydrogenError) else ProtocolError(f"malformed '{op}' request: {exc}")
            self.send(encode_frame(Kind.ERROR, {"error": ErrorInfo(type(error).__name__, str(error)).to_json()}))
            log.warning("coordinator: refused %r request from %s: %s", op, self.peer, error)

    def _authenticate(self, frame: Frame) -> None:
        header = frame.header
        gang = self.server.registry.get(str(header.get("gang", "")))
        try:
            client_nonce = bytes.fromhex(str(header.get("nonce", "")))
        except ValueError:
            client_nonce = b""
        proof = str(header.get("proof", ""))
        ok = (
            frame.kind is Kind.AUTH
            and gang is not None
            and len(client_nonce) == NONCE_BYTES
            and _consteq(proof, client_proof(gang.secret, gang.gang_id, self.nonce, client_nonce))
        )
        if not ok or gang is None:
            self._refuse("authentication failed (unknown gang or wrong secret)", tell_peer=False)
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.gang = gang
        cfg = self.server.config
        self.decoder.limits = Limits(cfg.max_header_bytes, cfg.max_payload_bytes)
        self.send(encode_frame(Kind.WELCOME, {"proof": server_proof(gang.secret, gang.gang_id, self.nonce, client_nonce)}))

    def _register(self, header: dict[str, Any]) -> None:
        assert self.gang is not None
        if self.attempt is not None:
            raise RegistrationError("this connection has already registered a rank")
        gang_attempt, stage_id, rank = header["gang_attempt"], header["stage_id"], header["rank"]
        for name, value in (("gang_attempt", gang_attempt), ("stage_id", stage_id), ("rank", rank)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ProtocolError(f"{name} must be an integer, got {value!r}")
        if not 0 <= rank < self.gang.world_size:
            raise RegistrationError(f"rank {rank} is outside 0..{self.gang.world_size - 1} for this gang")
        info = MemberInfo(host=str(header.get("host", "?")), pid=int(header.get("pid", 0)),
                          task_attempt_id=int(header.get("task_attempt_id", -1)))
        now = self.server.now()
        cfg = self.server.config
        attempt, superseded = self.gang.attempt_for(gang_attempt, stage_id, rank, info.task_attempt_id, now,
                                                    cfg.missing_log_interval, cfg.liveness_timeout)
        for old, actions in superseded:
            self.server._dispatch(old, actions)
        actions = attempt.register(rank, info, now)
        self.attempt, self.rank = attempt, rank
        self.server._attach(self)
        self.send(encode_frame(Kind.REPLY, {"op": "register", "world_size": attempt.world_size}))
        self.server._dispatch(attempt, actions)

    # helpers ---------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _refuse(self, why: str, tell_peer: bool, error: Optional[Exception] = None) -> None:
        log.warning("coordinator: closing connection from %s: %s", self.peer, why)
        if tell_peer and error is not None:
            self.send(encode_frame(Kind.ERROR, {"error": ErrorInfo(type(error).__name__, str(error)).to_json()}))
        if self.transport is not None:
            self.transport.close()

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.gang is None:
            self._refuse("no authentication within the handshake timeout", tell_peer=False)


def _dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def _parse_call(frame: Frame) -> Call:
    h = frame.header
    seq, root, timeout = h["seq"], h.get("root"), h.get("timeout")
    if not isinstance(seq, int) or seq < 0:
        raise ValueError(f"seq must be a non-negative integer, got {seq!r}")
    if root is not None and not isinstance(root, int):
        raise ValueError(f"root must be an integer, got {root!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number, got {timeout!r}")
    return Call(op=Op(h["kind"]), seq=seq, payload=frame.payload, root=root,
                timeout=None if timeout is None else float(timeout))


def _consteq(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class CoordinatorServer:
    """Runs the coordinator on its own daemon thread; the public methods are thread-safe."""

    def __init__(self, config: CoordinatorConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.now = clock
        self.registry = Registry()
        self._members: dict[tuple[str, AttemptKey], dict[int, _Connection]] = {}
        self._connections: set[_Connection] = set()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server: Optional[asyncio.base_events.Server] = None
        self._thread: Optional[threading.Thread] = None
        self._address: Optional[tuple[str, int]] = None
        self._abort_hooks: dict[str, Callable[[AttemptKey, ErrorInfo], None]] = {}
        self._log_hooks: dict[str, Callable[[LogRecord], None]] = {}
        self._reported: set[tuple[str, AttemptKey]] = set()

    # lifecycle ---------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("coordinator is not running")
        return self._address

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> tuple[str, int]:
        """Bind and serve; returns ``(host, port)`` once the socket is listening."""
        if self.running:
            return self.address
        ready: Future[tuple[str, int]] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="sparkhydrogen-coordinator", daemon=True)
        self._thread.start()
        self._address = ready.result(timeout=30)
        log.info("spark-hydrogen coordinator listening on %s:%d", *self._address)
        return self._address

    def stop(self) -> None:
        """Abort every running attempt, close every connection and end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
            except (RuntimeError, TimeoutError) as exc:  # loop already closing
                log.debug("coordinator shutdown: %s", exc)
            thread.join(timeout=10)
        self._thread = None
        self._loop = None
        log.info("spark-hydrogen coordinator stopped")

    def _run(self, ready: "Future[tuple[str, int]]") -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(self._bind())
            sock = self._server.sockets[0]
            ready.set_result((self.config.host, sock.getsockname()[1]))
        except BaseException as exc:  # report bind failures to start()
            ready.set_exception(exc)
            loop.close()
            return
        tick = loop.call_later(self.config.tick_interval, self._tick)
        try:
            loop.run_forever()
        finally:
            tick.cancel()
            loop.close()

    async def _bind(self) -> asyncio.base_events.Server:
        loop = asyncio.get_running_loop()
        cfg = self.config
        ports = [0] if cfg.port == 0 else range(cfg.port, min(cfg.port + cfg.port_max_retries, 65535) + 1)
        last: Optional[OSError] = None
        for port in ports:
            try:
                return await loop.create_server(lambda: _Connection(self), host=cfg.host, port=port,
                                                reuse_address=True, backlog=4096)
            except OSError as exc:
                last = exc
        raise HydrogenError(
            f"coordinator could not bind {cfg.host} on any port of {list(ports)[0]}..{list(ports)[-1]}: {last}; "
            "set spark.hydrogen.coordinator.port / portMaxRetries to a free range"
        ) from last

    async def _shutdown(self) -> None:
        for gang in list(self.registry.gangs.values()):
            for attempt in list(gang.attempts.values()):
                self._dispatch(attempt, attempt.abort("the coordinator is stopping (SparkContext stopped)"))
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()
        asyncio.get_running_loop().call_soon(asyncio.get_running_loop().stop)

    # thread-safe driver API ----------------------------------------------------
    def _on_loop(self, fn: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None or not self.running:
            raise HydrogenError("the spark-hydrogen coordinator is not running")
        if threading.current_thread() is self._thread:
            return fn()
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout=30)

    def add_gang(self, world_size: int, name: str = "",
                 on_abort: Optional[Callable[[AttemptKey, ErrorInfo], None]] = None,
                 on_log: Optional[Callable[[LogRecord], None]] = None,
                 gang_id: Optional[str] = None, secret: Optional[bytes] = None) -> GangHandle:
        """Declare a gang of ``world_size`` ranks; returns what its tasks need to join.

        ``on_abort(key, cause)`` is called (on a short-lived thread, never on the
        coordinator's loop) once for every attempt of the gang that aborts.
        ``on_log(record)`` receives the output ranks stream with
        :meth:`CoordinatorClient.log`; it runs on the coordinator's loop and must be quick.
        """
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if secret is not None and (not isinstance(secret, bytes) or len(secret) < 16):
            raise ValueError("secret must be at least 16 random bytes")
        gang = Gang(gang_id=gang_id or uuid.uuid4().hex, secret=secret or secrets.token_bytes(32),
                    world_size=world_size, name=name)
        self._on_loop(lambda: self.registry.add(gang))
        if on_abort is not None:
            self._abort_hooks[gang.gang_id] = on_abort
        if on_log is not None:
            self._log_hooks[gang.gang_id] = on_log
        host, port = self.address
        return GangHandle(gang.gang_id, gang.secret, world_size, host, port)

    def remove_gang(self, gang_id: str) -> None:
        """Forget a gang; its running attempts are aborted and its connections refused."""

        def remove() -> None:
            gang = self.registry.remove(gang_id)
            self._abort_hooks.pop(gang_id, None)
            self._log_hooks.pop(gang_id, None)
            self._reported = {r for r in self._reported if r[0] != gang_id}
            if gang is not None:
                for attempt in list(gang.attempts.values()):
                    self._dispatch(attempt, attempt.abort("the driver removed the gang"))

        self._on_loop(remove)

    def abort_attempts(self, gang_id: str, reason: str) -> None:
        """Abort every running attempt of a gang (e.g. the driver cancelled its job)."""

        def abort() -> None:
            gang = self.registry.get(gang_id)
            if gang is not None:
                for attempt in list(gang.attempts.values()):
                    self._dispatch(attempt, attempt.abort(reason))

        self._on_loop(abort)

    def last_failure(self, gang_id: str, gang_attempt: Optional[int] = None) -> Optional[ErrorInfo]:
        """The root cause of the most recent failed attempt of a gang (of ``gang_attempt``), if any."""

        def get() -> Optional[ErrorInfo]:
            gang = self.registry.get(gang_id)
            found = gang.last_failure(gang_attempt) if gang is not None else None
            return found[1] if found else None

        return self._on_loop(get)

    def gang_settled(self, gang_id: str) -> bool:
        """True when no attempt of the gang is running (every rank finished, or it was aborted)."""

        def settled() -> bool:
            gang = self.registry.get(gang_id)
            return gang is None or all(a.state is not AttemptState.RUNNING for a in gang.attempts.values())

        return self._on_loop(settled)

    def stats(self) -> dict[str, int]:
        return self._on_loop(lambda: {
            "gangs": len(self.registry.gangs),
            "attempts": sum(len(g.attempts) for g in self.registry.gangs.values()),
            "connections": len(self._connections),
        })

    # loop-side plumbing --------------------------------------------------------
    def _attach(self, conn: _Connection) -> None:
        assert conn.attempt is not None and conn.rank is not None
        self._members.setdefault((conn.attempt.gang_id, conn.attempt.key), {})[conn.rank] = conn

    def _detach(self, conn: _Connection) -> None:
        attempt, rank = conn.attempt, conn.rank
        assert attempt is not None and rank is not None
        members = self._members.get((attempt.gang_id, attempt.key), {})
        if members.get(rank) is conn:
            del members[rank]
        self._dispatch(attempt, attempt.disconnect(rank, self.now()))
        self._collect(attempt)

    def _collect(self, attempt: Attempt) -> None:
        if attempt.done:
            self._members.pop((attempt.gang_id, attempt.key), None)
            gang = self.registry.get(attempt.gang_id)
            if gang is not None:
                gang.prune()

    def _dispatch(self, attempt: Attempt, actions: list[Action]) -> None:
        members = self._members.get((attempt.gang_id, attempt.key), {})
        for action in actions:
            if isinstance(action, Complete) and action.op is Op.CHECKPOINT:
                self._commit(attempt, action, members)
            elif isinstance(action, Complete):
                sizes = [len(p) for p in action.payloads]
                frame = encode_frame(Kind.REPLY, {"op": action.op.value, "seq": action.seq, "sizes": sizes},
                                     b"".join(action.payloads))
                for rank in action.ranks:
                    conn = members.get(rank)
                    if conn is not None:
                        conn.send(frame)
            elif isinstance(action, Reject):
                frame = encode_frame(Kind.ERROR, {"error": action.error.to_json()})
                for rank in action.ranks:
                    conn = members.get(rank)
                    if conn is not None:
                        conn.send(frame)
            elif isinstance(action, Log):
                log.log(logging.ERROR if action.level == "error" else logging.WARNING, action.message)
        if attempt.state is AttemptState.ABORTED:
            self._report_abort(attempt)

    def _forward_log(self, attempt: Attempt, rank: int, frame: Frame) -> None:
        hook = self._log_hooks.get(attempt.gang_id)
        if hook is None:
            return
        dropped = frame.header.get("dropped", 0)
        record = LogRecord(gang_attempt=attempt.key[0], rank=rank, stream=str(frame.header.get("stream", "log")),
                           text=bytes(frame.payload).decode("utf-8", errors="replace"),
                           dropped=dropped if isinstance(dropped, int) and dropped > 0 else 0)
        try:
            hook(record)
        except Exception:  # a broken hook must not take the coordinator down
            log.exception("coordinator: log hook of gang %s failed", attempt.gang_id[:8])

    def _report_abort(self, attempt: Attempt) -> None:
        ident = (attempt.gang_id, attempt.key)
        hook = self._abort_hooks.get(attempt.gang_id)
        if hook is None or ident in self._reported or attempt.failure is None:
            return
        self._reported.add(ident)
        threading.Thread(target=hook, args=(attempt.key, attempt.failure), daemon=True,
                         name="sparkhydrogen-on-abort").start()

    def _commit(self, attempt: Attempt, action: Complete, members: dict[int, _Connection]) -> None:
        gang = self.registry.get(attempt.gang_id)
        error = (gang.commit(attempt.key, action.seq, action.payloads, self.config.checkpoint_max_bytes)
                 if gang is not None else ErrorInfo("RegistrationError", "the gang was removed"))
        if error is None:
            frame = encode_frame(Kind.REPLY, {"op": action.op.value, "seq": action.seq, "sizes": []})
        else:
            frame = encode_frame(Kind.ERROR, {"error": error.to_json()})
        for rank in action.ranks:
            conn = members.get(rank)
            if conn is not None:
                conn.send(frame)

    def _tick(self) -> None:
        loop = self._loop
        if loop is None:
            return
        now = self.now()
        for gang in list(self.registry.gangs.values()):
            for attempt in list(gang.attempts.values()):
                if attempt.state is AttemptState.RUNNING:
                    self._dispatch(attempt, attempt.tick(now))
        loop.call_later(self.config.tick_interval, self._tick)
