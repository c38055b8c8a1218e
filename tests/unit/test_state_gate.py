"""The start gate of coordinated gangs: the pure rules with a fake clock, then over real loopback sockets.

A gated gang runs as an ordinary Spark stage; the coordinator holds every rank's
registration until all have joined, bounds that wait, refuses Spark's per-task
retries of an aborted attempt, and holds speculative duplicates aside.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from kit import FakeClock, connect, in_thread, wait_until

from sparkhydrogen.config import HydrogenConfig
from sparkhydrogen.coordinator.protocol import Frame, Kind, decode_request, held_notice, register_reply
from sparkhydrogen.coordinator.state import (
    START_TIMEOUT_TYPE,
    Action,
    Attempt,
    AttemptState,
    Gang,
    Hold,
    MemberInfo,
    Registry,
    Reject,
    Start,
    start_timeout_message,
)
from sparkhydrogen.errors import RegistrationError
from sparkhydrogen.launch.preflight import GangCapacity, barrier_refused, capacity_message

pytestmark = pytest.mark.timeout(30)

GANG_ID = "fedcba9876543210fedcba9876543210"


def info(rank: int, task: int | None = None) -> MemberInfo:
    return MemberInfo(host=f"host{rank}", pid=100 + rank, task_attempt_id=rank if task is None else task,
                      address=f"10.0.0.{rank}:7000")


def gated(world: int = 4, start_timeout: float | None = 60.0, now: float = 0.0) -> Attempt:
    return Attempt(GANG_ID, (0, 5, 0), world, now, missing_log_interval=30.0, liveness_timeout=8.0,
                   gated=True, start_timeout=start_timeout)


def starts(actions: Sequence[Action]) -> list[Start]:
    return [a for a in actions if isinstance(a, Start)]


def rejects(actions: Sequence[Action]) -> list[Reject]:
    return [a for a in actions if isinstance(a, Reject)]


# -- the gate ---------------------------------------------------------------------------


def test_registrations_are_held_until_every_rank_joined_then_all_start_with_every_address() -> None:
    attempt = gated(4)
    for rank in (2, 0, 3):
        assert starts(attempt.register(rank, info(rank), now=1.0)) == []
        assert not attempt.started
    actions = attempt.register(1, info(1), now=2.0)
    assert starts(actions) == [Start((0, 1, 2, 3), ("10.0.0.0:7000", "10.0.0.1:7000", "10.0.0.2:7000",
                                                    "10.0.0.3:7000"))]
    assert attempt.started and attempt.started_at == 2.0


def test_a_rank_without_an_address_is_known_by_its_host() -> None:
    attempt = gated(2)
    attempt.register(0, MemberInfo(host="h0"), 0.0)
    assert starts(attempt.register(1, MemberInfo(host="h1"), 0.0))[0].addresses == ("h0", "h1")


def test_the_start_bound_aborts_naming_missing_ranks_and_rejects_every_waiting_rank() -> None:
    attempt = gated(4, start_timeout=30.0)
    attempt.register(0, info(0), 0.0)
    attempt.register(2, info(2), 5.0)
    assert rejects(attempt.tick(29.9)) == []
    actions = attempt.tick(30.0)
    assert attempt.state is AttemptState.ABORTED
    [reject] = rejects(actions)
    assert reject.ranks == (0, 2)
    assert reject.error.type == START_TIMEOUT_TYPE
    assert "only 2 of 4 ranks joined the start gate within 30 s" in reject.error.message
    assert "missing rank(s) 1, 3" in reject.error.message
    assert "rank 0 (host host0), rank 2 (host host2)" in reject.error.message
    assert attempt.failure is not None and attempt.failure.type == START_TIMEOUT_TYPE


def test_gate_timeout_quotes_the_cluster_and_the_gangs_holding_slots() -> None:
    attempt = gated(2, start_timeout=10.0)
    attempt.register(0, info(0), 0.0)
    [reject] = rejects(attempt.gate_timeout(10.0, ["gang abcd (other) has 2 of 2 ranks waiting at its start gate"],
                                            "1 executor(s) alive, 2 requested, 2 slot(s)"))
    text = reject.error.message
    assert "Cluster: 1 executor(s) alive, 2 requested, 2 slot(s)" in text
    assert "Another gang holds slots: gang abcd (other)" in text
    assert "spark.hydrogen.launch.startTimeout" in text


def test_the_bound_counts_from_the_launch_when_the_driver_told_it() -> None:
    gang = Gang(GANG_ID, b"s" * 32, 2, gated=True, start_timeout=20.0)
    gang.open_window(0, now=100.0)
    attempt, _ = gang.attempt_for(0, 5, 0, 0, now=115.0)
    assert attempt.start_deadline == 120.0


def test_no_liveness_verdict_while_waiting_and_the_clock_restarts_at_the_gate() -> None:
    attempt = gated(2, start_timeout=None)
    attempt.register(0, info(0), 0.0)
    assert rejects(attempt.tick(50.0)) == [] and attempt.busy_ranks(50.0) == []  # at the gate: waiting, not busy
    attempt.register(1, info(1), 50.0)
    assert attempt.busy_ranks(55.0) == []
    assert attempt.busy_ranks(59.0) == [0, 1]  # silent for 9 s after the start (limit 8 s): busy, never failed
    assert rejects(attempt.tick(59.0)) == [] and attempt.failure is None


def test_a_rank_lost_at_the_gate_can_be_replaced_but_after_the_start_it_aborts() -> None:
    attempt = gated(2)
    attempt.register(0, info(0, task=10), 0.0)
    assert rejects(attempt.disconnect(0, 1.0)) == []
    assert attempt.state is AttemptState.RUNNING and attempt.joined == 0
    attempt.register(0, info(0, task=12), 2.0)  # Spark re-ran the lost task: nothing had run yet
    assert starts(attempt.register(1, info(1, task=11), 2.0))
    attempt.disconnect(1, 3.0)
    assert attempt.state is AttemptState.ABORTED
    assert attempt.failure is not None and "rank 1's process died" in attempt.failure.message


def test_abort_from_outside_rejects_the_ranks_waiting_at_the_gate() -> None:
    attempt = gated(3)
    attempt.register(0, info(0), 0.0)
    attempt.register(1, info(1), 0.0)
    [reject] = rejects(attempt.abort("the job was cancelled"))
    assert reject.ranks == (0, 1)


# -- Spark's own retries and speculation -------------------------------------------------


def test_a_relaunched_single_task_of_an_aborted_attempt_is_refused_and_no_new_generation_starts() -> None:
    gang = Gang(GANG_ID, b"s" * 32, 2, gated=True, start_timeout=60.0)
    first, _ = gang.attempt_for(0, 5, 0, 3, 0.0)
    first.register(0, info(0, task=3), 0.0)
    gang.attempt_for(0, 5, 1, 4, 0.0)[0].register(1, info(1, task=4), 0.0)
    first.fail(1, __import__("sparkhydrogen").errors.ErrorInfo("ValueError", "boom", 1), 1.0)
    first.disconnect(0, 1.0)
    first.disconnect(1, 1.0)
    again, superseded = gang.attempt_for(0, 5, 1, 9, 2.0)  # Spark's retry of rank 1: task 9, same stage
    assert again is first and superseded == []
    with pytest.raises(RegistrationError, match=r"refusing task 9 .*rank 1: the attempt was aborted \(rank 1 raised "
                                                r"ValueError: boom\).*relaunched whole"):
        again.register(1, info(1, task=9), 2.0)
    assert len(gang.attempts) == 1


def test_a_speculative_duplicate_of_a_live_rank_is_held_and_never_joins() -> None:
    attempt = gated(2)
    attempt.register(0, info(0, task=1), 0.0)
    assert attempt.register(0, info(0, task=7), 0.5) == [Hold(0)]  # before the start too
    attempt.register(1, info(1, task=2), 1.0)
    assert attempt.register(1, info(1, task=8), 2.0) == [Hold(1)]
    attempt.finish(1, 3.0)
    assert attempt.register(1, info(1, task=9), 4.0) == [Hold(1)]  # after its rank finished
    assert attempt.members[1].info.task_attempt_id == 2


def test_a_newer_gang_attempt_supersedes_the_old_one_and_stale_tasks_are_refused() -> None:
    gang = Gang(GANG_ID, b"s" * 32, 2, gated=True, start_timeout=60.0)
    old, _ = gang.attempt_for(0, 5, 0, 1, 0.0)
    old.register(0, info(0), 0.0)
    new, superseded = gang.attempt_for(1, 8, 0, 20, 1.0)
    assert [a for a, _ in superseded] == [old] and old.state is AttemptState.ABORTED
    assert new.key == (1, 8, 0) and new.gated
    with pytest.raises(RegistrationError, match="stale"):
        gang.attempt_for(0, 5, 1, 21, 2.0)


def test_a_re_evaluated_bare_rdd_is_a_new_stage_and_a_new_attempt() -> None:
    gang = Gang(GANG_ID, b"s" * 32, 1, gated=True, start_timeout=60.0, ephemeral=True)
    first, _ = gang.attempt_for(0, 5, 0, 1, 0.0)
    first.register(0, info(0), 0.0)
    first.finish(0, 1.0)
    first.disconnect(0, 1.0)
    assert gang.retire_if_complete()
    second, _ = gang.attempt_for(0, 9, 0, 2, 2.0)
    assert second.key == (0, 9, 0)
    assert starts(second.register(0, info(0, task=2), 2.0))


# -- launches no rank ever joined, and competing gangs ----------------------------------------


def test_a_launch_no_rank_joined_fails_at_its_bound_with_a_record() -> None:
    gang = Gang(GANG_ID, b"s" * 32, 3, name="train", gated=True, start_timeout=10.0)
    gang.note = "0 executor(s) alive, 3 requested, 0 slot(s)"
    gang.open_window(2, now=0.0)
    assert gang.expire_windows(9.0) == []
    [failure] = gang.expire_windows(10.0, ["gang 1234 (x) is running 4 ranks"])
    assert failure.key == (2, -1, 0)
    assert "only 0 of 3 ranks joined" in failure.error.message and "missing rank(s) 0, 1, 2" in failure.error.message
    assert "Another gang holds slots: gang 1234 (x) is running 4 ranks" in failure.error.message
    last = gang.last_failure(2)
    assert last is not None and last[1].type == START_TIMEOUT_TYPE
    assert gang.expire_windows(99.0) == []  # reported once


def test_a_window_closes_once_a_rank_registers() -> None:
    gang = Gang(GANG_ID, b"s" * 32, 2, gated=True, start_timeout=10.0)
    gang.open_window(0, 0.0)
    gang.attempt_for(0, 5, 0, 1, 1.0)[0].register(0, info(0), 1.0)
    assert gang.expire_windows(50.0) == [] and gang.windows == {}


def test_competitors_name_the_gangs_that_hold_slots() -> None:
    registry = Registry()
    mine = Gang("a" * 32, b"s" * 32, 4, name="mine", gated=True, start_timeout=10.0)
    other = Gang("b" * 32, b"s" * 32, 4, name="other", gated=True, start_timeout=10.0)
    idle = Gang("c" * 32, b"s" * 32, 2, name="idle")
    for gang in (mine, other, idle):
        registry.add(gang)
    waiting, _ = other.attempt_for(0, 7, 0, 1, 0.0)
    waiting.register(0, info(0), 0.0)
    waiting.register(1, info(1), 0.0)
    assert registry.competitors(mine.gang_id) == ["gang bbbbbbbb (other) has 2 of 4 ranks waiting at its start gate"]
    assert registry.competitors(other.gang_id) == []


def test_start_timeout_message_is_pure_and_names_everything() -> None:
    text = start_timeout_message("gang x attempt 0", 3, 12.4, 12.0, {1: "h"}, ["gang y (z) is running 2 ranks"],
                                 "2 executor(s) alive")
    assert text.startswith("gang x attempt 0: only 1 of 3 ranks joined the start gate within 12 s "
                           "(spark.hydrogen.launch.startTimeout=12s); missing rank(s) 0, 2; joined: rank 1 (host h)")


# -- wire, settings, arithmetic ------------------------------------------------------------


def test_register_carries_an_address_and_the_gate_reply_every_rank_s() -> None:
    request = decode_request(Frame(Kind.REQUEST, {"op": "register", "gang_attempt": 0, "stage_id": 1, "rank": 0,
                                                   "address": "10.1.1.1:5000"}))
    assert request.member.address == "10.1.1.1:5000"  # type: ignore[union-attr]
    assert b'"addresses":["a:1","b:2"]' in register_reply(2, ["a:1", "b:2"])
    assert b'"addresses"' not in register_reply(2)
    assert b'"held":true' in held_notice()


def test_placement_and_start_timeout_settings() -> None:
    conf = {"spark.hydrogen.launch.placement": " Coordinated ", "spark.hydrogen.launch.startTimeout": "90s"}
    launch = HydrogenConfig.from_conf(conf.get, "127.0.0.1").launch
    assert (launch.placement, launch.start_timeout) == ("coordinated", 90.0)
    defaults = HydrogenConfig.from_conf({}.get, "127.0.0.1").launch
    assert (defaults.placement, defaults.start_timeout) == ("auto", 180.0)
    with pytest.raises(ValueError, match=r"spark.hydrogen.launch.placement='gang'.*auto, barrier, coordinated"):
        HydrogenConfig.from_conf({"spark.hydrogen.launch.placement": "gang"}.get, "h")
    with pytest.raises(ValueError, match="spark.hydrogen.launch.startTimeout"):
        HydrogenConfig.from_conf({"spark.hydrogen.launch.startTimeout": "0"}.get, "h")


def test_barrier_refused_only_where_spark_honours_dynamic_allocation() -> None:
    assert barrier_refused("spark://h:7077", True) and barrier_refused("local-cluster[2,1,1024]", True)
    assert barrier_refused("yarn", True) and barrier_refused("k8s://https://api:6443", True)
    assert not barrier_refused("local[4]", True) and not barrier_refused("local", True)
    assert not barrier_refused("spark://h:7077", False)


def test_capacity_arithmetic_refuses_a_gang_the_cluster_can_never_hold() -> None:
    cap = GangCapacity(max_executors=2, executor_cores=2, task_cpus=1)
    assert cap.slots == 4 and capacity_message(4, cap) is None
    text = capacity_message(5, cap)
    assert text is not None and "needs 5 slots" in text and "can never hold more than 4" in text
    assert "spark.dynamicAllocation.maxExecutors=2 x (spark.executor.cores=2 / spark.task.cpus=1) = 4 slots" in text
    gpus = GangCapacity(max_executors=3, executor_cores=8, task_cpus=1, resources=(("gpu", 2.0, 1.0),))
    assert gpus.slots == 6 and "spark.task.resource.gpu.amount=1" in (capacity_message(7, gpus) or "")
    assert GangCapacity(max_executors=None, executor_cores=2, task_cpus=1).slots is None  # unbounded
    assert GangCapacity(max_executors=2, executor_cores=None, task_cpus=1).slots is None  # unknown cores
    assert GangCapacity(max_executors=4, executor_cores=4, task_cpus=3).slots == 4


class _Conf:
    """The application's settings, as the launch layer reads them (``target.conf(key)``)."""

    def __init__(self, **settings: str) -> None:
        self.settings = {k.replace("_", "."): v for k, v in settings.items()}

    def conf(self, key: str) -> str | None:
        return self.settings.get(key)


