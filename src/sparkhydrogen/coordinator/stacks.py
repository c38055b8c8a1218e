"""Stacks on demand (``sparkhydrogen.stacks``): the pure parts, with no sockets and the clock passed in.

Every rank keeps a *stack channel*, a second authenticated connection to the
coordinator (see ``docs/protocol.md``, "Stacks"). The coordinator asks for stacks on
it; the rank answers on its own connection with every thread's Python stack. While
the rank's Python cannot run (a long C call holding the GIL), :mod:`faulthandler`'s
watchdog thread, which needs no GIL, writes a dump of every thread into the stack
channel instead; the coordinator keeps the latest one and shows it for a rank that
does not answer.

- :class:`DumpStream` splits what faulthandler writes on a channel into dumps.
- :class:`StackDesk` keeps the channels, the open requests and their answers, and
  words the result for each rank.
- :func:`format_stacks` is what a rank answers with.

Example:
    >>> desk: StackDesk[str] = StackDesk()
    >>> desk.attach("chan", ("g", (0, 0, 0), 0), dump_after=1.0)
    >>> request, send_to = desk.ask("g", (0, 0, 0), {0: RankQuery("rank 0")}, timeout=5.0, now=0.0)
    >>> send_to
    [('chan', 1)]
    >>> desk.answer(("g", (0, 0, 0), 0), 1, "Thread MainThread ...")
    >>> request.done.is_set(), desk.collect(request, now=0.1)
    (True, {0: 'Thread MainThread ...'})
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Generic, TypeVar

__all__ = [
    "ChannelKey",
    "DEFAULT_TIMEOUT",
    "Dump",
    "DumpStream",
    "MAX_ANSWER_BYTES",
    "MAX_DUMP_BYTES",
    "MAX_OPEN_REQUESTS",
    "RankQuery",
    "StackDesk",
    "StackRequest",
    "format_stacks",
]

E = TypeVar("E")

#: (gang id, attempt key, rank): the rank a stack channel speaks for.
ChannelKey = tuple[str, tuple[int, int, int], int]

#: Seconds ``stacks()`` waits for the ranks' answers by default.
DEFAULT_TIMEOUT = 5.0
#: A rank's answer is cut to this many bytes of UTF-8 (the rest is replaced by a note).
MAX_ANSWER_BYTES = 1 << 20
#: One faulthandler dump kept per channel is cut to this many bytes.
MAX_DUMP_BYTES = 1 << 20
#: Stack requests open at once in one coordinator (each ``stacks()`` call is one).
MAX_OPEN_REQUESTS = 64

#: faulthandler starts every dump it writes on a timer with this line ("Timeout (0:00:01)!").
_HEADER = b"Timeout ("
_SPLIT = b"\n" + _HEADER


@dataclass(frozen=True)
class Dump:
    """One faulthandler dump as the coordinator received it."""

    text: str
    #: When its first byte arrived (the coordinator's clock).
    at: float
    #: Whether a later dump began after it (so it is whole); the newest dump may still be arriving.
    complete: bool
    #: Bytes cut from it (beyond :data:`MAX_DUMP_BYTES`).
    dropped: int = 0


class DumpStream:
    """Splits the bytes faulthandler writes on one stack channel into dumps; keeps the newest two.

    faulthandler writes nothing but dumps there, each opening with a ``Timeout (...)!``
    line (with ``repeat=True``, one every interval while the GIL stays held). A dump is
    whole once the next one begins; bytes that do not belong to a dump are dropped
    (counted in :attr:`junk`). Bounded: a dump beyond :data:`MAX_DUMP_BYTES` is
    cut, and only the newest whole dump and the one arriving are kept.

    Example:
        >>> stream = DumpStream()
        >>> stream.feed(b"Timeout (0:00:01)!\\nThread 0x1 (most recent call first):\\n", now=1.0)
        False
        >>> stream.feed(b"  File \\"x.py\\", line 3 in spin\\nTimeout (0:00:01)!\\n", now=2.0)
        True
        >>> stream.last_complete.text.splitlines()[-1], stream.last_complete.at
        ('  File "x.py", line 3 in spin', 1.0)
    """

    def __init__(self, limit: int = MAX_DUMP_BYTES) -> None:
        if limit < 64:
            raise ValueError(f"limit must be at least 64 bytes, got {limit}")
        self._limit = limit
        self._buf = bytearray()
        self._at: float | None = None
        self._dropped = 0
        self.last_complete: Dump | None = None
        #: Bytes that were not part of any dump (dropped; faulthandler writes nothing else here).
        self.junk = 0

    @property
    def current(self) -> Dump | None:
        """The dump still arriving (or the newest, if no later one began), ``None`` before any."""
        if self._at is None:
            return None
        return Dump(self._text(self._buf, self._dropped), self._at, complete=False, dropped=self._dropped)

    def newest(self) -> Dump | None:
        """The newest dump, whole or not."""
        return self.current or self.last_complete

    def feed(self, data: bytes | bytearray | memoryview, now: float) -> bool:
        """Take bytes as they arrive; True when a dump became whole (a later one began)."""
        if not data:
            return False
        search_from = max(0, len(self._buf) - len(_SPLIT) + 1)
        self._buf += data
        completed = False
        if not self._buf.startswith(_HEADER[: len(self._buf)]):  # not a dump: dropped up to the next header
            index = self._buf.find(_SPLIT)
            if index < 0:
                keep = len(_SPLIT) - 1
                self.junk += max(0, len(self._buf) - keep)
                del self._buf[: max(0, len(self._buf) - keep)]
                self._at = None
                return False
            self.junk += index + 1
            del self._buf[: index + 1]
            self._at, search_from = now, 1
        elif self._at is None:
            self._at = now
        while True:
            index = self._buf.find(_SPLIT, search_from)
            if index < 0:
                break
            whole = self._buf[: index + 1]
            self.last_complete = Dump(self._text(whole, self._dropped), self._at, complete=True,
                                      dropped=self._dropped)
            del self._buf[: index + 1]
            self._at, self._dropped, completed, search_from = now, 0, True, 1
        if len(self._buf) > self._limit:  # keep the head, and enough of the tail to see the next header
            keep = len(_SPLIT) - 1
            self._dropped += len(self._buf) - self._limit
            self._buf[self._limit - keep : len(self._buf) - keep] = b""
        return completed

    @staticmethod
    def _text(raw: bytes | bytearray, dropped: int) -> str:
        text = bytes(raw).decode("utf-8", errors="replace")
        return text + (f"\n[... {dropped} more bytes of this dump were cut]\n" if dropped else "")


@dataclass(frozen=True)
class RankQuery:
    """What the coordinator knows of one rank when ``stacks()`` is asked.

    ``label`` names it in messages ("rank 1 (host h, pid 7)"); ``note`` is the whole
    answer for a rank that cannot be asked (not joined, finished, gone), else ``None``.
    """

    label: str
    note: str | None = None


@dataclass
class StackRequest(Generic[E]):
    """One ``stacks()`` call: what was asked of whom, what came back. ``done`` is set once all are in."""

    request_id: int
    gang_id: str
    key: tuple[int, int, int]
    sent_at: float
    timeout: float
    labels: dict[int, str]
    notes: dict[int, str] = field(default_factory=dict)
    #: rank -> the stack channel asked (the answer comes on the rank's own connection).
    waiting: dict[int, E] = field(default_factory=dict)
    answers: dict[int, str] = field(default_factory=dict)
    #: rank -> a whole faulthandler dump that began after the request was sent (the rank's Python cannot run).
    dumps: dict[int, Dump] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    def settle(self) -> None:
        if all(r in self.answers or r in self.dumps for r in self.waiting):
            self.done.set()


@dataclass
class _Channel(Generic[E]):
    endpoint: E
    key: ChannelKey
    dump_after: float | None
    no_dump: str
    dumps: DumpStream = field(default_factory=DumpStream)


class StackDesk(Generic[E]):
    """The stack channels of one coordinator, its open stack requests and their answers.

    ``E`` is the I/O layer's connection type; the desk only keeps and returns them.
    Every method runs on the coordinator's loop; a request's ``done`` event is what
    another thread may wait on.
    """

    def __init__(self) -> None:
        self._channels: dict[E, _Channel[E]] = {}
        self._by_key: dict[ChannelKey, E] = {}
        self._requests: dict[int, StackRequest[E]] = {}
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._channels)

    @property
    def open_requests(self) -> int:
        return len(self._requests)

    def attach(self, endpoint: E, key: ChannelKey, dump_after: float | None, no_dump: str = "") -> None:
        """``endpoint`` is now the stack channel of rank ``key`` (the newest one wins)."""
        old = self._by_key.get(key)
        if old is not None and old != endpoint:
            self._channels.pop(old, None)
        self._channels[endpoint] = _Channel(endpoint, key, dump_after, no_dump)
        self._by_key[key] = endpoint

    def detach(self, endpoint: E) -> None:
        """The channel closed: forget it; a request still waiting for it gets no answer from it."""
        channel = self._channels.pop(endpoint, None)
        if channel is None:
            return
        if self._by_key.get(channel.key) == endpoint:
            del self._by_key[channel.key]
        for request in self._requests.values():
            for rank, asked in list(request.waiting.items()):
                if asked == endpoint and rank not in request.answers and rank not in request.dumps:
                    del request.waiting[rank]
                    request.notes[rank] = (f"{request.labels[rank]}: its stack channel closed before it answered "
                                           "(the rank ended, or its process died)")
            request.settle()

    def feed(self, endpoint: E, data: bytes | bytearray | memoryview, now: float) -> None:
        """Bytes faulthandler wrote on ``endpoint``'s channel."""
        channel = self._channels.get(endpoint)
        if channel is None or not channel.dumps.feed(data, now):
            return
        whole = channel.dumps.last_complete
        for request in self._requests.values():
            rank = channel.key[2]
            if (whole is not None and request.waiting.get(rank) == endpoint and whole.at >= request.sent_at
                    and (request.gang_id, request.key) == channel.key[:2]):
                request.dumps[rank] = whole
                request.settle()

    def ask(self, gang_id: str, key: tuple[int, int, int], ranks: Mapping[int, RankQuery], timeout: float,
            now: float) -> tuple[StackRequest[E], list[tuple[E, int]]]:
        """Open a request for ``ranks`` of attempt ``key``; returns it and ``(channel, request id)`` to send.

        Raises :class:`RuntimeError` beyond :data:`MAX_OPEN_REQUESTS` open requests.
        """
        if len(self._requests) >= MAX_OPEN_REQUESTS:
            raise RuntimeError(f"{len(self._requests)} stack requests are open already (at most "
                               f"{MAX_OPEN_REQUESTS}): wait for them to return")
        request: StackRequest[E] = StackRequest(self._next_id, gang_id, key, now, timeout,
                                                {r: q.label for r, q in ranks.items()})
        self._next_id += 1
        sends: list[tuple[E, int]] = []
        for rank, query in sorted(ranks.items()):
            endpoint = self._by_key.get((gang_id, key, rank))
            if query.note is not None:
                request.notes[rank] = query.note
            elif endpoint is None:
                request.notes[rank] = (
                    f"{query.label} has no stack channel: it has not opened one yet (it just joined), or it "
                    "could not (its executor log says why), or it runs a spark-hydrogen without stacks()")
            else:
                request.waiting[rank] = endpoint
                sends.append((endpoint, request.request_id))
        self._requests[request.request_id] = request
        request.settle()
        return request, sends

    def answer(self, key: ChannelKey, request_id: int, text: str) -> None:
        """Rank ``key`` answered request ``request_id`` with its stacks (a late or unknown answer is dropped)."""
        request = self._requests.get(request_id)
        gang_id, attempt, rank = key
        if request is None or (request.gang_id, request.key) != (gang_id, attempt) or rank not in request.waiting:
            return
        request.answers[rank] = text
        request.settle()

    def collect(self, request: StackRequest[E], now: float) -> dict[int, str]:
        """Close ``request``: every rank's stack text, or why there is none (in rank order)."""
        self._requests.pop(request.request_id, None)
        out: dict[int, str] = {}
        for rank in sorted(request.labels):
            if rank in request.answers:
                out[rank] = request.answers[rank]
            elif rank in request.notes:
                out[rank] = request.notes[rank]
            else:
                out[rank] = self._unanswered(request, rank, now)
        return out

    def _unanswered(self, request: StackRequest[E], rank: int, now: float) -> str:
        label = request.labels[rank]
        head = f"{label} gave no answer within {request.timeout:g} s"
        channel = self._channels.get(request.waiting[rank])
        if channel is None:
            return head + "; its stack channel closed"
        if channel.dump_after is None:
            return (head + f" and writes no GIL-free dump ({channel.no_dump or 'faulthandler is off for it'}): "
                    "its Python threads may be unable to run (a long C call holding the GIL), or its "
                    "process is stopped or its host unreachable")
        dump = request.dumps.get(rank) or channel.dumps.newest()
        every = f"{channel.dump_after:g} s"
        if dump is None:
            return (head + f" and faulthandler wrote no dump (it writes one once the rank's Python threads "
                    f"cannot run for {every}): the process may be stopped, or its host unreachable")
        age = now - dump.at
        if dump.at >= request.sent_at - channel.dump_after - 1.0:
            return (f"{label} has held the GIL for at least {every} (its Python threads cannot run, e.g. one "
                    f"long C call), so it cannot answer; faulthandler dump written {age:.1f} s ago (most recent "
                    f"call first):\n{dump.text}")
        return (head + f" and faulthandler wrote no dump since the request (it would, every {every}, while the "
                f"GIL is held): the process may be stopped, or its host unreachable. Its last dump, written "
                f"{age:.1f} s ago, from a time its Python threads could not run (most recent call first):\n"
                f"{dump.text}")


