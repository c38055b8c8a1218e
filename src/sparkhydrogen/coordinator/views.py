"""What a person or a program sees of a gang: live status, and the report of a finished attempt.

Value types only (frozen dataclasses), built from the state machine by
:func:`gang_status` and :func:`gang_report` on the coordinator's loop (so a snapshot
is consistent), then handed out: :func:`sparkhydrogen.status` and
:func:`sparkhydrogen.report` return them. Each has a plain-text form (``str()``) and
an HTML form (``_repr_html_``, which a notebook shows).

Example:
    >>> rank = RankStatus(rank=1, state=RankState.RUNNING, host="h1", pid=42, last_heard=0.4)
    >>> str(rank)
    'rank 1  running  host h1  pid 42  last heard 0.4 s ago'
"""

from __future__ import annotations

import enum
import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .report_page import render_page
from .state import Attempt, Gang
from .timeline import RoundRecord, Straggler, Timeline, format_seconds, stragglers

__all__ = [
    "RankState",
    "RankStatus",
    "GangStatus",
    "GangReport",
    "gang_status",
    "gang_report",
]


class RankState(str, enum.Enum):
    """Where a rank is: compares equal to its text (``RankState.DONE == "done"``)."""

    JOINING = "joining"
    RUNNING = "running"
    IN_COLLECTIVE = "in a collective"
    DONE = "done"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


def _short(gang_id: str) -> str:
    """How a gang id is shown: 8 characters, 14 for a stage gang's (``stage-`` and 8)."""
    return gang_id[:14] if gang_id.startswith("stage-") else gang_id[:8]


def _ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


@dataclass(frozen=True)
class RankStatus:
    """One rank of a live gang, as the coordinator sees it now.

    ``call`` is the collective it waits in (``"barrier #12"``: the 12th collective call
    of its task), ``waiting_for`` the ranks that collective still waits for,
    ``seconds_in_call`` how long it has waited there, ``last_heard`` how many seconds ago
    the coordinator last heard from it (any message or heartbeat). ``host``/``pid`` are
    ``None`` for a rank that has not connected; ``executor`` is ``None`` when unknown.
    ``busy``: its connection is alive but its heartbeats stopped (a long call holding the
    GIL): it is reported, never failed for that alone.
    """

    rank: int
    state: RankState
    host: str | None = None
    pid: int | None = None
    executor: str | None = None
    call: str | None = None
    waiting_for: list[int] = field(default_factory=list)
    seconds_in_call: float | None = None
    last_heard: float | None = None
    busy: bool = False

    def __str__(self) -> str:
        text = f"rank {self.rank}  {self.state}"
        if self.busy:
            text += " (busy: heartbeats stopped, connection alive)"
        if self.host is not None:
            text += f"  host {self.host}  pid {self.pid}"
        if self.executor is not None:
            text += f"  executor {self.executor}"
        if self.call is not None:
            text += f"  in {self.call} for {_ago(self.seconds_in_call)}"
            if self.waiting_for:
                text += f", waiting for rank(s) {_ranks(self.waiting_for)}"
        if self.last_heard is not None:
            text += f"  last heard {_ago(self.last_heard)} ago"
        return text

    def _cells(self) -> list[str]:
        state = f"{self.state} (busy)" if self.busy else str(self.state)
        return [str(self.rank), state, self.host or "-", "-" if self.pid is None else str(self.pid),
                self.executor or "-", self.call or "-", _ranks(self.waiting_for) or "-",
                _ago(self.seconds_in_call), _ago(self.last_heard)]

    def _repr_html_(self) -> str:
        return _html_table(_RANK_COLUMNS, [self._cells()])


_RANK_COLUMNS = ["rank", "state", "host", "pid", "executor", "call", "waiting for", "in call", "last heard"]


@dataclass(frozen=True)
class GangStatus:
    """One live gang attempt: who it is, its state, and every rank's :class:`RankStatus`.

    ``state`` is ``"starting"`` (a coordinated gang whose ranks are still joining its
    start gate) or ``"running"``; ``placement`` is ``"barrier"`` or ``"coordinated"``
    when the coordinator knows it. ``rounds`` counts completed collective rounds;
    ``stragglers`` and ``summary`` apply the straggler rule to them so far.
    """

    name: str
    gang_id: str
    attempt: int
    state: str
    world_size: int
    ranks: list[RankStatus]
    placement: str | None = None
    stage: tuple[int, int] | None = None
    elapsed: float = 0.0
    rounds: int = 0
    stragglers: list[int] = field(default_factory=list)
    summary: str = ""

    @property
    def waiting_for(self) -> list[int]:
        """Ranks an open collective waits for (empty when no collective waits)."""
        return sorted({r for rank in self.ranks for r in rank.waiting_for})

    def title(self) -> str:
        stage = f" (stage {self.stage[0]}.{self.stage[1]})" if self.stage is not None else ""
        return (f"gang {_short(self.gang_id)} ({self.name or 'unnamed'}) attempt {self.attempt}{stage}: {self.state}, "
                f"{self.world_size} ranks, {self.rounds} collective rounds in {format_seconds(self.elapsed)}"
                + (f", placement {self.placement}" if self.placement else ""))

    def __str__(self) -> str:
        rows = [r._cells() for r in self.ranks]
        lines = [self.title()]
        if self.summary:
            lines.append(self.summary)
        return "\n".join(lines + [_text_table(_RANK_COLUMNS, rows)])

    def _repr_html_(self) -> str:
        note = f"<div>{html.escape(self.summary)}</div>" if self.summary else ""
        return (f"<div><b>{html.escape(self.title())}</b>{note}"
                + _html_table(_RANK_COLUMNS, [r._cells() for r in self.ranks]) + "</div>")


