"""The rank side of stacks on demand: a stack channel and the one thread that serves it.

A :class:`StackResponder` opens a second authenticated connection to the coordinator
(the *stack channel*), attaches it to its registered rank, and answers every stack
request that arrives there with every thread's Python stack, sent on the rank's own
connection. While it waits it keeps :func:`faulthandler.dump_traceback_later` armed on
the channel's socket: if this thread cannot run Python for ``dump_after`` seconds
(another thread holds the GIL, typically inside one long C call), faulthandler's
watchdog thread, which needs no GIL, writes a dump of every thread into the channel
(again every ``dump_after`` seconds while the GIL stays held), and the coordinator shows
the latest one for a rank that cannot answer. See ``docs/protocol.md``, "Stacks".

faulthandler has one timer per process. The responder uses it only when nothing else
is known to (see :func:`dump_refusal`), cancels it when the rank ends, and never
touches ``faulthandler.enable()`` (the fatal-error handler, a separate mechanism). Under
TLS the watchdog stays off: it can write only plaintext to a descriptor, and the
coordinator's channel never downgrades.

Example:
    >>> responder = StackResponder(client, address, gang_id, secret, rank=1).start()  # doctest: +SKIP
    >>> responder.attached                                                              # doctest: +SKIP
    True
    >>> responder.close()                                                               # doctest: +SKIP
"""

from __future__ import annotations

import faulthandler
import logging
import os
import selectors
import threading

from ..config import STACK_DUMP_AFTER
from ..errors import HydrogenError
from .client import CoordinatorClient
from .stacks import format_stacks

__all__ = ["StackResponder", "DEFAULT_DUMP_AFTER", "dump_refusal", "JOIN_TIMEOUT"]

log = logging.getLogger("sparkhydrogen.stacks")

#: Seconds this thread may be kept from running Python before faulthandler dumps every thread.
DEFAULT_DUMP_AFTER = STACK_DUMP_AFTER
#: How long :meth:`StackResponder.close` waits for its thread.
JOIN_TIMEOUT = 5.0

#: The responder that holds faulthandler's one timer in this process (at most one).
_owner_lock = threading.Lock()
_owner: list[StackResponder] = []


def dump_refusal(dump_after: float | None, tls: bool, environ: dict[str, str] | None = None) -> str:
    """Why this process must not arm faulthandler's timer for a stack channel ("" when it may) (pure).

    Example:
        >>> dump_refusal(1.0, tls=False, environ={"PYTHON_TRACEBACK_DUMP_INTERVAL_SECONDS": "30"})[:45]
        'spark.python.worker.tracebackDumpIntervalSec'
    """
    env = os.environ if environ is None else environ
    if dump_after is None:
        return "spark.hydrogen.stacks.gilDumpAfter=0"
    if tls:
        return "the coordinator channel is TLS and faulthandler can only write plaintext"
    interval = env.get("PYTHON_TRACEBACK_DUMP_INTERVAL_SECONDS", "").strip()
    if interval and interval not in ("0", "-1"):
        return ("spark.python.worker.tracebackDumpIntervalSeconds is set: faulthandler's one timer is Spark's "
                "periodic traceback")
    return ""


