"""Wire format of the coordinator channel (see ``docs/protocol.md``).

A frame is a fixed 12-byte binary prefix, a small UTF-8 JSON object (the
control header) and raw payload bytes::

    magic "H2" (2 bytes) | version (u8) | kind (u8) | header length (u32) | payload length (u32)

Both lengths are checked against the receiver's limits *before* anything is
allocated for them.  The JSON header carries the operation and its arguments;
the payload is opaque (pickled by tasks, never unpickled by the coordinator).

Authentication is a challenge/response on the gang's secret; the secret itself
never crosses the wire (:func:`client_proof`, :func:`server_proof`).

Requests are decoded into typed records (:func:`decode_request`) and the server's
frames are built by the ``*_frame`` functions here, so the field names of the
wire live in this one module.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ErrorInfo, ProtocolError
from ..tracking.points import MetricPoint, decode_points
from .state import Call, MemberInfo, Op

__all__ = [
    "MAGIC",
    "VERSION",
    "PREFIX",
    "Kind",
    "Frame",
    "Limits",
    "PREAUTH_LIMITS",
    "encode_frame",
    "encode_frame_parts",
    "decode_prefix",
    "decode_header",
    "FrameDecoder",
    "Admit",
    "client_proof",
    "server_proof",
    "NONCE_BYTES",
    "RequestError",
    "Register",
    "StageGangInfo",
    "MAX_START_TIMEOUT",
    "CallRequest",
    "Fail",
    "MAX_SETTLE",
    "Finish",
    "LogLines",
    "Metrics",
    "Ping",
    "Restore",
    "Request",
    "decode_request",
    "hello_frame",
    "welcome_frame",
    "error_frame",
    "register_reply",
    "held_notice",
    "restore_reply",
    "settle_reply",
    "collective_reply",
    "StacksChannel",
    "StacksAnswer",
    "MAX_DUMP_AFTER",
    "stacks_request",
    "stacks_channel_reply",
]

MAGIC = b"H2"
VERSION = 1
PREFIX = struct.Struct("!2sBBII")
NONCE_BYTES = 32


class Kind(enum.IntEnum):
    """Frame kinds. Server -> client: HELLO, WELCOME, REPLY, ERROR. Client -> server: AUTH, REQUEST."""

    HELLO = 1
    AUTH = 2
    WELCOME = 3
    REQUEST = 4
    REPLY = 5
    ERROR = 6


_KINDS = frozenset(int(k) for k in Kind)


@dataclass(frozen=True)
class Limits:
    """Largest control header and payload a receiver accepts in one frame."""

    max_header_bytes: int
    max_payload_bytes: int


#: What the server accepts from a peer that has not authenticated yet: one small
#: AUTH frame with no payload, so unauthenticated bytes cannot make it allocate.
PREAUTH_LIMITS = Limits(max_header_bytes=4096, max_payload_bytes=0)


@dataclass(frozen=True)
class Frame:
    kind: Kind
    header: Mapping[str, Any]
    payload: bytes | bytearray = b""


def encode_frame(kind: Kind, header: Mapping[str, Any], payload: bytes | bytearray | memoryview = b"") -> bytes:
    """Serialise one frame into a single bytes object (ready for ``sendall``/``write``)."""
    return encode_frame_parts(kind, header, (payload,))


def encode_frame_parts(kind: Kind, header: Mapping[str, Any],
                       parts: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """Like :func:`encode_frame` with the payload given as parts (e.g. every rank's), copied once."""
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    size = sum(len(p) for p in parts)
    return b"".join((PREFIX.pack(MAGIC, VERSION, int(kind), len(head), size), head, *parts))


def decode_prefix(prefix: bytes | bytearray | memoryview, limits: Limits) -> tuple[Kind, int, int]:
    """Check the 12-byte prefix; return (kind, header length, payload length)."""
    magic, version, kind, head_len, body_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}: the peer does not speak the spark-hydrogen protocol")
    if version != VERSION:
        raise ProtocolError(
            f"peer speaks protocol version {version}, this side speaks {VERSION}: "
            "install the same spark-hydrogen version on the driver and the executors"
        )
    if kind not in _KINDS:
        raise ProtocolError(f"unknown frame kind {kind}")
    if head_len > limits.max_header_bytes:
        raise ProtocolError(f"control header of {head_len} bytes exceeds the limit of {limits.max_header_bytes}")
    if body_len > limits.max_payload_bytes:
        raise ProtocolError(
            f"payload of {body_len} bytes exceeds the limit of {limits.max_payload_bytes} bytes "
            "(raise spark.hydrogen.coordinator.maxPayload to allow larger payloads)"
        )
    return Kind(kind), head_len, body_len


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_constant=_no_constants)


