"""Fuzzing the frame decoder and the header parser with hypothesis (no sockets).

Properties: arbitrary bytes in arbitrary chunks only ever yield frames or raise
``ProtocolError``; the decoder never holds more than one frame within its limits plus
the chunk being fed; a prefix announcing a huge frame allocates nothing for it; valid
frames survive any chunking; refused frames are skipped without losing sync.
"""

from __future__ import annotations

import json
import random
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sparkhydrogen.coordinator.protocol import (
    MAGIC,
    PREAUTH_LIMITS,
    PREFIX,
    VERSION,
    Frame,
    FrameDecoder,
    Kind,
    Limits,
    decode_header,
    decode_prefix,
    encode_frame,
)
from sparkhydrogen.errors import ProtocolError

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SERVER_LIMITS = Limits(max_header_bytes=64 * 1024, max_payload_bytes=1 << 20)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
headers = st.dictionaries(st.text(max_size=12), json_values, max_size=6)
kinds = st.sampled_from(list(Kind))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def prefix(kind: int, head_len: int, body_len: int, magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    return PREFIX.pack(magic, version, kind, head_len, body_len)


def feed_all(decoder: FrameDecoder, chunks: list[bytes], limits: Limits) -> list[Frame]:
    """Feed chunk by chunk; check the bound on buffered bytes after every chunk."""
    frames: list[Frame] = []
    bound = PREFIX.size + limits.max_header_bytes + limits.max_payload_bytes
    for chunk in chunks:
        frames += decoder.feed(chunk)
        assert decoder.buffered() <= bound + len(chunk)
    return frames


# --------------------------------------------------------------- arbitrary bytes


@FUZZ
@given(data=st.binary(max_size=4096), cuts=st.lists(st.integers(0, 4096), max_size=8),
       preauth=st.booleans())
def test_arbitrary_bytes_yield_frames_or_a_protocol_error_only(data: bytes, cuts: list[int], preauth: bool) -> None:
    limits = PREAUTH_LIMITS if preauth else SERVER_LIMITS
    decoder = FrameDecoder(limits)
    try:
        frames = feed_all(decoder, split(data, cuts), limits)
    except ProtocolError:
        return
    for frame in frames:
        assert isinstance(frame.kind, Kind) and isinstance(frame.header, dict)
        assert len(frame.header) >= 0 and len(frame.payload) <= limits.max_payload_bytes


@FUZZ
@given(kind=st.integers(0, 255), version=st.integers(0, 255), magic=st.binary(min_size=2, max_size=2),
       head_len=st.integers(0, 2**32 - 1), body_len=st.integers(0, 2**32 - 1))
def test_every_prefix_is_checked_before_anything_is_allocated(kind: int, version: int, magic: bytes,
                                                              head_len: int, body_len: int) -> None:
    raw = prefix(kind, head_len, body_len, magic, version)
    ok = (magic == MAGIC and version == VERSION and kind in {int(k) for k in Kind}
          and head_len <= SERVER_LIMITS.max_header_bytes and body_len <= SERVER_LIMITS.max_payload_bytes)
    if ok:
        assert decode_prefix(raw, SERVER_LIMITS) == (Kind(kind), head_len, body_len)
    else:
        with pytest.raises(ProtocolError):
            decode_prefix(raw, SERVER_LIMITS)


@settings(max_examples=50, deadline=None)
@given(head_len=st.integers(0, 2**32 - 1), body_len=st.integers(0, 2**32 - 1))
def test_a_prefix_announcing_gigabytes_allocates_nothing_for_them(head_len: int, body_len: int) -> None:
    """Even with limits wide open, only the bytes actually fed are ever held."""
    decoder = FrameDecoder(Limits(2**32, 2**32))
    tracemalloc.start()
    try:
        list(decoder.feed(prefix(Kind.REQUEST, head_len, body_len) + b"{" * 100))
        _, peak = tracemalloc.get_traced_memory()
    except ProtocolError:
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024
    assert decoder.buffered() <= 100


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_unauthenticated_streams_cost_at_most_one_small_frame(seed: int) -> None:
    """Before authentication: at most 12 + 4096 bytes of a frame are held, whatever arrives."""
    rng = random.Random(seed)
    decoder = FrameDecoder(PREAUTH_LIMITS)
    stream = prefix(Kind.AUTH, 4096, 0) + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 6000)))
    tracemalloc.start()
    try:
        for chunk in split(stream, [rng.randint(0, len(stream)) for _ in range(6)]):
            list(decoder.feed(chunk))
            assert decoder.buffered() <= PREFIX.size + 4096 + len(chunk)
    except ProtocolError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 256 * 1024


