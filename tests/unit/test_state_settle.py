"""How an aborted attempt settles: later failure reports kept with the root cause, and the wait to hear them."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from sparkhydrogen.coordinator.state import (
    MAX_OTHER_FAILURES,
    Action,
    Attempt,
    AttemptState,
    Call,
    MemberInfo,
    Op,
    Reject,
    Settled,
)
from sparkhydrogen.errors import ErrorInfo

pytestmark = pytest.mark.timeout(30)


def attempt_of(world_size: int) -> Attempt:
    attempt = Attempt("0123456789abcdef0123456789abcdef", (0, 3, 0), world_size, 0.0)
    for rank in range(world_size):
        attempt.register(rank, MemberInfo(host=f"host{rank}", pid=100 + rank), 0.0)
    return attempt


def settled(actions: Sequence[Action]) -> list[Settled]:
    return [a for a in actions if isinstance(a, Settled)]


def boom(rank: int, message: str, kind: str = "RuntimeError") -> ErrorInfo:
    return ErrorInfo(kind, message, rank=rank, traceback=f"Traceback ...\n{kind}: {message}")


def test_a_rank_broken_by_its_peers_teardown_reports_first_and_hears_the_real_cause() -> None:
    attempt = attempt_of(2)
    first = attempt.fail(0, boom(0, "ring allreduce failed", "XGBoostError"), 1.0, settle=2.0)
    assert attempt.state is AttemptState.ABORTED
    assert settled(first) == [] and attempt.settling  # rank 1 has not said anything yet
    then = attempt.fail(1, boom(1, "rank one blew up", "ZeroDivisionError"), 1.01)
    [answer] = settled(then)
    assert answer.ranks == (0,) and not attempt.settling
    assert answer.failure is not None and answer.failure.rank == 0
    assert [(o.rank, o.type, o.message, o.traceback) for o in answer.failure.others] == [
        (1, "ZeroDivisionError", "rank one blew up", "")]  # kept small: no traceback
    assert answer.failure.summary() == ("rank 0 raised XGBoostError: ring allreduce failed; "
                                        "then rank 1 raised ZeroDivisionError: rank one blew up")
    assert attempt.failure == answer.failure  # what the driver reads later says the same


def test_the_settle_ends_when_every_other_rank_finished_or_went() -> None:
    attempt = attempt_of(3)
    attempt.call(1, Call(Op.BARRIER, 0), 0.5)  # waits in a barrier: told of the abort
    actions = attempt.fail(0, boom(0, "bad shard"), 1.0, settle=5.0)
    assert [r.ranks for r in actions if isinstance(r, Reject)] == [(1,)]
    assert settled(attempt.disconnect(1, 1.1)) == []  # rank 2 is still connected
    [answer] = settled(attempt.disconnect(2, 1.2))
    assert answer.ranks == (0,)
    assert answer.failure is not None and answer.failure.others == ()


def test_a_peer_stuck_outside_our_collectives_bounds_the_settle() -> None:
    attempt = attempt_of(2)
    attempt.fail(1, boom(1, "oom"), 1.0, settle=2.0)
    assert settled(attempt.tick(2.9)) == []
    [answer] = settled(attempt.tick(3.0))
    assert answer.ranks == (1,) and not attempt.settling
    assert settled(attempt.tick(4.0)) == []  # answered once


def test_a_lone_rank_settles_at_once_and_a_rank_not_asking_gets_no_answer() -> None:
    lone = attempt_of(1)
    [answer] = settled(lone.fail(0, boom(0, "x"), 1.0, settle=2.0))
    assert answer.ranks == (0,)
    pair = attempt_of(2)
    assert settled(pair.fail(0, boom(0, "x"), 1.0)) == []
    assert settled(pair.fail(1, boom(1, "y"), 1.1)) == [] and not pair.settling


def test_several_ranks_waiting_are_answered_together() -> None:
    attempt = attempt_of(3)
    attempt.fail(0, boom(0, "a"), 1.0, settle=2.0)
    assert settled(attempt.fail(1, boom(1, "b"), 1.1, settle=2.0)) == []
    [answer] = settled(attempt.finish(2, 1.2))
    assert answer.ranks == (0, 1)
    assert answer.failure is not None and [o.rank for o in answer.failure.others] == [1]


def test_a_waiting_rank_that_goes_away_is_not_waited_for() -> None:
    attempt = attempt_of(2)
    attempt.fail(0, boom(0, "a"), 1.0, settle=2.0)
    assert settled(attempt.disconnect(0, 1.1)) == [] and not attempt.settling


def test_one_report_per_rank_and_a_bounded_list_of_others() -> None:
    world = MAX_OTHER_FAILURES + 4
    attempt = attempt_of(world)
    attempt.fail(0, boom(0, "root"), 1.0)
    for rank in range(1, world):
        attempt.fail(rank, boom(rank, "x" * 10_000), 1.0 + rank)
        attempt.fail(rank, boom(rank, "again"), 1.0 + rank)  # a second report of the same rank is ignored
    attempt.fail(0, boom(0, "root again"), 50.0)
    failure = attempt.failure
    assert failure is not None and failure.message == "root"
    assert [o.rank for o in failure.others] == list(range(1, MAX_OTHER_FAILURES + 1))
    assert all(len(o.message) <= 2000 for o in failure.others)
    assert failure.extra["others_more"] == world - 1 - MAX_OTHER_FAILURES
    assert failure.others_note().endswith(f"(and {world - 1 - MAX_OTHER_FAILURES} more)")


def test_a_coordinator_verdict_as_root_cause_keeps_the_ranks_reports_too() -> None:
    attempt = attempt_of(2)
    attempt.call(0, Call(Op.BARRIER, 0), 1.0)
    attempt.call(1, Call(Op.ALLGATHER, 0), 1.0)  # mismatch: the coordinator's verdict, no rank's
    assert attempt.failure is not None and attempt.failure.type == "CollectiveMismatchError"
    attempt.fail(1, boom(1, "gave up"), 2.0)
    assert [o.rank for o in attempt.failure.others] == [1]
