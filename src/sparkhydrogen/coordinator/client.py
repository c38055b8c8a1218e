"""Blocking client a task uses to talk to the coordinator: one connection, one request at a time.

With ``tls_fingerprint`` the connection is TLS and the coordinator must present
the certificate with that SHA-256 fingerprint (it reaches the task inside the task
closure, like the gang's secret); the HMAC handshake then runs inside TLS.

Example:
    >>> client = CoordinatorClient.connect(("127.0.0.1", port), gang_id, secret)  # doctest: +SKIP
    >>> client.register((0, 0, 0), rank=0)                                        # doctest: +SKIP
    >>> client.collective("barrier", b"")                                          # doctest: +SKIP
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Protocol

from ..errors import (
    AuthenticationError,
    CollectiveTimeoutError,
    CoordinatorConnectionError,
    ErrorInfo,
    HydrogenError,
    PayloadError,
    ProtocolError,
    from_info,
)
from ..tracking.points import MAX_POINTS_PER_FRAME, MetricPoint, encode_points
from .protocol import (
    NONCE_BYTES,
    PREAUTH_LIMITS,
    PREFIX,
    Frame,
    FrameDecoder,
    Kind,
    Limits,
    StageGangInfo,
    client_proof,
    decode_header,
    decode_prefix,
    encode_frame,
    server_proof,
)
from .tls import TlsChannel, check_pin, client_context

__all__ = ["CoordinatorClient", "PayloadTooLargeError", "REPLY_GRACE", "MAX_REPORT_BYTES"]

#: Extra seconds a client waits beyond a call's own timeout for the coordinator's verdict.
REPLY_GRACE = 5.0

#: Largest failure report (its JSON) a client sends: well inside the coordinator's 64 KiB control-header
#: limit, so a huge error (a long chained traceback, a big repr) is cut, never lost with the connection.
MAX_REPORT_BYTES = 32 * 1024

#: Once the coordinator has proved it knows the gang's secret, a client accepts large
#: replies (an allGather returns every rank's payload). Before that, HELLO and WELCOME
#: frames are held to the server's own pre-authentication limits.
_CLIENT_LIMITS = Limits(max_header_bytes=1 << 20, max_payload_bytes=1 << 40)


class PayloadTooLargeError(PayloadError, CoordinatorConnectionError):
    """A payload larger than the coordinator accepts per call (``spark.hydrogen.coordinator.maxPayload``).

    Raised before anything is sent, so the connection stays usable. It is a
    :class:`PayloadError`; it is also a :class:`CoordinatorConnectionError` because the
    coordinator, not the payload's content, sets the limit (and older versions cut the
    connection instead).
    """


class _Channel(Protocol):
    def sendall(self, data: bytes | bytearray | memoryview) -> None: ...
    def recv_into(self, buffer: memoryview, nbytes: int) -> int: ...
    def settimeout(self, timeout: float | None) -> None: ...
    def close(self) -> None: ...


class _PlainChannel:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        self._sock.sendall(data)

    def recv_into(self, buffer: memoryview, nbytes: int) -> int:
        return self._sock.recv_into(buffer, nbytes)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def close(self) -> None:
        self._sock.close()


def _where(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class CoordinatorClient:
    """A task's authenticated connection to its gang's coordinator (thread-safe)."""

    def __init__(self, sock: socket.socket | _Channel, address: tuple[str, int], gang_id: str = "") -> None:
        self._sock: _Channel = _PlainChannel(sock) if isinstance(sock, socket.socket) else sock
        self._raw_sock = sock if isinstance(sock, socket.socket) else None  # under TLS too (see connect)
        self.address = address
        self.gang_id = gang_id
        #: Largest payload the coordinator accepts per call (it says so in WELCOME); ``None``: unknown.
        self.max_payload: int | None = None
        self._lock = threading.Lock()  # one request/reply exchange at a time
        self._send_lock = threading.Lock()  # whole frames only, heartbeats included
        self._seq = 0
        #: An elastic gang's larger size, offered in the reply to the last collective (a committed checkpoint).
        self.grow_offer: int | None = None
        self._closed = False
        self._heartbeat_stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        #: Every rank's address, in rank order, once a gated gang's start gate opened (``None`` otherwise).
        self.addresses: list[str] | None = None

    @classmethod
    def connect(cls, address: tuple[str, int], gang_id: str, secret: bytes, timeout: float = 30.0,
                tls_fingerprint: str | None = None) -> CoordinatorClient:
        """Connect (over TLS pinned to ``tls_fingerprint``, if given) and run the mutual HMAC handshake.

        Raises :class:`CoordinatorConnectionError` (or its subclasses
        :class:`AuthenticationError`, :class:`ProtocolError`).
        """
        host, port = address
        where = _where((host, port))
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise CoordinatorConnectionError(
                f"cannot reach the spark-hydrogen coordinator at {where} within {timeout:g} s: {exc}. "
                "Executors must be able to connect to the driver; set spark.hydrogen.coordinator.host/port "
                "to an address and port they can reach"
            ) from exc
        channel: _Channel = _PlainChannel(sock)
        client = cls(channel, (host, port), gang_id)
        client._raw_sock = sock
        try:
            _tune(sock)
            if tls_fingerprint is not None:
                client._sock = channel = _start_tls(sock, where, tls_fingerprint)
            client._handshake(gang_id, secret, tls=tls_fingerprint is not None)
            channel.settimeout(None)
        except TimeoutError as exc:
            client.close()
            hint = "" if tls_fingerprint else (
                " (if the coordinator serves TLS, this task lacks its certificate fingerprint)")
            raise CoordinatorConnectionError(
                f"the peer at {where} accepted the connection but did not complete the spark-hydrogen handshake "
                f"within {timeout:g} s{hint}"
            ) from exc
        except BaseException:
            client.close()
            raise
        return client

    def _handshake(self, gang_id: str, secret: bytes, tls: bool = False) -> None:
        try:
            hello = self._read_frame(PREAUTH_LIMITS)
        except CoordinatorConnectionError as exc:
            if isinstance(exc, ProtocolError):
                raise
            hint = "" if tls else (
                " If the coordinator serves TLS (spark.hydrogen.coordinator.tls.*), this task was not given its "
                "certificate fingerprint."
            )
            raise CoordinatorConnectionError(f"{exc} during the handshake.{hint}") from exc
        if hello.kind is Kind.ERROR:  # refused before the handshake, e.g. at its connection limit
            raise from_info(ErrorInfo.from_json(_mapping(hello.header.get("error"))))
        if hello.kind is not Kind.HELLO:
            raise ProtocolError(f"expected HELLO from the coordinator, got {hello.kind.name}")
        try:
            server_nonce = bytes.fromhex(str(hello.header.get("nonce", "")))
        except ValueError as exc:
            raise ProtocolError("coordinator sent a malformed nonce") from exc
        if len(server_nonce) != NONCE_BYTES:
            raise ProtocolError("coordinator sent a nonce of the wrong length")
        nonce = secrets.token_bytes(NONCE_BYTES)
        proof = client_proof(secret, gang_id, server_nonce, nonce)
        self._send(encode_frame(Kind.AUTH, {"gang": gang_id, "nonce": nonce.hex(), "proof": proof}))
        try:
            welcome = self._read_frame(PREAUTH_LIMITS)
        except ProtocolError:
            raise
        except CoordinatorConnectionError as exc:
            raise AuthenticationError(
                f"the coordinator at {_where(self.address)} refused this task's credentials "
                f"for gang {gang_id[:8]} (the gang is unknown there or was removed): {exc}"
            ) from exc
        expected = server_proof(secret, gang_id, server_nonce, nonce)
        if welcome.kind is not Kind.WELCOME or not hmac.compare_digest(
            str(welcome.header.get("proof", "")).encode(), expected.encode()
        ):
            raise AuthenticationError(
                f"the peer at {_where(self.address)} could not prove it knows gang {gang_id[:8]}'s "
                "secret: it is not this gang's coordinator"
            )
        limit = welcome.header.get("max_payload")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            self.max_payload = limit

    # requests --------------------------------------------------------------
    def register(self, rank: int, *, gang_attempt: int = 0, stage_id: int = 0, host: str = "",
                 task_attempt_id: int = -1, address: str = "", gate_timeout: float | None = None,
                 stage: StageGangInfo | None = None) -> int:
        """Join the gang as ``rank`` (of gang attempt ``gang_attempt``, Spark stage ``stage_id``).

        Returns the gang's world size. In a gated gang the reply comes when every rank
        has joined (the start gate): ``gate_timeout`` bounds that wait here too, beyond
        the coordinator's own bound, and :attr:`addresses` then lists every rank's
        ``address``. A task the coordinator holds aside (a second copy of a live rank)
        waits for its verdict without a bound: Spark kills it once the live copy is done.
        ``stage``: for a stage gang (formed by the first task that joins), what the
        coordinator needs to form it: the stage's task count, its start gate, a name.
        """
        header = {
            "op": "register",
            "gang_attempt": gang_attempt,
            "stage_id": stage_id,
            "rank": rank,
            "host": host or socket.gethostname(),
            "pid": os.getpid(),
            "task_attempt_id": task_attempt_id,
        }
        if address:
            header["address"] = address
        if stage is not None:
            header["stage"] = {"world_size": stage.world_size, "name": stage.name, "gated": stage.gated,
                               "start_timeout": stage.start_timeout}
        with self._lock:
            self._send(encode_frame(Kind.REQUEST, header))
            wait = None if gate_timeout is None else gate_timeout + REPLY_GRACE
            reply = self._expect_reply(wait, "register (start gate)")
            if reply.header.get("held"):
                reply = self._expect_reply(None, "register (held aside)")
        addresses = reply.header.get("addresses")
        if isinstance(addresses, list):
            self.addresses = [str(a) for a in addresses]
        return int(reply.header["world_size"])

    @property
    def local_address(self) -> str:
        """``host:port`` of this end of the connection: where the coordinator sees this task (reachable by peers)."""
        sock = getattr(self._sock, "_sock", None) or getattr(self._sock, "sock", None)
        try:
            name = sock.getsockname() if sock is not None else None
        except OSError:
            name = None
        if not name:
            return socket.gethostname()
        host = str(name[0])
        return f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"

    def start_heartbeat(self, interval: float) -> None:
        """Send a small ping every ``interval`` seconds so the coordinator knows this rank is alive.

        A rank that stops pinging for ``spark.hydrogen.heartbeat.timeout`` while its
        connection is up is reported busy (e.g. it holds the GIL), never failed for that;
        a dead process or an unreachable host loses the connection (TCP keepalive).
        """
        if self._heartbeat is not None:
            return
        frame = encode_frame(Kind.REQUEST, {"op": "ping"})

        def beat() -> None:
            while not self._heartbeat_stop.wait(interval):
                try:
                    self._send(frame)
                except CoordinatorConnectionError:
                    return

        self._heartbeat = threading.Thread(target=beat, name="sparkhydrogen-heartbeat", daemon=True)
        self._heartbeat.start()

    def restore(self) -> bytes | None:
        """This rank's state in the gang's last committed checkpoint, or ``None``."""
        return self.restored()[0]

    def restored(self, of: int | None = None) -> tuple[bytes | None, int, int | None]:
        """(state, world size the checkpoint was written at, whose state) for this rank, or for rank ``of``.

        The world size is 0 when there is no checkpoint. At another size than it was written
        at, a rank without a state of its own gets rank 0's unless ``of`` names a rank.
        """
        header: dict[str, object] = {"op": "restore"}
        if of is not None:
            header["of"] = of
        with self._lock:
            self._send(encode_frame(Kind.REQUEST, header))
            reply = self._expect_reply(None)
        written, source = reply.header.get("world_size"), reply.header.get("of")
        return (bytes(reply.payload) if reply.header.get("found") else None,
                written if isinstance(written, int) else 0, source if isinstance(source, int) else None)

    def collective(self, kind: str, payload: bytes = b"", root: int | None = None,
                   timeout: float | None = None) -> list[memoryview]:
        """Make the next collective call; returns the payloads of the reply, in rank order."""
        if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < 1e9):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        if self.max_payload is not None and len(payload) > self.max_payload:
            raise PayloadTooLargeError(
                f"{kind} payload of {len(payload)} bytes exceeds the limit of {self.max_payload} bytes per call "
                "(spark.hydrogen.coordinator.maxPayload): send less per call (e.g. in several calls), keep large "
                "data in shared storage and send its path, or raise the limit"
            )
        with self._lock:
            seq = self._seq
            self._seq += 1
            header = {"op": "call", "kind": kind, "seq": seq, "root": root, "timeout": timeout}
            self._send(encode_frame(Kind.REQUEST, header, payload))
            reply = self._expect_reply(None if timeout is None else timeout + REPLY_GRACE, kind, seq)
        if reply.header.get("seq") != seq:
            raise ProtocolError(f"reply for collective call #{reply.header.get('seq')} while waiting for #{seq}")
        grow = reply.header.get("grow")
        self.grow_offer = grow if isinstance(grow, int) and not isinstance(grow, bool) else None
        sizes = reply.header.get("sizes") or []
        view = memoryview(reply.payload)
        parts, offset = [], 0
        for size in sizes:
            parts.append(view[offset : offset + size])
            offset += size
        return parts

    def log(self, stream: str, text: str, dropped: int = 0) -> None:
        """Stream output (whole lines) to the driver's log hook; no reply, never blocks on the peer's answer."""
        frame = encode_frame(Kind.REQUEST, {"op": "log", "stream": stream, "dropped": dropped}, text.encode("utf-8"))
        self._send(frame)

    def metrics(self, points: Sequence[MetricPoint], dropped: int = 0) -> None:
        """Send metric points (keys final, at most ``MAX_POINTS_PER_FRAME``) to the driver's metric hook; no reply."""
        if len(points) > MAX_POINTS_PER_FRAME:
            raise ValueError(f"at most {MAX_POINTS_PER_FRAME} points per call, got {len(points)}")
        self._send(encode_frame(Kind.REQUEST, {"op": "metrics", "dropped": int(dropped)}, encode_points(points)))

    def fail(self, error: ErrorInfo, settle: float | None = None) -> ErrorInfo | None:
        """Report that this rank's user code raised; the coordinator aborts the attempt.

        Never waits behind another thread's pending collective on this client: the
        report goes out at once (a whole frame), and that thread's call fails too. A
        report larger than :data:`MAX_REPORT_BYTES` is cut to the head and tail of its
        message and traceback (:meth:`ErrorInfo.clipped`), saying how much was cut.

        ``settle`` (seconds): then wait, at most that long (plus the reply grace), until
        every other rank has reported, finished or gone, and return the attempt's root
        cause with the later reports of other ranks in its ``others`` (``None``: the
        attempt had no failure on record, or no answer came). Without ``settle``: ``None``
        at once.
        """
        header: dict[str, object] = {"op": "fail", "error": error.clipped(MAX_REPORT_BYTES).to_json()}
        if settle is None:
            self._notify(header)
            return None
        header["settle"] = settle
        try:
            self._notify(header)
            with self._lock:  # a collective pending on another thread is rejected by this very report
                frame = self._expect_reply(settle + REPLY_GRACE, kind="settle")
        except HydrogenError:  # the answer is a courtesy: the report itself is what counts
            return None
        if frame.header.get("op") != "settle":
            return None
        failure = frame.header.get("failure")
        return ErrorInfo.from_json(failure) if isinstance(failure, dict) else None

    def finish(self, closed_early: bool = False) -> None:
        """Report that this rank's task ended.

        ``closed_early=True``: the consumer stopped reading this rank's partition
        (a chained ``take()``, ``islice``) before its generator ended, so the rank makes
        no more collectives; peers that wait for one fail with
        :class:`PartitionClosedError` instead of a collective mismatch.
        """
        self._notify({"op": "finish", "closed_early": True} if closed_early else {"op": "finish"})

    def _notify(self, header: dict[str, object]) -> None:
        # No reply is expected, so only the send lock is needed (whole frames); taking the
        # request lock would wait behind a collective another thread is blocked in.
        try:
            self._send(encode_frame(Kind.REQUEST, header))
        except CoordinatorConnectionError:
            pass  # the coordinator already knows: a lost connection counts as this rank failing

    def close(self) -> None:
        self._heartbeat_stop.set()
        if not self._closed:
            self._closed = True
            try:
                self._sock.close()
            except OSError:
                pass

    # the stack channel (coordinator/stackchannel.py) ------------------------------
    def open_stack_channel(self, request: dict[str, object], timeout: float) -> None:
        """Make this connection a stack channel: send ``stacks_channel`` and wait for its reply (ERROR raises)."""
        with self._lock:
            self._send(encode_frame(Kind.REQUEST, {**request, "op": "stacks_channel"}))
            self._expect_reply(timeout, "stacks_channel")

    def next_frame(self) -> Frame:
        """Block until the coordinator sends the next frame on this connection (an ERROR frame raises)."""
        frame = self._read_frame()
        if frame.kind is Kind.ERROR:
            raise from_info(ErrorInfo.from_json(_mapping(frame.header.get("error"))))
        return frame

    def answer_stacks(self, request_id: int, text: str) -> None:
        """Answer stack request ``request_id``: a whole frame, never waiting behind another thread's call."""
        self._send(encode_frame(Kind.REQUEST, {"op": "stacks", "id": request_id},
                                text.encode("utf-8", errors="replace")))

    def raw_fd(self) -> int | None:
        """The socket's descriptor when the connection is plain TCP (``None`` under TLS, or closed).

        For a writer that cannot run Python (faulthandler's watchdog): it writes there
        directly, so only a stack channel, whose inbound side carries nothing else, may use it.
        """
        if self._closed or self._raw_sock is None or not isinstance(self._sock, _PlainChannel):
            return None
        return self._raw_sock.fileno()

    def interrupt(self) -> None:
        """Wake a thread blocked reading this connection (it sees the connection closed); then :meth:`close`."""
        if self._raw_sock is not None and not self._closed:
            try:
                self._raw_sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # I/O -------------------------------------------------------------------
    def _expect_reply(self, timeout: float | None, kind: str = "register", seq: int = -1) -> Frame:
        self._sock.settimeout(timeout)
        try:
            frame = self._read_frame()
        except TimeoutError as exc:
            raise CollectiveTimeoutError(
                f"{kind} (collective call #{seq + 1}): the coordinator at {_where(self.address)} "
                f"gave no verdict within {timeout:g} s (the call's timeout plus {REPLY_GRACE:g} s grace); "
                "the driver may be overloaded or unreachable"
            ) from exc
        finally:
            if not self._closed:
                self._sock.settimeout(None)
        if frame.kind is Kind.ERROR:
            raise from_info(ErrorInfo.from_json(frame.header.get("error") or {}))
        if frame.kind is not Kind.REPLY:
            raise ProtocolError(f"expected REPLY from the coordinator, got {frame.kind.name}")
        return frame

    def _send(self, data: bytes) -> None:
        if self._closed:
            raise CoordinatorConnectionError("the connection to the coordinator is closed")
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except OSError as exc:
            raise CoordinatorConnectionError(
                f"lost the connection to the coordinator at {_where(self.address)}: {exc}"
            ) from exc

    def _read_frame(self, limits: Limits = _CLIENT_LIMITS) -> Frame:
        prefix = self._recv_exact(PREFIX.size)
        kind, head_len, body_len = decode_prefix(prefix, limits)
        header = decode_header(self._recv_exact(head_len))
        payload = self._recv_exact(body_len) if body_len else b""
        return Frame(kind, header, payload)

    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                chunk = self._sock.recv_into(view[got:], min(n - got, 1 << 22))
            except TimeoutError:
                raise
            except OSError as exc:
                raise CoordinatorConnectionError(
                    f"lost the connection to the coordinator at {_where(self.address)}: {exc}"
                ) from exc
            if chunk == 0:
                raise CoordinatorConnectionError(
                    f"the coordinator at {_where(self.address)} closed the connection "
                    "(the driver stopped, or refused this peer)"
                )
            got += chunk
        return buf


