"""The coordinator service: an asyncio loop on a daemon thread that moves frames.

All rules live in :mod:`.state`; this module authenticates peers, decodes
frames, feeds the state machine and writes the frames its actions call for.
It imports nothing from pyspark, so it can run in the driver or inside a task.

It also enforces the limits that keep one peer or gang from hurting the others
(see ``docs/security.md``): frame sizes from the 12-byte prefix, the bytes a gang
may have buffered here (payloads being received, held for a round, or queued for
sending), the number of gangs running at once and of open connections. Replies
are queued per connection and written as the peer reads them, so a large
allGather is held once, not once per rank, and a peer that stops reading stops
being read.

Example:
    >>> server = CoordinatorServer(CoordinatorConfig(host="127.0.0.1"))
    >>> host, port = server.start()
    >>> gang = server.add_gang(world_size=2)
    >>> server.stop()
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
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
    encode_frame_parts,
    server_proof,
)
from .state import (
    Action,
    Attempt,
    AttemptKey,
    AttemptState,
    Call,
    Complete,
    Gang,
    Log,
    MemberInfo,
    Op,
    Registry,
    Reject,
)
from .tls import ServerTls, server_tls

__all__ = ["CoordinatorServer", "GangHandle", "LogRecord"]

log = logging.getLogger("sparkhydrogen.coordinator")
T = TypeVar("T")

#: Replies larger than this are written in pieces of this size, as the peer reads them.
_CHUNK = 256 * 1024
#: Stop reading a peer's requests while this many reply bytes wait for it to read.
_READ_PAUSE_BYTES = 1 << 20
#: The transport asks us to stop writing above this many buffered bytes.
_WRITE_HIGH_WATER = 256 * 1024


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
    tls_fingerprint: Optional[str] = None  # SHA-256 of the coordinator's certificate, when it serves TLS

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return (f"GangHandle(gang_id={self.gang_id!r}, world_size={self.world_size}, host={self.host!r}, "
                f"port={self.port}, tls={self.tls_fingerprint is not None})")


@dataclass
class _Budget:
    """Bytes of one gang in the coordinator outside its attempts' rounds (those count themselves)."""

    receiving: int = 0  # announced payloads of frames being received
    sending: int = 0  # queued reply frames, each counted once however many ranks it goes to


class _Outgoing:
    """One frame queued for one or more connections; counted against a gang's budget while any holds it."""

    __slots__ = ("data", "holders", "budget")

    def __init__(self, data: bytes, budget: Optional[_Budget] = None) -> None:
        self.data = memoryview(data)
        self.holders = 0
        self.budget = budget

    def hold(self) -> None:
        if self.holders == 0 and self.budget is not None:
            self.budget.sending += len(self.data)
        self.holders += 1

    def release(self) -> None:
        self.holders -= 1
        if self.holders == 0 and self.budget is not None:
            self.budget.sending -= len(self.data)


