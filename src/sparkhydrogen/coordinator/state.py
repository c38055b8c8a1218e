"""The coordinator's rules as a pure state machine: no sockets, no threads, no clock.

Every method takes ``now`` (seconds, any monotonic origin) and returns the
*actions* the I/O layer must carry out: complete a round for some ranks,
reject some ranks' calls with an error, or log a line.  That keeps the rules
(membership, sequenced collectives, aborts, timeouts) testable exhaustively
with a fake clock.

Vocabulary:

* **gang** - one barrier job as the driver declared it (id, secret, world size);
* **attempt** - one launch of that gang's tasks, keyed by :data:`AttemptKey`
  ``(gang attempt, Spark stage id, Spark stage attempt)``;
* **round** - the k-th collective call (``seq == k``) of every rank of an attempt.

A *gated* attempt (coordinated placement: an ordinary Spark stage, no barrier
stage) holds every rank's registration at a start gate until all ``world_size``
ranks have joined (:class:`Start`), within a bound (``start_timeout``); a second
copy of a live rank (a speculative duplicate) is held aside (:class:`Hold`) and
never joins; a re-launched single task of an aborted attempt is refused.

Besides the rules of one attempt (:class:`Attempt`) this module holds the rules
across a gang's life (:class:`Gang`: generations, checkpoints, failure records,
its :class:`Budget` of buffered bytes, retiring an ephemeral gang after success),
the admission rule across gangs (:meth:`Registry.admit`, ``max_gangs``) and which
endpoint speaks for which rank (:class:`Roster`, generic over the I/O layer's
connection type).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from ..errors import ErrorInfo, RegistrationError
from .timeline import Timeline

__all__ = [
    "Op",
    "AttemptKey",
    "MemberInfo",
    "Call",
    "Complete",
    "Reject",
    "Log",
    "Stuck",
    "MissingRank",
    "Start",
    "Hold",
    "Settled",
    "Action",
    "AttemptState",
    "Attempt",
    "Gang",
    "Checkpoint",
    "Budget",
    "FailureKind",
    "FailureRecord",
    "Roster",
    "Registry",
    "START_TIMEOUT_TYPE",
]

E = TypeVar("E")

AttemptKey = tuple[int, int, int]

#: ``ErrorInfo.type`` of a gated attempt that did not gather all its ranks within its start bound.
START_TIMEOUT_TYPE = "GangStartTimeoutError"


class Op(str, enum.Enum):
    BARRIER = "barrier"
    ALLGATHER = "allGather"
    BROADCAST = "broadcast"
    CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class MemberInfo:
    """What a rank tells the coordinator about itself when it registers."""

    host: str = "?"
    pid: int = 0
    task_attempt_id: int = -1
    address: str = ""  # where peers reach this rank (gated gangs: the task's side of its coordinator connection)


@dataclass(frozen=True)
class Call:
    """One rank's collective call: the ``seq``-th of its task."""

    op: Op
    seq: int
    payload: bytes = b""
    root: int | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class Complete:
    """Round ``seq`` completed: reply to ``ranks`` with ``payloads`` (rank order, or root's only)."""

    ranks: tuple[int, ...]
    seq: int
    op: Op
    payloads: tuple[bytes, ...]


@dataclass(frozen=True)
class Reject:
    """Fail the pending (or just made) call of each of ``ranks`` with ``error``."""

    ranks: tuple[int, ...]
    error: ErrorInfo


@dataclass(frozen=True)
class Log:
    level: str
    message: str


#: How a busy rank (connection alive, heartbeats stopped) is described wherever its whereabouts are.
BUSY_NOTE = " (busy: its connection is alive but its heartbeats stopped, e.g. a long call holding the GIL)"


@dataclass(frozen=True)
class MissingRank:
    """A rank a stuck collective waits for, as last seen (``host is None``: it never connected)."""

    rank: int
    host: str | None = None
    pid: int | None = None
    last_heard: float | None = None  # seconds before the line was made
    last_call: str | None = None
    finished: bool = False
    busy: bool = False  # connection alive, heartbeats stopped (see :meth:`Attempt.busy_ranks`)

    def describe(self) -> str:
        if self.host is None:
            return f"rank {self.rank} never connected"
        where = f"host {self.host}, pid {self.pid}"
        if self.finished:
            return f"rank {self.rank} ({where}) already finished its task"
        text = f"rank {self.rank} ({where}) last heard {self.last_heard or 0.0:.1f} s ago"
        text += f" in {self.last_call}" if self.last_call else ""
        return text + (BUSY_NOTE if self.busy else "")


@dataclass(frozen=True)
class Stuck(Log):
    """A collective has waited ``waited`` seconds for ``missing`` ranks: log :attr:`message` (one line).

    ``message`` is :meth:`line` without gang name or stacks; the I/O layer may log
    :meth:`line` with both instead.
    """

    label: str
    call: str
    waited: float
    missing: tuple[MissingRank, ...]

    def line(self, gang_name: str = "", stacks: Mapping[int, str] | None = None) -> str:
        """The stuck-collective log line: gang, call, missing ranks, each one's last-heard time.

        ``stacks``: ``{rank: Python stack}`` of missing ranks, appended per rank when given
        (collected through the coordinator by the I/O layer; ``None``: not collected).

        >>> Stuck("warning", "", "gang ab attempt 0", "barrier #3", 61.0, (MissingRank(1, "h", 7, 61.0),)).line()
        'gang ab attempt 0: barrier #3 has waited 61 s for rank(s) 1: rank 1 (host h, pid 7) last heard 61.0 s ago'
        """
        named = f"{self.label} ({gang_name})" if gang_name else self.label
        text = (f"{named}: {self.call} has waited {self.waited:.0f} s for rank(s) "
                f"{_fmt_ranks([m.rank for m in self.missing])}: " + "; ".join(m.describe() for m in self.missing))
        for m in self.missing:
            stack = (stacks or {}).get(m.rank)
            if stack:
                text += f"\n--- rank {m.rank} stack ---\n{stack.rstrip()}"
        return text


@dataclass(frozen=True)
class Start:
    """The start gate opened: answer the held registration of each of ``ranks``, telling every rank's address."""

    ranks: tuple[int, ...]
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class Hold:
    """``rank``'s registration is a second copy of a live rank (a speculative duplicate): it never joins.

    Its registration stays unanswered until the attempt aborts (then it is refused);
    Spark kills it once the live copy's result arrives. Answering it with success or a
    failure earlier would let Spark take its (empty) result, or count a failure.
    """

    rank: int


@dataclass(frozen=True)
class Settled:
    """The aborted attempt settled for ``ranks``, who reported a failure and asked to hear the rest.

    Every other rank has reported its own failure, finished or gone, or the settle
    bound passed. ``failure`` is the attempt's root cause (the first failure the
    coordinator heard) with the later reports of other ranks in ``failure.others``.
    """

    ranks: tuple[int, ...]
    failure: ErrorInfo | None