@dataclass(frozen=True)
class GangReport:
    """A finished gang attempt, told through its collective rounds.

    ``rounds`` holds the last rounds kept in full (``total_rounds`` counts all); per rank,
    ``waited_for`` (seconds its peers waited for it), ``times_last`` (rounds it arrived
    last in) and ``hosts``. ``stragglers`` names the ranks the straggler rule names
    (empty when none) and ``summary`` says it in words, with the figures.

    Example:
        >>> report = sparkhydrogen.report()               # doctest: +SKIP
        >>> report.stragglers, report.save("gang.html")   # doctest: +SKIP
    """

    name: str
    gang_id: str
    attempt: int
    state: str
    world_size: int
    duration: float
    total_rounds: int
    rounds: list[RoundRecord]
    hosts: list[str | None]
    waited_for: list[float]
    times_last: list[int]
    skew_max: float
    skew_total: float
    stragglers: list[int]
    straggler_details: list[Straggler]
    summary: str
    stage: tuple[int, int] | None = None
    failure: str | None = None

    @property
    def label(self) -> str:
        stage = f" (stage {self.stage[0]}.{self.stage[1]})" if self.stage is not None else ""
        return f"gang {_short(self.gang_id)} ({self.name or 'unnamed'}) attempt {self.attempt}{stage}"

    def __str__(self) -> str:
        return self.summary

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(self.summary)}</pre>"

    def to_chrome_trace(self) -> dict[str, Any]:
        """The timeline in Chrome's trace-event format (Perfetto, ``chrome://tracing``, PyTorch's profiler).

        One track (``tid``) per rank; per kept round, a complete event (``"ph": "X"``) on each
        rank's track from its call's arrival to the round's completion, named like
        ``"barrier #12"``; times in microseconds from the attempt's start. JSON-serialisable.
        """
        pid = 1
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": self.label}},
        ]
        for rank in range(self.world_size):
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": rank,
                           "args": {"name": self._rank_label(rank)}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": rank,
                           "args": {"sort_index": rank}})
        for rec in self.rounds:
            last = max(range(len(rec.arrivals)), key=rec.arrivals.__getitem__)
            for rank, at in enumerate(rec.arrivals):
                events.append({
                    "name": rec.name, "cat": rec.op, "ph": "X", "pid": pid, "tid": rank,
                    "ts": round(at * 1e6, 3), "dur": round(max(rec.completed - at, 0.0) * 1e6, 3),
                    "args": {"seq": rec.seq + 1, "waited_ms": round((rec.completed - at) * 1e3, 3),
                             "arrived_last": rank == last},
                })
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"gang": self.label, "summary": self.summary, "stragglers": self.stragglers,
                              "rounds": self.total_rounds, "rounds_kept": len(self.rounds)}}

    def to_html(self) -> str:
        """One self-contained page (inline CSS, JS and SVG; nothing fetched): the timeline per rank and the summary."""
        ranks = [{"rank": r, "label": self._rank_label(r), "waited": self.waited_for[r],
                  "last": self.times_last[r], "straggler": r in self.stragglers} for r in range(self.world_size)]
        rounds = [{"name": rec.name, "arrivals": [round(a, 6) for a in rec.arrivals],
                   "completed": round(rec.completed, 6)} for rec in self.rounds]
        return render_page(self.label, self.summary, {"ranks": ranks, "rounds": rounds,
                                                      "total_rounds": self.total_rounds})

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the report by suffix: ``.json`` the Chrome trace, ``.html`` the page. Returns the path.

        Example:
            >>> report.save("/tmp/gang.json")   # doctest: +SKIP
            '/tmp/gang.json'
        """
        target = os.fspath(path)
        suffix = os.path.splitext(target)[1].lower()
        if suffix == ".json":
            text = json.dumps(self.to_chrome_trace())
        elif suffix in (".html", ".htm"):
            text = self.to_html()
        else:
            raise ValueError(f"cannot tell what to save from the suffix of {target!r}: use .json (a Chrome trace, "
                             "for Perfetto or chrome://tracing) or .html (a self-contained page)")
        with open(target, "w", encoding="utf-8") as out:
            out.write(text)
        return target

    def _rank_label(self, rank: int) -> str:
        host = self.hosts[rank] if rank < len(self.hosts) else None
        return f"rank {rank}" + (f" ({host})" if host else "")


# -- building them from the state machine (on the coordinator's loop) ---------------------------
def _placement(gang: Gang) -> str | None:
    if gang.gated:
        return "coordinated"
    if gang.derived:
        return "barrier"  # a stage gang not gated is a Spark barrier stage
    return None  # declared by a launcher: the coordinator is not told how its ranks were placed


def _rank_status(attempt: Attempt, rank: int, now: float, in_call: dict[int, tuple[str, float, list[int]]],
                 busy: frozenset[int] = frozenset()) -> RankStatus:
    member = attempt.members.get(rank)
    if member is None:
        return RankStatus(rank, RankState.JOINING)
    host, pid, heard = member.info.host, member.info.pid, now - member.last_heard
    if member.finished:
        state = RankState.DONE
    elif not member.connected or rank in attempt.reported:
        state = RankState.FAILED
    elif not attempt.started:
        state = RankState.JOINING
    elif rank in in_call:
        call, since, waiting = in_call[rank]
        return RankStatus(rank, RankState.IN_COLLECTIVE, host, pid, None, call, waiting, now - since, heard,
                          rank in busy)
    else:
        state = RankState.RUNNING
    return RankStatus(rank, state, host, pid, None, None, [], None, heard, rank in busy)


def gang_status(gang: Gang, attempt: Attempt, now: float) -> GangStatus:
    """A consistent snapshot of one live attempt (call it on the coordinator's loop)."""
    in_call: dict[int, tuple[str, float, list[int]]] = {}
    for rnd in attempt.rounds.values():
        waiting = [r for r in range(attempt.world_size) if r not in rnd.arrivals]
        name = f"{rnd.op.value} #{rnd.seq + 1}"
        for r, arrival in rnd.arrivals.items():
            in_call[r] = (name, arrival.at, waiting)
    busy = frozenset(attempt.busy_ranks(now))
    ranks = [_rank_status(attempt, r, now, in_call, busy) for r in range(attempt.world_size)]
    found = stragglers(attempt.timeline)
    state = "starting" if not attempt.started else attempt.state.value
    return GangStatus(
        name=gang.name, gang_id=gang.gang_id, attempt=attempt.key[0], state=state, world_size=attempt.world_size,
        ranks=ranks, placement=_placement(gang), stage=(attempt.key[1], attempt.key[2]),
        elapsed=now - attempt.created, rounds=attempt.timeline.rounds, stragglers=[s.rank for s in found],
        summary="; ".join("straggler: " + s.describe() for s in found))


def gang_report(gang_name: str, attempt: Attempt, now: float) -> GangReport:
    """The report of a done attempt, from its timeline (call it on the coordinator's loop)."""
    timeline = attempt.timeline
    found = stragglers(timeline)
    hosts = [attempt.members[r].info.host if r in attempt.members else None for r in range(attempt.world_size)]
    failure = attempt.failure.headline() if attempt.failure is not None else None
    rounds = timeline.kept_rounds()
    report = GangReport(
        name=gang_name, gang_id=attempt.gang_id, attempt=attempt.key[0], state=attempt.state.value,
        world_size=attempt.world_size, duration=now - attempt.created, total_rounds=timeline.rounds,
        rounds=rounds, hosts=hosts, waited_for=list(timeline.waited_for), times_last=list(timeline.times_last),
        skew_max=timeline.skew_max, skew_total=timeline.skew_total, stragglers=[s.rank for s in found],
        straggler_details=found, summary="", stage=(attempt.key[1], attempt.key[2]), failure=failure)
    return _with_summary(report, timeline, rounds)


def _with_summary(report: GangReport, timeline: Timeline, rounds: Sequence[RoundRecord]) -> GangReport:
    lines = [f"{report.label} {report.state}: {report.world_size} ranks, {report.total_rounds} collective rounds "
             f"in {format_seconds(report.duration)}" + (f"; {report.failure}" if report.failure else "")]
    if report.total_rounds:
        skews = sorted(r.skew for r in rounds)
        median = skews[len(skews) // 2] if skews else 0.0
        last = timeline.most_often_last()
        share = 100.0 * timeline.times_last[last] / timeline.rounds if last is not None else 0.0
        lines.append(f"skew per round (last minus first arrival): median {format_seconds(median)} of the last "
                     f"{len(rounds)}, max {format_seconds(report.skew_max)}; arrived last most often: rank {last} "
                     f"({share:.0f}% of rounds)")
        if report.world_size <= 16:
            lines.append("peers waited for: " + ", ".join(
                f"rank {r} {format_seconds(w)}" for r, w in enumerate(report.waited_for)))
    if report.straggler_details:
        lines += ["straggler: " + s.describe() for s in report.straggler_details]
    elif report.total_rounds:
        lines.append("no straggler: no rank made its peers wait far more than the others")
    return replace(report, summary="\n".join(lines))


# -- tables ---------------------------------------------------------------------------------------
def _ranks(ranks: Sequence[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def _text_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(columns)] + [line(row) for row in rows])


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