class _Connection(asyncio.BufferedProtocol):
    """One peer. Unauthenticated until its AUTH frame proves the gang's secret.

    Bytes arrive in the server's one receive buffer (the loop runs one callback at a
    time and the decoder copies what it keeps), so an idle connection costs no buffer.
    """

    def __init__(self, server: "CoordinatorServer") -> None:
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.peer = "?"
        self.decoder = FrameDecoder(PREAUTH_LIMITS)
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self.gang: Optional[Gang] = None
        self.budget: Optional[_Budget] = None
        self.attempt: Optional[Attempt] = None
        self.rank: Optional[int] = None
        self.counted = False  # in server._connections (refused connections never are)
        self.lost = False
        self._handshake_timer: Optional[asyncio.TimerHandle] = None
        self._tls_task: Optional[asyncio.Task[None]] = None
        self._outq: collections.deque[list[Any]] = collections.deque()  # [_Outgoing, offset]
        self._queued = 0  # bytes of _outq not yet handed to the transport
        self._write_paused = False
        self._read_paused = False
        self._receiving = False
        self._reserved = 0  # bytes of the frame being received, reserved in the gang's budget

    # asyncio callbacks -----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = _format_address(peer[0], peer[1]) if isinstance(peer, tuple) else str(peer)
        cfg = self.server.config
        if len(self.server._connections) >= cfg.max_connections:
            error = ErrorInfo("CoordinatorConnectionError", (
                f"the coordinator already has {len(self.server._connections)} open connections, its limit "
                f"(spark.hydrogen.coordinator.maxConnections={cfg.max_connections}): this connection is refused; "
                "raise the limit or run fewer ranks at once"))
            transport.write(encode_frame(Kind.ERROR, {"error": error.to_json()}))
            transport.close()
            self.server._note_refusal(self.peer, "refused a connection: connection limit reached")
            return
        self.counted = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server._connections.add(self)
        loop = asyncio.get_running_loop()
        # one deadline for the TLS handshake (if any) and the authentication together
        self._handshake_timer = loop.call_later(cfg.handshake_timeout, self._handshake_expired)
        tls = self.server._tls
        if tls is None:
            self._begin(transport)
        else:  # TLS starts only now, so connections still in their TLS handshake count against the limit
            transport.pause_reading()
            self._tls_task = loop.create_task(self._start_tls(transport, tls.context))

    async def _start_tls(self, raw: asyncio.Transport, context: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            secured = await loop.start_tls(raw, self, context, server_side=True,
                                           ssl_handshake_timeout=self.server.config.handshake_timeout)
        except Exception as exc:  # handshake failed, timed out, or the peer left: this connection only
            secured = None
            self.server._note_refusal(self.peer, f"closing the connection: TLS handshake failed: {exc!r}")
        if secured is None or self.lost:
            raw.close()
            self.connection_lost(None)  # asyncio does not report a loss during the TLS handshake
            return
        self._begin(secured)

    def _begin(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        transport.write(encode_frame(Kind.HELLO, {"nonce": self.nonce.hex(), "server": "sparkhydrogen"}))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server._receive_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.server._receive_buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._receiving = True
        try:
            for frame in self.decoder.feed(data):
                self._handle(frame)
                if self.transport is None or self.transport.is_closing():
                    return
                if self._queued > _READ_PAUSE_BYTES:
                    # The peer does not read its replies: stop reading its requests (the rest of
                    # this chunk stays in the decoder) until it has read most of them.
                    self._read_paused = True
                    self.transport.pause_reading()
                    break
        except ProtocolError as exc:
            self._refuse(f"protocol error: {exc}", tell_peer=self.gang is not None, error=exc)
        except Exception as exc:  # a bug must cost one connection, never the coordinator
            self.server._internal_error(f"handling bytes from {self.peer}", exc)
            self._refuse(f"internal error: {exc!r}", tell_peer=self.gang is not None,
                         error=HydrogenError(f"internal error in the coordinator: {exc!r}"))
        finally:
            self._receiving = False

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.attempt is not None and self.rank is not None:
            try:
                self.attempt.heard(self.rank, self.server.now())  # it is reading: it is alive
            except RegistrationError:
                pass
        self._flush()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.lost:
            return
        self.lost = True
        if self.counted:
            self.server._connections.discard(self)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self._release_reservation()
        while self._outq:
            self._outq.popleft()[0].release()
        self._queued = 0
        if self.attempt is not None and self.rank is not None:
            self.server._detach(self)
        self.transport = None

    # frames ----------------------------------------------------------------
    def _admit(self, kind: Kind, header: dict[str, Any], body_len: int) -> bool:
        """Before a payload is read: reserve it in the gang's budget, or refuse it (the payload is dropped)."""
        assert self.gang is not None and self.budget is not None
        if body_len == 0:
            return True
        limit = self.server.config.max_gang_buffer_bytes
        used = self.server._gang_bytes(self.gang, self.budget)
        if used + body_len <= limit:
            self.budget.receiving += body_len
            self._reserved = body_len
            return True
        op = header.get("op")
        message = (
            f"a {op!r} request with {body_len} bytes of payload would take gang {self.gang.gang_id[:8]} over its "
            f"buffer limit in the coordinator: {used} bytes are buffered already and the limit is {limit} "
            "(spark.hydrogen.coordinator.maxGangBuffer); send smaller payloads or raise the limit"
        )
        if op == "log":  # output lines get no reply; drop them and say so on the driver
            self.server._note_refusal(self.peer, message)
            return False
        info = ErrorInfo("PayloadError", message, self.rank)
        log.warning("coordinator: %s (rank %s, %s)", message, self.rank, self.peer)
        if op == "call" and self.attempt is not None and self.rank is not None:
            self.server._dispatch(self.attempt, self.attempt.fail(self.rank, info, self.server.now()))
        self.send(encode_frame(Kind.ERROR, {"error": info.to_json()}))
        return False

    def _release_reservation(self) -> None:
        if self._reserved and self.budget is not None:
            self.budget.receiving -= self._reserved
        self._reserved = 0

    def _handle(self, frame: Frame) -> None:
        self._release_reservation()  # the payload is now held by the frame (and the round, for a call)
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
                info = _parse_failure(frame.header.get("error"), self.rank)
                self.server._dispatch(self.attempt, self.attempt.fail(self.rank, info, self.server.now()))
            elif op == "finish":
                self.server._dispatch(self.attempt, self.attempt.finish(self.rank, self.server.now()))
            else:
                raise ProtocolError(f"unknown request op {op!r}")
        except (RegistrationError, ValueError, TypeError, KeyError) as exc:
            error = exc if isinstance(exc, HydrogenError) else ProtocolError(f"malformed '{op}' request: {exc}")
            self.send(encode_frame(Kind.ERROR, {"error": ErrorInfo(type(error).__name__, str(error)).to_json()}))
            self.server._note_refusal(self.peer, f"refused {str(op)[:40]!r} request: {error}")

    def _authenticate(self, frame: Frame) -> None:
        header = frame.header
        gang = self.server.registry.get(str(header.get("gang", "")))
        try:
            client_nonce = bytes.fromhex(str(header.get("nonce", "")))
        except ValueError:
            client_nonce = b""
        proof = str(header.get("proof", ""))
        # An unknown gang costs the same HMAC as a known one: timing tells nothing about which gangs exist.
        secret, gang_id = (gang.secret, gang.gang_id) if gang is not None else (_DECOY_SECRET, "decoy")
        ok = (
            frame.kind is Kind.AUTH
            and gang is not None
            and len(client_nonce) == NONCE_BYTES
        ) & _consteq(proof, client_proof(secret, gang_id, self.nonce, client_nonce))
        if not ok or gang is None:
            self._refuse("authentication failed (unknown gang or wrong secret)", tell_peer=False)
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.gang = gang
        self.budget = self.server._budget(gang.gang_id)
        cfg = self.server.config
        self.decoder.limits = Limits(cfg.max_header_bytes, cfg.max_payload_bytes)
        self.decoder.admit = self._admit
        self.send(encode_frame(Kind.WELCOME, {
            "proof": server_proof(gang.secret, gang.gang_id, self.nonce, client_nonce),
            "max_payload": cfg.max_payload_bytes,
        }))

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
        pid, task_attempt_id = header.get("pid", 0), header.get("task_attempt_id", -1)
        for name, value in (("pid", pid), ("task_attempt_id", task_attempt_id)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ProtocolError(f"{name} must be an integer, got {value!r}")
        info = MemberInfo(host=str(header.get("host", "?"))[:256], pid=pid, task_attempt_id=task_attempt_id)
        now = self.server.now()
        cfg = self.server.config
        if not any(a.state is AttemptState.RUNNING for a in self.gang.attempts.values()):
            self.server._check_gang_slots(self.gang, gang_attempt, stage_id, rank)
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
    def send(self, data: bytes, shared: Optional[_Outgoing] = None) -> None:
        """Queue one frame; ``shared`` is the same frame going to several connections (counted once)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self._outq and not self._write_paused and len(data) <= _CHUNK:
            transport.write(data)  # the common case: small, and the peer keeps up
            return
        out = shared if shared is not None else _Outgoing(data)
        out.hold()
        self._outq.append([out, 0])
        self._queued += len(out.data)
        self._flush()

    def _flush(self) -> None:
        transport = self.transport
        while self._outq and not self._write_paused and transport is not None and not transport.is_closing():
            entry = self._outq[0]
            out, offset = entry
            end = min(offset + _CHUNK, len(out.data))
            self._queued -= end - offset
            if end == len(out.data):
                self._outq.popleft()
                transport.write(out.data[offset:end])
                out.release()
            else:
                entry[1] = end
                transport.write(out.data[offset:end])  # may call pause_writing()
        if self._read_paused and not self._receiving and self._queued <= _READ_PAUSE_BYTES // 2 \
                and transport is not None and not transport.is_closing():
            self._read_paused = False
            transport.resume_reading()
            asyncio.get_running_loop().call_soon(self.data_received, b"")  # frames left in the decoder

    def _refuse(self, why: str, tell_peer: bool, error: Optional[Exception] = None) -> None:
        self.server._note_refusal(self.peer, f"closing the connection: {why}")
        if tell_peer and error is not None:
            self.send(encode_frame(Kind.ERROR, {"error": ErrorInfo(type(error).__name__, str(error)).to_json()}))
        if self.transport is not None:
            self.transport.close()

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.gang is None:
            self._refuse("no authentication within the handshake timeout", tell_peer=False)


def _format_address(host: str, port: int) -> str:
    """``10.0.0.5:7100``, ``[::1]:7100``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_DECOY_SECRET = secrets.token_bytes(32)


def _parse_failure(value: Any, rank: int) -> ErrorInfo:
    """The error a rank reports with ``fail``: strings and a plain ``extra`` object only."""
    if not isinstance(value, dict):
        raise TypeError(f"'error' must be an object, got {type(value).__name__}")
    extra = value.get("extra")
    return ErrorInfo(type=str(value.get("type", "Exception"))[:200], message=str(value.get("message", "")),
                     rank=rank, traceback=str(value.get("traceback", "")),
                     extra=extra if isinstance(extra, dict) else {})


def _parse_call(frame: Frame) -> Call:
    h = frame.header
    seq, root, timeout = h["seq"], h.get("root"), h.get("timeout")
    if not isinstance(seq, int) or seq < 0:
        raise ValueError(f"seq must be a non-negative integer, got {seq!r}")
    if root is not None and not isinstance(root, int):
        raise ValueError(f"root must be an integer, got {root!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < 1e9):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
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
        self._budgets: dict[str, _Budget] = {}
        self._receive_buffer = memoryview(bytearray(64 * 1024))  # shared by all connections (see _Connection)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._servers: list[asyncio.base_events.Server] = []
        self._thread: Optional[threading.Thread] = None
        self._address: Optional[tuple[str, int]] = None
        self._tls: Optional[ServerTls] = None
        self._abort_hooks: dict[str, Callable[[AttemptKey, ErrorInfo], None]] = {}
        self._log_hooks: dict[str, Callable[[LogRecord], None]] = {}
        self._reported: set[tuple[str, AttemptKey]] = set()
        #: Exceptions that escaped into the event loop or were caught as bugs (0 in a healthy run).
        self.internal_errors = 0
        self._refusal_log_at = float("-inf")
        self._refusals_unlogged = 0

    # lifecycle ---------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("coordinator is not running")
        return self._address

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def tls_fingerprint(self) -> Optional[str]:
        """SHA-256 fingerprint of the certificate this coordinator serves TLS with (``None``: no TLS)."""
        return self._tls.fingerprint if self._tls is not None else None

    @property
    def listening(self) -> list[tuple[str, int]]:
        """Every ``(address, port)`` a listening socket is bound to (one per address the host resolves to)."""
        return [tuple(sock.getsockname()[:2]) for server in self._servers for sock in server.sockets]  # type: ignore[misc]

    def start(self) -> tuple[str, int]:
        """Bind and serve; returns ``(host, port)`` once the socket is listening.

        With TLS on, the certificate is loaded (or generated) first; a TLS set-up that
        fails raises here, and nothing listens.
        """
        if self.running:
            return self.address
        if self._tls is None and self.config.tls.enabled:
            self._tls = server_tls(self.config.tls, self.config.host)
            log.info("spark-hydrogen coordinator: TLS with %s, SHA-256 %s%s", self._tls.source,
                     self._tls.fingerprint, f" (required by {self.config.tls.required_by})"
                     if self.config.tls.required_by else "")
        ready: Future[tuple[str, int]] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="sparkhydrogen-coordinator", daemon=True)
        self._thread.start()
        try:
            self._address = ready.result(timeout=30)
        except BaseException:
            self._thread.join(timeout=10)  # it has closed its loop and returned
            self._thread = self._loop = None
            raise
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
        loop.set_exception_handler(self._on_loop_error)
        self._loop = loop
        try:
            self._servers, port = loop.run_until_complete(self._bind())
            ready.set_result((self.config.host, port))
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

    async def _bind(self) -> tuple[list[asyncio.base_events.Server], int]:
        """Listen on every address ``config.host`` resolves to, all on one port (the first free one of the range).

        Only those addresses: never all interfaces unless the host itself is a wildcard.
        """
        loop = asyncio.get_running_loop()
        cfg = self.config
        try:
            infos = await loop.getaddrinfo(cfg.host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise HydrogenError(
                f"coordinator host {cfg.host!r} does not resolve: {exc}; set spark.hydrogen.coordinator.host "
                "(or spark.driver.host) to an address of this machine"
            ) from exc
        addresses: list[tuple[int, tuple[Any, ...]]] = []
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6) and all(sockaddr[0] != a[1][0] for a in addresses):
                addresses.append((family, tuple(sockaddr)))
        for _, sockaddr in addresses:
            if ipaddress.ip_address(str(sockaddr[0]).split("%")[0]).is_unspecified:
                log.warning("spark-hydrogen coordinator: listening on ALL interfaces (%s) because "
                            "spark.hydrogen.coordinator.host=%s; any host that reaches this machine can connect "
                            "(it still needs a gang's secret)", sockaddr[0], cfg.host)
        ports = [0] if cfg.port == 0 else range(cfg.port, min(cfg.port + cfg.port_max_retries, 65535) + 1)
        last: Optional[OSError] = None
        for port in ports:
            socks: list[socket.socket] = []
            servers: list[asyncio.base_events.Server] = []
            try:
                actual = port
                for family, sockaddr in addresses:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    socks.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind((sockaddr[0], actual, *sockaddr[2:]))
                    actual = sock.getsockname()[1]  # port 0: every address gets the port the first one got
                for sock in socks:
                    servers.append(await loop.create_server(lambda: _Connection(self), sock=sock, backlog=4096))
                return servers, actual
            except OSError as exc:
                last = exc
                for server in servers:
                    server.close()
                for sock in socks:
                    sock.close()
        raise HydrogenError(
            f"coordinator could not bind {cfg.host} on any port of {list(ports)[0]}..{list(ports)[-1]}: {last}; "
            "set spark.hydrogen.coordinator.port / portMaxRetries to a free range"
        ) from last

    async def _shutdown(self) -> None:
        for gang in list(self.registry.gangs.values()):
            for attempt in list(gang.attempts.values()):
                self._dispatch(attempt, attempt.abort("the coordinator is stopping (SparkContext stopped)"))
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            if conn._tls_task is not None:
                conn._tls_task.cancel()
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

        def add() -> None:
            self.registry.add(gang)
            self._budgets[gang.gang_id] = _Budget()

        self._on_loop(add)
        if on_abort is not None:
            self._abort_hooks[gang.gang_id] = on_abort
        if on_log is not None:
            self._log_hooks[gang.gang_id] = on_log
        host, port = self.address
        return GangHandle(gang.gang_id, gang.secret, world_size, host, port, self.tls_fingerprint)

    def remove_gang(self, gang_id: str) -> None:
        """Forget a gang; its running attempts are aborted and its connections refused."""

        def remove() -> None:
            gang = self.registry.remove(gang_id)
            self._budgets.pop(gang_id, None)
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
    def _budget(self, gang_id: str) -> _Budget:
        return self._budgets.setdefault(gang_id, _Budget())

    @staticmethod
    def _gang_bytes(gang: Gang, budget: _Budget) -> int:
        """Bytes a gang has in the coordinator: payloads being received, held for rounds, queued for sending."""
        return budget.receiving + budget.sending + sum(a.buffered_bytes for a in gang.attempts.values())

    def _check_gang_slots(self, gang: Gang, gang_attempt: int, stage_id: int, rank: int) -> None:
        """Refuse a gang that would start running while ``max_gangs`` others already run."""
        limit = self.config.max_gangs
        running = sum(1 for g in self.registry.gangs.values()
                      if any(a.state is AttemptState.RUNNING for a in g.attempts.values()))
        if running < limit:
            return
        message = (
            f"gang {gang.gang_id[:8]} ({gang.name or 'unnamed'}) cannot start: the coordinator already runs "
            f"{running} gangs, its limit (spark.hydrogen.coordinator.maxGangs={limit}); wait for other gang "
            "jobs to finish or raise the limit"
        )
        if not any(k[:2] == (gang_attempt, stage_id) and f.message == message for k, f in gang.failures):
            gang.failures.append(((gang_attempt, stage_id, -1), ErrorInfo("RegistrationError", message, rank)))
            del gang.failures[:-16]
            log.error("coordinator: %s", message)
        raise RegistrationError(message)

    def _note_refusal(self, peer: str, what: str) -> None:
        """Log a refused peer or request, at most once a second (a flood must not flood the driver's log)."""
        now = time.monotonic()
        if now - self._refusal_log_at < 1.0:
            self._refusals_unlogged += 1
            return
        more = f" ({self._refusals_unlogged} more refusals not logged)" if self._refusals_unlogged else ""
        self._refusal_log_at, self._refusals_unlogged = now, 0
        log.warning("coordinator: %s: %s%s", peer, what, more)

    def _internal_error(self, what: str, exc: BaseException) -> None:
        self.internal_errors += 1
        log.error("coordinator: internal error while %s", what, exc_info=exc)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.internal_errors += 1
        log.error("coordinator: %s", context.get("message", "error in the event loop"),
                  exc_info=exc if isinstance(exc, BaseException) else None)

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
                frame = encode_frame_parts(Kind.REPLY, {"op": action.op.value, "seq": action.seq, "sizes": sizes},
                                           action.payloads)  # one copy of every rank's payload
                shared = _Outgoing(frame, self._budgets.get(attempt.gang_id))
                for rank in action.ranks:
                    conn = members.get(rank)
                    if conn is not None:
                        conn.send(frame, shared)
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
