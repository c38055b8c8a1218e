"""Diagnosis without Spark: the timeline's bookkeeping and straggler rule, the stuck line, status and reports.

The timeline and the state machine run on a fake clock; the server tests use real
loopback clients (kit.py) and wait on the server's own state or on log records.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kit import joined, start_ranks, wait_until

from sparkhydrogen import GangReport, GangStatus, RankState
from sparkhydrogen.config import CoordinatorConfig, HydrogenConfig
from sparkhydrogen.coordinator.client import CoordinatorClient
from sparkhydrogen.coordinator.server import MAX_REPORTS, CoordinatorServer
from sparkhydrogen.coordinator.state import Attempt, Call, Gang, MemberInfo, MissingRank, Op, Stuck
from sparkhydrogen.coordinator.timeline import MAX_POINTS, MAX_ROUNDS, MIN_ROUNDS, Timeline, stragglers
from sparkhydrogen.coordinator.views import gang_report, gang_status

pytestmark = pytest.mark.timeout(60)

GANG_ID = "feedfacecafebeef0123456789abcdef"


def feed(timeline: Timeline, rounds: int, delays: Callable[[int, int], float], period: float = 1.0) -> None:
    """``rounds`` rounds, round ``k`` starting at ``k * period``; rank ``r`` arrives ``delays(k, r)`` later."""
    for k in range(rounds):
        arrivals = [k * period + delays(k, r) for r in range(timeline.world_size)]
        last = max(range(timeline.world_size), key=lambda r: (arrivals[r], r))
        timeline.record(k, "barrier", arrivals, max(arrivals), last)


# ----------------------------------------------------------------- timeline (pure)


def test_one_late_rank_is_charged_the_whole_skew() -> None:
    t = Timeline(4, origin=100.0)
    t.record(0, "barrier", [100.0, 100.1, 100.2, 101.2], 101.2, last=3)
    # stretches: 0.1 shared by ranks 1-3, 0.1 by ranks 2-3, 1.0 by rank 3 alone
    assert t.waited_for == pytest.approx([0.0, 0.1 / 3, 0.1 / 3 + 0.05, 0.1 / 3 + 0.05 + 1.0])
    assert sum(t.waited_for) == pytest.approx(t.skew_total) == pytest.approx(1.2)
    assert t.times_last == [0, 0, 0, 1]
    [rec] = t.kept_rounds()
    assert (rec.name, rec.arrivals, rec.completed) == ("barrier #1", pytest.approx((0.0, 0.1, 0.2, 1.2)),
                                                       pytest.approx(1.2))
    assert rec.skew == pytest.approx(1.2)


def test_two_equally_late_ranks_share_the_wait_and_both_are_named() -> None:
    t = Timeline(4, origin=0.0)
    feed(t, 40, lambda k, r: 0.3 if r in (1, 3) else 0.0)
    assert t.waited_for[1] == pytest.approx(t.waited_for[3]) == pytest.approx(40 * 0.15)
    assert t.waited_for[0] == t.waited_for[2] == 0.0
    assert [s.rank for s in stragglers(t)] == [1, 3]


def test_the_rounds_kept_are_bounded_and_the_totals_keep_counting() -> None:
    t = Timeline(2, origin=0.0)
    feed(t, MAX_ROUNDS * 3, lambda k, r: 0.01 * r)
    assert t.rounds == MAX_ROUNDS * 3
    assert t.kept == t.capacity == MAX_ROUNDS
    assert [r.seq for r in t.kept_rounds()][:2] == [MAX_ROUNDS * 2, MAX_ROUNDS * 2 + 1]  # the newest are kept
    assert t.waited_for[1] == pytest.approx(MAX_ROUNDS * 3 * 0.01)
    assert t.times_last == [0, MAX_ROUNDS * 3]


def test_a_wide_gang_keeps_fewer_rounds() -> None:
    t = Timeline(1024, origin=0.0)
    feed(t, 200, lambda k, r: 0.0)
    assert t.capacity == MAX_POINTS // 1024
    assert t.kept * 1024 <= MAX_POINTS
    assert t.rounds == 200


def test_a_straggler_is_named_with_its_figures() -> None:
    t = Timeline(4, origin=0.0)
    # rank 3 is 0.1 s late in 92 of 100 rounds; in the rest rank 0 is last by a hair
    feed(t, 100, lambda k, r: (0.1 if r == 3 and k % 25 >= 2 else 0.0) + (0.001 if r == 0 and k % 25 < 2 else 0.0))
    [found] = stragglers(t)
    assert found.rank == 3 and found.times_last == 92 and found.rounds == 100
    assert found.waited_for == pytest.approx(9.2)
    assert found.describe().startswith("rank 3 arrived last in 92% of 100 rounds; peers waited 9.2 s for it in all")
    assert t.most_often_last() == 3


def test_a_balanced_gang_has_no_straggler() -> None:
    t = Timeline(4, origin=0.0)
    feed(t, 400, lambda k, r: 0.2 if r == k % 4 else 0.0)  # everyone is late in turn, by a lot
    assert sum(t.waited_for) == pytest.approx(400 * 0.2)
    assert stragglers(t) == []


def test_no_straggler_from_too_few_rounds_or_too_little_waiting() -> None:
    few = Timeline(2, origin=0.0)
    feed(few, MIN_ROUNDS - 1, lambda k, r: 5.0 * r)
    assert stragglers(few) == []
    slight = Timeline(2, origin=0.0)
    feed(slight, 100, lambda k, r: 0.001 * r)  # always last, 0.1 s in all: immaterial
    assert slight.times_last[1] == 100
    assert stragglers(slight) == []
    diluted = Timeline(2, origin=0.0)
    feed(diluted, 100, lambda k, r: 0.01 * r, period=100.0)  # 1 s of waiting in 10,000 s of work
    assert stragglers(diluted) == []


def test_timeline_validates_its_bounds() -> None:
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        Timeline(0, origin=0.0)
    with pytest.raises(ValueError, match="max_rounds and max_points must be >= 1"):
        Timeline(2, origin=0.0, max_rounds=0)


# ----------------------------------------------------------------- the state machine's hooks


def make_attempt(world: int = 3, now: float = 0.0, **kwargs: object) -> Attempt:
    attempt = Attempt(GANG_ID, (0, 7, 0), world, now, **kwargs)  # type: ignore[arg-type]
    for rank in range(world):
        attempt.register(rank, MemberInfo(host=f"host{rank}", pid=100 + rank, task_attempt_id=rank), now)
    return attempt


def test_completed_rounds_are_recorded_relative_to_the_attempt_start() -> None:
    attempt = make_attempt(2, now=50.0)
    attempt.call(0, Call(Op.BARRIER, 0), 51.0)
    assert attempt.timeline.rounds == 0  # an open round is not in the timeline
    attempt.call(1, Call(Op.BARRIER, 0), 53.0)
    attempt.call(1, Call(Op.ALLGATHER, 1, b"x"), 54.0)
    attempt.call(0, Call(Op.ALLGATHER, 1, b"y"), 54.5)
    rounds = attempt.timeline.kept_rounds()
    assert [(r.name, r.arrivals, r.completed) for r in rounds] == [
        ("barrier #1", (1.0, 3.0), 3.0), ("allGather #2", (4.5, 4.0), 4.5)]
    assert attempt.timeline.times_last == [1, 1]
    assert attempt.timeline.waited_for == pytest.approx([0.5, 2.0])


def test_a_stuck_collective_is_logged_after_stuck_after_and_again_every_as_long() -> None:
    attempt = make_attempt(3, stuck_after=5.0)
    attempt.call(0, Call(Op.BARRIER, 0), 0.0)
    attempt.call(2, Call(Op.BARRIER, 0), 1.0)
    attempt.heard(1, 2.0)
    assert attempt.tick(4.9) == []
    [stuck] = attempt.tick(5.0)
    assert isinstance(stuck, Stuck) and stuck.level == "warning"
    assert stuck.missing == (MissingRank(1, "host1", 101, 3.0, None, False),)
    assert stuck.message == (f"gang {GANG_ID[:8]} attempt 0 (stage 7.0): barrier (collective call #1) has waited 5 s "
                             "for rank(s) 1: rank 1 (host host1, pid 101) last heard 3.0 s ago")
    assert attempt.tick(9.9) == []
    [again] = attempt.tick(10.0)
    assert "has waited 10 s for rank(s) 1" in again.message


def test_the_stuck_line_names_the_gang_and_carries_stacks_when_given() -> None:
    stuck = Stuck("warning", "", "gang ab attempt 0", "barrier (collective call #3)", 61.0,
                  (MissingRank(1, "h1", 7, 61.2, "barrier (collective call #2)"), MissingRank(2)))
    line = stuck.line("train", stacks={1: 'File "train.py", line 9, in step\n'})
    assert line.startswith("gang ab attempt 0 (train): barrier (collective call #3) has waited 61 s for rank(s) 1, 2: "
                           "rank 1 (host h1, pid 7) last heard 61.2 s ago in barrier (collective call #2); "
                           "rank 2 never connected")
    assert line.endswith('--- rank 1 stack ---\nFile "train.py", line 9, in step')
    assert "\n" not in stuck.line()  # without stacks: one line


def test_without_stuck_after_the_missing_log_interval_applies() -> None:
    attempt = make_attempt(2, missing_log_interval=7.0)
    attempt.call(0, Call(Op.BARRIER, 0), 0.0)
    assert attempt.tick(6.9) == []
    assert [type(a) for a in attempt.tick(7.0)] == [Stuck]


def test_stuck_after_is_a_spark_conf_key() -> None:
    conf = {"spark.hydrogen.diagnosis.stuckAfter": "2min"}
    assert HydrogenConfig.from_conf(conf.get, "127.0.0.1").coordinator.stuck_after == 120.0
    assert CoordinatorConfig().stuck_after == 60.0
    with pytest.raises(ValueError, match="spark.hydrogen.diagnosis.stuckAfter='0': stuck_after must be > 0"):
        HydrogenConfig.from_conf({"spark.hydrogen.diagnosis.stuckAfter": "0"}.get, "127.0.0.1")


# ----------------------------------------------------------------- views


def test_status_says_where_each_rank_is_and_whom_a_collective_waits_for() -> None:
    gang = Gang(gang_id=GANG_ID, secret=b"k" * 32, world_size=4, name="train<1>", derived=True)
    attempt = Attempt(GANG_ID, (0, 7, 0), 4, 0.0)
    for rank in (0, 1, 2):
        attempt.register(rank, MemberInfo(host=f"host{rank}", pid=100 + rank), 0.0)
    attempt.call(0, Call(Op.BARRIER, 0), 1.0)
    attempt.call(2, Call(Op.BARRIER, 0), 2.0)
    attempt.heard(1, 3.0)
    status = gang_status(gang, attempt, 4.0)
    assert (status.name, status.gang_id, status.attempt, status.state, status.placement) == (
        "train<1>", GANG_ID, 0, "running", "barrier")
    by_rank = {r.rank: r for r in status.ranks}
    assert by_rank[0].state == RankState.IN_COLLECTIVE == "in a collective"
    assert (by_rank[0].call, by_rank[0].waiting_for, by_rank[0].seconds_in_call) == ("barrier #1", [1, 3], 3.0)
    assert by_rank[2].seconds_in_call == 2.0
    assert (by_rank[1].state, by_rank[1].call, by_rank[1].last_heard) == ("running", None, 1.0)
    assert (by_rank[3].state, by_rank[3].host) == ("joining", None)
    assert status.waiting_for == [1, 3]
    text = str(status)
    assert "gang feedface (train<1>) attempt 0 (stage 7.0): running, 4 ranks" in text
    assert re.search(r"^0 +in a collective +host0 +100 +- +barrier #1 +1, 3 +3\.0 s", text, re.M)
    page = status._repr_html_()
    assert "train&lt;1&gt;" in page and "<td>in a collective</td>" in page
    assert str(by_rank[0]) == ("rank 0  in a collective  host host0  pid 100  in barrier #1 for 3.0 s, waiting for "
                               "rank(s) 1, 3  last heard 3.0 s ago")


def test_status_of_finished_and_failed_ranks() -> None:
    gang = Gang(gang_id=GANG_ID, secret=b"k" * 32, world_size=3)
    attempt = make_attempt(3)
    attempt.finish(0, 1.0)
    attempt.disconnect(0, 1.0)
    status = gang_status(gang, attempt, 2.0)
    assert [r.state for r in status.ranks] == ["done", "running", "running"]
    attempt.disconnect(1, 2.0)  # died before finishing: the attempt aborts
    status = gang_status(gang, attempt, 3.0)
    assert [r.state for r in status.ranks] == ["done", "failed", "running"]
    assert status.placement is None  # a declared gang: the coordinator is not told its placement


def straggling_attempt(rounds: int = 30, late: int = 2, world: int = 3) -> Attempt:
    attempt = make_attempt(world)
    now = 0.0
    for k in range(rounds):
        for rank in sorted(range(world), key=lambda r: r == late):
            now += 0.001 if rank != late else 0.1
            attempt.call(rank, Call(Op.BARRIER, k), now)
    for rank in range(world):
        attempt.finish(rank, now)
    return attempt


def test_report_names_the_straggler_and_exports_one_track_per_rank(tmp_path: Path) -> None:
    attempt = straggling_attempt()
    report = gang_report("train", attempt, 4.0)
    assert report.stragglers == [2]
    assert report.state == "finished" and report.total_rounds == 30 and len(report.rounds) == 30
    assert "straggler: rank 2 arrived last in 100% of 30 rounds; peers waited" in report.summary
    assert report.summary.splitlines()[0].startswith("gang feedface (train) attempt 0 (stage 7.0) finished: 3 ranks, "
                                                     "30 collective rounds")
    trace = json.loads(json.dumps(report.to_chrome_trace()))
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names == {0: "rank 0 (host0)", 1: "rank 1 (host1)", 2: "rank 2 (host2)"}
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in spans} == {0, 1, 2} and len(spans) == 3 * 30
    first = [e for e in spans if e["name"] == "barrier #1"]
    assert {e["tid"]: e["dur"] for e in first}[2] == 0.0  # the straggler never waits
    assert all(e["dur"] > 0 for e in first if e["tid"] != 2)
    assert report.save(tmp_path / "r.json") == str(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["otherData"]["stragglers"] == [2]


def test_the_html_report_is_one_self_contained_page(tmp_path: Path) -> None:
    attempt = straggling_attempt()
    attempt.members[1].info = MemberInfo(host="</script><script>alert(1)</script>", pid=1)
    page = gang_report("a<b", attempt, 4.0).to_html()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<link" not in page and "@import" not in page
    assert page.count("</script>") == 2  # the data cannot close its script element
    assert "a&lt;b" in page
    report = gang_report("", attempt, 4.0)
    report.save(tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text() == report.to_html()
    with pytest.raises(ValueError, match=r"use \.json .* or \.html"):
        report.save(tmp_path / "r.txt")


def test_a_balanced_report_says_there_is_no_straggler() -> None:
    attempt = make_attempt(2)
    for k in range(20):
        attempt.call(k % 2, Call(Op.BARRIER, k), k * 1.0)
        attempt.call(1 - k % 2, Call(Op.BARRIER, k), k * 1.0 + 0.5)
    report = gang_report("", attempt, 30.0)
    assert report.stragglers == []
    assert "no straggler" in report.summary
    assert report.state == "running"  # the report tells what the attempt's state was when it was made


# ----------------------------------------------------------------- the server, on loopback


class Records(logging.Handler):
    """Log records of one logger, with an event per new record (a ready signal for the test)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[tuple[int, str]] = []
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.levelno, record.getMessage()))
        self.event.set()

    def wait_for(self, pattern: str, timeout: float = 20.0) -> str:
        wait_until(lambda: any(re.search(pattern, m) for _, m in self.messages), f"a log line matching {pattern!r}",
                   timeout)
        return next(m for _, m in self.messages if re.search(pattern, m))


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("sparkhydrogen.coordinator")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


