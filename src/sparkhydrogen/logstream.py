"""Stream every rank's output to the driver, live, prefixed with its rank; nothing silently lost.

Task side, :class:`OutputCapture` catches a rank's output in two places:

* Python level: ``sys.stdout``/``sys.stderr`` are replaced by line writers, so
  ``print``, tracebacks and ``logging`` handlers that write to them are caught;
* file-descriptor level: fds 1 and 2 are redirected into pipes, so output of C
  extensions (torch, gloo), of ``os.write`` and of child processes that inherit
  the fds is caught too.

Lines go into one bounded buffer; a sender thread ships them in batches through a
``send(stream, text, dropped)`` callable (``CoordinatorClient.log``). When the
buffer is full the oldest line is dropped and counted, and the next batch carries
the count: whoever writes never blocks, and the driver says how many lines it lost.

Driver side, :class:`LogPrinter` is the coordinator's ``on_log`` hook: it queues
records and a thread prints them as ``[rank N] line`` to the driver's stdout or
stderr (the stream the rank wrote to).

Example:
    >>> lines = []
    >>> with OutputCapture(lambda stream, text, dropped: lines.append((stream, text)), capture_fds=False):
    ...     print("hello")
    >>> lines
    [('stdout', 'hello\\n')]
"""

from __future__ import annotations

import collections
import ctypes
import io
import os
import queue
import select
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = [
    "STDOUT",
    "STDERR",
    "LineBuffer",
    "OutputCapture",
    "LogPrinter",
    "format_record",
]

STDOUT = "stdout"
STDERR = "stderr"

#: Lines a rank may queue before the oldest are dropped (and counted).
DEFAULT_MAX_LINES = 10_000
#: Longest line kept whole; longer output without a newline is cut into pieces of this size.
MAX_LINE_CHARS = 64 * 1024
#: Upper bound of the text one log frame carries.
MAX_BATCH_CHARS = 256 * 1024
#: When a capture stops, how long it waits for the fd's other writers (child processes) to close it.
STOP_LINGER_SECONDS = 2.0
#: After that (or once the capture stops), what is still read: at most this many bytes ...
DRAIN_MAX_BYTES = 1024 * 1024
#: ... within this many seconds; a process that still writes after that is cut off, and the driver told.
DRAIN_MAX_SECONDS = 1.0

Send = Callable[[str, str, int], None]