Action = Complete | Reject | Log | Start | Hold | Settled  # Stuck is a Log

#: Later failure reports of other ranks kept with an attempt's root cause (each without its traceback).
MAX_OTHER_FAILURES = 8

#: Root causes that name a rank which said nothing itself (it never arrived): its own later report is news.
_VERDICTS_ON_SILENT_RANKS = frozenset({"CollectiveTimeoutError"})


class AttemptState(str, enum.Enum):
    RUNNING = "running"
    ABORTED = "aborted"
    FINISHED = "finished"


@dataclass
class _Member:
    info: MemberInfo
    registered_at: float
    last_heard: float
    next_seq: int = 0
    last_op: str | None = None
    finished: bool = False
    closed_early: bool = False  # finished because its consumer stopped reading its partition
    connected: bool = True
    #: Set while the rank is known busy: when it was last heard before its heartbeats stopped (logged once).
    busy_since: float | None = None


@dataclass
class _Arrival:
    call: Call
    at: float


@dataclass
class _Round:
    seq: int
    op: Op
    root: int | None
    started: float
    arrivals: dict[int, _Arrival] = field(default_factory=dict)
    last_logged: float = 0.0


def start_timeout_message(label: str, world_size: int, waited: float, bound: float | None,
                          joined: Mapping[int, str], competitors: Sequence[str] = (), note: str = "") -> str:
    """Why a gated launch never started: who joined, who is missing, what else holds slots, the fix (pure).

    >>> start_timeout_message("gang ab attempt 0", 2, 5.0, 5.0, {0: "h1"})[:62]
    'gang ab attempt 0: only 1 of 2 ranks joined the start gate wit'
    """
    missing = [r for r in range(world_size) if r not in joined]
    text = (f"{label}: only {len(joined)} of {world_size} ranks joined the start gate within {waited:.0f} s"
            + (f" (spark.hydrogen.launch.startTimeout={bound:g}s)" if bound is not None else "")
            + f"; missing rank(s) {_fmt_ranks(missing)}")
    if joined:
        text += "; joined: " + ", ".join(f"rank {r} (host {h})" for r, h in sorted(joined.items()))
    if note:
        text += f". Cluster: {note}"
    if competitors:
        text += ". Another gang holds slots: " + "; ".join(competitors)
    return text + (". Add executors (or raise spark.dynamicAllocation.maxExecutors), run fewer ranks, run competing "
                   "gangs one after the other, or raise spark.hydrogen.launch.startTimeout")


def _call_name(op: str, seq: int) -> str:
    return f"{op} (collective call #{seq + 1})"


def _fmt_ranks(ranks: Sequence[int]) -> str:
    return ", ".join(str(r) for r in sorted(ranks))


def _ranks_phrase(ranks: Sequence[int]) -> str:
    """``rank 1`` or ``ranks 1, 3`` (pure).

    >>> _ranks_phrase([3, 1]), _ranks_phrase([2])
    ('ranks 1, 3', 'rank 2')
    """
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {_fmt_ranks(ranks)}"


