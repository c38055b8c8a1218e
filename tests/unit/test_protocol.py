"""Wire protocol: frame encoding, the incremental decoder and its limits, HMAC proofs."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkhydrogen.coordinator.protocol import (
    MAGIC,
    NONCE_BYTES,
    PREAUTH_LIMITS,
    PREFIX,
    VERSION,
    CallRequest,
    Fail,
    Finish,
    Frame,
    FrameDecoder,
    Kind,
    Limits,
    LogLines,
    Ping,
    Register,
    RequestError,
    Restore,
    client_proof,
    collective_reply,
    decode_header,
    decode_prefix,
    decode_request,
    encode_frame,
    server_proof,
)
from sparkhydrogen.coordinator.state import Call, MemberInfo, Op
from sparkhydrogen.errors import CoordinatorConnectionError, ErrorInfo, ProtocolError

pytestmark = pytest.mark.timeout(30)

LIMITS = Limits(max_header_bytes=1024, max_payload_bytes=4096)


def prefix(kind: int = Kind.REQUEST, head_len: int = 2, body_len: int = 0,
           magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    return PREFIX.pack(magic, version, kind, head_len, body_len)


def decode_all(decoder: FrameDecoder, data: bytes) -> list[Frame]:
    return list(decoder.feed(data))


# ------------------------------------------------------------------ encoding


def test_prefix_is_twelve_bytes_magic_version_kind_lengths() -> None:
    raw = encode_frame(Kind.REPLY, {"op": "barrier"}, b"xyz")
    head = json.dumps({"op": "barrier"}, separators=(",", ":")).encode()
    assert PREFIX.size == 12
    assert raw[:2] == b"H2" and raw[2] == VERSION and raw[3] == int(Kind.REPLY)
    assert int.from_bytes(raw[4:8], "big") == len(head)
    assert int.from_bytes(raw[8:12], "big") == 3
    assert raw[12:] == head + b"xyz"


@pytest.mark.parametrize("payload", [b"", b"\x00\xff" * 100, bytearray(b"abc"), memoryview(b"view")])
def test_encode_decode_round_trip(payload: bytes) -> None:
    header = {"op": "call", "kind": "allGather", "seq": 7, "root": None, "timeout": 1.5, "text": "é✓"}
    frames = decode_all(FrameDecoder(LIMITS), encode_frame(Kind.REQUEST, header, payload))
    assert len(frames) == 1
    assert frames[0].kind is Kind.REQUEST
    assert frames[0].header == header
    assert bytes(frames[0].payload) == bytes(payload)


def test_decoder_accepts_one_byte_at_a_time() -> None:
    raw = encode_frame(Kind.REPLY, {"op": "allGather", "sizes": [3, 4]}, b"abcdefg")
    decoder = FrameDecoder(LIMITS)
    got: list[Frame] = []
    for i in range(len(raw)):
        got += decoder.feed(raw[i : i + 1])
        if i < len(raw) - 1:
            assert got == [], f"a frame came out after only {i + 1} of {len(raw)} bytes"
    assert [(f.kind, f.header, f.payload) for f in got] == [
        (Kind.REPLY, {"op": "allGather", "sizes": [3, 4]}, b"abcdefg")]
    assert decoder.buffered() == 0


def test_decoder_splits_several_frames_in_one_chunk_and_keeps_the_partial_tail() -> None:
    frames = [encode_frame(Kind.REQUEST, {"n": i}, bytes([i]) * i) for i in range(5)]
    tail = encode_frame(Kind.REQUEST, {"n": 99}, b"tail")
    decoder = FrameDecoder(LIMITS)
    got = decode_all(decoder, b"".join(frames) + tail[:5])
    assert [(f.header["n"], f.payload) for f in got] == [(i, bytes([i]) * i) for i in range(5)]
    assert decoder.buffered() == 5
    rest = decode_all(decoder, tail[5:])
    assert [(f.header, f.payload) for f in rest] == [({"n": 99}, b"tail")]
    assert decoder.buffered() == 0


def test_limits_can_be_widened_between_frames() -> None:
    auth = encode_frame(Kind.AUTH, {"gang": "g"})
    big = encode_frame(Kind.REQUEST, {"op": "call"}, b"x" * 100)
    decoder = FrameDecoder(PREAUTH_LIMITS)
    frames = decoder.feed(auth + big)
    assert next(frames).kind is Kind.AUTH
    decoder.limits = LIMITS  # what the server does once the peer has authenticated
    assert [f.payload for f in frames] == [b"x" * 100]


# ----------------------------------------------------- rejected prefixes


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (prefix(magic=b"GE"), r"bad magic b'GE'.*does not speak the spark-hydrogen protocol"),
        (prefix(version=VERSION + 1), rf"protocol version {VERSION + 1}, this side speaks {VERSION}"),
        (prefix(kind=0), "unknown frame kind 0"),
        (prefix(kind=200), "unknown frame kind 200"),
        (prefix(head_len=1025), "control header of 1025 bytes exceeds the limit of 1024"),
        (prefix(body_len=4097), r"payload of 4097 bytes exceeds the limit of 4096 bytes.*maxPayload"),
        (prefix(head_len=2**32 - 1, body_len=2**32 - 1), "control header of 4294967295 bytes"),
    ],
    ids=["magic", "version", "kind-0", "kind-200", "header-size", "payload-size", "huge"],
)
def test_bad_prefix_is_rejected_before_the_body_arrives(raw: bytes, match: str) -> None:
    assert len(raw) == PREFIX.size  # only the prefix: the announced body never comes
    decoder = FrameDecoder(LIMITS)
    with pytest.raises(ProtocolError, match=match):
        decode_all(decoder, raw)
    assert decoder.buffered() == PREFIX.size  # nothing was set aside for the announced lengths
    with pytest.raises(ProtocolError, match=match):
        decode_prefix(raw, LIMITS)


def test_preauth_limits_refuse_any_payload() -> None:
    with pytest.raises(ProtocolError, match="payload of 1 bytes exceeds the limit of 0 bytes"):
        decode_all(FrameDecoder(PREAUTH_LIMITS), prefix(kind=Kind.AUTH, body_len=1))
    with pytest.raises(ProtocolError, match="control header of 4097 bytes exceeds the limit of 4096"):
        decode_all(FrameDecoder(PREAUTH_LIMITS), prefix(kind=Kind.AUTH, head_len=4097))


def test_limits_at_the_boundary_are_accepted() -> None:
    header = {"p": "x" * 100}
    head_len = len(json.dumps(header, separators=(",", ":")))
    limits = Limits(max_header_bytes=head_len, max_payload_bytes=10)
    frames = decode_all(FrameDecoder(limits), encode_frame(Kind.REPLY, header, b"0123456789"))
    assert [(f.header, f.payload) for f in frames] == [(header, b"0123456789")]


def test_a_good_frame_before_a_bad_prefix_is_still_delivered() -> None:
    decoder = FrameDecoder(LIMITS)
    frames = decoder.feed(encode_frame(Kind.REQUEST, {"ok": 1}) + b"GET / HTTP/1.1\r\n")
    assert next(frames).header == {"ok": 1}
    with pytest.raises(ProtocolError, match="bad magic b'GE'"):
        next(frames)


def test_protocol_error_is_a_connection_error() -> None:
    assert issubclass(ProtocolError, CoordinatorConnectionError)


# ------------------------------------------------------------- headers


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"not json", "control header is not valid UTF-8 JSON"),
        (b"{\"a\": 1", "control header is not valid UTF-8 JSON"),
        (b"\xff\xfe{}", "control header is not valid UTF-8 JSON"),
        (b"[1, 2]", "control header must be a JSON object, got list"),
        (b"\"text\"", "control header must be a JSON object, got str"),
        (b"42", "control header must be a JSON object, got int"),
        (b"null", "control header must be a JSON object, got NoneType"),
    ],
)
def test_header_must_be_a_json_object(raw: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_header(raw)
    frame = prefix(head_len=len(raw)) + raw
    with pytest.raises(ProtocolError, match=match):
        decode_all(FrameDecoder(LIMITS), frame)


def test_decode_header_accepts_memoryview() -> None:
    assert decode_header(memoryview(b'{"op":"finish"}')) == {"op": "finish"}


# ------------------------------------------------------------------ HMAC

SECRET = b"s" * 32
NONCE_A = b"a" * NONCE_BYTES
NONCE_B = b"b" * NONCE_BYTES


def test_proofs_are_deterministic_hex_sha256() -> None:
    proof = client_proof(SECRET, "gang", NONCE_A, NONCE_B)
    assert proof == client_proof(SECRET, "gang", NONCE_A, NONCE_B)
    assert len(proof) == 64 and int(proof, 16) >= 0


@pytest.mark.parametrize(
    "other",
    [
        (b"t" * 32, "gang", NONCE_A, NONCE_B),   # other secret
        (SECRET, "gang2", NONCE_A, NONCE_B),     # other gang id
        (SECRET, "gang", NONCE_B, NONCE_B),      # other server nonce
        (SECRET, "gang", NONCE_A, NONCE_A),      # other client nonce
        (SECRET, "gang", NONCE_B, NONCE_A),      # nonces swapped
    ],
    ids=["secret", "gang", "server-nonce", "client-nonce", "swapped"],
)
def test_proofs_depend_on_every_input(other: tuple[bytes, str, bytes, bytes]) -> None:
    base = (SECRET, "gang", NONCE_A, NONCE_B)
    assert client_proof(*other) != client_proof(*base)
    assert server_proof(*other) != server_proof(*base)


def test_client_and_server_proofs_differ() -> None:
    assert client_proof(SECRET, "gang", NONCE_A, NONCE_B) != server_proof(SECRET, "gang", NONCE_A, NONCE_B)


def test_proof_parts_are_length_prefixed() -> None:
    # moving a byte from the gang id into the nonce must not give the same MAC
    assert client_proof(SECRET, "ab", b"c", b"d") != client_proof(SECRET, "a", b"bc", b"d")


# ------------------------------------------------------------ properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
frames_strategy = st.lists(
    st.tuples(
        st.sampled_from(list(Kind)),
        st.dictionaries(st.text(max_size=8), json_values, max_size=5),
        st.binary(max_size=300),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(frames=frames_strategy, cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=8))
def test_any_chunking_of_any_frames_decodes_to_the_same_frames(
    frames: list[tuple[Kind, dict[str, object], bytes]], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(kind, header, payload) for kind, header, payload in frames)
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    decoder = FrameDecoder(Limits(max_header_bytes=1 << 20, max_payload_bytes=1 << 20))
    got: list[Frame] = []
    for start, end in zip(points, points[1:], strict=False):
        got += decoder.feed(stream[start:end])
    assert [(f.kind, f.header, f.payload) for f in got] == frames
    assert decoder.buffered() == 0


# ------------------------------------------------------------------ requests


def request(header: dict[str, object], payload: bytes = b"") -> Frame:
    return next(iter(FrameDecoder(Limits(1 << 16, 1 << 16)).feed(encode_frame(Kind.REQUEST, header, payload))))


def test_every_request_decodes_into_its_typed_record() -> None:
    register = {"op": "register", "gang_attempt": 2, "stage_id": 5, "rank": 1, "host": "h" * 300, "pid": 42,
                "task_attempt_id": 9}
    assert decode_request(request(register)) == Register(2, 5, 1, MemberInfo("h" * 256, 42, 9))
    assert decode_request(request({"op": "register", "gang_attempt": 0, "stage_id": 0, "rank": 0})) == Register(
        0, 0, 0, MemberInfo("?", 0, -1))
    call = {"op": "call", "kind": "broadcast", "seq": 3, "root": 1, "timeout": 2}
    assert decode_request(request(call, b"pay")) == CallRequest(Call(Op.BROADCAST, 3, b"pay", 1, 2.0))
    error = {"type": "ValueError", "message": "bad", "traceback": "tb", "rank": 99, "extra": {"k": 1}}
    assert decode_request(request({"op": "fail", "error": error})) == Fail(
        ErrorInfo("ValueError", "bad", None, "tb", {"k": 1}))  # the rank comes from the connection, not the peer
    forged = {**error, "extra": {"k": 1, "others": [{"type": "X", "message": "not me"}], "others_more": 3}}
    assert decode_request(request({"op": "fail", "error": forged, "settle": 2})) == Fail(
        ErrorInfo("ValueError", "bad", None, "tb", {"k": 1}), 2.0)  # only the coordinator says who else failed
    assert decode_request(request({"op": "finish"})) == Finish(closed_early=False)
    assert decode_request(request({"op": "finish", "closed_early": True})) == Finish(closed_early=True)
    assert decode_request(request({"op": "log", "stream": "stderr", "dropped": 3}, "ü\n".encode())) == LogLines(
        "stderr", "ü\n", 3)
    assert decode_request(request({"op": "ping"})) == Ping()
    assert decode_request(request({"op": "restore"})) == Restore()


@pytest.mark.parametrize(("header", "match"), [
    ({"op": "call", "kind": "barrier", "seq": -1}, r"seq must be a non-negative integer, got -1"),
    ({"op": "call", "kind": "barrier", "seq": True}, r"seq must be a non-negative integer, got True"),
    ({"op": "call", "kind": "reduce", "seq": 0}, r"kind must be one of barrier, allGather, .* got 'reduce'"),
    ({"op": "call", "kind": "broadcast", "seq": 0, "root": "0"}, r"root must be an integer, got '0'"),
    ({"op": "call", "kind": "barrier", "seq": 0, "timeout": 0}, r"timeout must be a positive number of seconds"),
    ({"op": "fail", "error": "boom"}, r"'error' must be an object, got str"),
    ({"op": "finish", "closed_early": "yes"}, r"closed_early must be true or false, got 'yes'"),
    ({"op": "fail", "error": {}, "settle": -1}, r"settle must be a number of seconds in 0\.\.60, got -1"),
    ({"op": "fail", "error": {}, "settle": True}, r"settle must be a number of seconds in 0\.\.60, got True"),
    ({"op": "fail", "error": {}, "settle": "2"}, r"settle must be a number of seconds in 0\.\.60, got '2'"),
    ({"op": "register", "stage_id": 0, "rank": 0}, r"missing field 'gang_attempt'"),
])
def test_a_known_request_with_bad_arguments_is_a_request_error(header: dict[str, object], match: str) -> None:
    with pytest.raises(RequestError, match=match):
        decode_request(request(header))


@pytest.mark.parametrize(("frame", "match"), [
    (Frame(Kind.REQUEST, {"op": "shutdown"}), r"unknown request op 'shutdown'"),
    (Frame(Kind.AUTH, {"op": "ping"}), r"expected a REQUEST frame, got AUTH"),
    (Frame(Kind.REQUEST, {"op": "register", "gang_attempt": "0", "stage_id": 0, "rank": 0}),
     r"gang_attempt must be an integer, got '0'"),
])
def test_a_request_that_breaks_the_protocol_is_a_protocol_error(frame: Frame, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_request(frame)


def test_a_collective_reply_carries_every_payload_once_with_their_sizes() -> None:
    [frame] = FrameDecoder(Limits(1 << 16, 1 << 16)).feed(collective_reply(Op.ALLGATHER, 4, [b"ab", b"", b"cde"]))
    assert frame.kind is Kind.REPLY and frame.header == {"op": "allGather", "seq": 4, "sizes": [2, 0, 3]}
    assert frame.payload == b"abcde"