def decode_header(raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse the JSON control header; it must be an object.

    Strict JSON only (no ``NaN``/``Infinity``); nesting deep enough to exhaust the
    parser's recursion is refused like any other malformed header.
    """
    try:
        header = _JSON.decode(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"control header is not valid UTF-8 JSON: {exc}") from exc
    except RecursionError:
        raise ProtocolError("control header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"control header must be a JSON object, got {type(header).__name__}")
    return header


#: ``admit(kind, header, payload_length) -> bool``: called once a frame's header has been
#: read, before any of its payload is; ``False`` drops the payload unread (see :class:`FrameDecoder`).
Admit = Callable[[Kind, dict[str, Any], int], bool]


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, iterate complete frames.

    Limits can be changed between frames (the server widens them after authentication).
    With ``admit`` set, every frame's header is shown to it before the payload is
    buffered; a frame it refuses is consumed and dropped as its bytes arrive, so the
    connection stays in step without holding the payload. The decoder never holds
    more than one frame (within its limits) plus the chunk being fed.

    Example:
        >>> dec = FrameDecoder(Limits(1024, 1024))
        >>> [f.header for f in dec.feed(encode_frame(Kind.REQUEST, {"op": "barrier"}))]
        [{'op': 'barrier'}]
    """

    def __init__(self, limits: Limits, admit: Admit | None = None) -> None:
        self.limits = limits
        self.admit = admit
        self._buf = bytearray()
        self._pos = 0
        self._pending: tuple[Kind, int, int] | None = None
        self._header: dict[str, Any] | None = None
        self._skip = 0

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Frame]:
        self._buf += data
        while True:
            frame = self._next()
            if frame is None:
                break
            yield frame
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0

    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def _next(self) -> Frame | None:
        while True:
            avail = len(self._buf) - self._pos
            if self._skip:
                dropped = min(self._skip, avail)
                self._pos += dropped
                self._skip -= dropped
                if self._skip:
                    return None
                avail -= dropped
            if self._pending is None:
                if avail < PREFIX.size:
                    return None
                self._pending = decode_prefix(bytes(self._buf[self._pos : self._pos + PREFIX.size]), self.limits)
                self._pos += PREFIX.size
                avail -= PREFIX.size
            kind, head_len, body_len = self._pending
            if self._header is None:
                if avail < head_len:
                    return None
                header = decode_header(self._buf[self._pos : self._pos + head_len])
                self._pos += head_len
                avail -= head_len
                if self.admit is not None and not self.admit(kind, header, body_len):
                    self._pending, self._skip = None, body_len
                    continue
                self._header = header
            if avail < body_len:
                return None
            start = self._pos
            payload = bytes(memoryview(self._buf)[start : start + body_len]) if body_len else b""
            self._pos = start + body_len
            frame = Frame(kind, self._header, payload)
            self._pending, self._header = None, None
            return frame


def _mac(secret: bytes, label: bytes, parts: Sequence[bytes]) -> str:
    mac = hmac.new(secret, label, hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(4, "big"))
        mac.update(part)
    return mac.hexdigest()


def client_proof(secret: bytes, gang_id: str, server_nonce: bytes, client_nonce: bytes) -> str:
    """HMAC-SHA256 the client sends to prove it holds the gang's secret."""
    return _mac(secret, b"sparkhydrogen-client-v1", (gang_id.encode(), server_nonce, client_nonce))


def server_proof(secret: bytes, gang_id: str, server_nonce: bytes, client_nonce: bytes) -> str:
    """HMAC-SHA256 the server sends back so the client knows it reached the real coordinator."""
    return _mac(secret, b"sparkhydrogen-server-v1", (gang_id.encode(), server_nonce, client_nonce))


# -- requests (client -> server) ------------------------------------------------


class RequestError(ValueError):
    """A request of a known ``op`` whose arguments are malformed: refused with an ERROR, the connection stays."""


@dataclass(frozen=True)
class Register:
    """``register``: join the gang as ``rank`` of gang attempt ``gang_attempt``, Spark stage ``stage_id``."""

    gang_attempt: int
    stage_id: int
    rank: int
    member: MemberInfo
    #: A stage gang (formed by its first task, see :meth:`CoordinatorServer.stage_credential`) needs what
    #: the driver would otherwise have declared: the stage's task count, whether its start is gated (and
    #: within what bound) and a name for messages. Ignored for declared gangs.
    stage: StageGangInfo | None = None