class Attempt:
    """One launch of a gang: membership, sequenced rounds, abort and timeout rules."""

    def __init__(self, gang_id: str, key: AttemptKey, world_size: int, now: float,
                 missing_log_interval: float = 30.0, liveness_timeout: float | None = None, *,
                 gated: bool = False, start_timeout: float | None = None, window_start: float | None = None,
                 stuck_after: float | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if start_timeout is not None and not start_timeout > 0:
            raise ValueError(f"start_timeout must be > 0 seconds or None, got {start_timeout!r}")
        #: Gated: registrations are answered only once all ranks have joined (the start gate).
        self.gated = gated
        self.started = not gated
        self.started_at: float | None = None if gated else now
        opened = now if window_start is None else min(window_start, now)
        #: When the gate's bound expires (``None``: no bound); counted from the launch when the driver told it.
        self.start_deadline = None if not gated or start_timeout is None else opened + start_timeout
        self.start_timeout = start_timeout
        self.window_start = opened
        self.gang_id = gang_id
        self.key = key
        self.world_size = world_size
        self.created = now
        self.missing_log_interval = missing_log_interval
        #: A collective waiting this long logs a :class:`Stuck` line, and again every as long (None: the interval).
        self.stuck_after = stuck_after if stuck_after is not None else missing_log_interval
        #: Each completed round's arrival times, bounded (stragglers, the report's timeline).
        self.timeline = Timeline(world_size, now)
        self.liveness_timeout = liveness_timeout
        self.state = AttemptState.RUNNING
        self.members: dict[int, _Member] = {}
        self.rounds: dict[int, _Round] = {}
        #: Payload bytes held by rounds that have not completed yet (counted against the gang's buffer limit).
        self.buffered_bytes = 0
        self._finished: set[int] = set()
        self.abort_error: ErrorInfo | None = None
        self.failure: ErrorInfo | None = None
        #: Set by the I/O layer once it has told the driver's abort hook about this attempt.
        self.abort_reported = False
        #: Ranks that reported a failure of their own (at most one report each).
        self.reported: set[int] = set()
        #: Ranks waiting to hear how the aborted attempt settled, with the bound of each wait.
        self._settle_waiters: dict[int, float] = {}
        self._last_registration_log = now

    # -- description -------------------------------------------------------
    @property
    def label(self) -> str:
        attempt, stage, stage_attempt = self.key
        return f"gang {self.gang_id[:8]} attempt {attempt} (stage {stage}.{stage_attempt})"

    def _whereabouts(self, rank: int, now: float) -> str:
        member = self.members.get(rank)
        if member is None:
            return f"rank {rank} never connected"
        where = f"host {member.info.host}, pid {member.info.pid}"
        if member.finished:
            return f"rank {rank} ({where}) already finished its task"
        last = f"last heard {now - member.last_heard:.1f} s ago"
        if member.last_op:
            last += f" in {member.last_op}"
        if rank in self.busy_ranks(now):
            last += BUSY_NOTE
        return f"rank {rank} ({where}) {last}"

    @property
    def done(self) -> bool:
        """True once nothing more can happen: finished, or aborted with every rank gone."""
        if self.state is AttemptState.FINISHED:
            return True
        return self.state is AttemptState.ABORTED and not any(m.connected for m in self.members.values())

    # -- membership --------------------------------------------------------
    def register(self, rank: int, info: MemberInfo, now: float) -> list[Action]:
        """Admit ``rank``; raises :class:`RegistrationError` for a bad or duplicate rank."""
        if not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise RegistrationError(f"rank {rank!r} is outside 0..{self.world_size - 1} for {self.label}")
        if self.gated:
            return self._register_gated(rank, info, now)
        if rank in self.members:
            old = self.members[rank].info
            raise RegistrationError(
                f"rank {rank} is already registered in {self.label} (host {old.host}, pid {old.pid}); "
                f"refusing a second registration from host {info.host}, pid {info.pid}"
            )
        self.members[rank] = _Member(info=info, registered_at=now, last_heard=now)
        if self.state is not AttemptState.RUNNING:
            return [Reject((rank,), self._closed_error())]
        return []

    def _register_gated(self, rank: int, info: MemberInfo, now: float) -> list[Action]:
        member = self.members.get(rank)
        if self.state is AttemptState.ABORTED or (member is not None and self.started and not member.connected):
            raise RegistrationError(
                f"{self.label}: refusing task {info.task_attempt_id} (host {info.host}) for rank {rank}: "
                + (f"the attempt was aborted ({self.failure.describe()}); " if self.failure is not None else
                   "its rank's first task was lost after the gang started; ")
                + "Spark re-launched this one task, but a gang never runs with a mixed set of tasks: it is "
                "relaunched whole as a new attempt (max_retries), or fails"
            )
        if member is not None and (member.connected or member.finished):
            return [Hold(rank)]  # a speculative duplicate of a live (or finished) rank
        replaced = member is not None  # its first task was lost while waiting at the gate: nothing ran yet
        self.members[rank] = _Member(info=info, registered_at=now, last_heard=now)
        actions: list[Action] = []
        if replaced:
            actions.append(Log("warning", f"{self.label}: rank {rank} re-joined at the start gate from host "
                                          f"{info.host} (its first task was lost before the gang started)"))
        if self.state is AttemptState.RUNNING and self.joined == self.world_size:
            self.started, self.started_at = True, now
            for other in self.members.values():
                other.last_heard = now  # waiting at the gate is not silence
            addresses = tuple(self.members[r].info.address or self.members[r].info.host for r in range(self.world_size))
            actions.append(Start(tuple(range(self.world_size)), addresses))
        return actions

    @property
    def joined(self) -> int:
        """Ranks registered and connected (for a gated attempt before its start: waiting at the gate)."""
        return sum(1 for m in self.members.values() if m.connected)

    @property
    def missing(self) -> list[int]:
        return [r for r in range(self.world_size) if r not in self.members or not self.members[r].connected]

    def gate_timeout(self, now: float, competitors: Sequence[str] = (), note: str = "") -> list[Action]:
        """The start bound expired with ranks missing: abort, naming who is missing and what else holds slots."""
        if not self.gated or self.started or self.state is not AttemptState.RUNNING:
            return []
        error = ErrorInfo(type=START_TIMEOUT_TYPE, message=start_timeout_message(
            self.label, self.world_size, now - self.window_start, self.start_timeout,
            {r: m.info.host for r, m in self.members.items() if m.connected}, competitors, note))
        return self._abort(error, failed_rank=None, root_cause=error)

    def heard(self, rank: int, now: float) -> list[Action]:
        """Bytes (a heartbeat, any frame or part of one) arrived from ``rank``; a busy rank's return is logged."""
        member = self._member(rank)
        member.last_heard = now
        if member.busy_since is None:
            return []
        silent, member.busy_since = now - member.busy_since, None
        return [Log("warning", f"{self.label}: rank {rank} (host {member.info.host}, pid {member.info.pid}) is "
                               f"heard from again after {silent:.1f} s busy")]

    def busy_ranks(self, now: float) -> list[int]:
        """Ranks alive but silent: connected, unfinished, not heard from within the liveness timeout.

        A rank whose process holds the GIL (a long sort, pickling a large value, a C call)
        sends no heartbeat, since those come from a Python thread; its connection stays up,
        because the kernel, not the interpreter, keeps it (and answers the coordinator's TCP
        keepalive probes). Such a rank is busy, not dead: it is reported, never failed for
        that alone. A dead process closes its connection; an unreachable host fails the
        keepalive, which the I/O layer reports as a closed connection (:meth:`disconnect`).
        A process stopped by a signal looks busy too: a collective ``timeout`` bounds it.
        """
        if self.liveness_timeout is None or self.state is not AttemptState.RUNNING or not self.started:
            return []
        return [r for r, m in sorted(self.members.items())
                if m.connected and not m.finished and now - m.last_heard > self.liveness_timeout]

    def finish(self, rank: int, now: float, closed_early: bool = False) -> list[Action]:
        """``rank``'s task ended normally after ``next_seq`` collectives.

        ``closed_early``: its consumer stopped reading the partition (a chained
        ``take()``, ``islice``), so it will make no more collectives. Peers that wait
        in (or later make) one it never made fail with :class:`PartitionClosedError`,
        not a mismatch; if nobody waits, the attempt completes as usual.
        """
        member = self._member(rank)
        member.finished = True
        member.closed_early = closed_early
        self._finished.add(rank)
        member.last_heard = now
        if self.state is not AttemptState.RUNNING:
            return self._settle(now)
        waiting = [r for r in self.rounds.values() if r.seq >= member.next_seq]
        if waiting:
            rnd = min(waiting, key=lambda r: r.seq)
            ranks = sorted(rnd.arrivals)
            if closed_early:
                error = self._closed_early_error(rank, rnd.op.value, rnd.seq, ranks)
                return self._abort(error, failed_rank=None, root_cause=error)
            error = ErrorInfo(
                type="CollectiveMismatchError",
                message=(
                    f"{self.label}: rank {rank} finished its task after {member.next_seq} collective call(s), "
                    f"but rank(s) {_fmt_ranks(ranks)} called {_call_name(rnd.op.value, rnd.seq)}: every rank "
                    "must make the same sequence of barrier/allGather/broadcast calls"
                ),
                rank=rank,
            )
            return self._abort(error, failed_rank=None, root_cause=error)
        if len(self._finished) == self.world_size:
            self.state = AttemptState.FINISHED
        return []

    def fail(self, rank: int, error: ErrorInfo, now: float, settle: float | None = None) -> list[Action]:
        """``rank``'s user code raised ``error``: abort the attempt for everyone.

        A call of ``rank`` itself still pending (another thread of the task waits in a
        collective) is rejected too, so that thread does not wait forever. A report
        after the attempt aborted is kept with the root cause (:attr:`ErrorInfo.others`):
        when a rank's teardown broke its peers' connections, the peers often report
        first, and the report that names the real cause comes second.

        ``settle`` (seconds): ``rank`` waits to hear the others' failures too; it is
        answered (:class:`Settled`) once every other rank has reported, finished or
        gone, or after ``settle`` seconds, whichever comes first.
        """
        member = self._member(rank)
        member.last_heard = now
        first = rank not in self.reported
        self.reported.add(rank)
        actions: list[Action] = []
        if self.state is AttemptState.RUNNING:
            actions = self._abort_for(rank, error, tell_failed=True)
        elif first and self.state is AttemptState.ABORTED and self.failure is not None and (
                self.failure.rank != rank or self.failure.type in _VERDICTS_ON_SILENT_RANKS):
            self._add_other(error)
            actions.append(Log("warning", f"{self.label}: after it had failed, {error.headline()}"))
        if settle is not None:
            self._settle_waiters[rank] = now + max(0.0, settle)
        return actions + self._settle(now)

    def _add_other(self, error: ErrorInfo) -> None:
        assert self.failure is not None
        kept = len(self.failure.extra.get("others") or ())
        if kept >= MAX_OTHER_FAILURES:
            more = int(self.failure.extra.get("others_more", 0)) + 1
            self.failure = replace(self.failure, extra={**self.failure.extra, "others_more": more})
            return
        brief = ErrorInfo(error.type, error.message[:2000], error.rank)
        self.failure = self.failure.with_other(brief)

    @property
    def settling(self) -> bool:
        """Some rank waits to hear how this aborted attempt settles (the driver's abort hook waits too)."""
        return bool(self._settle_waiters)

    def _settle(self, now: float) -> list[Action]:
        """Answer the ranks waiting for the settle, if every other rank is accounted for or their bound passed."""
        if not self._settle_waiters:
            return []
        if self.state is not AttemptState.RUNNING and all(
            not m.connected or m.finished or r in self.reported for r, m in self.members.items()
        ):
            ranks = tuple(sorted(self._settle_waiters))
        else:
            ranks = tuple(sorted(r for r, bound in self._settle_waiters.items() if now >= bound))
        if not ranks:
            return []
        for rank in ranks:
            del self._settle_waiters[rank]
        return [Settled(ranks, self.failure)]

    def disconnect(self, rank: int, now: float) -> list[Action]:
        """``rank``'s connection closed. Before it finished, that is a failure of the rank."""
        member = self.members.get(rank)
        if member is None:
            return []
        member.connected = False
        self._settle_waiters.pop(rank, None)
        if member.finished or self.state is not AttemptState.RUNNING:
            return self._settle(now)
        if not self.started:  # lost while waiting at the gate: no user code ran, its rank may join again
            return [Log("warning", f"{self.label}: rank {rank}'s task (host {member.info.host}) was lost while "
                                   f"waiting at the start gate; {self.joined} of {self.world_size} ranks are waiting")]
        error = ErrorInfo(
            type="RankLostError",
            message=(
                f"rank {rank}'s process died or lost its connection to the coordinator (host {member.info.host}, "
                f"pid {member.info.pid}, last heard {now - member.last_heard:.1f} s ago"
                + (f" in {member.last_op}" if member.last_op else "")
                + ") before finishing its task: its Python worker exited or was killed, its executor was lost, or "
                "its host stopped answering (TCP keepalive)"
            ),
            rank=rank,
        )
        return self._abort_for(rank, error)

    def abort(self, reason: str) -> list[Action]:
        """Abort from outside the gang (driver cancelled the job, coordinator stopping)."""
        if self.state is not AttemptState.RUNNING:
            return []
        error = ErrorInfo(type="GangAbortedError", message=f"{self.label} was aborted: {reason}")
        return self._abort(error, failed_rank=None, root_cause=error)

    # -- collectives -------------------------------------------------------
    def call(self, rank: int, call: Call, now: float) -> list[Action]:
        """``rank`` makes its ``call.seq``-th collective call."""
        member = self._member(rank)
        member.last_heard = now
        if member.finished:
            raise RegistrationError(f"rank {rank} made a collective call after finishing its task")
        if call.op is Op.BROADCAST and (
            isinstance(call.root, bool) or not isinstance(call.root, int) or not 0 <= call.root < self.world_size
        ):
            raise ValueError(f"broadcast root {call.root!r} is not a rank of {self.label} (0..{self.world_size - 1})")
        if call.seq != member.next_seq:
            raise RegistrationError(
                f"rank {rank} sent collective call #{call.seq + 1} but #{member.next_seq + 1} was expected"
            )
        member.next_seq += 1
        member.last_op = _call_name(call.op.value, call.seq)
        if self.state is not AttemptState.RUNNING:
            return [Reject((rank,), self._closed_error())]
        finished = [r for r in self._finished if self.members[r].next_seq <= call.seq]  # O(finished), not O(world)
        closed = [r for r in finished if self.members[r].closed_early]
        if closed:
            error = self._closed_early_error(min(closed), call.op.value, call.seq, [rank])
            return self._abort(error, failed_rank=None, root_cause=error, also=(rank,))
        if finished:
            error = ErrorInfo(
                type="CollectiveMismatchError",
                message=(
                    f"{self.label}: rank {rank} called {_call_name(call.op.value, call.seq)}, but rank(s) "
                    f"{_fmt_ranks(finished)} already finished their task after "
                    f"{min(self.members[r].next_seq for r in finished)} collective call(s): every rank must "
                    "make the same sequence of barrier/allGather/broadcast calls"
                ),
                rank=rank,
            )
            return self._abort(error, failed_rank=None, root_cause=error, also=(rank,))
        rnd = self.rounds.get(call.seq)
        if rnd is None:
            rnd = self.rounds[call.seq] = _Round(call.seq, call.op, call.root, started=now, last_logged=now)
        rnd.arrivals[rank] = _Arrival(call, now)
        self.buffered_bytes += len(call.payload)
        if rnd.op is not call.op or rnd.root != call.root:
            return self._mismatch(rnd)
        if len(rnd.arrivals) < self.world_size:
            return []
        del self.rounds[call.seq]
        self.buffered_bytes -= sum(len(a.call.payload) for a in rnd.arrivals.values())
        ranks = tuple(range(self.world_size))
        self.timeline.record(call.seq, call.op.value, [rnd.arrivals[r].at for r in ranks], now, rank)
        if call.op is Op.BARRIER:
            payloads: tuple[bytes, ...] = ()
        elif call.op is Op.CHECKPOINT:
            payloads = tuple(rnd.arrivals[r].call.payload for r in ranks)
        elif call.op is Op.BROADCAST:
            payloads = (rnd.arrivals[rnd.root].call.payload,)  # type: ignore[index]
        else:
            payloads = tuple(rnd.arrivals[r].call.payload for r in ranks)
        return [Complete(ranks, call.seq, call.op, payloads)]

    def _closed_early_error(self, rank: int, op: str, seq: int, callers: Sequence[int]) -> ErrorInfo:
        return ErrorInfo(
            type="PartitionClosedError",
            message=(
                f"{self.label}: rank {rank}'s partition was closed early by its consumer (e.g. a chained "
                f"take()/islice) before its collective #{seq + 1} ({op}), which rank(s) {_fmt_ranks(callers)} "
                "called: consume every partition of a barrier stage to its end (e.g. collect() it before "
                "take()/limit), or make every rank stop after the same collectives"
            ),
            rank=rank,
        )

    def _mismatch(self, rnd: _Round) -> list[Action]:
        by_call: dict[str, list[int]] = {}
        for r, arrival in sorted(rnd.arrivals.items()):
            desc = arrival.call.op.value + ("" if arrival.call.root is None else f"(root={arrival.call.root})")
            by_call.setdefault(desc, []).append(r)
        detail = "; ".join(f"rank(s) {_fmt_ranks(rs)} called {desc}" for desc, rs in by_call.items())
        error = ErrorInfo(
            type="CollectiveMismatchError",
            message=(
                f"{self.label}: mismatched collective call #{rnd.seq + 1}: {detail}. Every rank must make "
                "the same sequence of barrier/allGather/broadcast calls (with the same root)"
            ),
        )
        return self._abort(error, failed_rank=None, root_cause=error)

    # -- time --------------------------------------------------------------
    def tick(self, now: float) -> list[Action]:
        """Expire timed-out calls and log rounds that wait long for missing ranks (aborted: settle bounds)."""
        if self.state is not AttemptState.RUNNING:
            return self._settle(now)
        if not self.started:
            return self._tick_gate(now)
        actions: list[Action] = self._note_busy(now)
        for rnd in list(self.rounds.values()):
            expired = [
                (r, a) for r, a in rnd.arrivals.items()
                if a.call.timeout is not None and now >= a.at + a.call.timeout
            ]
            if expired:
                return self._timeout(rnd, expired, now)
            if now - rnd.last_logged >= self.stuck_after:
                rnd.last_logged = now
                actions.append(self._stuck(rnd, now))
        if len(self.members) < self.world_size and now - self._last_registration_log >= self.missing_log_interval:
            self._last_registration_log = now
            missing = [r for r in range(self.world_size) if r not in self.members]
            actions.append(Log("warning", (
                f"{self.label}: rank(s) {_fmt_ranks(missing)} have not connected "
                f"{now - self.created:.0f} s after the first rank did"
            )))
        return actions

    def _stuck(self, rnd: _Round, now: float) -> Stuck:
        missing = []
        busy = set(self.busy_ranks(now))
        for r in range(self.world_size):
            if r in rnd.arrivals:
                continue
            m = self.members.get(r)
            missing.append(MissingRank(r) if m is None else MissingRank(
                r, m.info.host, m.info.pid, now - m.last_heard, m.last_op, m.finished, r in busy))
        stuck = Stuck("warning", "", self.label, _call_name(rnd.op.value, rnd.seq), now - rnd.started, tuple(missing))
        return replace(stuck, message=stuck.line())

    def _tick_gate(self, now: float) -> list[Action]:
        if self.start_deadline is not None and now >= self.start_deadline:
            return self.gate_timeout(now)
        if now - self._last_registration_log >= self.missing_log_interval:
            self._last_registration_log = now
            return [Log("warning", (
                f"{self.label}: {self.joined} of {self.world_size} ranks waiting at the start gate after "
                f"{now - self.window_start:.0f} s; missing rank(s) {_fmt_ranks(self.missing)}"
                + (f" (start bound {self.start_timeout:g} s)" if self.start_timeout is not None else "")
            ))]
        return []

    def _note_busy(self, now: float) -> list[Action]:
        """Log once when a rank turns busy (see :meth:`busy_ranks`); :meth:`heard` logs its return."""
        actions: list[Action] = []
        for rank in self.busy_ranks(now):
            member = self.members[rank]
            if member.busy_since is None:
                member.busy_since = member.last_heard
                actions.append(Log("warning", (
                    f"{self.label}: rank {rank} (host {member.info.host}, pid {member.info.pid}) has sent no "
                    f"heartbeat for {now - member.last_heard:.1f} s "
                    f"(spark.hydrogen.heartbeat.timeout={self.liveness_timeout:g}s), but its connection is alive: "
                    "it is busy (a long call holding the GIL: a sort, pickling a large value, a C extension) or "
                    "stopped; it is kept, not failed"
                    + (f" (its last call: {member.last_op})" if member.last_op else "")
                )))
        return actions

    def _timeout(self, rnd: _Round, expired: list[tuple[int, _Arrival]], now: float) -> list[Action]:
        """A call's timeout expired: the ranks that never arrived are the failure, those that waited the detail."""
        _, arrival = min(expired, key=lambda item: item[1].at + (item[1].call.timeout or 0.0))
        missing = [r for r in range(self.world_size) if r not in rnd.arrivals]
        waited = sorted(rnd.arrivals)
        timeout = arrival.call.timeout or 0.0
        error = ErrorInfo(
            type="CollectiveTimeoutError",
            message=(
                f"{_ranks_phrase(missing)} never reached {_call_name(rnd.op.value, rnd.seq)} within {timeout:g} s "
                f"({_ranks_phrase(waited)} waited): "
                + "; ".join(self._whereabouts(r, now) for r in missing)
            ),
            rank=min(missing),
            extra={"missing": missing, "waited": waited, "seq": rnd.seq, "op": rnd.op.value, "timeout": timeout},
        )
        return self._abort(error, failed_rank=None, root_cause=error, also=tuple(r for r, _ in expired))

    # -- aborting ----------------------------------------------------------
    def _abort_for(self, rank: int, cause: ErrorInfo, tell_failed: bool = False) -> list[Action]:
        error = ErrorInfo(
            type="GangAbortedError",
            message=f"{self.label} aborted: {cause.describe()}" + (
                f"\n--- traceback of rank {rank} ---\n{cause.traceback}" if cause.traceback else ""
            ),
            rank=rank,
            extra={"failed_rank": rank, "cause": cause.to_json()},
        )
        return self._abort(error, failed_rank=None if tell_failed else rank, root_cause=cause)

    def _abort(self, error: ErrorInfo, failed_rank: int | None, root_cause: ErrorInfo,
               also: tuple[int, ...] = ()) -> list[Action]:
        """Move to ABORTED; reject every pending call (and the ranks in ``also``) with ``error``.

        ``failed_rank`` (gone, or not listening) is not told.
        """
        self.state = AttemptState.ABORTED
        self.abort_error = error
        self.failure = root_cause
        waiting = {r for rnd in self.rounds.values() for r in rnd.arrivals} | set(also)
        if not self.started:  # ranks held at the start gate
            waiting |= {r for r, m in self.members.items() if m.connected}
        if failed_rank is not None:
            waiting.discard(failed_rank)
        self.rounds.clear()
        self.buffered_bytes = 0
        actions: list[Action] = [Log("error", f"{self.label}: {root_cause.describe()}")]
        if waiting:
            actions.append(Reject(tuple(sorted(waiting)), error))
        return actions

    def _closed_error(self) -> ErrorInfo:
        return self.abort_error or ErrorInfo(
            type="GangAbortedError", message=f"{self.label} has already finished; no more collectives"
        )

    def _member(self, rank: int) -> _Member:
        member = self.members.get(rank)
        if member is None:
            raise RegistrationError(f"rank {rank} is not registered in {self.label}")
        return member


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint: every rank's state from one completed checkpoint round."""

    key: AttemptKey
    seq: int
    step: int
    payloads: tuple[bytes, ...]

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.payloads)