def _mapping(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def _start_tls(sock: socket.socket, where: str, fingerprint: str) -> TlsChannel:
    """TLS handshake, then the pin: the coordinator must present exactly the expected certificate."""
    channel = TlsChannel(sock, client_context())
    try:
        channel.handshake()
    except TimeoutError:
        raise
    except (ssl.SSLError, OSError) as exc:
        answer = _plaintext_answer(bytes(channel.handshake_bytes))
        if answer is not None and answer.kind is Kind.ERROR:  # refused before TLS, e.g. at its connection limit
            raise from_info(ErrorInfo.from_json(_mapping(answer.header.get("error")))) from exc
        plain = " (it answered in plaintext: a coordinator without TLS?)" if answer is not None else ""
        raise ProtocolError(
            f"TLS handshake with the coordinator at {where} failed: {exc}. This task expects TLS "
            f"(it was given the coordinator's certificate fingerprint); the peer does not speak it{plain}"
        ) from exc
    check_pin(channel.peer_certificate(), fingerprint, where)
    return channel


def _plaintext_answer(data: bytes) -> Frame | None:
    """The spark-hydrogen frame a peer sent instead of TLS, if it sent one."""
    try:
        return next(iter(FrameDecoder(PREAUTH_LIMITS).feed(data)), None)
    except ProtocolError:
        return None


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)