class LineBuffer:
    """Bounded FIFO of ``(stream, line)``: when full, the oldest line is dropped and counted.

    Thread-safe; :meth:`put` never blocks.

    >>> buf = LineBuffer(max_lines=2)
    >>> for n in range(5):
    ...     buf.put("stdout", f"line {n}")
    >>> buf.take(timeout=0)
    ([('stdout', 'line 3'), ('stdout', 'line 4')], 3)
    """

    def __init__(self, max_lines: int = DEFAULT_MAX_LINES) -> None:
        if isinstance(max_lines, bool) or not isinstance(max_lines, int) or max_lines < 1:
            raise ValueError(f"max_lines must be a positive int, got {max_lines!r}")
        self.max_lines = max_lines
        self._lines: collections.deque[tuple[str, str]] = collections.deque()
        self._dropped = 0
        self._closed = False
        self._cond = threading.Condition()

    def put(self, stream: str, line: str) -> None:
        with self._cond:
            if len(self._lines) >= self.max_lines:
                self._lines.popleft()
                self._dropped += 1
            self._lines.append((stream, line))
            self._cond.notify()

    def close(self) -> None:
        """No more lines will come; :meth:`take` returns what is left, then ``([], 0)``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> tuple[list[tuple[str, str]], int]:
        """Wait (up to ``timeout`` s) for lines; return all of them and the lines dropped before them."""
        with self._cond:
            if not self._lines and not self._closed:
                self._cond.wait(timeout)
            lines, dropped = list(self._lines), self._dropped
            self._lines.clear()
            self._dropped = 0
            return lines, dropped

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed and not self._lines


class _Splitter:
    """Turns chunks of text into whole lines (without the newline), capping very long lines."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._partial = ""

    def feed(self, text: str) -> None:
        if not text:
            return
        text = self._partial + text
        *lines, self._partial = text.split("\n")
        for line in lines:
            self._emit(line)
        while len(self._partial) > MAX_LINE_CHARS:
            self._emit(self._partial[:MAX_LINE_CHARS])
            self._partial = self._partial[MAX_LINE_CHARS:]

    def end(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = ""


class _LineWriter(io.TextIOBase):
    """Stands in for ``sys.stdout``/``sys.stderr``: every whole line goes to the buffer at once.

    Objects made during the capture may keep the writer (a ``logging.StreamHandler``
    created in ``train`` does, in a Python worker Spark reuses); once the capture
    ends, the writer passes text on to the stream it replaced, so nothing written
    through it later is lost (and a later capture catches it at the fd level).
    """

    def __init__(self, stream: str, emit: Callable[[str], None], fd: int, original: Any) -> None:
        super().__init__()
        self._stream = stream
        self._fd = fd
        self._lock = threading.Lock()
        self._splitter = _Splitter(emit)
        self._original = original
        self._ended = False

    @property
    def name(self) -> str:
        return f"<sparkhydrogen {self._stream}>"

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd  # still captured: the fd itself is redirected too

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self._lock:
            if not self._ended:
                self._splitter.feed(text)
                return len(text)
        self._original.write(text)  # the capture is over: behave like the stream we replaced
        self._original.flush()
        return len(text)

    def flush(self) -> None:
        pass

    def end(self) -> None:
        with self._lock:
            self._splitter.end()
            self._ended = True


def _flush_c_stdio() -> None:
    """Flush C's stdio buffers so nothing written before a redirection lands after it."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no libc symbols here: nothing buffered that we can reach
        pass


class _FdPump:
    """Redirects fd 1 or 2 into a pipe whose reader thread feeds the buffer; restores it on stop.

    Child processes inherit the pipe, so one that outlives the capture (a daemon the
    rank started) keeps it open, and may keep writing. :meth:`stop` is bounded all the
    same: it waits ``linger`` seconds for EOF, reading as usual; from the moment it is
    called at most :data:`DRAIN_MAX_BYTES` more are read, and once it signals the
    reader, at most for :data:`DRAIN_MAX_SECONDS`. What such a process writes after
    that is not captured, and a last line says so.
    """

    def __init__(self, fd: int, stream: str, emit: Callable[[str], None]) -> None:
        self.fd = fd
        self._emit = emit
        self._splitter = _Splitter(emit)
        self._stopping = threading.Event()
        self._read_after_stop = 0
        self._saved = os.dup(fd)
        read_end, write_end = os.pipe()
        self._stop_r, self._stop_w = os.pipe()
        self._read = read_end
        _flush_c_stdio()
        os.dup2(write_end, fd)  # fd (inheritable) now writes into the pipe; children inherit it
        os.close(write_end)
        self._thread = threading.Thread(target=self._pump, name=f"sparkhydrogen-{stream}-pump", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        decoder = _decoder()
        cut_off = False
        try:
            while True:
                ready, _, _ = select.select([self._stop_r, self._read], [], [])
                if self._stop_r in ready:  # checked first: a writer that never pauses cannot keep us here
                    cut_off = self._drain(decoder)
                    break
                chunk = os.read(self._read, 65536)
                if not chunk:
                    break
                self._feed(decoder, chunk)
                if self._over_budget():
                    cut_off = True
                    break
            self._splitter.feed(decoder.decode(b"", final=True))
            self._splitter.end()
            if cut_off:
                self._emit(f"[sparkhydrogen] a process that outlived the capture still writes to fd {self.fd}: "
                           f"stopped reading after {self._read_after_stop} more bytes, the rest is not captured")
        finally:
            os.close(self._read)

    def _feed(self, decoder: Any, chunk: bytes) -> None:
        if self._stopping.is_set():
            self._read_after_stop += len(chunk)
        self._splitter.feed(decoder.decode(chunk))

    def _over_budget(self) -> bool:
        return self._read_after_stop >= DRAIN_MAX_BYTES

    def _drain(self, decoder: Any) -> bool:
        """Read what the pipe holds now, within the budget; True if the writer was cut off."""
        os.set_blocking(self._read, False)
        deadline = time.monotonic() + DRAIN_MAX_SECONDS
        while True:
            if self._over_budget() or time.monotonic() >= deadline:
                return True
            try:
                chunk = os.read(self._read, min(65536, DRAIN_MAX_BYTES - self._read_after_stop))
            except BlockingIOError:
                return False
            if not chunk:
                return False
            self._feed(decoder, chunk)

    def stop(self, linger: float = STOP_LINGER_SECONDS) -> None:
        _stop_pumps([self], linger)

    # the three steps of a stop, so that several pumps share one linger (see _stop_pumps)
    def _release(self) -> None:
        """Give the fd back; from now on the reader's byte budget counts down."""
        _flush_c_stdio()
        # The rank's own last output is at most a pipe's worth (writers block on a full pipe),
        # far below the budget: only a process that outlives the capture can exhaust it.
        self._stopping.set()
        os.dup2(self._saved, self.fd)  # our end of the pipe is gone: the reader sees EOF
        os.close(self._saved)

    def _wait(self, timeout: float) -> None:
        self._thread.join(max(timeout, 0.0))

    def _cut_off(self) -> None:
        if self._thread.is_alive():  # some child process still holds the write end
            os.write(self._stop_w, b"x")
            self._thread.join(DRAIN_MAX_SECONDS + 5.0)  # the drain is bounded; this only guards against a bug
        if self._thread.is_alive():  # never seen: leave the stop pipe to the (daemon) thread rather than race it
            return
        os.close(self._stop_r)
        os.close(self._stop_w)


def _stop_pumps(pumps: list[_FdPump], linger: float = STOP_LINGER_SECONDS) -> None:
    """Stop pumps together: one ``linger`` for all (a child that holds fd 1 usually holds fd 2 too)."""
    for pump in pumps:
        pump._release()
    deadline = time.monotonic() + linger
    for pump in pumps:
        pump._wait(deadline - time.monotonic())
    for pump in pumps:
        pump._cut_off()


def _decoder() -> Any:
    import codecs

    return codecs.getincrementaldecoder("utf-8")(errors="replace")


class OutputCapture:
    """Capture this process's stdout/stderr (Python and fd level) and stream it through ``send``.

    ``send(stream, text, dropped)`` receives whole lines (``text`` ends with a
    newline) of one stream, in order, on a background thread; ``dropped`` counts the
    lines discarded just before them because more than ``max_lines`` were waiting.
    If ``send`` raises, streaming stops (the lines are counted as dropped locally).

    Use as a context manager; leaving it restores the streams and returns only once
    every captured line has been handed to ``send``. ``tail(stream)`` gives the last
    ``tail_lines`` lines of a stream afterwards (for error messages).

    Example:
        >>> with OutputCapture(client.log):                            # doctest: +SKIP
        ...     print("epoch 1")      # reaches the driver as "[rank 3] epoch 1"
    """

    def __init__(self, send: Send, *, max_lines: int = DEFAULT_MAX_LINES, capture_fds: bool = True,
                 tail_lines: int = 20) -> None:
        if not callable(send):
            raise TypeError(f"send must be callable, got {type(send).__name__}")
        self._send = send
        self.buffer = LineBuffer(max_lines)
        self._capture_fds = capture_fds
        self._tails: dict[str, collections.deque[str]] = {
            STDOUT: collections.deque(maxlen=tail_lines), STDERR: collections.deque(maxlen=tail_lines)}
        self._tail_lock = threading.Lock()
        self._pumps: list[_FdPump] = []
        self._writers: list[_LineWriter] = []
        self._saved_sys: tuple[TextIO, TextIO] | None = None
        self._sender: threading.Thread | None = None
        self.sent_lines = 0
        self.lost_lines = 0  # dropped here, or unsent because ``send`` failed
        self.send_error: BaseException | None = None

    def _emitter(self, stream: str) -> Callable[[str], None]:
        tail = self._tails[stream]

        def emit(line: str) -> None:
            self.buffer.put(stream, line)
            with self._tail_lock:
                tail.append(line)

        return emit

    def tail(self, stream: str = STDERR) -> list[str]:
        with self._tail_lock:
            return list(self._tails[stream])

    # lifecycle -------------------------------------------------------------
    def start(self) -> OutputCapture:
        if self._sender is not None:
            raise RuntimeError("this OutputCapture has already been started")
        self._sender = threading.Thread(target=self._run_sender, name="sparkhydrogen-log-sender", daemon=True)
        self._sender.start()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, ValueError, OSError):
                pass
        if self._capture_fds:
            for fd, stream in ((1, STDOUT), (2, STDERR)):
                try:
                    self._pumps.append(_FdPump(fd, stream, self._emitter(stream)))
                except OSError:  # the fd is not open here: Python-level capture still works
                    pass
        self._saved_sys = (sys.stdout, sys.stderr)
        self._writers = [_LineWriter(STDOUT, self._emitter(STDOUT), 1, sys.stdout),
                         _LineWriter(STDERR, self._emitter(STDERR), 2, sys.stderr)]
        sys.stdout, sys.stderr = self._writers
        return self

    def stop(self) -> None:
        """Restore the streams, flush every captured line through ``send``, and stop the sender."""
        if self._saved_sys is not None:
            for writer in self._writers:
                writer.end()
            for original in self._saved_sys:  # objects that kept the original streams may hold buffered text
                try:
                    original.flush()
                except (AttributeError, ValueError, OSError):
                    pass
            if sys.stdout is self._writers[0]:
                sys.stdout = self._saved_sys[0]
            if sys.stderr is self._writers[1]:
                sys.stderr = self._saved_sys[1]
            self._saved_sys = None
        _stop_pumps(self._pumps)
        self._pumps = []
        self.buffer.close()
        if self._sender is not None:
            self._sender.join()

    def __enter__(self) -> OutputCapture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # sender ----------------------------------------------------------------
    def _run_sender(self) -> None:
        while not self.buffer.closed:
            lines, dropped = self.buffer.take()
            if self.send_error is not None:
                self.lost_lines += len(lines) + dropped
                continue
            self.lost_lines += dropped
            for stream, text, count in _batches(lines):
                try:
                    self._send(stream, text, dropped)
                except Exception as exc:  # the coordinator is gone: the gang fails anyway, keep writers unblocked
                    self.send_error = exc
                    self.lost_lines += len(lines)
                    break
                self.sent_lines += count
                lines = lines[count:]
                dropped = 0