# --------------------------------------------------------------- headers


@FUZZ
@given(raw=st.binary(max_size=2048))
def test_arbitrary_header_bytes_parse_to_an_object_or_a_protocol_error(raw: bytes) -> None:
    try:
        header = decode_header(raw)
    except ProtocolError:
        return
    assert isinstance(header, dict)


@FUZZ
@given(text=st.text(max_size=512))
def test_arbitrary_header_text_parses_to_an_object_or_a_protocol_error(text: str) -> None:
    try:
        header = decode_header(text.encode("utf-8"))
    except ProtocolError:
        return
    assert isinstance(header, dict)


@pytest.mark.parametrize("depth", [10, 500, 5_000, 60_000])
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_headers_are_refused_or_parsed_never_crash(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    raw = ('{"x":' + opener * depth + "1" + closer * depth + "}").encode()
    try:
        assert isinstance(decode_header(raw), dict)
    except ProtocolError as exc:
        assert "nested too deeply" in str(exc) or "not valid UTF-8 JSON" in str(exc)


@pytest.mark.parametrize("raw", [b'{"t": NaN}', b'{"t": Infinity}', b'{"t": -Infinity}',
                                 b'{"n": 1' + b"0" * 5000 + b"}", b"\xff\xfe{}", b'{"a": 1} {"b": 2}', b"[]",
                                 b'"text"', b"", b"\x00" * 64])
def test_non_standard_or_hostile_json_is_refused(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_header(raw)


# --------------------------------------------------------------- valid frames


@FUZZ
@given(frames=st.lists(st.tuples(kinds, headers, st.binary(max_size=300)), min_size=1, max_size=6),
       cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_valid_frames_survive_any_chunking(frames: list[tuple[Kind, dict[str, Any], bytes]], cuts: list[int]) -> None:
    raw = b"".join(encode_frame(k, h, p) for k, h, p in frames)
    limits = Limits(1 << 20, 1 << 20)
    got = feed_all(FrameDecoder(limits), split(raw, cuts), limits)
    assert [(f.kind, f.header, bytes(f.payload)) for f in got] == [
        (k, json.loads(json.dumps(h)), p) for k, h, p in frames]


@FUZZ
@given(frames=st.lists(st.tuples(headers, st.binary(max_size=500), st.booleans()), min_size=1, max_size=8),
       cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_refused_frames_are_skipped_and_the_stream_stays_in_step(
    frames: list[tuple[dict[str, Any], bytes, bool]], cuts: list[int],
) -> None:
    """``admit`` sees every header before its payload; refused payloads are dropped unread."""
    assume(all("n" not in h for h, _, _ in frames))
    tagged = [({**h, "n": i}, p, keep) for i, (h, p, keep) in enumerate(frames)]
    verdicts = {i: keep for i, (_, _, keep) in enumerate(tagged)}
    seen: list[tuple[int, int]] = []

    def admit(kind: Kind, header: dict[str, Any], body_len: int) -> bool:
        seen.append((header["n"], body_len))
        return verdicts[header["n"]]

    raw = b"".join(encode_frame(Kind.REQUEST, h, p) for h, p, _ in tagged)
    decoder = FrameDecoder(Limits(1 << 20, 1 << 20), admit=admit)
    got = feed_all(decoder, split(raw, cuts), Limits(1 << 20, 1 << 20))
    assert seen == [(i, len(p)) for i, (_, p, _) in enumerate(tagged)]
    assert [(f.header["n"], bytes(f.payload)) for f in got] == [(i, p) for i, (_, p, keep) in enumerate(tagged) if keep]
    assert decoder.buffered() == 0


def test_encoding_refuses_non_json_numbers() -> None:
    with pytest.raises(ValueError):
        encode_frame(Kind.REQUEST, {"timeout": float("nan")})
