"""Output capture and streaming (sparkhydrogen.logstream) in this process: no Spark, no torch.

The sender is a plain function collecting what it is given; where a test needs the
sender to be slow, it blocks on an Event the test releases.
"""

from __future__ import annotations

import doctest
import json
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from sparkhydrogen import logstream
from sparkhydrogen.coordinator.server import LogRecord
from sparkhydrogen.logstream import LineBuffer, LogPrinter, OutputCapture, format_record

pytestmark = pytest.mark.timeout(60)


class Collected:
    """A ``send`` that keeps every batch: (stream, text, dropped)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[tuple[str, str, int]] = []
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, stream: str, text: str, dropped: int) -> None:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        self.batches.append((stream, text, dropped))

    def lines(self, stream: str) -> list[str]:
        return [line for s, text, _ in self.batches if s == stream for line in text.splitlines()]

    @property
    def dropped(self) -> int:
        return sum(d for _, _, d in self.batches)


def test_doctests() -> None:
    result = doctest.testmod(logstream)
    assert result.attempted > 0 and result.failed == 0


def test_buffer_drops_the_oldest_lines_and_counts_them() -> None:
    buf = LineBuffer(max_lines=3)
    for n in range(10):
        buf.put("stdout", str(n))
    assert buf.take(timeout=0) == ([("stdout", "7"), ("stdout", "8"), ("stdout", "9")], 7)
    assert buf.take(timeout=0) == ([], 0)  # the count was handed over once


def test_buffer_close_ends_take() -> None:
    buf = LineBuffer()
    buf.put("stderr", "last")
    buf.close()
    assert buf.take() == ([("stderr", "last")], 0)
    assert buf.closed and buf.take() == ([], 0)


def test_buffer_size_is_checked() -> None:
    with pytest.raises(ValueError, match="max_lines must be a positive int"):
        LineBuffer(0)


def test_python_level_output_print_stderr_and_logging(capfd: pytest.CaptureFixture[str]) -> None:
    sent = Collected()
    log = logging.getLogger("sparkhydrogen.tests.logstream")
    with OutputCapture(sent):
        print("hello from print")
        print("to stderr", file=sys.stderr)
        sys.stdout.write("partial ")
        sys.stdout.write("line\n")
        handler = logging.StreamHandler()  # made inside: writes to the captured sys.stderr
        log.addHandler(handler)
        try:
            log.warning("a logging record")
        finally:
            log.removeHandler(handler)
        print("no newline at the end", end="")
    assert sent.lines("stdout") == ["hello from print", "partial line", "no newline at the end"]
    assert sent.lines("stderr") == ["to stderr", "a logging record"]
    assert capfd.readouterr() == ("", "")  # nothing leaked past the capture


def test_fd_level_output_and_child_processes_are_captured() -> None:
    sent = Collected()
    with OutputCapture(sent):
        os.write(1, b"raw fd 1\n")
        os.write(2, b"raw fd 2\n")
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"],
                       check=True)
    assert sent.lines("stdout") == ["raw fd 1", "child out"]
    assert sent.lines("stderr") == ["raw fd 2", "child err"]


def test_streams_are_restored_afterwards(capfd: pytest.CaptureFixture[str]) -> None:
    before = sys.stdout, sys.stderr
    with OutputCapture(Collected()):
        pass
    assert (sys.stdout, sys.stderr) == before
    print("after")
    os.write(2, b"after fd 2\n")
    assert capfd.readouterr() == ("after\n", "after fd 2\n")


def test_overflow_drops_lines_and_says_how_many() -> None:
    gate = threading.Event()
    sent = Collected(gate)
    capture = OutputCapture(sent, max_lines=5, capture_fds=False).start()
    try:
        print("first")
        assert sent.entered.wait(10)  # the sender holds "first" and is stuck sending it
        for n in range(100):
            print(f"line {n}")  # never blocks, though nothing can be sent
    finally:
        gate.set()
        capture.stop()
    assert sent.lines("stdout") == ["first"] + [f"line {n}" for n in range(95, 100)]
    assert sent.dropped == 95
    assert [d for _, _, d in sent.batches] == [0, 95]  # the count travels with the first lines after the gap
    assert capture.sent_lines == 6 and capture.lost_lines == 95


def test_a_failing_sender_never_blocks_the_writer() -> None:
    def broken(stream: str, text: str, dropped: int) -> None:
        raise ConnectionError("coordinator gone")

    capture = OutputCapture(broken, capture_fds=False)
    with capture:
        for n in range(50):
            print(n)
    assert isinstance(capture.send_error, ConnectionError)
    assert capture.lost_lines == 50 and capture.sent_lines == 0


def test_tail_keeps_the_last_lines() -> None:
    capture = OutputCapture(Collected(), tail_lines=2, capture_fds=False)
    with capture:
        for n in range(5):
            print(n, file=sys.stderr)
    assert capture.tail("stderr") == ["3", "4"]


def test_long_lines_are_cut_not_buffered_forever() -> None:
    sent = Collected()
    with OutputCapture(sent, capture_fds=False):
        sys.stdout.write("x" * (logstream.MAX_LINE_CHARS * 2 + 5))
    assert [len(line) for line in sent.lines("stdout")] == [logstream.MAX_LINE_CHARS] * 2 + [5]


def test_format_prefixes_every_line_with_the_rank() -> None:
    assert format_record(LogRecord(0, 3, "stdout", "a\nb\n")) == "[rank 3] a\n[rank 3] b\n"
    assert format_record(LogRecord(2, 0, "stderr", "c\n", dropped=4)) == (
        "[rank 0, attempt 2] ... 4 line(s) dropped: the rank wrote faster than they could be streamed ...\n"
        "[rank 0, attempt 2] c\n")


def test_printer_writes_each_stream_to_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    printer = LogPrinter()
    records: list[Any] = [LogRecord(0, 1, "stdout", "out line\n"), LogRecord(0, 0, "stderr", "err line\n")]
    for record in records:
        printer(record)
    printer.close()
    assert capsys.readouterr() == ("[rank 1] out line\n", "[rank 0] err line\n")
    assert printer.records == 2


KEPT_WRITER = """
import json, logging, sys
from sparkhydrogen.logstream import OutputCapture
got = []
send = lambda stream, text, dropped: got.append((stream, text))
log = logging.getLogger("kept")
with OutputCapture(send):
    log.addHandler(logging.StreamHandler())  # holds the capture's stderr writer, as basicConfig() would
