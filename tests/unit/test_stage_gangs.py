"""Stage gangs over real loopback sockets (no Spark): formed by their first task, gone when done.

A lazily built gang stage carries only a stage credential (an id and a secret derived
from the coordinator's key); the coordinator forms the gang when the first task of a
stage attempt registers, sized by what the task states, and forgets it once the
stage is done -- at once after success, as a bounded tombstone after failure.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import pytest
from kit import HOST, JOIN_TIMEOUT, connect, wait_until

from sparkhydrogen.coordinator.client import CoordinatorClient
from sparkhydrogen.coordinator.protocol import StageGangInfo
from sparkhydrogen.coordinator.server import MAX_STAGE_TOMBSTONES, STAGE_PREFIX, CoordinatorServer, stage_secret
from sparkhydrogen.errors import AuthenticationError, ErrorInfo, GangAbortedError, ProtocolError, RegistrationError

pytestmark = pytest.mark.timeout(60)


def _stage(client: CoordinatorClient, rank: int, world: int, stage_id: int = 7, task: int | None = None) -> int:
    return client.register(rank, stage_id=stage_id, host=HOST, task_attempt_id=rank if task is None else task,
                           stage=StageGangInfo(world_size=world, name="unit stage"))


def _run_stage(server: CoordinatorServer, handle: Any, world: int, stage_id: int, fail_rank: int | None = None
               ) -> dict[int, Any]:
    """Every rank of one stage attempt on threads: register, one allGather, finish (or fail)."""
    results: dict[int, Any] = {}

    def rank(r: int) -> None:
        client = connect(handle)
        try:
            assert _stage(client, r, world, stage_id, task=stage_id * 100 + r) == world
            if r == fail_rank:
                client.fail(ErrorInfo.from_exception(ZeroDivisionError("boom"), r, ""))
                results[r] = "failed"
                return
            results[r] = [bytes(p) for p in client.collective("allGather", f"{stage_id}:{r}".encode(), timeout=20)]
            client.finish()
        except Exception as exc:
            results[r] = exc
        finally:
            client.close()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    return results


def _gangs(server: CoordinatorServer) -> int:
    return server.footprint()["gangs"]


def test_the_first_task_forms_the_gang_and_the_gang_is_gone_when_the_stage_is_done(server: CoordinatorServer) -> None:
    handle = server.stage_credential()
    assert handle.gang_id.startswith(STAGE_PREFIX) and handle.world_size == 0
    assert _gangs(server) == 0  # nothing declared
    for stage_id in (3, 4, 5):  # the same plan run three times: three stages, each its own gang
        results = _run_stage(server, handle, 3, stage_id)
        assert results == {r: [f"{stage_id}:{i}".encode() for i in range(3)] for r in range(3)}
        wait_until(lambda: _gangs(server) == 0, "the finished stage gang is forgotten")
    footprint = server.footprint()
    assert footprint["attempts"] == 0 and footprint["roster_attempts"] == 0 and footprint["stage_tombstones"] == 0


def test_a_credential_proves_only_its_own_gang(server: CoordinatorServer) -> None:
    one, other = server.stage_credential(), server.stage_credential()
    assert one.secret != other.secret
    with pytest.raises(AuthenticationError):
        connect(one, gang_id=other.gang_id)  # one's secret does not open the other's gang
    with pytest.raises(AuthenticationError):
        connect(one, gang_id=STAGE_PREFIX + "0" * 32, secret=b"x" * 32)  # nor does a guess
    key_of_another_coordinator = b"k" * 32
    with pytest.raises(AuthenticationError):
        connect(one, secret=stage_secret(key_of_another_coordinator, one.gang_id))


def test_a_stage_task_must_state_its_size(server: CoordinatorServer) -> None:
    client = connect(server.stage_credential())
    try:
        with pytest.raises(RegistrationError, match="did not state its stage's task count"):
            client.register(0, host=HOST)
    finally:
        client.close()
    assert _gangs(server) == 0


def test_a_different_size_while_the_gang_runs_is_refused(server: CoordinatorServer) -> None:
    handle = server.stage_credential()
    first = connect(handle)
    second = connect(handle)
    try:
        _stage(first, 0, 2, stage_id=1)
        with pytest.raises(RegistrationError, match="runs a stage of 2 tasks; this task's stage has 3"):
            _stage(second, 0, 3, stage_id=2)
    finally:
        first.close()
        second.close()


def test_a_failed_stage_gang_refuses_its_late_task_and_is_kept_bounded(make_server: Any) -> None:
    server = make_server()
    handle = server.stage_credential()
    results = _run_stage(server, handle, 2, stage_id=9, fail_rank=0)
    assert results[0] == "failed" and isinstance(results[1], GangAbortedError)
    wait_until(lambda: server.footprint()["stage_tombstones"] == 1, "the failed gang is kept as a tombstone")
    late = connect(handle)  # a task of the aborted stage attempt that registers late
    try:
        with pytest.raises(RegistrationError):
            late.register(1, stage_id=9, host=HOST, task_attempt_id=9 * 100 + 1,
                          stage=StageGangInfo(world_size=2))
    finally:
        late.close()
    # a new stage of the same plan forms the gang again and succeeds
    assert _run_stage(server, handle, 2, stage_id=10) == {r: [b"10:0", b"10:1"] for r in range(2)}
    wait_until(lambda: _gangs(server) == 0, "the gang is forgotten after the successful stage")
    # many failed stage gangs: at most MAX_STAGE_TOMBSTONES are kept
    for n in range(MAX_STAGE_TOMBSTONES + 5):
        _run_stage(server, server.stage_credential(), 1, stage_id=100 + n, fail_rank=0)
    wait_until(lambda: server.footprint()["connections"] == 0, "every rank has gone")
    footprint = server.footprint()
    assert footprint["stage_tombstones"] == footprint["gangs"] == MAX_STAGE_TOMBSTONES  # the oldest were dropped


def test_a_task_that_authenticated_before_its_gang_was_removed_cannot_register(server: CoordinatorServer) -> None:
    handle = server.add_gang(2, name="scoped")
    late = connect(handle)  # authenticated while the gang existed
    server.remove_gang(handle.gang_id)
    try:
        with pytest.raises(RegistrationError, match="was removed by the driver before this task registered"):
            late.register(0, host=HOST)
    finally:
        late.close()
    footprint = server.footprint()
    assert footprint["gangs"] == 0 and footprint["attempts"] == 0  # nothing was formed for it


def test_stage_gangs_count_against_max_gangs(make_server: Any) -> None:
    server = make_server(max_gangs=1)
    busy = connect(server.stage_credential())
    refused = connect(server.stage_credential())
    try:
        _stage(busy, 0, 2, stage_id=1)  # running (waits for rank 1)
        with pytest.raises(RegistrationError, match="maxGangs=1"):
            _stage(refused, 0, 1, stage_id=2)
        assert _gangs(server) == 1  # the refused gang was not kept
    finally:
        busy.close()
        refused.close()
    wait_until(lambda: server.footprint()["running_gangs"] == 0, "the abandoned gang stops running")


def test_stage_info_is_checked_on_the_wire(server: CoordinatorServer) -> None:
    client = connect(server.stage_credential())
    try:
        with pytest.raises(ProtocolError, match="stage.world_size must be a positive integer, got 0"):
            client.register(0, host=HOST, stage=replace(StageGangInfo(world_size=1), world_size=0))
    finally:
        client.close()