@dataclass
class Budget:
    """Bytes of one gang in the coordinator outside its attempts' rounds (those count themselves)."""

    receiving: int = 0  # announced payloads of frames being received
    sending: int = 0  # queued reply frames, each counted once however many ranks it goes to


class FailureKind(str, enum.Enum):
    ATTEMPT = "attempt"  # an attempt ran and aborted
    ADMISSION = "admission"  # a launch was refused before it could start (``max_gangs``)


@dataclass(frozen=True)
class FailureRecord:
    """A failure the gang remembers after its attempt is gone (or for a launch that never started).

    ``key`` is the failed attempt's; for :attr:`FailureKind.ADMISSION` it is the
    key the refused launch would have had (the next generation of its stage).
    """

    key: AttemptKey
    error: ErrorInfo
    kind: FailureKind = FailureKind.ATTEMPT


#: Failures a gang remembers beyond its kept attempts.
MAX_FAILURE_RECORDS = 16


@dataclass
class Gang:
    """A gang as declared by the driver; owns its attempts.

    An ``ephemeral`` gang (a bare job that will not be retried from a checkpoint)
    forgets its attempts and checkpoint once one attempt has succeeded and every
    connection of it is gone (:meth:`retire_if_complete`); what stays is the dormant
    declaration (id, secret, world size, name), so a re-evaluation of the same RDD can
    still join as a new generation.
    """

    gang_id: str
    secret: bytes
    world_size: int
    name: str = ""
    ephemeral: bool = False
    attempts: dict[AttemptKey, Attempt] = field(default_factory=dict)
    failures: list[FailureRecord] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    budget: Budget = field(default_factory=Budget)
    #: The newest attempt key forgotten by :meth:`retire_if_complete` (generations continue after it).
    retired: AttemptKey | None = None
    #: Coordinated placement: every attempt waits at a start gate for all ranks, within ``start_timeout`` s.
    gated: bool = False
    start_timeout: float | None = None
    #: Gang attempt -> when the driver launched it (the start bound counts from there, not from the first rank).
    windows: dict[int, float] = field(default_factory=dict)
    #: The driver's latest word on the cluster (executors alive/requested, slots), quoted in start-timeout errors.
    note: str = ""
    #: A *stage gang*: formed by the first task of a Spark stage that joins with a stage credential, not
    #: declared by the driver; the coordinator forgets it once its stages are done (see ``idle``).
    derived: bool = False
    #: Elastic gangs (``grow="checkpoint"``): the size the driver offers; the next committed checkpoint tells the ranks.
    grow_to: int | None = None

    def resize(self, world_size: int) -> None:
        """Elastic gangs: the next attempts have ``world_size`` ranks (running attempts keep theirs)."""
        self.world_size = world_size
        self.grow_to = None

    # -- the start gate ----------------------------------------------------
    def open_window(self, gang_attempt: int, now: float) -> None:
        """The driver launched ``gang_attempt`` now: its start bound counts from here."""
        self.windows.setdefault(gang_attempt, now)

    def gate_status(self, gang_attempt: int) -> tuple[int, bool]:
        """(ranks waiting at the gate or started, whether it opened) for the newest attempt of ``gang_attempt``."""
        attempts = [a for a in self.attempts.values() if a.key[0] == gang_attempt]
        if not attempts:
            return 0, False
        newest = max(attempts, key=lambda a: a.key)
        return newest.joined, newest.started

    def waiting_at_gate(self) -> int:
        """Ranks of this gang holding slots while waiting at a start gate (0 when none waits)."""
        return sum(a.joined for a in self.attempts.values()
                   if a.gated and not a.started and a.state is AttemptState.RUNNING)

    def expire_windows(self, now: float, competitors: Sequence[str] = ()) -> list[FailureRecord]:
        """Launches whose start bound passed with no rank registered at all: their failures (recorded here)."""
        if self.start_timeout is None:
            return []
        failures = []
        for gang_attempt, opened in list(self.windows.items()):
            if any(a.key[0] == gang_attempt for a in self.attempts.values()):
                del self.windows[gang_attempt]  # a rank registered: the attempt's own bound applies
                continue
            if now < opened + self.start_timeout:
                continue
            del self.windows[gang_attempt]
            label = f"gang {self.gang_id[:8]} attempt {gang_attempt}"
            error = ErrorInfo(START_TIMEOUT_TYPE, start_timeout_message(
                label, self.world_size, now - opened, self.start_timeout, {}, competitors, self.note))
            failure = FailureRecord((gang_attempt, -1, 0), error)
            self.record(failure)
            failures.append(failure)
        return failures

    # -- bytes -------------------------------------------------------------
    @property
    def buffered_bytes(self) -> int:
        """Bytes this gang has in the coordinator: payloads being received, held for rounds, queued for sending."""
        return self.budget.receiving + self.budget.sending + sum(a.buffered_bytes for a in self.attempts.values())

    def reserve(self, nbytes: int, limit: int) -> bool:
        """Reserve an announced payload of ``nbytes`` against ``limit``; ``False`` if it does not fit."""
        if self.buffered_bytes + nbytes > limit:
            return False
        self.budget.receiving += nbytes
        return True

    def release(self, nbytes: int) -> None:
        """A reserved payload has arrived (or will never): it no longer counts as being received."""
        self.budget.receiving -= nbytes

    @property
    def running(self) -> bool:
        return any(a.state is AttemptState.RUNNING for a in self.attempts.values())

    # -- checkpoints -------------------------------------------------------
    def commit(self, key: AttemptKey, seq: int, payloads: Sequence[bytes], max_bytes: int) -> ErrorInfo | None:
        """Keep every rank's state of a completed checkpoint round; an error if it is too large."""
        size = sum(len(p) for p in payloads)
        if size > max_bytes:
            return ErrorInfo(
                type="PayloadError",
                message=(
                    f"checkpoint of {size} bytes (all ranks together) exceeds the driver-side limit of "
                    f"{max_bytes} bytes (spark.hydrogen.checkpoint.maxSize): checkpoint less state, raise the "
                    "limit, or save large state to shared storage and checkpoint its path"
                ),
            )
        step = 0 if self.checkpoint is None else self.checkpoint.step + 1
        self.checkpoint = Checkpoint(key, seq, step, tuple(payloads))
        return None

    def restore(self, rank: int) -> bytes | None:
        """``rank``'s state in the last committed checkpoint, if any."""
        if self.checkpoint is None or not 0 <= rank < len(self.checkpoint.payloads):
            return None
        return self.checkpoint.payloads[rank]

    def restored(self, rank: int, exact: bool = False) -> tuple[bytes | None, int, int | None]:
        """(state, world size the checkpoint was written at, the rank whose state it is) for ``rank``.

        An elastic gang may restore at another size than it checkpointed at: a rank the
        checkpoint has no state for gets rank 0's (the same model, in data-parallel
        training), unless ``exact`` asks for that rank's state alone.
        """
        if self.checkpoint is None:
            return None, 0, None
        written = len(self.checkpoint.payloads)
        source = rank if 0 <= rank < written else (None if exact else 0)
        return (None if source is None else self.checkpoint.payloads[source]), written, source

    # -- attempts ----------------------------------------------------------
    def attempt_for(self, gang_attempt: int, stage_id: int, rank: int, task_attempt_id: int, now: float,
                    missing_log_interval: float = 30.0, liveness_timeout: float | None = None,
                    stuck_after: float | None = None) -> tuple[Attempt, list[tuple[Attempt, list[Action]]]]:
        """The attempt a registering task belongs to, created on first use.

        Python tasks cannot see Spark's stage attempt number, so the *generation*
        (third part of the key) is inferred from task attempt ids.  Spark gives the
        tasks of one barrier stage attempt ids from one window of ``world_size``
        consecutive numbers (it launches them in one scheduling pass), and every
        later stage attempt gets higher ids.  So a task starts a new generation
        when its rank is already taken by a lower id, or when its id cannot lie in
        the window of the current generation's members.  A gang attempt
        older than one already seen is stale and refused.

        Returns the attempt and, for each older attempt this one supersedes, the
        actions of aborting it.
        """
        seen = [a.key[0] for a in self.attempts.values()] + ([self.retired[0]] if self.retired else [])
        newest = max(seen, default=gang_attempt)
        if gang_attempt < newest:
            raise RegistrationError(
                f"gang {self.gang_id[:8]}: this task belongs to gang attempt {gang_attempt}, but attempt "
                f"{newest} has already started (the driver retried the gang); refusing the stale task"
            )
        superseded: list[tuple[Attempt, list[Action]]] = []
        if self.gated:
            return self._gated_attempt_for(gang_attempt, stage_id, now, missing_log_interval, liveness_timeout,
                                           stuck_after)
        same = [a for a in self.attempts.values() if a.key[:2] == (gang_attempt, stage_id)]
        current = max(same, key=lambda a: a.key[2], default=None)
        for older in sorted(same, key=lambda a: a.key[2], reverse=True)[1:]:
            if older.state is not AttemptState.RUNNING and _in_window(older, task_attempt_id):
                return older, superseded  # a straggler of an earlier launch: it is refused there
        if current is not None and not self._starts_new_generation(current, rank, task_attempt_id):
            return current, superseded
        generation = self.next_generation(gang_attempt, stage_id)
        for other in list(self.attempts.values()):
            if other.key[0] < gang_attempt or other is current:
                superseded.append((other, other.abort(
                    f"superseded by a newer launch of the gang (attempt {gang_attempt}.{generation})")))
        key: AttemptKey = (gang_attempt, stage_id, generation)
        attempt = Attempt(self.gang_id, key, self.world_size, now, missing_log_interval, liveness_timeout,
                          stuck_after=stuck_after)
        self.attempts[key] = attempt
        return attempt, superseded

    def _gated_attempt_for(self, gang_attempt: int, stage_id: int, now: float, missing_log_interval: float,
                           liveness_timeout: float | None, stuck_after: float | None = None,
                           ) -> tuple[Attempt, list[tuple[Attempt, list[Action]]]]:
        """Gated gangs: one attempt per (gang attempt, stage), never a new generation from Spark's task retries.

        An ordinary stage's task ids do not come in one window (tasks start as executors
        arrive, between other jobs' tasks), and Spark retries single tasks: every task of
        the stage joins (or is refused by) the stage's one attempt.
        """
        same = [a for a in self.attempts.values() if a.key[:2] == (gang_attempt, stage_id)]
        if same:
            return max(same, key=lambda a: a.key[2]), []
        generation = self.next_generation(gang_attempt, stage_id)
        superseded = [(other, other.abort(f"superseded by a newer launch of the gang (attempt {gang_attempt})"))
                      for other in list(self.attempts.values()) if other.key[0] < gang_attempt]
        key: AttemptKey = (gang_attempt, stage_id, generation)
        attempt = Attempt(self.gang_id, key, self.world_size, now, missing_log_interval, liveness_timeout,
                          gated=True, start_timeout=self.start_timeout,
                          window_start=self.windows.pop(gang_attempt, None), stuck_after=stuck_after)
        self.attempts[key] = attempt
        return attempt, superseded

    def next_generation(self, gang_attempt: int, stage_id: int) -> int:
        """The generation a new launch of ``(gang_attempt, stage_id)`` gets."""
        gens = [a.key[2] for a in self.attempts.values() if a.key[:2] == (gang_attempt, stage_id)]
        if self.retired is not None and self.retired[:2] == (gang_attempt, stage_id):
            gens.append(self.retired[2])
        return max(gens) + 1 if gens else 0

    @staticmethod
    def _starts_new_generation(current: Attempt, rank: int, task_attempt_id: int) -> bool:
        member = current.members.get(rank)
        if member is not None:
            if task_attempt_id <= member.info.task_attempt_id:
                raise RegistrationError(
                    f"rank {rank} is already registered in {current.label} by task {member.info.task_attempt_id} "
                    f"(host {member.info.host}, pid {member.info.pid}); refusing task {task_attempt_id}"
                )
            return True
        if current.members:
            ids = [m.info.task_attempt_id for m in current.members.values()]
            if task_attempt_id <= max(ids) - current.world_size:
                raise RegistrationError(
                    f"task {task_attempt_id} (rank {rank}) belongs to an earlier launch than {current.label}, "
                    "whose tasks have ids from a later window; refusing the stale task"
                )
            return task_attempt_id >= min(ids) + current.world_size
        return False

    def prune(self, keep_done: int = 8) -> None:
        """Forget all but the ``keep_done`` newest done attempts, remembering their failures.

        Done attempts are kept a while so that a late task of an aborted attempt
        joins it (and is refused at once) instead of starting a fresh attempt.
        """
        done = sorted((a for a in self.attempts.values() if a.done), key=lambda a: a.key)
        for attempt in done[: max(len(done) - keep_done, 0)]:
            if attempt.failure is not None:
                self.record(FailureRecord(attempt.key, attempt.failure))
            del self.attempts[attempt.key]

    def retire_if_complete(self) -> bool:
        """Ephemeral gangs: once an attempt succeeded and no connection is left, forget attempts and checkpoint.

        Returns ``True`` when it retired something. The gang stays declared (dormant).
        """
        if not self.ephemeral or not self.attempts:
            return False
        attempts = list(self.attempts.values())
        if not any(a.state is AttemptState.FINISHED for a in attempts):
            return False
        if any(a.state is AttemptState.RUNNING or any(m.connected for m in a.members.values()) for a in attempts):
            return False
        self.retired = max(a.key for a in attempts)
        self.attempts.clear()
        self.checkpoint = None
        return True

    @property
    def idle(self) -> bool:
        """No attempt runs and no task is connected: nothing of this gang can happen until a new stage joins."""
        return not any(a.state is AttemptState.RUNNING or any(m.connected for m in a.members.values())
                       for a in self.attempts.values())

    # -- failures ----------------------------------------------------------
    def record(self, failure: FailureRecord) -> bool:
        """Remember a failure (at most :data:`MAX_FAILURE_RECORDS`); ``False`` if the same one is known."""
        if failure.kind is FailureKind.ADMISSION and any(
            f.kind is FailureKind.ADMISSION and f.key[:2] == failure.key[:2]
            and f.error.message == failure.error.message for f in self.failures
        ):
            return False
        self.failures.append(failure)
        del self.failures[:-MAX_FAILURE_RECORDS]
        return True

    def last_failure(self, gang_attempt: int | None = None) -> tuple[AttemptKey, ErrorInfo] | None:
        """Most recent root-cause failure (of ``gang_attempt``, if given) across kept and pruned attempts."""
        live = [(a.key, a.failure) for a in self.attempts.values() if a.failure is not None]
        recorded = [(f.key, f.error) for f in self.failures]
        candidates = [(k, f) for k, f in recorded + live if gang_attempt is None or k[0] == gang_attempt]
        return max(candidates, key=lambda kv: kv[0]) if candidates else None