def test_server_status_and_the_stuck_line_name_the_missing_rank(make_server: Callable[..., CoordinatorServer],
                                                               records: Records) -> None:
    server = make_server(stuck_after=0.2)
    handle = server.add_gang(3, name="stuck-gang")
    silent = joined(handle, 1, host="host-of-1")
    try:
        ranks = start_ranks(handle, lambda c, r: c.collective("barrier"), ranks=[0, 2])
        line = records.wait_for(r"stuck-gang.*has waited")
        assert re.search(r"gang \w{8} attempt 0 \(stage 0\.0\) \(stuck-gang\): barrier \(collective call #1\) has "
                         r"waited \d+ s for rank\(s\) 1: rank 1 \(host host-of-1, pid \d+\) last heard [\d.]+ s ago",
                         line)
        [status] = server.status()
        assert isinstance(status, GangStatus) and status.name == "stuck-gang"
        assert status.waiting_for == [1]
        assert {r.rank: r.state for r in status.ranks} == {0: "in a collective", 1: "running", 2: "in a collective"}
        assert status.ranks[1].host == "host-of-1"
        silent.collective("barrier")
        silent.finish()
    finally:
        silent.close()
    ranks.values()
    wait_until(lambda: server.status() == [], "the gang is no longer live")


def test_server_keeps_the_newest_reports_and_logs_the_end_of_each_gang(
        make_server: Callable[..., CoordinatorServer], records: Records) -> None:
    server = make_server()

    def rounds(client: CoordinatorClient, rank: int) -> None:
        for _ in range(3):
            client.collective("barrier")

    for i in range(MAX_REPORTS + 2):
        start_ranks(server.add_gang(2, name=f"g{i}"), rounds).values()
        wait_until(lambda i=i: len(server.reports()) == min(i + 1, MAX_REPORTS), f"report {i} is kept")
    reports = server.reports()
    assert [r.name for r in reports] == [f"g{i}" for i in range(2, MAX_REPORTS + 2)]
    assert all(isinstance(r, GangReport) and r.total_rounds == 3 and r.state == "finished" for r in reports)
    line = records.wait_for(rf"\(g{MAX_REPORTS + 1}\) attempt 0 .*finished: 2 ranks, 3 collective rounds")
    assert "straggler" not in line
    assert server.footprint()["timeline_rounds"] == 0  # done attempts kept by their gangs hold only totals