def test_capacity_arithmetic_uses_the_gangs_own_resource_profile() -> None:
    from pyspark.resource import ExecutorResourceRequests, ResourceProfileBuilder, TaskResourceRequests

    from sparkhydrogen.launch.preflight import gang_capacity

    app = _Conf(spark_dynamicAllocation_maxExecutors="2", spark_executor_cores="4",
                spark_executor_resource_gpu_amount="2")
    assert gang_capacity(app).slots == 8  # the application's tasks ask for one CPU and no GPU
    asks = ResourceProfileBuilder().require(TaskResourceRequests().cpus(1).resource("gpu", 1)).build
    cap = gang_capacity(app, asks, "cpus=1, gpu=1")  # executors as configured: 2 GPUs each
    assert cap.slots == 4
    text = capacity_message(5, cap) or ""
    assert "limited by spark.executor.resource.gpu.amount=2 / the gang's tasks' resource.gpu.amount=1" in text
    assert text.endswith("slots for the gang's resources (cpus=1, gpu=1). Lower the number of tasks to at most 4, "
                         "or raise spark.dynamicAllocation.maxExecutors (or the cores/resources per executor)")
    bigger = ResourceProfileBuilder().require(TaskResourceRequests().cpus(2)).require(
        ExecutorResourceRequests().cores(8)).build
    assert gang_capacity(app, bigger, "cpus=2").slots == 8  # its own executors: 8 cores, 2 per task


