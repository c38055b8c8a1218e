"""The coordinator service: an asyncio loop on a daemon thread that wires the parts together.

The rules live in :mod:`.state` (pure), the wire format and request decoding in
:mod:`.protocol`, one connection's framing, handshake and flow control in
:mod:`.peer`. This module binds the sockets, runs the loop on its thread, feeds
decoded requests to the state machine, writes the frames its actions call for,
ticks the clock, and offers the thread-safe driver API. It imports nothing from
pyspark, so it can run in the driver or inside a task.

It also applies the limits that keep one peer or gang from hurting the others
(see ``docs/security.md``): frame sizes from the 12-byte prefix, the bytes a gang
may have buffered here (:class:`~.state.Budget`), the number of gangs running at
once (:meth:`~.state.Registry.admit`) and of open connections.

Example:
    >>> server = CoordinatorServer(CoordinatorConfig(host="127.0.0.1"))
    >>> host, port = server.start()
    >>> gang = server.add_gang(world_size=2)
    >>> server.stop()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import ssl
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from ..config import CoordinatorConfig
from ..errors import ErrorInfo, GangNotFoundError, HydrogenError, RegistrationError
from .handles import GangHandle, LogRecord, MetricRecord
from .peer import Outgoing, Peer
from .protocol import (
    CallRequest,
    Fail,
    Finish,
    Kind,
    LogLines,
    Metrics,
    Ping,
    Register,
    Request,
    Restore,
    StacksAnswer,
    StacksChannel,
    collective_reply,
    encode_frame,
    error_frame,
    held_notice,
    register_reply,
    restore_reply,
    settle_reply,
    stacks_channel_reply,
    stacks_request,
)
from .stacks import DEFAULT_TIMEOUT, RankQuery, StackDesk, StackRequest
from .state import (
    Action,
    Attempt,
    AttemptKey,
    AttemptState,
    Complete,
    Gang,
    Hold,
    Log,
    Op,
    Registry,
    Reject,
    Roster,
    Settled,
    Start,
    Stuck,
)
from .tls import ServerTls, server_tls
from .views import GangReport, GangStatus, gang_report, gang_status

__all__ = ["CoordinatorServer", "GangHandle", "LogRecord", "STAGE_PREFIX", "MAX_STAGE_TOMBSTONES", "MAX_REPORTS",
           "stage_secret"]

log = logging.getLogger("sparkhydrogen.coordinator")
T = TypeVar("T")

#: How long a driver-API call waits for the coordinator's loop to run it.
LOOP_CALL_TIMEOUT = 30.0

#: Ids of stage gangs (see :meth:`CoordinatorServer.stage_credential`) start with this.
STAGE_PREFIX = "stage-"
#: Failed stage gangs kept, idle, so that their late tasks are refused rather than forming the gang anew.
MAX_STAGE_TOMBSTONES = 32
#: Reports of done gang attempts kept (the newest), for :meth:`CoordinatorServer.reports`.
MAX_REPORTS = 8
#: How long the stuck-collective line waits for the missing ranks' stacks before it is logged without them.
STUCK_STACKS_WAIT = 5.0


def stage_secret(key: bytes, gang_id: str) -> bytes:
    """The secret of stage gang ``gang_id``: HMAC-SHA256 of its id under the coordinator's key.

    The coordinator recomputes it when a task authenticates, so a stage gang needs no
    declaration; a task of one gang learns nothing about another gang's secret.
    """
    return hmac.new(key, b"sparkhydrogen stage gang\x00" + gang_id.encode(), hashlib.sha256).digest()


def _send_to(members: Mapping[int, Peer], ranks: Sequence[int], frame: bytes, shared: Outgoing | None = None) -> None:
    """Queue ``frame`` to each of ``ranks`` that still has a connection."""
    for rank in ranks:
        peer = members.get(rank)
        if peer is not None:
            peer.send(frame, shared)


class CoordinatorServer:
    """Runs the coordinator on its own daemon thread; the public driver methods are thread-safe.

    It is the :class:`~.peer.PeerHost` of every connection: ``peer_opened``,
    ``serve``, ``heard`` and the rest run on the loop, called by :class:`~.peer.Peer`.
    """

    def __init__(self, config: CoordinatorConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self.now = clock
        self.registry = Registry()
        self.roster: Roster[Peer] = Roster()
        self._connections: set[Peer] = set()
        self._receive_buffer = memoryview(bytearray(64 * 1024))  # shared by all connections (see Peer)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._thread: threading.Thread | None = None
        self._address: tuple[str, int] | None = None
        self._tls: ServerTls | None = None
        self._abort_hooks: dict[str, Callable[[AttemptKey, ErrorInfo], None]] = {}
        self._log_hooks: dict[str, Callable[[LogRecord], None]] = {}
        self._metric_hooks: dict[str, Callable[[MetricRecord], None]] = {}
        #: Exceptions that escaped into the event loop or were caught as bugs (0 in a healthy run).
        self.internal_errors = 0
        self._refusal_log_at = float("-inf")
        self._refusals_unlogged = 0
        #: Second copies of live ranks (speculative duplicates), held unanswered: peer -> (gang id, attempt key).
        self._held: dict[Peer, tuple[str, AttemptKey]] = {}
        #: The key stage gangs' secrets derive from (never leaves this process).
        self._stage_key = secrets.token_bytes(32)
        #: Failed stage gangs kept idle (oldest first), at most :data:`MAX_STAGE_TOMBSTONES`.
        self._tombstones: OrderedDict[str, None] = OrderedDict()
        #: Called (like an ``on_abort`` hook) when an attempt of a gated stage gang aborts: the driver cancels
        #: the attempt's Spark stage there, so ranks busy outside collectives stop too.
        self.stage_abort_hook: Callable[[AttemptKey, ErrorInfo], None] | None = None
        #: Every rank's stack channel and the open ``stacks()`` requests (see :meth:`stacks`).
        self.stack_desk: StackDesk[Peer] = StackDesk()
        #: Reports of the newest done attempts (oldest first), at most :data:`MAX_REPORTS`.
        self._reports: deque[GangReport] = deque(maxlen=MAX_REPORTS)

    # lifecycle ---------------------------------------------------------------
    @property
    def config(self) -> CoordinatorConfig:
        return self._config

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` tasks connect to: the advertised host (``config.advertised_host``) and the bound port."""
        if self._address is None:
            raise RuntimeError("coordinator is not running")
        return self.config.advertised_host, self._address[1]

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def tls_fingerprint(self) -> str | None:
        """SHA-256 fingerprint of the certificate this coordinator serves TLS with (``None``: no TLS)."""
        return self._tls.fingerprint if self._tls is not None else None

    @property
    def listening(self) -> list[tuple[str, int]]:
        """Every ``(address, port)`` a listening socket is bound to (one per address the host resolves to)."""
        return [(str(sock.getsockname()[0]), int(sock.getsockname()[1]))
                for server in self._servers for sock in server.sockets]

    def start(self) -> tuple[str, int]:
        """Bind and serve; returns ``(host, port)`` once the socket is listening.

        With TLS on, the certificate is loaded (or generated) first; a TLS set-up that
        fails raises here, and nothing listens.
        """
        if self.running:
            return self.address
        if self._tls is None and self.config.tls.enabled:
            tls = server_tls(self.config.tls, self.config.host)
            if tls is None:
                raise HydrogenError("TLS is on for the coordinator but server_tls() set up nothing")
            self._tls = tls
            log.info("spark-hydrogen coordinator: TLS with %s, SHA-256 %s%s", tls.source,
                     tls.fingerprint, f" (required by {self.config.tls.required_by})"
                     if self.config.tls.required_by else "")
        ready: concurrent.futures.Future[tuple[str, int]] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="sparkhydrogen-coordinator", daemon=True)
        self._thread.start()
        try:
            self._address = ready.result(timeout=LOOP_CALL_TIMEOUT)
        except BaseException as exc:
            self._thread.join(timeout=10)  # it has closed its loop and returned
            self._thread = self._loop = None
            if isinstance(exc, concurrent.futures.TimeoutError):  # not the builtin TimeoutError before 3.11
                raise HydrogenError(f"the spark-hydrogen coordinator did not start listening on {self.config.host} "
                                    f"within {LOOP_CALL_TIMEOUT:g} s") from exc
            raise
        log.info("spark-hydrogen coordinator listening on %s:%d", *self._address)
        return self._address

    def stop(self) -> None:
        """Abort every running attempt, close every connection and end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
            except (RuntimeError, concurrent.futures.TimeoutError) as exc:  # loop already closing, or stuck
                log.debug("coordinator shutdown: %r", exc)
            thread.join(timeout=10)
        self._thread = None
        self._loop = None
        log.info("spark-hydrogen coordinator stopped")

    def _run(self, ready: concurrent.futures.Future[tuple[str, int]]) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._on_loop_error)
        self._loop = loop
        try:
            self._servers, port = loop.run_until_complete(self._bind())
            ready.set_result((self.config.host, port))
        except BaseException as exc:  # report bind failures to start()
            ready.set_exception(exc)
            loop.close()
            return
        tick = loop.call_later(self.config.tick_interval, self._tick)
        try:
            loop.run_forever()
        finally:
            tick.cancel()
            loop.close()

    async def _bind(self) -> tuple[list[asyncio.base_events.Server], int]:
        """Listen on every address ``config.host`` resolves to, all on one port (the first free one of the range).

        Only those addresses: never all interfaces unless the host itself is a wildcard.
        """
        loop = asyncio.get_running_loop()
        cfg = self.config
        try:
            infos = await loop.getaddrinfo(cfg.host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise HydrogenError(
                f"coordinator host {cfg.host!r} does not resolve: {exc}; set spark.hydrogen.coordinator.host "
                "(or spark.driver.host) to an address of this machine"
            ) from exc
        addresses: list[tuple[int, tuple[Any, ...]]] = []
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6) and all(sockaddr[0] != a[1][0] for a in addresses):
                addresses.append((family, tuple(sockaddr)))
        for _, sockaddr in addresses:
            if ipaddress.ip_address(str(sockaddr[0]).split("%")[0]).is_unspecified:
                log.warning("spark-hydrogen coordinator: listening on ALL interfaces (%s) because "
                            "spark.hydrogen.coordinator.host=%s; any host that reaches this machine can connect "
                            "(it still needs a gang's secret)", sockaddr[0], cfg.host)
        ports = [0] if cfg.port == 0 else range(cfg.port, min(cfg.port + cfg.port_max_retries, 65535) + 1)
        last: OSError | None = None
        for port in ports:
            socks: list[socket.socket] = []
            servers: list[asyncio.base_events.Server] = []
            try:
                actual = port
                for af, sockaddr in addresses:
                    sock = socket.socket(af, socket.SOCK_STREAM)
                    socks.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if af == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind((sockaddr[0], actual, *sockaddr[2:]))
                    actual = sock.getsockname()[1]  # port 0: every address gets the port the first one got
                for sock in socks:
                    servers.append(await loop.create_server(lambda: Peer(self), sock=sock, backlog=4096))
                return servers, actual
            except OSError as exc:
                last = exc
                for server in servers:
                    server.close()
                for sock in socks:
                    sock.close()
        raise HydrogenError(
            f"coordinator could not bind {cfg.host} on any port of {list(ports)[0]}..{list(ports)[-1]}: {last}; "
            "set spark.hydrogen.coordinator.port / portMaxRetries to a free range"
        ) from last

    async def _shutdown(self) -> None:
        for gang in list(self.registry.gangs.values()):
            for attempt in list(gang.attempts.values()):
                self._dispatch(attempt, attempt.abort("the coordinator is stopping (SparkContext stopped)"))
        for server in self._servers:
            server.close()
        for peer in list(self._connections):
            peer.close()
        asyncio.get_running_loop().call_soon(asyncio.get_running_loop().stop)

    # thread-safe driver API ----------------------------------------------------
    def _on_loop(self, fn: Callable[[], T], what: str = "a driver request") -> T:
        """Run ``fn`` on the coordinator's loop and return its result (at once if already on it)."""
        loop = self._loop
        if loop is None or not self.running:
            raise HydrogenError("the spark-hydrogen coordinator is not running")
        if threading.current_thread() is self._thread:
            return fn()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        try:
            return future.result(timeout=LOOP_CALL_TIMEOUT)
        except concurrent.futures.TimeoutError as exc:  # not the builtin TimeoutError before Python 3.11
            raise HydrogenError(
                f"the spark-hydrogen coordinator did not run {what} within {LOOP_CALL_TIMEOUT:g} s: its loop is "
                f"blocked or overloaded (internal errors so far: {self.internal_errors})"
            ) from exc

    def add_gang(self, world_size: int, name: str = "",
                 on_abort: Callable[[AttemptKey, ErrorInfo], None] | None = None,
                 on_log: Callable[[LogRecord], None] | None = None,
                 on_metrics: Callable[[MetricRecord], None] | None = None,
                 gang_id: str | None = None, secret: bytes | None = None,
                 ephemeral: bool = False, gated: bool = False, start_timeout: float | None = None) -> GangHandle:
        """Declare a gang of ``world_size`` ranks; returns what its tasks need to join.

        ``on_abort(key, cause)`` is called (on a short-lived thread, never on the
        coordinator's loop) once for every attempt of the gang that aborts.
        ``on_log(record)`` receives the output ranks stream with
        :meth:`CoordinatorClient.log`; it runs on the coordinator's loop and must be quick.
        ``on_metrics(record)`` likewise receives the metric points ranks send with
        :meth:`CoordinatorClient.metrics` (``sparkhydrogen.mlflow.log_metric``); without
        it they are dropped here.
        ``ephemeral``: once an attempt has succeeded and its connections are gone, the
        coordinator forgets the gang's attempts and checkpoint and keeps only the dormant
        declaration (for notebooks that run thousands of bare jobs); a re-evaluation can
        still join it as a new generation.
        ``gated`` (coordinated placement): registrations are held at a start gate until
        every rank has joined, at most ``start_timeout`` seconds from the launch
        (:meth:`open_window`) or the first registration; then the attempt aborts naming
        the missing ranks.

        Example:
            >>> handle = server.add_gang(4, name="train", ephemeral=True)  # doctest: +SKIP
        """
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if secret is not None and (not isinstance(secret, bytes) or len(secret) < 16):
            raise ValueError("secret must be at least 16 random bytes")
        if not isinstance(ephemeral, bool):
            raise TypeError(f"ephemeral must be True or False, got {ephemeral!r}")
        if start_timeout is not None and (isinstance(start_timeout, bool) or not start_timeout > 0):
            raise ValueError(f"start_timeout must be a positive number of seconds or None, got {start_timeout!r}")
        gang = Gang(gang_id=gang_id or uuid.uuid4().hex, secret=secret or secrets.token_bytes(32),
                    world_size=world_size, name=name, ephemeral=ephemeral, gated=bool(gated),
                    start_timeout=float(start_timeout) if gated and start_timeout is not None else None)

        def add() -> None:
            self.registry.add(gang)
            if on_abort is not None:
                self._abort_hooks[gang.gang_id] = on_abort
            if on_log is not None:
                self._log_hooks[gang.gang_id] = on_log
            if on_metrics is not None:
                self._metric_hooks[gang.gang_id] = on_metrics

        self._on_loop(add, f"add_gang({name or gang.gang_id[:8]!r})")
        host, port = self.address
        return GangHandle(gang.gang_id, gang.secret, world_size, host, port, self.tls_fingerprint)

    def stage_credential(self) -> GangHandle:
        """What the tasks of a lazily built gang stage carry: an id and its secret, nothing declared here.

        The gang is formed when the first task of a Spark stage attempt registers with it
        (its size is the stage's task count, which that task states), and forgotten once
        its stages are done, so a plan built on it can run any number of times, composed
        in any way, and the coordinator keeps nothing per job. ``world_size`` is 0 in the
        handle: the stage decides it. Thread-safe; needs the coordinator started.

        Example:
            >>> handle = server.stage_credential()     # doctest: +SKIP
        """
        gang_id = STAGE_PREFIX + uuid.uuid4().hex
        host, port = self.address
        return GangHandle(gang_id, stage_secret(self._stage_key, gang_id), 0, host, port, self.tls_fingerprint)

    def remove_gang(self, gang_id: str) -> None:
        """Forget a gang: its running attempts are aborted, its connections refused, no trace of it is left."""

        def remove() -> None:
            self._abort_hooks.pop(gang_id, None)  # before aborting: a removed gang reports nothing
            self._log_hooks.pop(gang_id, None)
            self._metric_hooks.pop(gang_id, None)
            gang = self.registry.remove(gang_id)
            if gang is not None:
                for attempt in list(gang.attempts.values()):
                    self._dispatch(attempt, attempt.abort("the driver removed the gang"))
            self._release_held(gang_id, None, ErrorInfo("RegistrationError", "the driver removed the gang"))
            self.roster.drop_gang(gang_id)

        self._on_loop(remove, f"remove_gang({gang_id[:8]!r})")

    def abort_attempts(self, gang_id: str, reason: str) -> None:
        """Abort every running attempt of a gang (e.g. the driver cancelled its job)."""

        def abort() -> None:
            gang = self.registry.get(gang_id)
            if gang is not None:
                for attempt in list(gang.attempts.values()):
                    self._dispatch(attempt, attempt.abort(reason))

        self._on_loop(abort, f"abort_attempts({gang_id[:8]!r})")

    def open_window(self, gang_id: str, gang_attempt: int) -> None:
        """A gated gang's launch of ``gang_attempt`` was submitted now: its start bound counts from here."""

        def mark() -> None:
            gang = self.registry.get(gang_id)
            if gang is not None:
                gang.open_window(gang_attempt, self.now())

        self._on_loop(mark, f"open_window({gang_id[:8]!r})")

    def note_gang(self, gang_id: str, note: str) -> None:
        """The driver's latest word on the cluster for a gated gang (quoted if its start bound expires)."""

        def put() -> None:
            gang = self.registry.get(gang_id)
            if gang is not None:
                gang.note = note

        self._on_loop(put, f"note_gang({gang_id[:8]!r})")

    def resize_gang(self, gang_id: str, world_size: int) -> None:
        """An elastic gang's next attempts have ``world_size`` ranks (its id, secret and checkpoint stay)."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")

        def put() -> None:
            gang = self.registry.get(gang_id)
            if gang is None:
                raise GangNotFoundError(f"gang {gang_id[:8]} is not declared")
            gang.resize(world_size)

        self._on_loop(put, f"resize_gang({gang_id[:8]!r})")

    def offer_growth(self, gang_id: str, world_size: int | None) -> None:
        """Tell an elastic gang's ranks, at their next committed checkpoint, to relaunch at ``world_size`` ranks."""

        def put() -> None:
            gang = self.registry.get(gang_id)
            if gang is not None:
                gang.grow_to = world_size

        self._on_loop(put, f"offer_growth({gang_id[:8]!r})")

    def gate_status(self, gang_id: str, gang_attempt: int) -> tuple[int, bool]:
        """(ranks joined, whether the start gate opened) of a gated gang's launch ``gang_attempt``."""

        def get() -> tuple[int, bool]:
            gang = self.registry.get(gang_id)
            return gang.gate_status(gang_attempt) if gang is not None else (0, False)

        return self._on_loop(get, f"gate_status({gang_id[:8]!r})")

    def last_failure(self, gang_id: str, gang_attempt: int | None = None) -> ErrorInfo | None:
        """The root cause of the most recent failed attempt of a gang (of ``gang_attempt``), if any."""

        def get() -> ErrorInfo | None:
            gang = self.registry.get(gang_id)
            found = gang.last_failure(gang_attempt) if gang is not None else None
            return found[1] if found else None

        return self._on_loop(get, f"last_failure({gang_id[:8]!r})")

    def gang_settled(self, gang_id: str) -> bool:
        """True when no attempt of the gang is running (every rank finished, or it was aborted)."""

        def settled() -> bool:
            gang = self.registry.get(gang_id)
            return gang is None or not gang.running

        return self._on_loop(settled, f"gang_settled({gang_id[:8]!r})")

    def stats(self) -> dict[str, int]:
        """Gangs, attempts and open connections, for load tests and diagnostics."""
        return self._on_loop(lambda: {
            "gangs": len(self.registry.gangs),
            "attempts": sum(len(g.attempts) for g in self.registry.gangs.values()),
            "connections": len(self._connections),
        }, "stats()")

    def footprint(self) -> dict[str, int]:
        """Sizes of every internal per-gang container: what the coordinator holds, to check nothing leaks.

        ``gangs`` (declared, dormant ones included), ``running_gangs``, ``attempts``,
        ``members`` (registered ranks of kept attempts), ``rounds`` (open rounds),
        ``failure_records``, ``checkpoints`` and ``checkpoint_bytes``, ``buffered_bytes``
        (payloads being received, held or queued), ``roster_attempts`` and
        ``roster_connections`` (connections speaking for ranks), ``abort_hooks``,
        ``log_hooks``, ``held`` (second copies of live ranks held aside, see
        :class:`~.state.Hold`), ``connections`` (open), ``stage_tombstones`` (failed stage
        gangs kept idle, at most :data:`MAX_STAGE_TOMBSTONES`) and ``timeline_rounds`` (rounds kept
        in full by kept attempts' timelines; a done attempt's are dropped once its report is made).
        Not counted: the reports of the :data:`MAX_REPORTS` newest done attempts (:meth:`reports`).

        Example:
            >>> server.footprint()["checkpoint_bytes"]  # doctest: +SKIP
            0
        """

        def measure() -> dict[str, int]:
            gangs = list(self.registry.gangs.values())
            attempts = [a for g in gangs for a in g.attempts.values()]
            return {
                "gangs": len(gangs),
                "running_gangs": sum(1 for g in gangs if g.running),
                "attempts": len(attempts),
                "members": sum(len(a.members) for a in attempts),
                "rounds": sum(len(a.rounds) for a in attempts),
                "failure_records": sum(len(g.failures) for g in gangs),
                "checkpoints": sum(1 for g in gangs if g.checkpoint is not None),
                "checkpoint_bytes": sum(g.checkpoint.size for g in gangs if g.checkpoint is not None),
                "buffered_bytes": sum(g.buffered_bytes for g in gangs),
                "roster_attempts": self.roster.attempts,
                "roster_connections": self.roster.endpoint_count,
                "abort_hooks": len(self._abort_hooks),
                "log_hooks": len(self._log_hooks),
                "metric_hooks": len(self._metric_hooks),
                "stage_tombstones": len(self._tombstones),
                "held": len(self._held),
                "connections": len(self._connections),
                "stack_channels": len(self.stack_desk),
                "stack_requests": self.stack_desk.open_requests,
                "timeline_rounds": sum(a.timeline.kept for a in attempts),
            }

        return self._on_loop(measure, "footprint()")

    def live_gangs(self) -> dict[str, str]:
        """Gangs with an attempt running: gang id -> name ("" when unnamed)."""
        return self._on_loop(lambda: {gid: g.name for gid, g in self.registry.gangs.items() if g.running},
                             "live_gangs()")

    def stacks(self, gang_id: str, timeout: float = DEFAULT_TIMEOUT) -> dict[int, str]:
        """Every rank's current Python stacks (all threads), by rank, for the running attempt of ``gang_id``.

        Thread-safe; waits at most ``timeout`` seconds (never on the coordinator's loop).
        A rank answers through its stack channel (see ``docs/protocol.md``, "Stacks"). A
        rank that does not answer in time gets a text that says so and, when its Python
        threads could not run (the GIL held by a long C call), the latest faulthandler
        dump its watchdog wrote without the GIL. A rank that has not joined, has finished
        or is gone gets a line saying that. Raises :class:`ValueError` when the gang has no
        running attempt here (the message lists the live gangs).

        Example:
            >>> for rank, text in server.stacks(gang_id, timeout=5).items():   # doctest: +SKIP
            ...     print(f"--- rank {rank}\n{text}")
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 600:
            raise ValueError(f"timeout must be a number of seconds in (0, 600], got {timeout!r}")
        request = self._on_loop(lambda: self._ask_stacks(str(gang_id), float(timeout)), f"stacks({gang_id!r:.12})")
        request.done.wait(timeout)
        return self._on_loop(lambda: self.stack_desk.collect(request, self.now()), f"stacks({gang_id!r:.12})")

    def _ask_stacks(self, gang_id: str, timeout: float) -> StackRequest[Peer]:
        gang = self.registry.get(gang_id)
        running = [a for a in gang.attempts.values() if a.state is AttemptState.RUNNING] if gang else []
        if not running:
            live = ", ".join(f"{g} ({n or 'unnamed'})" for g, n in sorted(
                (gid, g.name) for gid, g in self.registry.gangs.items() if g.running)) or "none"
            raise GangNotFoundError(f"gang {gang_id!r} has no running attempt in this coordinator; live gangs: {live}")
        attempt = max(running, key=lambda a: a.created)
        queries: dict[int, RankQuery] = {}
        for rank in range(attempt.world_size):
            member = attempt.members.get(rank)
            if member is None:
                queries[rank] = RankQuery(f"rank {rank}", f"rank {rank} has not joined {attempt.label} yet")
                continue
            label = f"rank {rank} (host {member.info.host}, pid {member.info.pid})"
            note = (f"{label} has finished its task" if member.finished
                    else f"{label} lost its connection to the coordinator" if not member.connected else None)
            queries[rank] = RankQuery(label, note)
        try:
            request, sends = self.stack_desk.ask(gang_id, attempt.key, queries, timeout, self.now())
        except RuntimeError as exc:
            raise HydrogenError(f"stacks({gang_id[:14]!r}): {exc}") from exc
        for peer, request_id in sends:
            peer.send(stacks_request(request_id))
        return request

    def _attach_stacks(self, peer: Peer, request: StacksChannel) -> None:
        """Make ``peer`` the stack channel of the rank its request names (it must be registered and running)."""
        if peer.attempt is not None or peer.raw_sink is not None:
            raise RegistrationError("this connection already speaks for a rank; open a new one for its stacks")
        gang = self.registry.get(peer.gang.gang_id) if peer.gang is not None else None
        found = None
        for attempt in gang.attempts.values() if gang is not None else ():
            member = attempt.members.get(request.rank)
            if (attempt.key[:2] == (request.gang_attempt, request.stage_id) and member is not None
                    and attempt.state is AttemptState.RUNNING and not member.finished
                    and (member.info.task_attempt_id, member.info.pid) == (request.task_attempt_id, request.pid)):
                found = attempt
        if gang is None or found is None:
            raise RegistrationError(
                f"no running rank {request.rank} with task attempt {request.task_attempt_id} (pid {request.pid}) "
                "in this gang to attach a stack channel to: register the rank first")
        self.stack_desk.attach(peer, (gang.gang_id, found.key, request.rank), request.dump_after, request.no_dump)
        peer.send(stacks_channel_reply())
        peer.raw_sink = lambda data: self.stack_desk.feed(peer, data, self.now())

    def status(self) -> list[GangStatus]:
        """Every live gang attempt and each of its ranks, as a snapshot taken on the loop (consistent).

        Example:
            >>> [str(g) for g in server.status()]   # doctest: +SKIP
        """

        def snapshot() -> list[GangStatus]:
            now = self.now()
            return [gang_status(gang, attempt, now) for gang in self.registry.gangs.values()
                    for attempt in sorted(gang.attempts.values(), key=lambda a: a.key)
                    if attempt.state is AttemptState.RUNNING]

        return self._on_loop(snapshot, "status()")

    def reports(self) -> list[GangReport]:
        """Reports of the newest done gang attempts, oldest first (at most :data:`MAX_REPORTS`)."""
        return self._on_loop(lambda: list(self._reports), "reports()")

    def expire(self) -> None:
        """Apply timeouts and liveness now (the loop does it every ``tick_interval``): for tests with a fake clock."""
        self._on_loop(self._expire, "expire()")

    # PeerHost: called by Peer on the loop -----------------------------------------
    @property
    def tls_context(self) -> ssl.SSLContext | None:
        return self._tls.context if self._tls is not None else None

    @property
    def receive_buffer(self) -> memoryview:
        return self._receive_buffer

    def peer_opened(self, peer: Peer) -> ErrorInfo | None:
        limit = self.config.max_connections
        if len(self._connections) >= limit:
            return ErrorInfo("CoordinatorConnectionError", (
                f"the coordinator already has {len(self._connections)} open connections, its limit "
                f"(spark.hydrogen.coordinator.maxConnections={limit}): this connection is refused; "
                "raise the limit or run fewer ranks at once"))
        self._connections.add(peer)
        return None

    def peer_closed(self, peer: Peer) -> None:
        self._connections.discard(peer)
        self.stack_desk.detach(peer)
        self._held.pop(peer, None)
        attempt, rank = peer.attempt, peer.rank
        if attempt is None or rank is None:
            return
        self.roster.detach(attempt, rank, peer)
        self._dispatch(attempt, attempt.disconnect(rank, self.now()))
        self._collect(attempt)

    def find_gang(self, gang_id: str) -> Gang | None:
        """The gang a peer authenticates against: a declared one, or a stage gang (formed or not yet)."""
        gang = self.registry.get(gang_id)
        if gang is not None or not gang_id.startswith(STAGE_PREFIX) or len(gang_id) > 64:
            return gang
        return Gang(gang_id=gang_id, secret=stage_secret(self._stage_key, gang_id), world_size=0, ephemeral=True,
                    derived=True)

    def heard(self, peer: Peer) -> None:
        if peer.attempt is not None and peer.rank is not None:
            try:
                actions = peer.attempt.heard(peer.rank, self.now())
            except RegistrationError:
                return
            if actions:  # a busy rank is back: log it
                self._dispatch(peer.attempt, actions)

    def refuse_payload(self, peer: Peer, op: Any, nbytes: int) -> None:
        gang = peer.gang
        if gang is None:
            return
        limit = self.config.max_gang_buffer_bytes
        message = (
            f"a {op!r} request with {nbytes} bytes of payload would take gang {gang.gang_id[:8]} over its "
            f"buffer limit in the coordinator: {gang.buffered_bytes} bytes are buffered already and the limit is "
            f"{limit} (spark.hydrogen.coordinator.maxGangBuffer); send smaller payloads or raise the limit"
        )
        if op == "log":  # output lines get no reply; drop them and say so on the driver
            self.note_refusal(peer.name, message)
            return
        info = ErrorInfo("PayloadError", message, peer.rank)
        log.warning("coordinator: %s (rank %s, %s)", message, peer.rank, peer.name)
        if op == "call" and peer.attempt is not None and peer.rank is not None:
            self._dispatch(peer.attempt, peer.attempt.fail(peer.rank, info, self.now()))
        peer.send(error_frame(info))

    def serve(self, peer: Peer, request: Request) -> None:
        if isinstance(request, Register):
            self._register(peer, request)
            return
        if isinstance(request, StacksChannel):
            self._attach_stacks(peer, request)
            return
        attempt, rank, gang = peer.attempt, peer.rank, peer.gang
        if attempt is None or rank is None or gang is None:
            raise RegistrationError(f"{type(request).__name__.lower()} before 'register'")
        now = self.now()
        if isinstance(request, CallRequest):
            self._dispatch(attempt, attempt.call(rank, request.call, now))
        elif isinstance(request, Ping):
            attempt.heard(rank, now)
        elif isinstance(request, LogLines):
            attempt.heard(rank, now)
            self._forward_log(attempt, rank, request)
        elif isinstance(request, Metrics):
            attempt.heard(rank, now)
            self._forward_metrics(attempt, rank, request)
        elif isinstance(request, Restore):
            of = rank if request.of is None else request.of
            state, written, source = gang.restored(of, exact=request.of is not None)
            peer.send(restore_reply(state, written, source))
        elif isinstance(request, Fail):
            self._dispatch(attempt, attempt.fail(rank, replace(request.error, rank=rank), now, request.settle))
        elif isinstance(request, Finish):
            self._dispatch(attempt, attempt.finish(rank, now, closed_early=request.closed_early))
        elif isinstance(request, StacksAnswer):
            attempt.heard(rank, now)
            self.stack_desk.answer((gang.gang_id, attempt.key, rank), request.request_id, request.text)

    def note_refusal(self, peer_name: str, what: str) -> None:
        """Log a refused peer or request, at most once a second (a flood must not flood the driver's log)."""
        now = time.monotonic()
        if now - self._refusal_log_at < 1.0:
            self._refusals_unlogged += 1
            return
        more = f" ({self._refusals_unlogged} more refusals not logged)" if self._refusals_unlogged else ""
        self._refusal_log_at, self._refusals_unlogged = now, 0
        log.warning("coordinator: %s: %s%s", peer_name, what, more)

    def internal_error(self, what: str, exc: BaseException) -> None:
        self.internal_errors += 1
        log.error("coordinator: internal error while %s", what, exc_info=exc)

    # loop-side plumbing --------------------------------------------------------
    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.internal_errors += 1
        log.error("coordinator: %s", context.get("message", "error in the event loop"),
                  exc_info=exc if isinstance(exc, BaseException) else None)

    def _joining(self, peer: Peer, request: Register) -> tuple[Gang, bool]:
        """The gang a registering peer joins (looked up now, not at authentication), and whether it is new.

        A declared gang removed since the peer authenticated refuses it; a stage gang
        that is not formed (or was forgotten) is formed from what the task states.
        """
        claimed = peer.gang
        if claimed is None:
            raise RegistrationError("'register' before authentication")
        live = self.registry.get(claimed.gang_id)
        if live is not None:
            stage = request.stage
            if live.derived and stage is not None and stage.world_size != live.world_size:
                if not live.idle:
                    raise RegistrationError(
                        f"gang {live.gang_id[:14]} ({live.name or 'unnamed'}) runs a stage of {live.world_size} "
                        f"tasks; this task's stage has {stage.world_size}: run the two plans one after the other, "
                        "or give them the same number of partitions")
                self._remove_stage_gang(live.gang_id)  # a stage of another size: form the gang anew
            else:
                return live, False
        if not claimed.derived:
            raise RegistrationError(
                f"gang {claimed.gang_id[:8]} ({claimed.name or 'unnamed'}) was removed by the driver before this "
                "task registered (its job or scope ended): the task is late and is refused")
        if request.stage is None:
            raise RegistrationError(
                "this task joins a stage gang but did not state its stage's task count: the executors run an "
                "older spark-hydrogen than the driver; install the same version on both")
        stage = request.stage
        return Gang(gang_id=claimed.gang_id, secret=claimed.secret, world_size=stage.world_size, name=stage.name,
                    ephemeral=True, derived=True, gated=stage.gated,
                    start_timeout=stage.start_timeout if stage.gated else None), True

    def _register(self, peer: Peer, request: Register) -> None:
        gang, new = self._joining(peer, request)
        rank = request.rank
        if not 0 <= rank < gang.world_size:
            raise RegistrationError(f"rank {rank} is outside 0..{gang.world_size - 1} for this gang")
        refusal = self.registry.admit(gang, request.gang_attempt, request.stage_id, rank, self.config.max_gangs)
        if refusal is not None:
            if gang.record(refusal):  # a new stage gang is not kept: its refusal is logged every time
                log.error("coordinator: %s", refusal.error.message)
            raise RegistrationError(refusal.error.message)
        if new:
            self.registry.add(gang)
            if gang.gated and self.stage_abort_hook is not None:
                self._abort_hooks[gang.gang_id] = self.stage_abort_hook
        elif gang.derived:
            self._tombstones.pop(gang.gang_id, None)  # a new stage of a failed stage gang: live again
        peer.gang = gang
        now, cfg = self.now(), self.config
        attempt, superseded = gang.attempt_for(request.gang_attempt, request.stage_id, rank,
                                               request.member.task_attempt_id, now,
                                               cfg.missing_log_interval, cfg.liveness_timeout,
                                               stuck_after=cfg.stuck_after)
        attempt.timeline.name = gang.name
        for old, actions in superseded:
            self._dispatch(old, actions)
        actions = attempt.register(rank, request.member, now)
        if any(isinstance(a, Hold) for a in actions):
            self._held[peer] = (gang.gang_id, attempt.key)
            log.info("coordinator: %s: a second task for rank %d (task %d, host %s) is held aside: rank %d is "
                     "alive; the copy never joins (a speculative duplicate)", attempt.label, rank,
                     request.member.task_attempt_id, request.member.host, rank)
            peer.send(held_notice())
            return
        peer.bind(attempt, rank)
        self.roster.attach(attempt, rank, peer)
        if not attempt.gated:
            peer.send(register_reply(attempt.world_size))
        self._dispatch(attempt, actions)

    def _collect(self, attempt: Attempt) -> None:
        """Forget what a done attempt no longer needs (and retire an ephemeral gang after success)."""
        if not attempt.done:
            return
        self._keep_report(attempt)
        self.roster.drop(attempt)
        gang = self.registry.get(attempt.gang_id)
        if gang is None:
            return
        gang.prune()
        gang.retire_if_complete()
        if gang.derived:
            self._forget_stage_gang(gang)

    def _keep_report(self, attempt: Attempt) -> None:
        """Once per done attempt: keep its report (bounded) and log its end, naming a straggler if there is one."""
        if attempt.timeline.closed:
            return
        report = gang_report(attempt.timeline.name, attempt, self.now())
        attempt.timeline.close()  # the report has the rounds now; a kept done attempt holds only totals
        self._reports.append(report)
        headline = report.summary.splitlines()[0]
        if report.stragglers:
            log.warning("coordinator: %s; %s", headline,
                        "; ".join("straggler: " + s.describe() for s in report.straggler_details))
        else:
            log.log(logging.INFO if report.total_rounds else logging.DEBUG, "coordinator: %s", headline)

    def _log_stuck(self, attempt: Attempt, action: Stuck) -> None:
        """The stuck-collective line: gang (with its name), call, missing ranks, each one's last-heard time and stack.

        The missing ranks' stacks are asked for through their stack channels (on the
        loop); a short-lived thread waits for the answers (at most :data:`STUCK_STACKS_WAIT`
        seconds) and logs the line with them. Without an answer, or with the stack
        requests all taken, the line is logged without stacks.
        """
        gang = self.registry.get(attempt.gang_id)
        name = gang.name if gang is not None else ""
        try:
            request = self._ask_stacks(attempt.gang_id, STUCK_STACKS_WAIT)
        except (ValueError, HydrogenError) as exc:
            log.debug("no stacks for the stuck line of %s: %s", attempt.label, exc)
            log.warning("%s", action.line(name))
            return
        missing = {m.rank for m in action.missing}

        def finish() -> None:
            request.done.wait(STUCK_STACKS_WAIT)
            try:
                stacks = self._on_loop(lambda: self.stack_desk.collect(request, self.now()), "stuck stacks")
            except Exception as exc:  # the coordinator is stopping
                log.debug("stuck line of %s without stacks: %s", attempt.label, exc)
                stacks = {}
            log.warning("%s", action.line(name, stacks={r: t for r, t in stacks.items() if r in missing}))

        threading.Thread(target=finish, name="sparkhydrogen-stuck-stacks", daemon=True).start()

    def _forget_stage_gang(self, gang: Gang) -> None:
        """A stage gang whose stages are all done is forgotten: at once after success, as a tombstone after failure.

        A failed one stays (idle, bounded by :data:`MAX_STAGE_TOMBSTONES`) so that a late
        task of its aborted attempt is refused instead of forming the gang anew.
        """
        if not gang.idle or any(g == gang.gang_id for g, _ in self._held.values()):
            return
        if not gang.attempts:  # retired after success (or it never ran)
            self._remove_stage_gang(gang.gang_id)
            return
        self._tombstones[gang.gang_id] = None
        self._tombstones.move_to_end(gang.gang_id)
        while len(self._tombstones) > MAX_STAGE_TOMBSTONES:
            oldest, _ = self._tombstones.popitem(last=False)
            self._remove_stage_gang(oldest)

    def _remove_stage_gang(self, gang_id: str) -> None:
        self._tombstones.pop(gang_id, None)
        self.registry.remove(gang_id)
        self._abort_hooks.pop(gang_id, None)
        self._log_hooks.pop(gang_id, None)
        self._metric_hooks.pop(gang_id, None)
        self.roster.drop_gang(gang_id)

    def _dispatch(self, attempt: Attempt, actions: list[Action]) -> None:
        members = self.roster.endpoints(attempt)
        for action in actions:
            if isinstance(action, Complete) and action.op is Op.CHECKPOINT:
                self._commit(attempt, action)
            elif isinstance(action, Complete):
                gang = self.registry.get(attempt.gang_id)
                frame = collective_reply(action.op, action.seq, action.payloads)
                _send_to(members, action.ranks, frame, Outgoing(frame, gang.budget if gang is not None else None))
            elif isinstance(action, Reject):
                _send_to(members, action.ranks, error_frame(action.error))
            elif isinstance(action, Start):
                _send_to(members, action.ranks, register_reply(attempt.world_size, action.addresses))
                log.info("coordinator: %s: all %d ranks joined, the start gate opened", attempt.label,
                         attempt.world_size)
            elif isinstance(action, Settled):
                _send_to(members, action.ranks, settle_reply(action.failure))
            elif isinstance(action, Stuck):
                self._log_stuck(attempt, action)
            elif isinstance(action, Log):
                log.log(logging.ERROR if action.level == "error" else logging.WARNING, action.message)
        if attempt.state is AttemptState.ABORTED:
            if attempt.abort_error is not None:
                self._release_held(attempt.gang_id, attempt.key, attempt.abort_error)
            self._report_abort(attempt)
        elif attempt.state is AttemptState.FINISHED:
            self._collect(attempt)

    def _release_held(self, gang_id: str, key: AttemptKey | None, error: ErrorInfo) -> None:
        """Refuse the held duplicates of an aborted attempt (``key``), or of a removed gang (``None``)."""
        held = [p for p, (g, k) in self._held.items() if g == gang_id and (key is None or k == key)]
        frame = error_frame(error)
        for peer in held:
            del self._held[peer]
            peer.send(frame)

    def _forward_log(self, attempt: Attempt, rank: int, request: LogLines) -> None:
        hook = self._log_hooks.get(attempt.gang_id)
        if hook is None:
            return
        record = LogRecord(gang_attempt=attempt.key[0], rank=rank, stream=request.stream, text=request.text,
                           dropped=request.dropped)
        try:
            hook(record)
        except Exception:  # a broken hook must not take the coordinator down
            log.exception("coordinator: log hook of gang %s failed", attempt.gang_id[:8])

    def _forward_metrics(self, attempt: Attempt, rank: int, request: Metrics) -> None:
        hook = self._metric_hooks.get(attempt.gang_id)
        if hook is None:
            return
        record = MetricRecord(gang_attempt=attempt.key[0], rank=rank, points=request.points, dropped=request.dropped)
        try:
            hook(record)
        except Exception:  # a broken hook must not take the coordinator down
            log.exception("coordinator: metric hook of gang %s failed", attempt.gang_id[:8])

    def _report_abort(self, attempt: Attempt) -> None:
        hook = self._abort_hooks.get(attempt.gang_id)
        if hook is None or attempt.abort_reported or attempt.failure is None:
            return
        if attempt.settling:  # a failing rank waits for its peers' reports: the driver hears the whole story after
            return
        attempt.abort_reported = True
        threading.Thread(target=hook, args=(attempt.key, attempt.failure), daemon=True,
                         name="sparkhydrogen-on-abort").start()

    def _commit(self, attempt: Attempt, action: Complete) -> None:
        gang = self.registry.get(attempt.gang_id)
        error = (gang.commit(attempt.key, action.seq, action.payloads, self.config.checkpoint_max_bytes)
                 if gang is not None else ErrorInfo("RegistrationError", "the gang was removed"))
        if error is None:
            header: dict[str, Any] = {"op": action.op.value, "seq": action.seq, "sizes": []}
            if gang is not None and gang.grow_to is not None and gang.grow_to > attempt.world_size:
                header["grow"] = gang.grow_to  # elastic (grow="checkpoint"): the ranks end here, to relaunch larger
            frame = encode_frame(Kind.REPLY, header)
        else:
            frame = error_frame(error)
        _send_to(self.roster.endpoints(attempt), action.ranks, frame)

    def _expire(self) -> None:
        now = self.now()
        for gang in list(self.registry.gangs.values()):
            for attempt in list(gang.attempts.values()):
                if attempt.state is AttemptState.ABORTED and attempt.settling:
                    self._dispatch(attempt, attempt.tick(now))
                if attempt.state is not AttemptState.RUNNING:
                    continue
                if not attempt.started and attempt.start_deadline is not None and now >= attempt.start_deadline:
                    self._dispatch(attempt, attempt.gate_timeout(now, self.registry.competitors(gang.gang_id),
                                                                 gang.note))
                else:
                    self._dispatch(attempt, attempt.tick(now))
            if gang.windows:
                for failure in gang.expire_windows(now, self.registry.competitors(gang.gang_id)):
                    log.error("coordinator: %s", failure.error.message)
                    hook = self._abort_hooks.get(gang.gang_id)
                    if hook is not None:
                        threading.Thread(target=hook, args=(failure.key, failure.error), daemon=True,
                                         name="sparkhydrogen-on-abort").start()

    def _tick(self) -> None:
        loop = self._loop
        if loop is None:
            return
        self._expire()
        loop.call_later(self.config.tick_interval, self._tick)
