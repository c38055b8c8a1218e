"""Stacks on demand: the wire messages, the pure bookkeeping, and real loopback ranks (no Spark).

The loopback tests run real clients against a real coordinator; a rank that never
answers is a real socket that attaches a stack channel and stays silent.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from kit import HOST, connect, joined, wait_until

from sparkhydrogen.coordinator.client import CoordinatorClient
from sparkhydrogen.coordinator.protocol import (
    PREAUTH_LIMITS,
    Frame,
    FrameDecoder,
    Kind,
    RequestError,
    StacksAnswer,
    StacksChannel,
    decode_request,
    encode_frame,
    stacks_channel_reply,
    stacks_request,
)
from sparkhydrogen.coordinator.server import CoordinatorServer
from sparkhydrogen.coordinator.stackchannel import StackResponder, dump_refusal
from sparkhydrogen.coordinator.stacks import MAX_OPEN_REQUESTS, DumpStream, RankQuery, StackDesk, format_stacks
from sparkhydrogen.errors import GangNotFoundError, ProtocolError, RegistrationError

KEY = (0, 0, 0)
DUMP = b"Timeout (0:00:01)!\nThread 0x00007f01 (most recent call first):\n  File \"job.py\", line 9 in hold_gil\n"


# -- wire -------------------------------------------------------------------------------


def test_stacks_channel_request_round_trips() -> None:
    frame = Frame(Kind.REQUEST, {"op": "stacks_channel", "gang_attempt": 1, "stage_id": 4, "rank": 2,
                                 "task_attempt_id": 17, "pid": 99, "dump_after": 1.5, "no_dump": ""})
    assert decode_request(frame) == StacksChannel(1, 4, 2, 17, 99, 1.5, "")


@pytest.mark.parametrize("bad", [0, -1, True, "1", 1e9])
def test_stacks_channel_refuses_a_bad_dump_after(bad: Any) -> None:
    frame = Frame(Kind.REQUEST, {"op": "stacks_channel", "gang_attempt": 0, "stage_id": 0, "rank": 0,
                                 "task_attempt_id": 0, "pid": 1, "dump_after": bad})
    with pytest.raises(RequestError, match="dump_after must be"):
        decode_request(frame)


def test_stacks_channel_needs_integer_ids() -> None:
    with pytest.raises(ProtocolError, match="rank must be an integer"):
        decode_request(Frame(Kind.REQUEST, {"op": "stacks_channel", "gang_attempt": 0, "stage_id": 0,
                                            "rank": "one", "task_attempt_id": 0, "pid": 1}))


def test_stacks_answer_carries_text_and_checks_its_id() -> None:
    answer = decode_request(Frame(Kind.REQUEST, {"op": "stacks", "id": 7}, b"Thread main\n  f()\n"))
    assert answer == StacksAnswer(7, "Thread main\n  f()\n")
    for bad in (0, -3, None, True, "7"):
        with pytest.raises(RequestError, match="id must be a positive integer"):
            decode_request(Frame(Kind.REQUEST, {"op": "stacks", "id": bad}))


def test_server_frames_of_the_stack_channel() -> None:
    frames = list(FrameDecoder(PREAUTH_LIMITS).feed(stacks_request(12) + stacks_channel_reply()))
    assert [(f.kind, f.header) for f in frames] == [(Kind.REQUEST, {"op": "stacks", "id": 12}),
                                                    (Kind.REPLY, {"op": "stacks_channel"})]


# -- faulthandler dumps ------------------------------------------------------------------


def test_dump_stream_splits_dumps_at_their_header_even_across_chunks() -> None:
    stream = DumpStream()
    data = DUMP + DUMP.replace(b"hold_gil", b"second")
    cut = len(DUMP) + 4  # the second header arrives in two pieces: "\nTime" | "out (..."
    assert stream.feed(data[:cut], now=1.0) is False
    assert stream.newest() is not None and "hold_gil" in stream.newest().text  # type: ignore[union-attr]
    assert stream.feed(data[cut:], now=2.0) is True
    whole, current = stream.last_complete, stream.current
    assert whole is not None and current is not None
    assert whole.complete and whole.at == 1.0 and "hold_gil" in whole.text and "second" not in whole.text
    assert not current.complete and current.at == 2.0 and current.text.startswith("Timeout (")
    assert "second" in current.text


def test_dump_stream_drops_bytes_that_are_no_dump() -> None:
    stream = DumpStream()
    assert stream.feed(b"\x00\xff garbage\nTimeo", now=1.0) is False
    assert stream.current is None
    stream.feed(b"ut (0:00:01)!\nThread 0x1 (most recent call first):\n", now=2.0)  # the header, split in two
    assert stream.current is not None and stream.current.text.startswith("Timeout (0:00:01)!")
    assert stream.current.at == 2.0
    assert stream.junk == len(b"\x00\xff garbage\n")
    other = DumpStream()
    other.feed(b"no header at all" * 10, now=0.0)
    assert other.newest() is None and other.junk > 0


def test_dump_stream_is_bounded_and_says_what_it_cut() -> None:
    stream = DumpStream(limit=200)
    stream.feed(DUMP + b"  File \"x.py\", line 1 in f\n" * 100, now=0.0)
    current = stream.current
    assert current is not None and current.dropped > 0 and "bytes of this dump were cut" in current.text
    assert len(current.text.encode()) < 400
    assert stream.feed(DUMP, now=1.0) is True  # the next header is still seen after a cut
    assert stream.last_complete is not None and stream.last_complete.dropped > 0


# -- the desk (pure) -------------------------------------------------------------------------


def _desk(*ranks: int, dump_after: float | None = 1.0) -> StackDesk[str]:
    desk: StackDesk[str] = StackDesk()
    for rank in ranks:
        desk.attach(f"chan{rank}", ("g", KEY, rank), dump_after, "" if dump_after else "watchdog off: TLS")
    return desk


def _queries(n: int) -> dict[int, RankQuery]:
    return {r: RankQuery(f"rank {r} (host h, pid {100 + r})") for r in range(n)}


def test_desk_asks_every_channel_and_settles_once_all_answer() -> None:
    desk = _desk(0, 1)
    request, sends = desk.ask("g", KEY, _queries(2), timeout=5.0, now=10.0)
    assert sends == [("chan0", request.request_id), ("chan1", request.request_id)]
    desk.answer(("g", KEY, 0), request.request_id, "stack of 0")
    assert not request.done.is_set()
    desk.answer(("g", KEY, 1), request.request_id + 1, "an unknown request")  # dropped
    desk.answer(("g", (1, 0, 0), 1), request.request_id, "another attempt")  # dropped
    assert not request.done.is_set()
    desk.answer(("g", KEY, 1), request.request_id, "stack of 1")
    assert request.done.is_set()
    assert desk.collect(request, now=10.1) == {0: "stack of 0", 1: "stack of 1"}
    assert desk.open_requests == 0


def test_desk_notes_ranks_it_cannot_ask() -> None:
    desk = _desk(0)
    queries = {0: RankQuery("rank 0"), 1: RankQuery("rank 1"), 2: RankQuery("rank 2", "rank 2 has finished")}
    request, sends = desk.ask("g", KEY, queries, timeout=5.0, now=0.0)
    assert [s[0] for s in sends] == ["chan0"]
    desk.detach("chan0")  # the rank ended before it answered
    assert request.done.is_set()
    out = desk.collect(request, now=1.0)
    assert "rank 0: its stack channel closed before it answered" in out[0]
    assert out[1].startswith("rank 1 has no stack channel")
    assert out[2] == "rank 2 has finished"
    assert len(desk) == 0


def test_desk_says_which_rank_gave_no_answer_and_why() -> None:
    desk = _desk(0)
    desk.attach("tls", ("g", KEY, 1), None, "the coordinator channel is TLS")
    request, _ = desk.ask("g", KEY, _queries(2), timeout=2.5, now=0.0)
    out = desk.collect(request, now=2.5)
    assert out[0].startswith("rank 0 (host h, pid 100) gave no answer within 2.5 s and faulthandler wrote no dump")
    assert "gave no answer within 2.5 s and writes no GIL-free dump (the coordinator channel is TLS)" in out[1]


def test_a_whole_dump_after_the_request_settles_a_rank_that_holds_the_gil() -> None:
    desk = _desk(0, 1)
    request, _ = desk.ask("g", KEY, _queries(2), timeout=30.0, now=100.0)
    desk.answer(("g", KEY, 0), request.request_id, "stack of 0")
    desk.feed("chan1", DUMP, now=100.5)  # the first dump is not known to be whole yet
    assert not request.done.is_set()
    desk.feed("chan1", DUMP.replace(b"hold_gil", b"later"), now=101.5)
    assert request.done.is_set()
    text = desk.collect(request, now=101.6)[1]
    assert text.startswith("rank 1 (host h, pid 101) has held the GIL for at least 1 s")
    assert "faulthandler dump written 1.1 s ago" in text and "line 9 in hold_gil" in text


def test_a_dump_from_before_the_request_is_shown_as_stale() -> None:
    desk = _desk(0)
    desk.feed("chan0", DUMP, now=1.0)
    desk.feed("chan0", DUMP, now=2.0)
    request, _ = desk.ask("g", KEY, _queries(1), timeout=5.0, now=60.0)
    assert not request.done.is_set()  # old dumps do not answer a new request
    text = desk.collect(request, now=65.0)[0]
    assert "faulthandler wrote no dump since the request" in text and "written 63.0 s ago" in text
    assert "hold_gil" in text


def test_the_desk_bounds_open_requests() -> None:
    desk = _desk(0)
    for _ in range(MAX_OPEN_REQUESTS):
        desk.ask("g", KEY, _queries(1), timeout=1.0, now=0.0)
    with pytest.raises(RuntimeError, match="stack requests are open already"):
        desk.ask("g", KEY, _queries(1), timeout=1.0, now=0.0)


def test_format_stacks_names_every_thread_and_its_functions() -> None:
    parked, release = threading.Event(), threading.Event()

    def parked_in_a_recognisable_function() -> None:
        parked.set()
        release.wait(30)

    thread = threading.Thread(target=parked_in_a_recognisable_function, name="worker-7", daemon=True)
    thread.start()
    try:
        assert parked.wait(30)
        text = format_stacks()
    finally:
        release.set()
        thread.join(30)
    assert text.startswith("Thread MainThread (ident ")
    assert "Thread worker-7 (ident " in text and "daemon), most recent call last:" in text
    assert "in parked_in_a_recognisable_function" in text
    assert "in test_format_stacks_names_every_thread_and_its_functions" in text


def test_dump_refusal_leaves_a_timer_others_own_alone() -> None:
    assert dump_refusal(1.0, tls=False, environ={}) == ""
    assert "TLS" in dump_refusal(1.0, tls=True, environ={})
    assert "gilDumpAfter=0" in dump_refusal(None, tls=False, environ={})
    assert "Spark's periodic traceback" in dump_refusal(
        1.0, tls=False, environ={"PYTHON_TRACEBACK_DUMP_INTERVAL_SECONDS": "10"})
    assert dump_refusal(1.0, tls=False, environ={"PYTHON_TRACEBACK_DUMP_INTERVAL_SECONDS": "0"}) == ""


# -- real loopback ranks -----------------------------------------------------------------------


def _silent_channel(server: CoordinatorServer, handle: Any, rank_client: CoordinatorClient, rank: int,
                    pid: int) -> CoordinatorClient:
    """A real stack channel for ``rank`` that never answers (nobody reads it)."""
    channel = connect(handle)
    channel.open_stack_channel({"rank": rank, "gang_attempt": 0, "stage_id": 0, "task_attempt_id": rank,
                                "pid": pid, "dump_after": 1.0}, timeout=10)
    return channel


def test_every_rank_answers_with_its_threads_and_a_silent_rank_is_bounded(server: CoordinatorServer) -> None:
    handle = server.add_gang(3, name="loop")
    clients = [joined(handle, r, task_attempt_id=r) for r in range(3)]
    responders = [StackResponder(clients[r], (handle.host, handle.port), handle.gang_id, handle.secret, rank=r,
                                 task_attempt_id=r, dump_after=None).start() for r in (0, 1)]
    silent = _silent_channel(server, handle, clients[2], 2, pid=__import__("os").getpid())
    parked, release = threading.Event(), threading.Event()

    def waiting_for_the_test_to_release_it() -> None:
        parked.set()
        release.wait(60)

    worker = threading.Thread(target=waiting_for_the_test_to_release_it, name="user-thread", daemon=True)
    worker.start()
    try:
        assert parked.wait(30) and all(r.attached for r in responders)
        out = server.stacks(handle.gang_id, timeout=1.0)
        assert sorted(out) == [0, 1, 2]
        for rank in (0, 1):
            assert "Thread user-thread" in out[rank] and "in waiting_for_the_test_to_release_it" in out[rank]
            # the answering thread leaves itself out (this process runs two ranks: the other one's is shown)
            assert out[rank].count("Thread sparkhydrogen-stacks") == 1
        assert out[2].startswith(f"rank 2 (host {HOST}, pid ") and "gave no answer within 1 s" in out[2]
        # the service keeps serving: the gang's collectives work, and so does the next request
        results: dict[int, int] = {}
        threads = [threading.Thread(target=lambda r=r: results.update({r: len(clients[r].collective("barrier"))}))
                   for r in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == {0: 0, 1: 0, 2: 0}
        assert "in waiting_for_the_test_to_release_it" in server.stacks(handle.gang_id, timeout=1.0)[0]
    finally:
        release.set()
        for responder in responders:
            responder.close()
        silent.close()
        for client in clients:
            client.close()
    wait_until(lambda: server.footprint()["stack_channels"] == 0, "every stack channel is forgotten")
    assert server.footprint()["stack_requests"] == 0
    assert not [t for t in threading.enumerate() if t.name == "sparkhydrogen-stacks"]


def test_garbage_on_a_stack_channel_hurts_nobody(server: CoordinatorServer) -> None:
    handle = server.add_gang(2)
    clients = [joined(handle, r, task_attempt_id=r) for r in range(2)]
    pid = __import__("os").getpid()
    noisy = _silent_channel(server, handle, clients[1], 1, pid)
    responder = StackResponder(clients[0], (handle.host, handle.port), handle.gang_id, handle.secret, rank=0,
                               task_attempt_id=0, dump_after=None).start()
    try:
        assert responder.attached
        raw = socket.socket(fileno=noisy.raw_fd())  # the channel's own socket: write bytes that are no dump
        try:
            raw.sendall(b"\x00\xff not a dump \x1e" * 1000)
        finally:
            raw.detach()
        # a malformed answer on a rank's own connection is refused; the connection stays
        clients[1]._send(encode_frame(Kind.REQUEST, {"op": "stacks", "id": "x"}))  # noqa: SLF001 - raw bytes
        out = server.stacks(handle.gang_id, timeout=1.0)
        assert "in test_garbage_on_a_stack_channel_hurts_nobody" in out[0]
        assert out[1].startswith("rank 1 (host") and "gave no answer within 1 s and faulthandler wrote no dump" \
            in out[1]
        assert "not a dump" not in out[1]  # bytes that are no faulthandler dump are dropped, never shown
    finally:
        responder.close()
        noisy.close()
        for client in clients:
            client.close()


def test_a_stack_channel_must_name_a_registered_running_rank(server: CoordinatorServer) -> None:
    handle = server.add_gang(2)
    client = joined(handle, 0, task_attempt_id=5)
    try:
        for wrong in ({"rank": 1, "task_attempt_id": 5}, {"rank": 0, "task_attempt_id": 6}):
            channel = connect(handle)
            try:
                with pytest.raises(RegistrationError, match="no running rank .* to attach a stack channel to"):
                    channel.open_stack_channel({"gang_attempt": 0, "stage_id": 0, "pid": __import__("os").getpid(),
                                                **wrong}, timeout=10)
            finally:
                channel.close()
        with pytest.raises(GangNotFoundError, match=r"has no running attempt in this coordinator; live gangs: "
                                             rf"{handle.gang_id} \(unnamed\)"):
            server.stacks("nope")
        with pytest.raises(ValueError, match="timeout must be"):
            server.stacks(handle.gang_id, timeout=0)
        out = server.stacks(handle.gang_id, timeout=1.0)
        assert out[0].startswith("rank 0 (host unit-host, pid ") and "has no stack channel" in out[0]
        assert out[1] == f"rank 1 has not joined gang {handle.gang_id[:8]} attempt 0 (stage 0.0) yet"
    finally:
        client.close()


def test_public_stacks_checks_its_arguments_and_names_what_is_live() -> None:
    import sparkhydrogen as h2

    with pytest.raises(TypeError, match="gang must be a gang id, a gang name or an object with a gang_id"):
        h2.stacks(42)
    with pytest.raises(ValueError, match="timeout must be a number of seconds"):
        h2.stacks("train", timeout=-1)

    class Status:
        gang_id = "0123456789abcdef"

    with pytest.raises(GangNotFoundError, match="no live gang '0123456789abcdef' in this application; live gangs: "
                                                "none. Under Spark Connect a gang's coordinator runs inside its"):
        h2.stacks(Status())


def test_under_tls_ranks_answer_and_say_there_is_no_gil_free_dump(make_server: Any) -> None:
    from sparkhydrogen.config import TlsConfig

    server = make_server(tls=TlsConfig(enabled=True))
    handle = server.add_gang(1)
    client = joined(handle, 0, task_attempt_id=0)
    responder = StackResponder(client, (handle.host, handle.port), handle.gang_id, handle.secret, rank=0,
                               task_attempt_id=0, tls_fingerprint=handle.tls_fingerprint).start()
    try:
        assert responder.attached and "TLS" in responder.no_dump
        out = server.stacks(handle.gang_id, timeout=5.0)
        assert "in test_under_tls_ranks_answer_and_say_there_is_no_gil_free_dump" in out[0]
    finally:
        responder.close()
        client.close()
    assert not responder.attached