def _in_window(attempt: Attempt, task_attempt_id: int) -> bool:
    """Whether a task id can belong to the same launch as ``attempt``'s members (one window of ids)."""
    ids = [m.info.task_attempt_id for m in attempt.members.values()]
    return bool(ids) and max(ids) - attempt.world_size < task_attempt_id < min(ids) + attempt.world_size


class Roster(Generic[E]):
    """Which endpoint (the I/O layer's connection) speaks for each rank of each attempt.

    Pure bookkeeping: an attempt's entry goes when the attempt is done, a gang's
    entries when the gang is removed.
    """

    def __init__(self) -> None:
        self._by_attempt: dict[tuple[str, AttemptKey], dict[int, E]] = {}

    def attach(self, attempt: Attempt, rank: int, endpoint: E) -> None:
        self._by_attempt.setdefault((attempt.gang_id, attempt.key), {})[rank] = endpoint

    def detach(self, attempt: Attempt, rank: int, endpoint: E) -> None:
        """Forget ``endpoint`` for ``rank`` (if it is still the one attached)."""
        ident = (attempt.gang_id, attempt.key)
        members = self._by_attempt.get(ident)
        if members is not None and members.get(rank) is endpoint:
            del members[rank]
            if not members:
                del self._by_attempt[ident]

    def endpoints(self, attempt: Attempt) -> Mapping[int, E]:
        return self._by_attempt.get((attempt.gang_id, attempt.key), {})

    def drop(self, attempt: Attempt) -> None:
        self._by_attempt.pop((attempt.gang_id, attempt.key), None)

    def drop_gang(self, gang_id: str) -> None:
        for ident in [i for i in self._by_attempt if i[0] == gang_id]:
            del self._by_attempt[ident]

    @property
    def attempts(self) -> int:
        return len(self._by_attempt)

    @property
    def endpoint_count(self) -> int:
        return sum(len(m) for m in self._by_attempt.values())