# -- over real loopback sockets ------------------------------------------------------------


def test_loopback_ranks_wait_at_the_gate_and_learn_every_address(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server()
    handle = server.add_gang(2, "gate", gated=True, start_timeout=20.0)
    first = connect(handle)
    waiting = in_thread(lambda: (first.register(0, address="10.9.9.0:1", gate_timeout=20.0), first.addresses))
    wait_until(lambda: server.gate_status(handle.gang_id, 0) == (1, False), "rank 0 waits at the gate")
    assert waiting.thread.is_alive()
    second = connect(handle)
    assert second.register(1, address="10.9.9.1:1", gate_timeout=20.0) == 2
    assert waiting.get() == (2, ["10.9.9.0:1", "10.9.9.1:1"])
    assert second.addresses == ["10.9.9.0:1", "10.9.9.1:1"]
    assert server.gate_status(handle.gang_id, 0) == (2, True)
    for client in (first, second):
        client.finish()
        client.close()


def test_loopback_start_bound_with_a_fake_clock(make_server) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    server = make_server(clock=clock)
    handle = server.add_gang(3, "slow", gated=True, start_timeout=30.0)
    server.open_window(handle.gang_id, 0)
    server.note_gang(handle.gang_id, "1 executor(s) alive, 2 requested, 2 slot(s)")
    client = connect(handle)
    waiting = in_thread(lambda: client.register(1, stage_id=4, gate_timeout=30.0))
    wait_until(lambda: server.gate_status(handle.gang_id, 0)[0] == 1, "rank 1 waits")
    clock.advance(31.0)
    server.expire()
    with pytest.raises(Exception, match=r"only 1 of 3 ranks joined.*missing rank\(s\) 0, 2.*Cluster: 1 executor"):
        waiting.get()
    failure = server.last_failure(handle.gang_id, 0)
    assert failure is not None and failure.type == START_TIMEOUT_TYPE
    client.close()


def test_loopback_duplicate_is_held_and_refused_when_the_attempt_aborts(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server()
    handle = server.add_gang(1, "dup", gated=True, start_timeout=20.0)
    live = connect(handle)
    assert live.register(0, task_attempt_id=1, gate_timeout=20.0) == 1
    duplicate = connect(handle)
    held = in_thread(lambda: duplicate.register(0, task_attempt_id=5, gate_timeout=0.5))
    # held past its own gate timeout: a held copy waits for a verdict without a bound
    wait_until(lambda: server._on_loop(lambda: len(server._held)) == 1, "the duplicate is held")
    assert held.thread.is_alive()
    server.abort_attempts(handle.gang_id, "the driver cancelled the job")
    with pytest.raises(Exception, match="cancelled the job"):
        held.get()
    live.close()
    duplicate.close()