log.warning("after the capture")
with OutputCapture(send):  # a later capture in the same (reused) process
    log.warning("in the next capture")
print(json.dumps(got))
"""


def test_writers_kept_after_the_capture_pass_text_on() -> None:
    # a fresh interpreter, whose sys.stderr writes to fd 2 as in a Spark Python worker
    done = subprocess.run([sys.executable, "-c", KEPT_WRITER], capture_output=True, text=True, timeout=50, check=True)
    assert done.stderr == "after the capture\n"  # passed on to the stream it replaced
    assert json.loads(done.stdout) == [["stderr", "in the next capture\n"]]  # caught again, at the fd level


# stopping while a process that inherited the fd keeps writing ----------------------------

WRITE_FOREVER = """
import os, sys, time
fd, line = int(sys.argv[1]), b"y" * 99 + b"\\n"
deadline = time.monotonic() + 40  # bounded: ends by itself even if nothing stops it
try:
    while time.monotonic() < deadline:
        os.write(fd, line * 650)
except BrokenPipeError:  # the capture stopped reading: what a long-lived grandchild sees
    pass
"""


def _wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_stop_is_bounded_in_time_and_bytes_while_a_child_keeps_writing() -> None:
    lines: list[str] = []
    fd = os.open(os.devnull, os.O_WRONLY)  # a spare fd, so pytest's own fds 1 and 2 are left alone
    try:
        pump = logstream._FdPump(fd, "stdout", lines.append)
        writer = subprocess.Popen([sys.executable, "-c", WRITE_FOREVER, str(fd)], pass_fds=(fd,))
        try:
            _wait_for(lambda: len(lines) > 1000)
            seen = len(lines)
            start = time.monotonic()
            pump.stop(linger=0.5)
            elapsed = time.monotonic() - start
            after = lines[seen:]
        finally:
            writer.kill()
            writer.wait()
    finally:
        os.close(fd)
    assert elapsed < 0.5 + logstream.DRAIN_MAX_SECONDS + 2.0, f"stop() took {elapsed:.1f} s"
    read_after = sum(len(line) + 1 for line in after[:-1])
    assert read_after <= logstream.DRAIN_MAX_BYTES + logstream.MAX_LINE_CHARS
    assert "still writes to fd" in after[-1] and "not captured" in after[-1]


def test_stop_is_bounded_when_a_silent_grandchild_holds_the_pipe() -> None:
    sent = Collected()
    holder = None
    start = 0.0
    try:
        with OutputCapture(sent):
            # a daemon the rank started and never waited for: it keeps fds 1 and 2 open, writing nothing
            holder = subprocess.Popen([sys.executable, "-c", "import time; print('started', flush=True); "
                                       "time.sleep(40)"])
            _wait_for(lambda: "started" in sent.lines("stdout"))
            start = time.monotonic()
        elapsed = time.monotonic() - start
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    # one linger for fds 1 and 2 together (the holder has both), not one after the other
    assert elapsed < logstream.STOP_LINGER_SECONDS + 1.5, f"stop() took {elapsed:.1f} s"
    assert sent.lines("stdout") == ["started"]
