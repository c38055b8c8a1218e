"""One peer of the coordinator: its framing, authentication handshake and flow control.

A :class:`Peer` is the asyncio protocol of one TCP (or TLS) connection. It turns
bytes into frames, proves the peer holds its gang's secret, decodes requests and
hands them to its :class:`PeerHost` (the server), and queues the frames going
back so a peer that does not read stops being read. It knows the server only
through :class:`PeerHost`, a handful of public methods.

Example (what the server does for every accepted connection):
    >>> loop.create_server(lambda: Peer(host), sock=sock)   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import math
import secrets
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import CoordinatorConfig
from ..errors import ErrorInfo, HydrogenError, ProtocolError, RegistrationError
from .protocol import (
    NONCE_BYTES,
    PREAUTH_LIMITS,
    Frame,
    FrameDecoder,
    Kind,
    Limits,
    Register,
    Request,
    client_proof,
    decode_request,
    error_frame,
    hello_frame,
    server_proof,
    welcome_frame,
)
from .state import Attempt, Budget, Gang

__all__ = ["Peer", "PeerHost", "Outgoing", "CHUNK", "READ_PAUSE_BYTES", "WRITE_HIGH_WATER", "format_address",
           "Keepalive", "keepalive_for", "enable_keepalive"]

#: Replies larger than this are written in pieces of this size, as the peer reads them.
CHUNK = 256 * 1024
#: Stop reading a peer's requests while this many reply bytes wait for it to read.
READ_PAUSE_BYTES = 1 << 20
#: The transport asks us to stop writing above this many buffered bytes.
WRITE_HIGH_WATER = 256 * 1024


@dataclass(frozen=True)
class Keepalive:
    """TCP keepalive of a peer's connection (seconds; probes): the kernel's liveness check, GIL or not.

    ``idle`` seconds without any packet, then ``count`` probes ``interval`` seconds apart:
    a host that answers none of them is unreachable and the connection fails, which the
    server sees as a closed connection. ``user_timeout`` (Linux) bounds the same way how
    long data the coordinator sent may stay unacknowledged: while some is outstanding
    (a reply sent to a host that just went away) the kernel sends no keepalive probe.
    Both are answered by the peer's kernel, never by its interpreter. (Linux 5.1 to 5.10
    also count unanswered zero-window probes against ``user_timeout``: there a rank that
    leaves a large reply unread for longer, its receive buffer full, loses its connection.)
    """

    idle: int
    interval: int
    count: int
    user_timeout: int

    @property
    def detects_within(self) -> int:
        """Seconds from the last packet until an unreachable peer's connection fails."""
        return self.idle + self.interval * self.count


def keepalive_for(liveness_timeout: float | None) -> Keepalive:
    """Keepalive settings that find an unreachable host within about ``liveness_timeout`` (pure).

    ``spark.hydrogen.heartbeat.timeout`` no longer fails a silent rank whose connection is
    up (it is busy: heartbeats come from a Python thread), so this is what notices a host
    that went away. The kernel takes whole seconds, at least 1.

    >>> keepalive_for(8.0)
    Keepalive(idle=4, interval=1, count=4, user_timeout=8)
    >>> keepalive_for(2.0).detects_within, keepalive_for(None).detects_within
    (5, 8)
    """
    timeout = 8.0 if liveness_timeout is None else liveness_timeout
    count = 4
    idle = max(1, math.ceil(timeout / 2))
    interval = max(1, math.ceil(timeout / 2 / count))
    return Keepalive(idle, interval, count, idle + interval * count)


