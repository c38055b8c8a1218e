"""Failures named right on real loopback sockets: a report always arrives however large its error, a child's
unpicklable result is a PayloadError, and an unreachable host is found by the kernel's TCP keepalive."""

from __future__ import annotations

import json
import socket
import traceback
from typing import Any

import pytest
from kit import joined, start_ranks, wait_pending

from sparkhydrogen.coordinator.client import MAX_REPORT_BYTES
from sparkhydrogen.coordinator.peer import keepalive_for
from sparkhydrogen.coordinator.server import CoordinatorServer
from sparkhydrogen.errors import ErrorInfo, GangAbortedError, PayloadError

pytestmark = pytest.mark.timeout(60)

HEADER_LIMIT = 64 * 1024  # the coordinator's control-header limit after authentication


def _raised(exc: Exception) -> ErrorInfo:
    """``exc`` raised from a deep, chained stack, as a rank's session reports it (type, message, traceback)."""

    def deep(n: int) -> None:
        if n == 0:
            try:
                raise KeyError("inner cause " + "k" * 20_000)
            except KeyError as inner:
                raise exc from inner
        deep(n - 1)

    try:
        deep(400)
    except Exception as caught:
        return ErrorInfo.from_exception(caught, 0, "".join(traceback.format_exception(caught)))
    raise AssertionError("unreachable")


@pytest.mark.parametrize("filler", ["x", "\u00e9\x00"], ids=["ascii", "escaped"])
def test_a_megabyte_error_reaches_the_peers_with_its_head_and_tail(server: CoordinatorServer, filler: str) -> None:
    message = "Error(s) in loading state_dict: Missing key(s): " + filler * 500_000 + " END-OF-MESSAGE"
    report = _raised(RuntimeError(message))
    assert len(json.dumps(report.to_json())) > 1_000_000  # far over the coordinator's 64 KiB header limit
    handle = server.add_gang(world_size=2)
    peer = start_ranks(handle, lambda c, r: c.collective("barrier"), ranks=[1])
    failing = joined(handle, 0)
    wait_pending(server, handle, {1})
    failing.fail(report)
    outcome = peer.join()[1]
    failing.close()
    with pytest.raises(GangAbortedError, match=r"aborted: rank 0 raised RuntimeError: Error\(s\) in loading "
                                               r"state_dict: Missing key\(s\)") as info:
        outcome.get()
    cause = info.value.cause
    assert cause is not None and (cause.type, cause.rank) == ("RuntimeError", 0)
    assert cause.message.endswith(" END-OF-MESSAGE")  # the tail is kept
    assert "spark-hydrogen cut" in cause.message and "characters of this message" in cause.message
    assert cause.traceback.rstrip().endswith(" END-OF-MESSAGE")  # the exception line, at the traceback's end
    assert cause.traceback.startswith("Traceback (most recent call last)")  # and where it started
    assert "characters of this traceback" in cause.traceback
    last = server.last_failure(handle.gang_id)
    assert last is not None and last.type == "RuntimeError" and last.message == cause.message


def test_a_small_error_is_sent_as_it_is() -> None:
    report = ErrorInfo("ValueError", "bad shard 17", 3, "Traceback ...\nValueError: bad shard 17")
    assert report.clipped(MAX_REPORT_BYTES) == report


@pytest.mark.parametrize("size", [10_000, 100_000, 3_000_000])
def test_a_clipped_report_fits_the_header_and_says_how_much_was_cut(size: int) -> None:
    report = ErrorInfo("ValueError", "m" * size + "\u2603" * size, 1, "t" * size * 2, extra={"note": "n" * size})
    clipped = report.clipped(MAX_REPORT_BYTES)
    assert len(json.dumps(clipped.to_json(), separators=(",", ":"))) <= MAX_REPORT_BYTES < HEADER_LIMIT
    assert (clipped.type, clipped.rank) == ("ValueError", 1)
    assert clipped.message.startswith("m" * 100) and clipped.message.endswith("\u2603" * 100)
    cut = len(report.message) - len(clipped.message.replace(_note_of(clipped.message), ""))
    assert f"spark-hydrogen cut {cut:,} of {len(report.message):,} characters of this message" in clipped.message


def _note_of(text: str) -> str:
    start = text.index("\n[... spark-hydrogen cut")
    return text[start: text.index("...]\n", start) + 5]


def test_a_framework_child_whose_result_cannot_be_pickled_raises_a_payload_error() -> None:
    """The fresh-process runner of framework ranks (TensorFlow's), for real: a child process returning a lock."""
    from sparkhydrogen.frameworks import Framework, GangLayout
    from sparkhydrogen.frameworks._child import run_in_child

    def locked() -> Any:
        import threading

        return threading.Lock()

    with pytest.raises(PayloadError, match=r"^return value of rank 1 of type _thread\.lock cannot be pickled"):
        run_in_child(Framework(), GangLayout(rank=1, hosts=("h", "h")), locked, (), {})
    assert run_in_child(Framework(), GangLayout(rank=1, hosts=("h", "h")), lambda: [1, 2], (), {}) == [1, 2]


# ------------------------------------------------------------------ liveness without the GIL


@pytest.mark.parametrize("timeout", [8.0, 2.0])
def test_the_coordinator_turns_tcp_keepalive_on_with_settings_from_the_heartbeat_timeout(
        make_server: Any, timeout: float) -> None:
    """An unreachable host is found by the kernel's keepalive (it answers without the GIL), not by heartbeats."""
    server = make_server(liveness_timeout=timeout)
    expected = keepalive_for(timeout)
    assert expected.detects_within <= timeout + 3  # found about when a heartbeat verdict used to come
    with socket.create_connection(server.address, timeout=10) as sock:
        assert sock.recv(1)  # the server's HELLO: it has accepted and set the connection up

        def options() -> dict[str, int]:
            (peer,) = server._connections
            accepted = peer.transport.get_extra_info("socket")
            names = {"TCP_KEEPIDLE": socket.IPPROTO_TCP, "TCP_KEEPINTVL": socket.IPPROTO_TCP,
                     "TCP_KEEPCNT": socket.IPPROTO_TCP, "TCP_USER_TIMEOUT": socket.IPPROTO_TCP}
            found = {"SO_KEEPALIVE": accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)}
            for name, level in names.items():
                if hasattr(socket, name):
                    found[name] = accepted.getsockopt(level, getattr(socket, name))
            return found

        found = server._on_loop(options)
    assert found.pop("SO_KEEPALIVE") == 1
    want = {"TCP_KEEPIDLE": expected.idle, "TCP_KEEPINTVL": expected.interval, "TCP_KEEPCNT": expected.count,
            "TCP_USER_TIMEOUT": expected.user_timeout * 1000}
    assert found == {name: want[name] for name in found}