class Registry:
    """All gangs known to one coordinator, and the admission rule across them."""

    def __init__(self) -> None:
        self.gangs: dict[str, Gang] = {}

    def add(self, gang: Gang) -> None:
        if gang.gang_id in self.gangs:
            raise ValueError(f"gang {gang.gang_id} is already registered")
        self.gangs[gang.gang_id] = gang

    def remove(self, gang_id: str) -> Gang | None:
        return self.gangs.pop(gang_id, None)

    def get(self, gang_id: str) -> Gang | None:
        return self.gangs.get(gang_id)

    def secrets(self) -> Mapping[str, bytes]:
        return {gid: g.secret for gid, g in self.gangs.items()}

    def running(self) -> int:
        """Gangs with an attempt running."""
        return sum(1 for g in self.gangs.values() if g.running)

    def competitors(self, gang_id: str) -> list[str]:
        """Other gangs holding slots while ``gang_id`` waits: gated ones at their gate, and running ones.

        Quoted when a gated launch times out, so two gangs that split the slots between
        them say so instead of waiting for each other in silence.
        """
        found = []
        for other in self.gangs.values():
            if other.gang_id == gang_id:
                continue
            waiting = other.waiting_at_gate()
            running = [a for a in other.attempts.values() if a.started and a.state is AttemptState.RUNNING]
            label = f"gang {other.gang_id[:8]} ({other.name or 'unnamed'})"
            if waiting:
                found.append(f"{label} has {waiting} of {other.world_size} ranks waiting at its start gate")
            elif running:
                found.append(f"{label} is running {other.world_size} ranks")
        return found

    def admit(self, gang: Gang, gang_attempt: int, stage_id: int, rank: int, max_gangs: int) -> FailureRecord | None:
        """The slot rule: a gang may start running only while fewer than ``max_gangs`` others run.

        ``None`` admits the registration; otherwise the refusal, to record on the gang
        (:meth:`Gang.record`) and send to the rank as a :class:`RegistrationError`.
        """
        if gang.running:
            return None
        running = self.running()
        if running < max_gangs:
            return None
        message = (
            f"gang {gang.gang_id[:8]} ({gang.name or 'unnamed'}) cannot start: the coordinator already runs "
            f"{running} gangs, its limit (spark.hydrogen.coordinator.maxGangs={max_gangs}); wait for other gang "
            "jobs to finish or raise the limit"
        )
        key: AttemptKey = (gang_attempt, stage_id, gang.next_generation(gang_attempt, stage_id))
        return FailureRecord(key, ErrorInfo("RegistrationError", message, rank), FailureKind.ADMISSION)