@dataclass(frozen=True)
class StageGangInfo:
    """What the first task of a stage attempt tells the coordinator to form a stage gang."""

    world_size: int
    name: str = ""
    gated: bool = False
    start_timeout: float | None = None


@dataclass(frozen=True)
class CallRequest:
    """``call``: the rank's next collective call."""

    call: Call


@dataclass(frozen=True)
class Fail:
    """``fail``: the rank's user code raised ``error`` (its ``rank`` is set by the server, never trusted).

    ``settle`` (seconds, at most :data:`MAX_SETTLE`): the rank waits for a ``settle``
    reply naming the attempt's failures, sent once every other rank has reported,
    finished or gone, or after ``settle`` seconds. ``None``: no reply.
    """

    error: ErrorInfo
    settle: float | None = None


#: The longest a failing rank may ask to wait for the other ranks' failures (seconds).
MAX_SETTLE = 60.0


@dataclass(frozen=True)
class Finish:
    """``finish``: the rank's task ended; ``closed_early`` if its consumer stopped reading the partition."""

    closed_early: bool = False


@dataclass(frozen=True)
class LogLines:
    """``log``: whole lines of output for the driver's log hook (no reply)."""

    stream: str
    text: str
    dropped: int = 0


@dataclass(frozen=True)
class Metrics:
    """``metrics``: metric points for the driver's metric hook (no reply); ``dropped`` were lost on the rank.

    The payload is JSON ``[[key, value, step, timestamp_ms], ...]``, at most
    :data:`~sparkhydrogen.tracking.points.MAX_POINTS_PER_FRAME` points, keys final
    (``rank_<r>/...`` decided on the rank), non-finite values as ``"nan"``/``"inf"``/``"-inf"``.
    """

    points: tuple[MetricPoint, ...]
    dropped: int = 0


@dataclass(frozen=True)
class Ping:
    """``ping``: a heartbeat (no reply)."""


@dataclass(frozen=True)
class Restore:
    """``restore``: the rank's state in the gang's last committed checkpoint (``of``: another rank's, to re-shard)."""

    of: int | None = None


@dataclass(frozen=True)
class StacksChannel:
    """``stacks_channel``: this connection becomes the stack channel of the rank registered as ``rank``.

    It names the rank's registration (gang attempt, stage, task attempt id, pid) so the
    coordinator attaches it to that very rank. ``dump_after``: seconds after which the
    rank's faulthandler watchdog writes a dump here while its Python cannot run (``None``:
    it writes none, ``no_dump`` says why). See ``docs/protocol.md``, "Stacks".
    """

    gang_attempt: int
    stage_id: int
    rank: int
    task_attempt_id: int
    pid: int
    dump_after: float | None = None
    no_dump: str = ""


@dataclass(frozen=True)
class StacksAnswer:
    """``stacks``: the rank's answer (on its own connection) to stack request ``request_id``: every thread's stack."""

    request_id: int
    text: str


#: The longest ``dump_after`` a stack channel may state (seconds).
MAX_DUMP_AFTER = 3600.0

Request = (Register | CallRequest | Fail | Finish | LogLines | Metrics | Ping | Restore | StacksChannel
           | StacksAnswer)


def _int(header: Mapping[str, Any], name: str, default: int | None = None) -> int:
    if name not in header and default is None:
        raise RequestError(f"missing field {name!r}")
    value = header.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{name} must be an integer, got {value!r}")
    return value


#: Longest start bound a stage gang's task may ask for (a day): the bound is the user's, the cap is ours.
MAX_START_TIMEOUT = 86400.0


def _decode_stage(value: Any) -> StageGangInfo | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RequestError(f"stage must be an object, got {type(value).__name__}")
    size = value.get("world_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise RequestError(f"stage.world_size must be a positive integer, got {size!r}")
    bound = value.get("start_timeout")
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))
                              or not 0 < bound <= MAX_START_TIMEOUT):
        raise RequestError(f"stage.start_timeout must be a number of seconds in (0, {MAX_START_TIMEOUT:g}], "
                           f"got {bound!r}")
    return StageGangInfo(world_size=size, name=str(value.get("name", ""))[:200], gated=value.get("gated") is True,
                         start_timeout=None if bound is None else float(bound))