def _batches(lines: list[tuple[str, str]]) -> list[tuple[str, str, int]]:
    """Group consecutive lines of one stream into ``(stream, text, line_count)`` batches of bounded size."""
    out: list[tuple[str, str, int]] = []
    current: str | None = None
    parts: list[str] = []
    size = 0
    for stream, line in lines:
        if parts and (stream != current or size + len(line) + 1 > MAX_BATCH_CHARS):
            out.append((current or STDOUT, "\n".join(parts) + "\n", len(parts)))
            parts, size = [], 0
        current = stream
        parts.append(line)
        size += len(line) + 1
    if parts:
        out.append((current or STDOUT, "\n".join(parts) + "\n", len(parts)))
    return out


# driver side -------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """The fields of :class:`~sparkhydrogen.coordinator.server.LogRecord` the printer uses."""

    gang_attempt: int
    rank: int
    stream: str
    text: str
    dropped: int = 0


def format_record(record: Any) -> str:
    """Prefix every line of a streamed record with its rank (and attempt, after a retry).

    >>> format_record(_Record(0, 2, "stdout", "loss 0.5\\nloss 0.4\\n"))
    '[rank 2] loss 0.5\\n[rank 2] loss 0.4\\n'
    >>> print(format_record(_Record(1, 0, "stderr", "boom\\n", dropped=7)), end="")
    [rank 0, attempt 1] ... 7 line(s) dropped: the rank wrote faster than they could be streamed ...
    [rank 0, attempt 1] boom
    """
    if record.gang_attempt == 0:
        prefix = f"[rank {record.rank}]"
    else:
        prefix = f"[rank {record.rank}, attempt {record.gang_attempt}]"
    out = []
    if record.dropped:
        out.append(f"{prefix} ... {record.dropped} line(s) dropped: the rank wrote faster than they could be "
                   "streamed ...\n")
    text = record.text[:-1] if record.text.endswith("\n") else record.text
    out.extend(f"{prefix} {line}\n" for line in text.split("\n"))
    return "".join(out)


class LogPrinter:
    """Driver-side ``on_log`` hook: prints ranks' output, prefixed, from its own thread.

    The coordinator calls the hook on its event loop, which must never wait on a
    slow terminal; records are queued here and written by a daemon thread to
    ``sys.stdout`` (stdout records) or ``sys.stderr`` (everything else), looked up
    when written. :meth:`close` prints what is queued and stops the thread.

    Example:
        >>> printer = LogPrinter()
        >>> handle = server.add_gang(4, on_log=printer)                    # doctest: +SKIP
        >>> printer.close()
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sparkhydrogen-log-printer", daemon=True)
        self._thread.start()
        self.records = 0

    def __call__(self, record: Any) -> None:
        self._queue.put(record)

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            self.records += 1
            out = sys.stdout if record.stream == STDOUT else sys.stderr
            try:
                out.write(format_record(record))
                out.flush()
            except (ValueError, OSError):  # the driver's stream is closed: nothing left to print to
                pass

    def close(self, timeout: float = 30.0) -> None:
        """Print everything queued so far, then stop."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