def enable_keepalive(sock: socket.socket, liveness_timeout: float | None) -> Keepalive:
    """Turn TCP keepalive on for ``sock`` with :func:`keepalive_for`'s settings, those the platform has.

    ``SO_KEEPALIVE`` is everywhere; ``TCP_KEEPIDLE``/``TCP_KEEPINTVL``/``TCP_KEEPCNT`` on
    Linux, the BSDs and recent macOS and Windows (macOS before 10.15 names the idle time
    ``TCP_KEEPALIVE``); ``TCP_USER_TIMEOUT`` (milliseconds) on Linux. An option the
    platform lacks or refuses is left at the system default.
    """
    settings = keepalive_for(liveness_timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle_option = "TCP_KEEPIDLE" if hasattr(socket, "TCP_KEEPIDLE") else "TCP_KEEPALIVE"
    for name, value in ((idle_option, settings.idle), ("TCP_KEEPINTVL", settings.interval),
                        ("TCP_KEEPCNT", settings.count), ("TCP_USER_TIMEOUT", settings.user_timeout * 1000)):
        option = getattr(socket, name, None)
        if option is None:
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except OSError:
            pass  # e.g. not settable on this socket type: the system default stays
    return settings


class PeerHost(Protocol):
    """What a :class:`Peer` needs from the server (``CoordinatorServer`` implements it)."""

    @property
    def config(self) -> CoordinatorConfig: ...

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The context to serve TLS with, or ``None`` for plain TCP."""

    @property
    def receive_buffer(self) -> memoryview:
        """One buffer every peer reads into (the loop runs one callback at a time)."""

    def now(self) -> float: ...

    def peer_opened(self, peer: Peer) -> ErrorInfo | None:
        """Count a new connection; the error to refuse it with when the server is at its limit."""

    def peer_closed(self, peer: Peer) -> None:
        """The connection is gone (counted or not, registered or not)."""

    def find_gang(self, gang_id: str) -> Gang | None: ...

    def refuse_payload(self, peer: Peer, op: Any, nbytes: int) -> None:
        """A payload of ``nbytes`` does not fit in the gang's buffer: say so (it is dropped unread)."""

    def serve(self, peer: Peer, request: Request) -> None:
        """Carry out one decoded request; raises :class:`RegistrationError`/:class:`RequestError` to refuse it."""

    def heard(self, peer: Peer) -> None:
        """The registered rank behind ``peer`` showed it is alive (bytes arrived, or it read its replies)."""

    def note_refusal(self, peer_name: str, what: str) -> None: ...

    def internal_error(self, what: str, exc: BaseException) -> None: ...


class Outgoing:
    """One frame queued for one or more connections; counted against a gang's budget while any holds it."""

    __slots__ = ("data", "holders", "budget")

    def __init__(self, data: bytes, budget: Budget | None = None) -> None:
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


class Peer(asyncio.BufferedProtocol):
    """One connection. Unauthenticated until its AUTH frame proves the gang's secret.

    After authentication ``gang`` is set; after ``register``, ``attempt`` and ``rank``
    (:meth:`bind`). Bytes arrive in the host's one receive buffer (the decoder copies
    what it keeps), so an idle connection costs no buffer.
    """

    def __init__(self, host: PeerHost) -> None:
        self.host = host
        self.transport: asyncio.Transport | None = None
        self.name = "?"
        self.decoder = FrameDecoder(PREAUTH_LIMITS)
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self.gang: Gang | None = None
        self.attempt: Attempt | None = None
        self.rank: int | None = None
        self.counted = False  # counted by the host (refused connections never are)
        self.lost = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._tls_task: asyncio.Task[None] | None = None
        self._outq: collections.deque[list[Any]] = collections.deque()  # [Outgoing, offset]
        self._queued = 0  # bytes of _outq not yet handed to the transport
        self._write_paused = False
        self._read_paused = False
        self._receiving = False
        self._unread = bytearray()  # bytes handed on while reading was paused (TLS before 3.11)
        self._reserved = 0  # bytes of the frame being received, reserved in the gang's budget
        #: Set by the host when the connection stops carrying frames inbound (a stack channel: faulthandler
        #: text): every later chunk goes here (it may be the shared receive buffer: copy what you keep).
        self.raw_sink: Callable[[memoryview], None] | None = None

    # public surface for the host ----------------------------------------------
    @property
    def queued(self) -> int:
        """Reply bytes queued for this peer and not yet handed to the transport."""
        return self._queued

    @property
    def read_paused(self) -> bool:
        """Whether this peer's requests are not being read because it does not read its replies."""
        return self._read_paused

    def bind(self, attempt: Attempt, rank: int) -> None:
        """This connection now speaks for ``rank`` of ``attempt`` (after a successful ``register``)."""
        self.attempt, self.rank = attempt, rank

    def close(self) -> None:
        """Close the connection (or give up its TLS handshake)."""
        if self._tls_task is not None:
            self._tls_task.cancel()
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes, shared: Outgoing | None = None) -> None:
        """Queue one frame; ``shared`` is the same frame going to several connections (counted once)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self._outq and not self._write_paused and len(data) <= CHUNK:
            transport.write(data)  # the common case: small, and the peer keeps up
            return
        out = shared if shared is not None else Outgoing(data)
        out.hold()
        self._outq.append([out, 0])
        self._queued += len(out.data)
        self._flush()

    # asyncio callbacks -----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):
            raise TypeError(f"a coordinator peer needs a stream transport, got {type(transport).__name__}")
        self.transport = transport
        address = transport.get_extra_info("peername")
        self.name = format_address(address[0], address[1]) if isinstance(address, tuple) else str(address)
        refusal = self.host.peer_opened(self)
        if refusal is not None:
            transport.write(error_frame(refusal))
            transport.close()
            self.host.note_refusal(self.name, "refused a connection: connection limit reached")
            return
        self.counted = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            enable_keepalive(sock, self.host.config.liveness_timeout)
        loop = asyncio.get_running_loop()
        # one deadline for the TLS handshake (if any) and the authentication together
        self._handshake_timer = loop.call_later(self.host.config.handshake_timeout, self._handshake_expired)
        context = self.host.tls_context
        if context is None:
            self._begin(transport)
        else:  # TLS starts only now, so connections still in their TLS handshake count against the limit
            transport.pause_reading()
            self._tls_task = loop.create_task(self._start_tls(transport, context))

    async def _start_tls(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        if sys.version_info < (3, 11) and not raw.is_reading():
            # Before 3.11 the selector transport registers its reader after connection_made()
            # even if connection_made() paused reading (its _add_reader ignores the pause), so
            # `raw` claims to be paused while it reads. start_tls() then skips its own pause
            # ("already paused") and the client's first TLS bytes reach the SSL protocol before
            # its connection_made(), which drops them: the handshake never completes. Resuming
            # here, with no loop iteration before start_tls() pauses again, lets that pause
            # take the reader off, so no byte is read until the SSL protocol is ready.
            raw.resume_reading()
        try:
            secured = await loop.start_tls(raw, self, context, server_side=True,
                                           ssl_handshake_timeout=self.host.config.handshake_timeout)
        except Exception as exc:  # handshake failed, timed out, or the peer left: this connection only
            secured = None
            self.host.note_refusal(self.name, f"closing the connection: TLS handshake failed: {exc!r}")
        if secured is None or self.lost:
            raw.close()
            self.connection_lost(None)  # asyncio does not report a loss during the TLS handshake
            return
        self._begin(secured)

    def _begin(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        transport.write(hello_frame(self.nonce))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.host.receive_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.host.receive_buffer[:nbytes])

    def data_received(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if data and self.attempt is not None:
            self.host.heard(self)  # every chunk counts: a large upload over a slow link is a live rank
        if self.raw_sink is not None:
            if data:
                self.raw_sink(memoryview(data))
            return
        if self._read_paused:
            # Before 3.11 the SSL transport hands on the rest of what it decrypted after
            # pause_reading(). Keep it unread (a copy: ``data`` may be the shared receive buffer);
            # it is at most what one read of the paused socket brought.
            self._unread += data
            return
        if self._unread:  # reading resumed: what was kept comes first
            self._unread += data
            data, self._unread = self._unread, bytearray()
        self._receiving = True
        try:
            for frame in self.decoder.feed(data):
                self._handle(frame)
                if self.transport is None or self.transport.is_closing():
                    return
                if self._queued > READ_PAUSE_BYTES:
                    # The peer does not read its replies: stop reading its requests (the rest of
                    # this chunk stays in the decoder) until it has read most of them.
                    self._read_paused = True
                    self.transport.pause_reading()
                    break
        except ProtocolError as exc:
            self._refuse(f"protocol error: {exc}", tell_peer=self.gang is not None, error=exc)
        except Exception as exc:  # a bug must cost one connection, never the coordinator
            self.host.internal_error(f"handling bytes from {self.name}", exc)
            self._refuse(f"internal error: {exc!r}", tell_peer=self.gang is not None,
                         error=HydrogenError(f"internal error in the coordinator: {exc!r}"))
        finally:
            self._receiving = False

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.attempt is not None:
            self.host.heard(self)  # it is reading: it is alive
        self._flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.lost:
            return
        self.lost = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self._release_reservation()
        while self._outq:
            self._outq.popleft()[0].release()
        self._queued = 0
        self._unread = bytearray()
        self.host.peer_closed(self)
        self.transport = None

    # frames ----------------------------------------------------------------
    def _admit(self, kind: Kind, header: dict[str, Any], body_len: int) -> bool:
        """Before a payload is read: reserve it in the gang's budget, or refuse it (the payload is dropped)."""
        gang = self.gang
        if body_len == 0 or gang is None:
            return True
        if gang.reserve(body_len, self.host.config.max_gang_buffer_bytes):
            self._reserved = body_len
            return True
        self.host.refuse_payload(self, header.get("op"), body_len)
        return False

    def _release_reservation(self) -> None:
        if self._reserved and self.gang is not None:
            self.gang.release(self._reserved)
        self._reserved = 0

    def _handle(self, frame: Frame) -> None:
        self._release_reservation()  # the payload is now held by the frame (and the round, for a call)
        if self.gang is None:
            self._authenticate(frame)
            return
        op = frame.header.get("op")
        try:
            if self.raw_sink is not None:  # a stack channel sends nothing after its request until the reply
                raise ProtocolError("a frame after 'stacks_channel' in the same read: the stack channel carries "
                                    "only faulthandler text once it is open")
            if op not in ("register", "stacks_channel") and self.attempt is None and frame.kind is Kind.REQUEST:
                raise RegistrationError(f"'{op}' before 'register'")
            request = decode_request(frame)
            if isinstance(request, Register) and self.attempt is not None:
                raise RegistrationError("this connection has already registered a rank")
            self.host.serve(self, request)
        except (RegistrationError, ValueError) as exc:  # RequestError, or a call the rules refuse (bad root)
            error = exc if isinstance(exc, HydrogenError) else ProtocolError(f"malformed '{op}' request: {exc}")
            self.send(error_frame(ErrorInfo(type(error).__name__, str(error))))
            self.host.note_refusal(self.name, f"refused {str(op)[:40]!r} request: {error}")

    def _authenticate(self, frame: Frame) -> None:
        header = frame.header
        gang = self.host.find_gang(str(header.get("gang", "")))
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
        cfg = self.host.config
        self.decoder.limits = Limits(cfg.max_header_bytes, cfg.max_payload_bytes)
        self.decoder.admit = self._admit
        self.send(welcome_frame(server_proof(gang.secret, gang.gang_id, self.nonce, client_nonce),
                                cfg.max_payload_bytes))

    # flow control ----------------------------------------------------------
    def _flush(self) -> None:
        transport = self.transport
        while self._outq and not self._write_paused and transport is not None and not transport.is_closing():
            entry = self._outq[0]
            out, offset = entry
            end = min(offset + CHUNK, len(out.data))
            self._queued -= end - offset
            if end == len(out.data):
                self._outq.popleft()
                transport.write(out.data[offset:end])
                out.release()
            else:
                entry[1] = end
                transport.write(out.data[offset:end])  # may call pause_writing()
        if self._read_paused and not self._receiving and self._queued <= READ_PAUSE_BYTES // 2 \
                and transport is not None and not transport.is_closing():
            self._read_paused = False
            transport.resume_reading()
            asyncio.get_running_loop().call_soon(self.data_received, b"")  # frames left in the decoder

    def _refuse(self, why: str, tell_peer: bool, error: Exception | None = None) -> None:
        self.host.note_refusal(self.name, f"closing the connection: {why}")
        if tell_peer and error is not None:
            self.send(error_frame(ErrorInfo(type(error).__name__, str(error))))
        if self.transport is not None:
            self.transport.close()

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.gang is None:
            self._refuse("no authentication within the handshake timeout", tell_peer=False)


def format_address(host: str, port: int) -> str:
    """``10.0.0.5:7100``, ``[::1]:7100``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_DECOY_SECRET = secrets.token_bytes(32)


def _consteq(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