def _decode_register(header: Mapping[str, Any]) -> Register:
    return Register(
        gang_attempt=_int(header, "gang_attempt"),
        stage_id=_int(header, "stage_id"),
        rank=_int(header, "rank"),
        member=MemberInfo(host=str(header.get("host", "?"))[:256], pid=_int(header, "pid", 0),
                          task_attempt_id=_int(header, "task_attempt_id", -1),
                          address=str(header.get("address", ""))[:300]),
        stage=_decode_stage(header.get("stage")),
    )


def _decode_call(header: Mapping[str, Any], payload: bytes | bytearray) -> CallRequest:
    seq, root, timeout = header.get("seq"), header.get("root"), header.get("timeout")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise RequestError(f"seq must be a non-negative integer, got {seq!r}")
    if root is not None and (isinstance(root, bool) or not isinstance(root, int)):
        raise RequestError(f"root must be an integer, got {root!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < 1e9):
        raise RequestError(f"timeout must be a positive number of seconds, got {timeout!r}")
    try:
        op = Op(header.get("kind"))
    except ValueError:
        kinds = ", ".join(o.value for o in Op)
        raise RequestError(f"kind must be one of {kinds}, got {header.get('kind')!r}") from None
    return CallRequest(Call(op=op, seq=seq, payload=bytes(payload) if isinstance(payload, bytearray) else payload,
                            root=root, timeout=None if timeout is None else float(timeout)))


def _decode_fail(header: Mapping[str, Any]) -> Fail:
    """The error a rank reports: strings and a plain ``extra`` object only."""
    value = header.get("error")
    if not isinstance(value, dict):
        raise RequestError(f"'error' must be an object, got {type(value).__name__}")
    extra = value.get("extra")
    if isinstance(extra, dict):  # the coordinator alone says which other ranks failed
        extra = {k: v for k, v in extra.items() if k not in ("others", "others_more")}
    settle = header.get("settle")
    if settle is not None and (isinstance(settle, bool) or not isinstance(settle, (int, float))
                               or not 0 <= settle <= MAX_SETTLE):
        raise RequestError(f"settle must be a number of seconds in 0..{MAX_SETTLE:g}, got {settle!r}")
    return Fail(ErrorInfo(type=str(value.get("type", "Exception"))[:200], message=str(value.get("message", "")),
                          traceback=str(value.get("traceback", "")), extra=extra if isinstance(extra, dict) else {}),
                None if settle is None else float(settle))


def _decode_restore(header: Mapping[str, Any]) -> Restore:
    of = header.get("of")
    if of is not None and (isinstance(of, bool) or not isinstance(of, int) or of < 0):
        raise RequestError(f"'of' must be a rank (an int >= 0), got {of!r}")
    return Restore(of=of)


def _decode_finish(header: Mapping[str, Any]) -> Finish:
    closed_early = header.get("closed_early", False)
    if not isinstance(closed_early, bool):
        raise RequestError(f"closed_early must be true or false, got {closed_early!r}")
    return Finish(closed_early=closed_early)


def _decode_log(header: Mapping[str, Any], payload: bytes | bytearray) -> LogLines:
    dropped = header.get("dropped", 0)
    return LogLines(stream=str(header.get("stream", "log")), text=bytes(payload).decode("utf-8", errors="replace"),
                    dropped=dropped if isinstance(dropped, int) and not isinstance(dropped, bool) and dropped > 0
                    else 0)


def _decode_metrics(header: Mapping[str, Any], payload: bytes | bytearray) -> Metrics:
    dropped = header.get("dropped", 0)
    if isinstance(dropped, bool) or not isinstance(dropped, int) or dropped < 0:
        raise RequestError(f"dropped must be a non-negative integer, got {dropped!r}")
    try:
        points = decode_points(payload)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    return Metrics(points=tuple(points), dropped=dropped)


def _decode_stacks_channel(header: Mapping[str, Any]) -> StacksChannel:
    after = header.get("dump_after")
    if after is not None and (isinstance(after, bool) or not isinstance(after, (int, float))
                              or not 0 < after <= MAX_DUMP_AFTER):
        raise RequestError(f"dump_after must be a number of seconds in (0, {MAX_DUMP_AFTER:g}] or null, "
                           f"got {after!r}")
    return StacksChannel(gang_attempt=_int(header, "gang_attempt"), stage_id=_int(header, "stage_id"),
                         rank=_int(header, "rank"), task_attempt_id=_int(header, "task_attempt_id"),
                         pid=_int(header, "pid"), dump_after=None if after is None else float(after),
                         no_dump=str(header.get("no_dump", ""))[:300])


def _decode_stacks_answer(header: Mapping[str, Any], payload: bytes | bytearray) -> StacksAnswer:
    request_id = header.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, int) or request_id < 1:
        raise RequestError(f"id must be a positive integer, got {request_id!r}")
    return StacksAnswer(request_id, bytes(payload).decode("utf-8", errors="replace"))