def format_stacks(frames: Mapping[int, FrameType] | None = None, threads: Iterable[threading.Thread] | None = None,
                  skip: Iterable[int] = ()) -> str:
    """Every thread's current Python stack as text (most recent call last), the main thread first.

    ``frames`` and ``threads`` default to this process's (``sys._current_frames()``,
    ``threading.enumerate()``); threads whose ident is in ``skip`` are left out.

    Example:
        >>> format_stacks().splitlines()[0].startswith("Thread MainThread")
        True
    """
    frames = dict(sys._current_frames() if frames is None else frames)
    named = {t.ident: t for t in (threading.enumerate() if threads is None else threads) if t.ident is not None}
    main = threading.main_thread().ident
    skipped = set(skip)
    blocks = []
    for ident in sorted(frames, key=lambda i: (i != main, getattr(named.get(i), "name", ""), i)):
        if ident in skipped:
            continue
        thread = named.get(ident)
        name = thread.name if thread is not None else "<not started by threading>"
        kind = "main" if ident == main else ("daemon" if thread is not None and thread.daemon else "thread")
        stack = "".join(traceback.format_stack(frames[ident]))
        blocks.append(f"Thread {name} (ident {ident:#x}, {kind}), most recent call last:\n{stack}")
    text = "\n".join(blocks)
    raw = text.encode("utf-8", errors="replace")
    if len(raw) > MAX_ANSWER_BYTES:
        cut = raw[: MAX_ANSWER_BYTES - 200].decode("utf-8", errors="ignore")
        text = cut + f"\n[... {len(raw) - len(cut.encode())} more bytes of stacks were cut]\n"
    return text
