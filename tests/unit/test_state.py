"""The coordinator's pure state machine, driven with a fake clock (plain floats)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pytest

from sparkhydrogen.coordinator.state import (
    Action,
    Attempt,
    AttemptState,
    Call,
    Complete,
    FailureKind,
    Gang,
    Log,
    MemberInfo,
    Op,
    Registry,
    Reject,
    Roster,
)
from sparkhydrogen.errors import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    ErrorInfo,
    GangAbortedError,
    PartitionClosedError,
    RankLostError,
    RegistrationError,
    from_info,
)

pytestmark = pytest.mark.timeout(30)

GANG_ID = "0123456789abcdef0123456789abcdef"


def make_attempt(world_size: int = 4, registered: Iterable[int] | None = None, now: float = 0.0,
                 missing_log_interval: float = 30.0) -> Attempt:
    attempt = Attempt(GANG_ID, (0, 3, 0), world_size, now, missing_log_interval)
    for rank in range(world_size) if registered is None else registered:
        assert attempt.register(rank, MemberInfo(host=f"host{rank}", pid=1000 + rank, task_attempt_id=rank), now) == []
    return attempt


def call(op: Op, seq: int, payload: bytes = b"", root: int | None = None,
         timeout: float | None = None) -> Call:
    return Call(op=op, seq=seq, payload=payload, root=root, timeout=timeout)


def completes(actions: Sequence[Action]) -> list[Complete]:
    return [a for a in actions if isinstance(a, Complete)]


def rejects(actions: Sequence[Action]) -> list[Reject]:
    return [a for a in actions if isinstance(a, Reject)]


def logs(actions: Sequence[Action]) -> list[Log]:
    return [a for a in actions if isinstance(a, Log)]


def rejected_ranks(actions: Sequence[Action]) -> set[int]:
    return {r for a in rejects(actions) for r in a.ranks}


def only_reject(actions: Sequence[Action]) -> Reject:
    found = rejects(actions)
    assert len(found) == 1, actions
    return found[0]


# ---------------------------------------------------------------- rounds


def test_barrier_completes_only_when_every_rank_arrives() -> None:
    attempt = make_attempt(4)
    for rank in (2, 0, 3):
        assert attempt.call(rank, call(Op.BARRIER, 0), now=1.0 + rank) == []
    actions = attempt.call(1, call(Op.BARRIER, 0), now=5.0)
    assert actions == [Complete(ranks=(0, 1, 2, 3), seq=0, op=Op.BARRIER, payloads=())]
    assert attempt.rounds == {}
    assert attempt.state is AttemptState.RUNNING


def test_allgather_payloads_come_back_in_rank_order_whatever_the_arrival_order() -> None:
    attempt = make_attempt(4)
    for rank in (3, 1, 0):
        assert attempt.call(rank, call(Op.ALLGATHER, 0, f"p{rank}".encode()), now=1.0) == []
    [done] = completes(attempt.call(2, call(Op.ALLGATHER, 0, b"p2"), now=2.0))
    assert done.ranks == (0, 1, 2, 3) and done.seq == 0 and done.op is Op.ALLGATHER
    assert done.payloads == (b"p0", b"p1", b"p2", b"p3")


def test_broadcast_returns_the_roots_payload_only() -> None:
    attempt = make_attempt(3)
    attempt.call(0, call(Op.BROADCAST, 0, b"", root=2), now=1.0)
    attempt.call(2, call(Op.BROADCAST, 0, b"from-root", root=2), now=1.0)
    [done] = completes(attempt.call(1, call(Op.BROADCAST, 0, b"ignored", root=2), now=1.0))
    assert done.payloads == (b"from-root",)
    assert done.ranks == (0, 1, 2)


def test_broadcast_root_outside_the_gang_rejects_every_caller() -> None:
    attempt = make_attempt(2)
    rejected: set[int] = set()
    for rank in (0, 1):
        try:
            actions = attempt.call(rank, call(Op.BROADCAST, 0, b"x", root=5), 1.0)
        except (ValueError, RegistrationError):
            rejected.add(rank)
            continue
        assert not completes(actions)
        rejected |= rejected_ranks(actions)
    assert rejected == {0, 1}


def test_successive_rounds_are_sequenced_per_rank() -> None:
    attempt = make_attempt(2)
    assert attempt.call(0, call(Op.BARRIER, 0), 1.0) == []
    assert completes(attempt.call(1, call(Op.BARRIER, 0), 1.0))
    # rank 0 runs ahead into round 1 while rank 1 is still on its way
    assert attempt.call(0, call(Op.ALLGATHER, 1, b"a"), 2.0) == []
    [done] = completes(attempt.call(1, call(Op.ALLGATHER, 1, b"b"), 3.0))
    assert (done.seq, done.payloads) == (1, (b"a", b"b"))


def test_world_of_one_completes_immediately() -> None:
    attempt = make_attempt(1)
    assert completes(attempt.call(0, call(Op.ALLGATHER, 0, b"solo"), 0.0))[0].payloads == (b"solo",)


def test_out_of_sequence_call_is_refused() -> None:
    attempt = make_attempt(2)
    with pytest.raises(RegistrationError, match=r"rank 1 sent collective call #3 but #1 was expected"):
        attempt.call(1, call(Op.BARRIER, 2), 0.0)


def test_call_from_an_unregistered_rank_is_refused() -> None:
    attempt = make_attempt(3, registered=[0])
    with pytest.raises(RegistrationError, match=r"rank 2 is not registered in gang 01234567 attempt 0 \(stage 3.0\)"):
        attempt.call(2, call(Op.BARRIER, 0), 0.0)


# -------------------------------------------------------------- mismatch


def test_different_ops_at_the_same_seq_abort_naming_both_ranks_and_ops() -> None:
    attempt = make_attempt(3)
    assert attempt.call(0, call(Op.BARRIER, 0), 1.0) == []
    assert attempt.call(1, call(Op.BARRIER, 0), 1.0) == []
    actions = attempt.call(2, call(Op.ALLGATHER, 0, b"x"), 2.0)
    reject = only_reject(actions)
    assert reject.ranks == (0, 1, 2)  # every pending rank, and the one that just called
    assert reject.error.type == "CollectiveMismatchError"
    with pytest.raises(CollectiveMismatchError,
                       match=r"mismatched collective call #1: rank\(s\) 0, 1 called barrier; "
                             r"rank\(s\) 2 called allGather"):
        raise from_info(reject.error)
    assert attempt.state is AttemptState.ABORTED
    assert attempt.failure == reject.error
    assert [log.level for log in logs(actions)] == ["error"]


def test_different_broadcast_roots_are_a_mismatch() -> None:
    attempt = make_attempt(2)
    attempt.call(0, call(Op.BROADCAST, 0, b"a", root=0), 1.0)
    reject = only_reject(attempt.call(1, call(Op.BROADCAST, 0, b"b", root=1), 1.0))
    assert reject.ranks == (0, 1)
    with pytest.raises(CollectiveMismatchError,
                       match=r"rank\(s\) 0 called broadcast\(root=0\); rank\(s\) 1 called broadcast\(root=1\)"):
        raise from_info(reject.error)


def test_rank_finishing_while_a_peer_waits_in_a_later_call_is_a_mismatch() -> None:
    attempt = make_attempt(2)
    attempt.call(0, call(Op.BARRIER, 0), 1.0)
    attempt.call(1, call(Op.BARRIER, 0), 1.0)
    assert attempt.call(0, call(Op.ALLGATHER, 1, b"x"), 2.0) == []
    actions = attempt.finish(1, 3.0)
    reject = only_reject(actions)
    assert reject.ranks == (0,)
    with pytest.raises(
        CollectiveMismatchError,
        match=r"rank 1 finished its task after 1 collective call\(s\), but rank\(s\) 0 called allGather "
              r"\(collective call #2\)",
    ):
        raise from_info(reject.error)
    assert attempt.state is AttemptState.ABORTED


def test_call_after_a_peer_finished_with_fewer_calls_is_a_mismatch() -> None:
    attempt = make_attempt(3)
    assert attempt.finish(2, 1.0) == []
    actions = attempt.call(0, call(Op.BARRIER, 0), 2.0)
    reject = only_reject(actions)
    assert reject.ranks == (0,)
    with pytest.raises(
        CollectiveMismatchError,
        match=r"rank 0 called barrier \(collective call #1\), but rank\(s\) 2 already finished their task "
              r"after 0 collective call\(s\)",
    ):
        raise from_info(reject.error)
    # rank 1 arrives later: the attempt is closed, it is rejected at once with the same verdict
    assert only_reject(attempt.call(1, call(Op.BARRIER, 0), 3.0)) == Reject((1,), reject.error)


def test_every_rank_finishing_after_the_same_calls_finishes_the_attempt() -> None:
    attempt = make_attempt(2)
    attempt.call(0, call(Op.BARRIER, 0), 1.0)
    attempt.call(1, call(Op.BARRIER, 0), 1.0)
    assert attempt.finish(0, 2.0) == []
    assert attempt.state is AttemptState.RUNNING and not attempt.done
    assert attempt.finish(1, 2.0) == []
    assert attempt.state is AttemptState.FINISHED and attempt.done
    assert attempt.failure is None


def test_finish_before_every_rank_registered_does_not_finish_the_attempt() -> None:
    attempt = make_attempt(2, registered=[0])
    attempt.finish(0, 1.0)
    assert attempt.state is AttemptState.RUNNING


def test_call_after_finishing_is_refused() -> None:
    attempt = make_attempt(1)
    attempt.finish(0, 1.0)
    with pytest.raises(RegistrationError, match="rank 0 made a collective call after finishing its task"):
        attempt.call(0, call(Op.BARRIER, 0), 2.0)


def test_call_after_finished_attempt_is_rejected_by_a_late_registration() -> None:
    attempt = make_attempt(2)
    attempt.finish(0, 1.0)
    attempt.finish(1, 1.0)
    with pytest.raises(RegistrationError, match=r"rank 1 is already registered"):
        attempt.register(1, MemberInfo(), 2.0)


# --------------------------------------------------------------- liveness


def live_attempt(world_size: int = 2, timeout: float = 2.0) -> Attempt:
    attempt = Attempt(GANG_ID, (0, 3, 0), world_size, 0.0, liveness_timeout=timeout)
    for rank in range(world_size):
        attempt.register(rank, MemberInfo(host=f"host{rank}", pid=1000 + rank, task_attempt_id=rank), 0.0)
    return attempt


def test_a_busy_rank_is_kept_and_reported_not_failed() -> None:
    attempt = live_attempt()
    attempt.call(0, call(Op.BARRIER, 0), 0.5)  # rank 0 waits; rank 1 holds the GIL: no heartbeat
    attempt.heard(0, 1.5)
    assert attempt.tick(2.0) == [] and attempt.busy_ranks(2.0) == []  # at the limit, not beyond it
    attempt.heard(0, 3.0)
    actions = attempt.tick(3.0)
    assert rejects(actions) == [] and attempt.state is AttemptState.RUNNING
    assert attempt.busy_ranks(3.0) == [1]
    (busy,) = logs(actions)
    assert busy.level == "warning" and busy.message.startswith(
        "gang 01234567 attempt 0 (stage 3.0): rank 1 (host host1, pid 1001) has sent no heartbeat for 3.0 s "
        "(spark.hydrogen.heartbeat.timeout=2s), but its connection is alive: it is busy")
    attempt.heard(0, 500.0)
    (waiting,) = logs(attempt.tick(500.0))  # "busy" is logged once, however long it lasts
    assert waiting.message.endswith("has waited 500 s for rank(s) 1: rank 1 (host host1, pid 1001) last heard "
                                    "500.0 s ago (busy: its connection is alive but its heartbeats stopped, e.g. "
                                    "a long call holding the GIL)")
    assert attempt.busy_ranks(500.0) == [1]
    assert attempt.failure is None


def test_a_busy_rank_heard_again_is_logged_once_and_its_round_completes() -> None:
    attempt = live_attempt()
    attempt.call(0, call(Op.BARRIER, 0), 0.0)
    attempt.heard(0, 30.0)
    attempt.tick(30.0)
    assert attempt.busy_ranks(30.0) == [1]
    (again,) = logs(attempt.heard(1, 31.0))  # its long call returned: the first bytes of its next request
    assert again.message == ("gang 01234567 attempt 0 (stage 3.0): rank 1 (host host1, pid 1001) is heard from "
                             "again after 31.0 s busy")
    assert attempt.heard(1, 31.0) == []  # once
    done = attempt.call(1, call(Op.BARRIER, 0), 31.0)
    assert completes(done) and attempt.busy_ranks(31.0) == []
    assert logs(attempt.tick(31.1)) == []


def test_a_busy_rank_whose_connection_closes_is_lost() -> None:
    attempt = live_attempt()
    attempt.call(0, call(Op.BARRIER, 0), 0.0)
    attempt.heard(0, 10.0)
    attempt.tick(10.0)
    assert attempt.busy_ranks(10.0) == [1]
    reject = only_reject(attempt.disconnect(1, 11.0))  # its process died, or its host failed the TCP keepalive
    assert reject.ranks == (0,)
    assert attempt.failure is not None and attempt.failure.type == "RankLostError" and attempt.failure.rank == 1
    assert attempt.busy_ranks(11.0) == []


def test_a_timeout_says_the_missing_rank_is_busy() -> None:
    attempt = live_attempt()
    attempt.call(0, call(Op.BARRIER, 0, timeout=5.0), 0.0)
    attempt.heard(0, 5.0)
    reject = only_reject(attempt.tick(5.0))
    assert reject.error.rank == 1
    assert ("rank 1 (host host1, pid 1001) last heard 5.0 s ago (busy: its connection is alive but its heartbeats "
            "stopped") in reject.error.message


def test_finished_ranks_and_attempts_without_liveness_have_no_busy_ranks() -> None:
    attempt = live_attempt()
    attempt.finish(1, 0.0)
    attempt.heard(0, 10.0)
    assert attempt.busy_ranks(10.0) == []
    assert make_attempt(2).busy_ranks(1000.0) == []  # no liveness timeout: nothing is expected


# --------------------------------------------------------------- timeouts


def test_timeout_names_missing_ranks_with_their_whereabouts() -> None:
    attempt = make_attempt(4, registered=[0, 1, 2])
    attempt.call(2, call(Op.ALLGATHER, 0, b"", timeout=10.0), now=0.0)  # rank 2 is the only caller so far
    assert attempt.call(0, call(Op.ALLGATHER, 0, b"", timeout=10.0), now=1.0) == []
    # rank 1 registered at 0.0 and is silent; rank 3 never registered
    assert attempt.tick(9.99) == []
    actions = attempt.tick(10.0)
    reject = only_reject(actions)
    assert reject.ranks == (0, 2)
    assert reject.error.type == "CollectiveTimeoutError"
    assert reject.error.rank == 1  # the missing ranks are the failure, not the rank that waited
    with pytest.raises(
        CollectiveTimeoutError,
        match=r"^ranks 1, 3 never reached allGather \(collective call #1\) within 10 s \(ranks 0, 2 waited\): "
              r"rank 1 \(host host1, pid 1001\) last heard 10\.0 s "
              r"ago; rank 3 never connected$",
    ):
        raise from_info(reject.error)
    assert attempt.state is AttemptState.ABORTED
    assert attempt.tick(100.0) == []


def test_timeout_blames_the_missing_rank_not_the_one_that_waited() -> None:
    attempt = make_attempt(2)
    attempt.call(0, call(Op.BARRIER, 0), 0.0)
    attempt.call(1, call(Op.BARRIER, 0), 0.0)
    attempt.call(0, call(Op.BARRIER, 1, timeout=30.0), 1.0)
    only_reject(attempt.tick(31.0))
    failure = attempt.failure
    assert failure is not None and failure.rank == 1
    assert failure.headline().startswith(
        "rank 1 never reached barrier (collective call #2) within 30 s (rank 0 waited): rank 1 (host host1")
    assert failure.extra == {"missing": [1], "waited": [0], "seq": 1, "op": "barrier", "timeout": 30.0}
    # the silent rank's own later error is still heard, next to the verdict on it
    attempt.fail(1, ErrorInfo("ValueError", "bad shard", rank=1), 32.0)
    assert [o.headline() for o in attempt.failure.others] == ["rank 1 raised ValueError: bad shard"]


def test_timeout_mentions_the_last_call_of_a_missing_rank() -> None:
    attempt = make_attempt(2)
    attempt.call(0, call(Op.BARRIER, 0), 0.0)
    attempt.call(1, call(Op.BARRIER, 0), 2.0)
    attempt.call(0, call(Op.BARRIER, 1, timeout=1.0), 3.0)
    reject = only_reject(attempt.tick(4.5))
    assert "rank 1 (host host1, pid 1001) last heard 2.5 s ago in barrier (collective call #1)" in reject.error.message


def test_tick_before_any_deadline_does_nothing() -> None:
    attempt = make_attempt(2)
    attempt.call(0, call(Op.BARRIER, 0, timeout=5.0), now=1.0)
    for now in (1.0, 3.0, 5.999):
        assert attempt.tick(now) == []
    assert attempt.state is AttemptState.RUNNING
    assert 0 in attempt.rounds


def test_call_without_timeout_never_expires() -> None:
    attempt = make_attempt(2, missing_log_interval=1e9)
    attempt.call(0, call(Op.BARRIER, 0), now=0.0)
    assert attempt.tick(1e6) == []
    assert attempt.state is AttemptState.RUNNING


def test_a_completed_round_cannot_time_out() -> None:
    attempt = make_attempt(2)
    attempt.call(0, call(Op.BARRIER, 0, timeout=1.0), 0.0)
    attempt.call(1, call(Op.BARRIER, 0, timeout=1.0), 0.5)
    assert attempt.tick(10.0) == []
    assert attempt.state is AttemptState.RUNNING


# ------------------------------------------------------------ failures


def test_fail_aborts_the_gang_for_the_others_with_failed_rank_and_cause() -> None:
    attempt = make_attempt(4)
    for rank in (0, 1, 3):
        attempt.call(rank, call(Op.BARRIER, 0), 1.0)
    cause = ErrorInfo(type="ValueError", message="bad input", rank=2, traceback="Traceback ...\nValueError: bad input")
    actions = attempt.fail(2, cause, 2.0)
    reject = only_reject(actions)
    assert reject.ranks == (0, 1, 3)
    assert reject.error.type == "GangAbortedError"
    assert reject.error.extra["failed_rank"] == 2
    assert reject.error.extra["cause"] == cause.to_json()
    with pytest.raises(GangAbortedError,
                       match=r"aborted: rank 2 raised ValueError: bad input\n--- traceback of rank 2 ---") as info:
        raise from_info(reject.error)
    assert info.value.failed_rank == 2
    assert info.value.cause == cause
    assert attempt.failure == cause
    assert attempt.state is AttemptState.ABORTED
    assert any(log.level == "error" and "rank 2 raised ValueError: bad input" in log.message for log in logs(actions))


def test_calls_after_an_abort_are_rejected_immediately_with_the_abort_error() -> None:
    attempt = make_attempt(3)
    attempt.fail(0, ErrorInfo("RuntimeError", "boom", rank=0), 1.0)
    first = only_reject(attempt.call(1, call(Op.BARRIER, 0), 2.0))
    second = only_reject(attempt.call(2, call(Op.ALLGATHER, 0, b"x"), 3.0))
    assert first.ranks == (1,) and second.ranks == (2,)
    assert first.error == second.error == attempt.abort_error
    assert first.error.extra["failed_rank"] == 0
    assert attempt.rounds == {}


def test_second_failure_does_not_replace_the_first_but_is_kept_with_it() -> None:
    attempt = make_attempt(3)
    attempt.fail(0, ErrorInfo("RuntimeError", "first", rank=0), 1.0)
    actions = attempt.fail(1, ErrorInfo("RuntimeError", "second", rank=1), 2.0)
    assert rejects(actions) == []
    assert [log.level for log in logs(actions)] == ["warning"]
    assert attempt.failure is not None and attempt.failure.message == "first"
    assert [(o.rank, o.message) for o in attempt.failure.others] == [(1, "second")]


def test_registration_into_an_aborted_attempt_is_rejected() -> None:
    attempt = make_attempt(3, registered=[0, 1])
    attempt.fail(0, ErrorInfo("RuntimeError", "boom", rank=0), 1.0)
    reject = only_reject(attempt.register(2, MemberInfo(), 2.0))
    assert reject.ranks == (2,) and reject.error.type == "GangAbortedError"


def test_disconnect_before_finish_aborts_the_attempt() -> None:
    attempt = make_attempt(3)
    attempt.call(0, call(Op.BARRIER, 0), 1.0)
    attempt.call(1, call(Op.BARRIER, 0), 1.0)
    reject = only_reject(attempt.disconnect(2, 4.0))
    assert reject.ranks == (0, 1)
    with pytest.raises(GangAbortedError,
                       match=r"aborted: rank 2's process died or lost its connection to the coordinator \(host host2, "
                             r"pid 1002, last heard 4\.0 s ago\) before finishing its task") as info:
        raise from_info(reject.error)
    assert "raised" not in str(info.value)
    assert info.value.failed_rank == 2
    assert info.value.cause is not None and info.value.cause.type == "RankLostError"
    with pytest.raises(RankLostError, match=r"^rank 2's process died"):
        raise from_info(info.value.cause)
    assert not attempt.done  # ranks 0 and 1 are still connected
    attempt.disconnect(0, 5.0)
    attempt.disconnect(1, 5.0)
    assert attempt.done


def test_disconnect_after_finish_does_not_abort() -> None:
    attempt = make_attempt(2)
    attempt.finish(1, 1.0)
    assert attempt.disconnect(1, 2.0) == []
    assert attempt.state is AttemptState.RUNNING
    assert attempt.finish(0, 3.0) == []
    assert attempt.state is AttemptState.FINISHED


def test_disconnect_of_an_unknown_rank_is_ignored() -> None:
    attempt = make_attempt(2, registered=[0])
    assert attempt.disconnect(1, 1.0) == []
    assert attempt.state is AttemptState.RUNNING


def test_external_abort_rejects_pending_and_is_idempotent() -> None:
    attempt = make_attempt(2)
    attempt.call(0, call(Op.BARRIER, 0), 1.0)
    reject = only_reject(attempt.abort("the driver cancelled the job"))
    assert reject.ranks == (0,)
    with pytest.raises(GangAbortedError, match=r"attempt 0 \(stage 3.0\) was aborted: the driver cancelled the job"):
        raise from_info(reject.error)
    assert attempt.abort("again") == []


# --------------------------------------------------------- registration


def test_duplicate_rank_registration_is_refused() -> None:
    attempt = make_attempt(2, registered=[0])
    with pytest.raises(RegistrationError,
                       match=r"rank 0 is already registered in gang 01234567 attempt 0 \(stage 3.0\) \(host host0, "
                             r"pid 1000\); refusing a second registration from host other, pid 7"):
        attempt.register(0, MemberInfo(host="other", pid=7), 1.0)


@pytest.mark.parametrize("rank", [-1, 2, 100, "0", 1.0, None])
def test_rank_outside_the_gang_is_refused(rank: object) -> None:
    attempt = make_attempt(2, registered=[])
    with pytest.raises(RegistrationError, match=r"is outside 0\.\.1 for gang 01234567"):
        attempt.register(rank, MemberInfo(), 0.0)  # type: ignore[arg-type]
    assert attempt.members == {}


@pytest.mark.parametrize("world_size", [0, -3])
def test_world_size_must_be_positive(world_size: int) -> None:
    with pytest.raises(ValueError, match=f"world_size must be >= 1, got {world_size}"):
        Attempt(GANG_ID, (0, 0, 0), world_size, 0.0)


# ------------------------------------------------------------------ logs


def test_long_wait_is_logged_naming_the_missing_ranks_every_interval() -> None:
    attempt = make_attempt(3, missing_log_interval=10.0)
    attempt.call(0, call(Op.BARRIER, 0), 0.0)
    attempt.call(1, call(Op.BARRIER, 0), 0.0)
    assert attempt.tick(9.9) == []
    [log] = attempt.tick(10.0)
    assert log.level == "warning"
    assert "barrier (collective call #1) has waited 10 s for rank(s) 2" in log.message
    assert "rank 2 (host host2, pid 1002) last heard 10.0 s ago" in log.message
    assert attempt.tick(15.0) == []  # not again before the next interval
    assert len(logs(attempt.tick(20.0))) == 1


def test_ranks_that_never_register_are_logged() -> None:
    attempt = make_attempt(3, registered=[1], now=0.0, missing_log_interval=5.0)
    assert attempt.tick(4.0) == []
    [log] = attempt.tick(5.0)
    assert log.level == "warning"
    assert "rank(s) 0, 2 have not connected 5 s after the first rank did" in log.message


# -------------------------------------------------------------------- Gang


def make_gang(world_size: int = 2) -> Gang:
    return Gang(gang_id=GANG_ID, secret=b"k" * 32, world_size=world_size)


def join(gang: Gang, rank: int, task_attempt_id: int, gang_attempt: int = 0, stage_id: int = 5,
         now: float = 0.0) -> tuple[Attempt, list[tuple[Attempt, list[Action]]]]:
    attempt, superseded = gang.attempt_for(gang_attempt, stage_id, rank, task_attempt_id, now)
    attempt.register(rank, MemberInfo(host=f"h{rank}", pid=rank, task_attempt_id=task_attempt_id), now)
    return attempt, superseded


def test_ranks_of_one_launch_share_an_attempt() -> None:
    gang = make_gang(3)
    first, sup0 = join(gang, 0, task_attempt_id=10)
    second, sup1 = join(gang, 2, task_attempt_id=12)
    third, sup2 = join(gang, 1, task_attempt_id=11)
    assert first is second is third
    assert first.key == (0, 5, 0)
    assert sup0 == sup1 == sup2 == []
    assert list(gang.attempts) == [(0, 5, 0)]


def test_newer_gang_attempt_supersedes_and_aborts_the_older_one() -> None:
    gang = make_gang(2)
    old, _ = join(gang, 0, task_attempt_id=1)
    old.call(0, call(Op.BARRIER, 0), 1.0)
    new, superseded = gang.attempt_for(1, 9, 0, 50, 2.0)
    assert new.key == (1, 9, 0) and new is not old
    assert [a for a, _ in superseded] == [old]
    assert old.state is AttemptState.ABORTED
    reject = only_reject(superseded[0][1])
    assert reject.ranks == (0,)
    assert "superseded by a newer launch of the gang (attempt 1.0)" in reject.error.message


def test_stale_gang_attempt_is_refused() -> None:
    gang = make_gang(2)
    join(gang, 0, task_attempt_id=1, gang_attempt=2)
    with pytest.raises(RegistrationError,
                       match=r"this task belongs to gang attempt 1, but attempt 2 has already started"):
        gang.attempt_for(1, 5, 1, 2, 1.0)


def test_same_rank_with_a_higher_task_attempt_id_starts_a_new_generation() -> None:
    gang = make_gang(2)
    first, _ = join(gang, 0, task_attempt_id=4)
    join(gang, 1, task_attempt_id=5)
    second, superseded = join(gang, 0, task_attempt_id=6, now=1.0)
    assert second.key == (0, 5, 1)
    assert [a for a, _ in superseded] == [first]
    assert first.state is AttemptState.ABORTED
    # the other rank of the relaunch joins the new generation, not the old one
    third, _ = join(gang, 1, task_attempt_id=7, now=1.0)
    assert third is second


@pytest.mark.parametrize("task_attempt_id", [3, 4])
def test_same_rank_with_an_equal_or_lower_task_attempt_id_is_refused(task_attempt_id: int) -> None:
    gang = make_gang(2)
    join(gang, 0, task_attempt_id=4)
    with pytest.raises(RegistrationError,
                       match=rf"rank 0 is already registered in .* by task 4 .*refusing task {task_attempt_id}"):
        gang.attempt_for(0, 5, 0, task_attempt_id, 1.0)


def test_new_task_above_every_member_of_an_aborted_attempt_starts_a_new_generation() -> None:
    gang = make_gang(4)
    first, _ = join(gang, 0, task_attempt_id=20)
    join(gang, 1, task_attempt_id=21)
    first.fail(1, ErrorInfo("ValueError", "x", rank=1), 1.0)
    # Spark relaunched the stage: new tasks get ids above the whole first launch
    second, superseded = join(gang, 2, task_attempt_id=40, now=2.0)
    assert second is not first and second.key == (0, 5, 1)
    assert [a for a, _ in superseded] == [first]


def test_late_task_of_an_aborted_launch_joins_it_and_is_rejected() -> None:
    gang = make_gang(4)
    first, _ = join(gang, 0, task_attempt_id=20)
    join(gang, 1, task_attempt_id=22)
    first.fail(1, ErrorInfo("ValueError", "x", rank=1), 1.0)
    attempt, superseded = gang.attempt_for(0, 5, 2, 21, 2.0)  # id inside the first launch's window
    assert attempt is first and superseded == []
    reject = only_reject(attempt.register(2, MemberInfo(task_attempt_id=21), 2.0))
    assert reject.ranks == (2,) and reject.error.extra["failed_rank"] == 1


def test_late_task_of_an_aborted_done_launch_is_still_refused() -> None:
    gang = make_gang(2)
    first, _ = join(gang, 0, task_attempt_id=10)
    first.fail(0, ErrorInfo("ValueError", "boom", rank=0), 1.0)
    first.disconnect(0, 1.5)
    assert first.done
    gang.prune()  # what the server does when an attempt is done: it is kept a while
    # rank 1 of the *same* launch (task id 11, next to rank 0's 10) was slow to start
    late, superseded = gang.attempt_for(0, 5, 1, 11, 2.0)
    assert late is first and superseded == []
    reject = only_reject(late.register(1, MemberInfo(task_attempt_id=11), 2.0))
    assert reject.ranks == (1,) and reject.error.extra["failed_rank"] == 0


def test_late_task_of_an_older_generation_does_not_join_the_newer_one() -> None:
    gang = make_gang(4)
    # launch 0: tasks 100..103; rank 0 registers and fails, Spark relaunches the stage
    gen0, _ = join(gang, 0, task_attempt_id=100)
    gen0.fail(0, ErrorInfo("ValueError", "boom", rank=0), 1.0)
    # launch 1: tasks 104..107; its rank 0 starts generation 1
    gen1, _ = join(gang, 0, task_attempt_id=104, now=2.0)
    assert gen1.key == (0, 5, 1)
    # now a straggler of launch 0 (rank 2, task 102) registers
    try:
        late, _ = gang.attempt_for(0, 5, 2, 102, 3.0)
    except RegistrationError:
        return
    assert late is not gen1, "a task of launch 0 took rank 2 of launch 1; launch 1's own rank 2 will supersede it"
    assert only_reject(late.register(2, MemberInfo(task_attempt_id=102), 3.0)).ranks == (2,)


def test_different_stages_of_one_gang_attempt_get_their_own_attempts() -> None:
    gang = make_gang(2)
    a, _ = join(gang, 0, task_attempt_id=1, stage_id=5)
    b, superseded = join(gang, 0, task_attempt_id=9, stage_id=6)
    assert a is not b and a.key == (0, 5, 0) and b.key == (0, 6, 0)
    assert superseded == [] and a.state is AttemptState.RUNNING


def finish_all(attempt: Attempt, now: float) -> None:
    for rank in range(attempt.world_size):
        attempt.finish(rank, now)
    for rank in range(attempt.world_size):
        attempt.disconnect(rank, now)


def test_prune_keeps_the_newest_done_attempts_and_remembers_failures() -> None:
    gang = make_gang(1)
    keys = []
    for n in range(5):
        attempt, _ = join(gang, 0, task_attempt_id=n, gang_attempt=n)
        attempt.fail(0, ErrorInfo("ValueError", f"failure {n}", rank=0), float(n))
        attempt.disconnect(0, float(n))
        keys.append(attempt.key)
    running, _ = join(gang, 0, task_attempt_id=10, gang_attempt=9)  # never done: never pruned
    gang.prune(keep_done=2)
    assert sorted(gang.attempts) == [keys[3], keys[4], running.key]
    assert [f.error.message for f in gang.failures] == ["failure 0", "failure 1", "failure 2"]
    assert gang.last_failure() == (keys[4], ErrorInfo("ValueError", "failure 4", rank=0))
    gang.prune(keep_done=0)
    assert list(gang.attempts) == [running.key]
    assert gang.last_failure() == (keys[4], ErrorInfo("ValueError", "failure 4", rank=0))


def test_prune_leaves_running_and_aborted_but_connected_attempts_alone() -> None:
    gang = make_gang(2)
    attempt, _ = join(gang, 0, task_attempt_id=1)
    join(gang, 1, task_attempt_id=2)
    attempt.fail(1, ErrorInfo("ValueError", "x", rank=1), 1.0)
    attempt.disconnect(1, 1.0)
    assert not attempt.done  # rank 0 is still connected
    gang.prune(keep_done=0)
    assert list(gang.attempts) == [attempt.key]


def test_last_failure_is_the_most_recent_root_cause() -> None:
    gang = make_gang(2)
    assert gang.last_failure() is None
    first, _ = join(gang, 0, task_attempt_id=1)
    join(gang, 1, task_attempt_id=2)
    cause = ErrorInfo("ValueError", "first failure", rank=1)
    first.fail(1, cause, 1.0)
    assert gang.last_failure() == ((0, 5, 0), cause)  # live attempts count

    second, superseded = join(gang, 0, task_attempt_id=3, gang_attempt=1)
    assert [a for a, _ in superseded] == [first]
    later = ErrorInfo("KeyError", "second failure", rank=0)
    second.fail(0, later, 2.0)
    assert gang.last_failure() == ((1, 5, 0), later)  # the newest attempt wins

    # a finished attempt leaves no failure behind, even once pruned
    third, _ = join(gang, 0, task_attempt_id=5, gang_attempt=2)
    join(gang, 1, task_attempt_id=6, gang_attempt=2)
    finish_all(third, 3.0)
    assert third.state is AttemptState.FINISHED and third.done
    gang.prune(keep_done=0)
    assert gang.last_failure() == ((1, 5, 0), later)


def test_failures_list_is_bounded() -> None:
    gang = make_gang(1)
    for n in range(20):
        attempt, _ = join(gang, 0, task_attempt_id=n, gang_attempt=n)
        attempt.fail(0, ErrorInfo("ValueError", f"failure {n}", rank=0), float(n))
        attempt.disconnect(0, float(n))
        gang.prune(keep_done=0)
    assert gang.attempts == {}
    assert [f.error.message for f in gang.failures] == [f"failure {n}" for n in range(4, 20)]


# ---------------------------------------------------------------- Registry


def test_registry_add_get_remove_and_secrets() -> None:
    registry = Registry()
    gang = make_gang(2)
    registry.add(gang)
    assert registry.get(GANG_ID) is gang
    assert registry.secrets() == {GANG_ID: b"k" * 32}
    with pytest.raises(ValueError, match=f"gang {GANG_ID} is already registered"):
        registry.add(make_gang(3))
    assert registry.remove(GANG_ID) is gang
    assert registry.get(GANG_ID) is None
    assert registry.remove(GANG_ID) is None


def test_admission_refuses_a_gang_beyond_max_gangs_with_a_typed_record() -> None:
    registry = Registry()
    busy = Gang("a" * 32, b"k" * 32, 1, name="busy")
    waiting = Gang("b" * 32, b"k" * 32, 1, name="waiting")
    registry.add(busy)
    registry.add(waiting)
    assert registry.admit(busy, 0, 1, 0, max_gangs=1) is None
    join(busy, 0, task_attempt_id=1, stage_id=1)
    assert registry.running() == 1
    refusal = registry.admit(waiting, 0, 7, 0, max_gangs=1)
    assert refusal is not None and refusal.kind is FailureKind.ADMISSION
    assert refusal.key == (0, 7, 0)  # the launch that was refused, not a made-up generation
    with pytest.raises(RegistrationError, match=r"gang bbbbbbbb \(waiting\) cannot start: the coordinator already "
                                                r"runs 1 gangs, its limit \(spark.hydrogen.coordinator.maxGangs=1\)"):
        raise from_info(refusal.error)
    assert waiting.record(refusal) and not waiting.record(refusal)  # the same refusal is remembered once
    assert waiting.last_failure() == ((0, 7, 0), refusal.error)
    assert registry.admit(busy, 0, 1, 0, max_gangs=1) is None  # a running gang admits its own ranks


def test_budget_reserves_only_what_fits_and_counts_rounds() -> None:
    gang = make_gang(2)
    assert gang.reserve(600, limit=1000) and not gang.reserve(600, limit=1000)
    gang.release(600)
    attempt, _ = join(gang, 0, task_attempt_id=1)
    join(gang, 1, task_attempt_id=2)
    attempt.call(0, call(Op.ALLGATHER, 0, b"x" * 700), 1.0)
    assert gang.buffered_bytes == 700 and not gang.reserve(400, limit=1000)
    attempt.call(1, call(Op.ALLGATHER, 0, b"y" * 10), 1.0)
    assert gang.buffered_bytes == 0


def test_roster_attaches_and_forgets_endpoints() -> None:
    roster: Roster[str] = Roster()
    attempt = make_attempt(2)
    roster.attach(attempt, 0, "conn0")
    roster.attach(attempt, 1, "conn1")
    roster.detach(attempt, 1, "someone else")
    assert dict(roster.endpoints(attempt)) == {0: "conn0", 1: "conn1"}
    roster.detach(attempt, 1, "conn1")
    assert dict(roster.endpoints(attempt)) == {0: "conn0"} and roster.endpoint_count == 1
    roster.drop_gang(GANG_ID)
    assert roster.attempts == 0 and roster.endpoint_count == 0


# ------------------------------------------------------- closed early


def test_a_rank_closed_early_while_peers_wait_fails_them_with_what_happened_not_a_mismatch() -> None:
    attempt = make_attempt(3)
    for rank in range(3):
        attempt.call(rank, call(Op.BARRIER, 0), 1.0)
    for rank in range(3):
        attempt.call(rank, call(Op.BARRIER, 1), 1.0)
    attempt.call(0, call(Op.ALLGATHER, 2, b"a"), 2.0)
    attempt.call(2, call(Op.ALLGATHER, 2, b"c"), 2.0)
    reject = only_reject(attempt.finish(1, 3.0, closed_early=True))
    assert reject.ranks == (0, 2)
    with pytest.raises(PartitionClosedError,
                       match=r"rank 1's partition was closed early by its consumer \(e.g. a chained take\(\)/islice\) "
                             r"before its collective #3 \(allGather\), which rank\(s\) 0, 2 called"):
        raise from_info(reject.error)
    assert attempt.state is AttemptState.ABORTED
    assert attempt.failure is not None and attempt.failure.type == "PartitionClosedError"
    assert "raised" not in attempt.failure.describe() and "mismatch" not in attempt.failure.describe()


def test_a_peer_calling_after_a_rank_closed_early_gets_the_closed_early_verdict() -> None:
    attempt = make_attempt(2)
    assert attempt.finish(1, 1.0, closed_early=True) == []
    reject = only_reject(attempt.call(0, call(Op.BARRIER, 0), 2.0))
    assert reject.ranks == (0,)
    with pytest.raises(PartitionClosedError, match=r"rank 1's partition was closed early .* before its collective #1 "
                                                   r"\(barrier\), which rank\(s\) 0 called"):
        raise from_info(reject.error)


def test_every_rank_closed_early_with_nobody_waiting_simply_completes() -> None:
    attempt = make_attempt(3)
    for rank in range(3):
        attempt.call(rank, call(Op.BARRIER, 0), 1.0)
    assert attempt.finish(0, 2.0, closed_early=True) == []
    assert attempt.finish(1, 2.0) == []
    assert attempt.finish(2, 2.0, closed_early=True) == []
    assert attempt.state is AttemptState.FINISHED and attempt.failure is None


def test_fail_also_rejects_the_failing_ranks_own_pending_call() -> None:
    attempt = make_attempt(2)
    attempt.call(0, call(Op.BARRIER, 0), 1.0)  # one thread of rank 0 waits in a barrier ...
    reject = only_reject(attempt.fail(0, ErrorInfo("RuntimeError", "boom", rank=0), 2.0))  # ... another fails
    assert reject.ranks == (0,)
    with pytest.raises(GangAbortedError, match=r"aborted: rank 0 raised RuntimeError: boom"):
        raise from_info(reject.error)


# ------------------------------------------------------- ephemeral gangs


def test_an_ephemeral_gang_forgets_attempts_and_checkpoint_after_success_and_can_run_again() -> None:
    gang = Gang(GANG_ID, b"k" * 32, 2, name="bare", ephemeral=True)
    attempt, _ = join(gang, 0, task_attempt_id=1)
    join(gang, 1, task_attempt_id=2)
    assert gang.commit(attempt.key, 0, [b"s0", b"s1"], max_bytes=100) is None
    attempt.finish(0, 1.0)
    attempt.finish(1, 1.0)
    assert attempt.state is AttemptState.FINISHED
    assert not gang.retire_if_complete()  # rank connections are still open
    attempt.disconnect(0, 1.0)
    attempt.disconnect(1, 1.0)
    assert gang.retire_if_complete()
    assert gang.attempts == {} and gang.checkpoint is None and gang.retired == (0, 5, 0)
    again, _ = join(gang, 0, task_attempt_id=3)  # the RDD is evaluated again: a new generation
    assert again.key == (0, 5, 1)
    with pytest.raises(RegistrationError, match=r"belongs to gang attempt 0, but attempt 1 has already started"):
        gang.retired = (1, 5, 0)
        gang.attempt_for(0, 5, 0, 9, 2.0)


def test_a_durable_gang_keeps_its_checkpoint_after_success() -> None:
    gang = make_gang(1)
    attempt, _ = join(gang, 0, task_attempt_id=1)
    gang.commit(attempt.key, 0, [b"s0"], max_bytes=100)
    finish_all(attempt, 1.0)
    assert not gang.retire_if_complete()
    assert gang.checkpoint is not None and list(gang.attempts) == [attempt.key]