def decode_request(frame: Frame) -> Request:
    """The typed request a REQUEST frame carries.

    Raises :class:`ProtocolError` for a frame that breaks the protocol (not a REQUEST,
    an unknown ``op``, registration ids that are not integers: the server closes the
    connection) and :class:`RequestError` for a known ``op`` with bad arguments (the
    server refuses that request only).

    Example:
        >>> decode_request(Frame(Kind.REQUEST, {"op": "finish", "closed_early": True}))
        Finish(closed_early=True)
    """
    if frame.kind is not Kind.REQUEST:
        raise ProtocolError(f"expected a REQUEST frame, got {frame.kind.name}")
    header = frame.header
    op = header.get("op")
    if op == "register":
        return _decode_register(header)
    if op == "call":
        return _decode_call(header, frame.payload)
    if op == "ping":
        return Ping()
    if op == "log":
        return _decode_log(header, frame.payload)
    if op == "metrics":
        return _decode_metrics(header, frame.payload)
    if op == "finish":
        return _decode_finish(header)
    if op == "fail":
        return _decode_fail(header)
    if op == "restore":
        return _decode_restore(header)
    if op == "stacks":
        return _decode_stacks_answer(header, frame.payload)
    if op == "stacks_channel":
        return _decode_stacks_channel(header)
    raise ProtocolError(f"unknown request op {op!r}")


# -- server -> client frames ----------------------------------------------------


def hello_frame(nonce: bytes) -> bytes:
    return encode_frame(Kind.HELLO, {"nonce": nonce.hex(), "server": "sparkhydrogen"})


def welcome_frame(proof: str, max_payload: int) -> bytes:
    return encode_frame(Kind.WELCOME, {"proof": proof, "max_payload": max_payload})


def error_frame(error: ErrorInfo) -> bytes:
    return encode_frame(Kind.ERROR, {"error": error.to_json()})


def register_reply(world_size: int, addresses: Sequence[str] | None = None) -> bytes:
    """The answer to ``register``; a gated gang's (sent when its start gate opens) lists every rank's address."""
    header: dict[str, Any] = {"op": "register", "world_size": world_size}
    if addresses is not None:
        header["addresses"] = list(addresses)
    return encode_frame(Kind.REPLY, header)


def held_notice() -> bytes:
    """Tells a second copy of a live rank (a speculative duplicate) that it will not join: wait to be killed."""
    return encode_frame(Kind.REPLY, {"op": "register", "held": True})


def settle_reply(failure: ErrorInfo | None) -> bytes:
    """The answer to a ``fail`` that asked to settle: the attempt's root cause, later reports in its ``others``."""
    return encode_frame(Kind.REPLY, {"op": "settle", "failure": None if failure is None else failure.to_json()})


def restore_reply(state: bytes | None, world_size: int = 0, of: int | None = None) -> bytes:
    """The answer to ``restore``: the state, the world size its checkpoint was written at, and whose state it is."""
    return encode_frame(Kind.REPLY, {"op": "restore", "found": state is not None, "world_size": world_size,
                                     "of": of}, state or b"")


def collective_reply(op: Op, seq: int, payloads: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """A completed round's reply: every payload once, with ``sizes`` to split them (one copy of each)."""
    return encode_frame_parts(Kind.REPLY, {"op": op.value, "seq": seq, "sizes": [len(p) for p in payloads]}, payloads)


def stacks_channel_reply() -> bytes:
    """The answer to ``stacks_channel``: the connection is now the rank's stack channel."""
    return encode_frame(Kind.REPLY, {"op": "stacks_channel"})


def stacks_request(request_id: int) -> bytes:
    """Server -> client on a stack channel: send every thread's stack, answering ``request_id``.

    Example:
        >>> next(iter(FrameDecoder(PREAUTH_LIMITS).feed(stacks_request(3)))).header
        {'op': 'stacks', 'id': 3}
    """
    return encode_frame(Kind.REQUEST, {"op": "stacks", "id": request_id})