class StackResponder:
    """Serves the stack channel of one rank on a daemon thread (``sparkhydrogen-stacks``).

    ``client`` is the rank's own, registered connection (answers go there); the
    channel is a second connection to ``address`` with the same credentials.
    ``dump_after`` (seconds, ``None``: never) arms faulthandler's watchdog on the
    channel. :meth:`close` stops the thread, cancels the watchdog and closes the
    channel, so a reused Python worker keeps no thread, timer or descriptor.
    """

    def __init__(self, client: CoordinatorClient, address: tuple[str, int], gang_id: str, secret: bytes, *,
                 rank: int, gang_attempt: int = 0, stage_id: int = 0, task_attempt_id: int = -1,
                 tls_fingerprint: str | None = None, connect_timeout: float = 30.0,
                 dump_after: float | None = DEFAULT_DUMP_AFTER) -> None:
        if dump_after is not None and not 0 < dump_after <= 3600:
            raise ValueError(f"dump_after must be in (0, 3600] seconds or None, got {dump_after!r}")
        self._client = client
        self._address = address
        self._gang_id = gang_id
        self._secret = secret
        self._tls_fingerprint = tls_fingerprint
        self._connect_timeout = connect_timeout
        self._dump_after = dump_after
        self._registration: dict[str, object] = {
            "rank": rank, "gang_attempt": gang_attempt, "stage_id": stage_id,
            "task_attempt_id": task_attempt_id, "pid": os.getpid()}
        self._lock = threading.Lock()  # guards _stopping, _channel and faulthandler's timer
        self._stopping = False
        self._armed = False
        self._channel: CoordinatorClient | None = None
        self._thread: threading.Thread | None = None
        #: Why the watchdog is off for this rank ("" while it is on), known once :meth:`start` returned.
        self.no_dump = ""

    def start(self) -> StackResponder:
        """Open and attach the stack channel, then serve it on the thread; returns once it is attached.

        It is attached before the rank's code runs, so a rank that goes straight into a
        long GIL-holding call still has its channel. A channel that cannot be opened is
        logged (``stacks()`` then says so for this rank); the rank runs on regardless.
        """
        rank = self._registration["rank"]
        try:
            channel = CoordinatorClient.connect(self._address, self._gang_id, self._secret, self._connect_timeout,
                                                tls_fingerprint=self._tls_fingerprint)
        except (HydrogenError, OSError) as exc:
            log.warning("rank %s: no stack channel (sparkhydrogen.stacks() will say so for this rank): %s", rank, exc)
            return self
        fd = self._claim_timer(channel)
        try:
            channel.open_stack_channel({**self._registration, "dump_after": self._dump_after if fd else None,
                                        "no_dump": self.no_dump}, self._connect_timeout)
        except (HydrogenError, OSError) as exc:
            log.warning("rank %s: the coordinator refused its stack channel: %s", rank, exc)
            self._release_timer()
            channel.close()
            return self
        self._channel = channel
        if fd is not None:  # armed before the rank's code runs: the thread may not get the GIL to arm it first
            with self._lock:
                self._arm(fd)
        self._thread = threading.Thread(target=self._run, args=(channel, fd), name="sparkhydrogen-stacks",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop answering: cancel the watchdog, wake and join the thread, close the channel."""
        with self._lock:
            self._stopping = True
            self._disarm()
            channel = self._channel
        if channel is not None:
            channel.interrupt()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("rank %s: the stack channel thread did not end within %g s",
                            self._registration["rank"], JOIN_TIMEOUT)
        if channel is not None:
            channel.close()
        self._release_timer()

    # faulthandler's one timer ----------------------------------------------------
    def _claim_timer(self, channel: CoordinatorClient) -> int | None:
        """The descriptor faulthandler may write dumps to, if this responder may use the process's timer."""
        with _owner_lock:
            refusal = dump_refusal(self._dump_after, tls=channel.raw_fd() is None)
            if not refusal and _owner:
                refusal = "another rank in this process holds faulthandler's timer"
            if not refusal:
                _owner.append(self)
        self.no_dump = refusal
        return None if refusal else channel.raw_fd()

    def _release_timer(self) -> None:
        with _owner_lock:
            if self in _owner:
                _owner.remove(self)

    # the thread ----------------------------------------------------------------
    def _run(self, channel: CoordinatorClient, fd: int | None) -> None:
        try:
            if fd is None:
                while not self._stopping:
                    self._answer(channel)
                return
            with selectors.DefaultSelector() as selector:
                selector.register(fd, selectors.EVENT_READ)
                rearm = max(0.05, (self._dump_after or 1.0) / 2)  # each re-arm starts a new watchdog thread
                while not self._stopping:
                    with self._lock:
                        self._arm(fd)
                    if selector.select(rearm):
                        self._answer(channel)
        except (HydrogenError, OSError) as exc:
            if not self._stopping:
                log.info("rank %s: the stack channel ended: %s", self._registration["rank"], exc)
        finally:
            with self._lock:
                self._disarm()

    def _answer(self, channel: CoordinatorClient) -> None:
        frame = channel.next_frame()
        request_id = frame.header.get("id")
        if frame.header.get("op") != "stacks" or isinstance(request_id, bool) or not isinstance(request_id, int):
            log.debug("stack channel: ignored a frame %s", frame.header)
            return
        self._client.answer_stacks(request_id, format_stacks(skip={threading.get_ident()}))

    @property
    def attached(self) -> bool:
        """Whether the stack channel is open and served (False: it could not be opened, or it closed)."""
        return self._thread is not None and self._thread.is_alive()

    # faulthandler's timer: only with self._lock held ---------------------------------------------
    def _arm(self, fd: int) -> None:
        if not self._stopping and self._dump_after is not None:
            faulthandler.dump_traceback_later(self._dump_after, repeat=True, file=fd)
            self._armed = True

    def _disarm(self) -> None:
        if self._armed:
            faulthandler.cancel_dump_traceback_later()
            self._armed = False
