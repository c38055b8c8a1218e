"""A failing rank hears its peers' later reports (the settle), on a real coordinator over loopback."""

from __future__ import annotations

import threading
import time

import pytest
from kit import in_thread, joined, wait_until

from sparkhydrogen.coordinator.server import CoordinatorServer
from sparkhydrogen.errors import ErrorInfo, GangAbortedError

pytestmark = pytest.mark.timeout(60)


def error(rank: int, kind: str, message: str) -> ErrorInfo:
    return ErrorInfo(kind, message, rank=rank, traceback=f"Traceback ...\n{kind}: {message}")


def test_the_first_reporter_hears_the_real_cause_and_the_driver_hears_both(server: CoordinatorServer) -> None:
    aborts: list[ErrorInfo] = []
    hooked = threading.Event()
    handle = server.add_gang(world_size=2, on_abort=lambda key, cause: (aborts.append(cause), hooked.set()))
    broken, culprit = joined(handle, 0), joined(handle, 1)
    try:
        # rank 1's teardown broke rank 0's own connections first: rank 0 reports first, and waits
        answer = in_thread(lambda: broken.fail(error(0, "XGBoostError", "ring allreduce failed"), settle=20.0))
        wait_until(lambda: server.last_failure(handle.gang_id) is not None, "rank 0's report arrived")
        assert not hooked.is_set()  # the driver's abort hook waits for the settle too
        culprit.fail(error(1, "ZeroDivisionError", "rank one blew up"))
        failure = answer.get()
        assert failure is not None and (failure.rank, failure.type) == (0, "XGBoostError")
        assert [(o.rank, o.type, o.message) for o in failure.others] == [(1, "ZeroDivisionError", "rank one blew up")]
        assert hooked.wait(10.0)
        assert aborts[0].summary().endswith("then rank 1 raised ZeroDivisionError: rank one blew up")
        last = server.last_failure(handle.gang_id)
        assert last is not None and last.others == failure.others
    finally:
        broken.close()
        culprit.close()


def test_the_settle_is_bounded_when_a_peer_says_nothing(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=2)
    failing, silent = joined(handle, 0), joined(handle, 1)
    try:
        started = time.monotonic()
        failure = failing.fail(error(0, "ValueError", "bad shard"), settle=0.5)
        assert time.monotonic() - started >= 0.5  # it waited for rank 1, up to its bound
        assert failure is not None and failure.rank == 0 and failure.others == ()
        with pytest.raises(GangAbortedError, match=r"aborted: rank 0 raised ValueError: bad shard"):
            silent.collective("barrier")  # the gang was aborted at once all the same
    finally:
        failing.close()
        silent.close()


def test_a_peer_leaving_ends_the_settle_and_a_told_peer_needs_no_report(server: CoordinatorServer) -> None:
    handle = server.add_gang(world_size=3)
    failing, waiting, leaving = joined(handle, 0), joined(handle, 1), joined(handle, 2)
    try:
        told = in_thread(lambda: waiting.collective("barrier"))
        wait_until(lambda: server._on_loop(lambda: any(
            a.rounds for a in server.registry.gangs[handle.gang_id].attempts.values())), "rank 1 waits in a barrier")
        answer = in_thread(lambda: failing.fail(error(0, "OSError", "disk full"), settle=20.0))
        with pytest.raises(GangAbortedError):
            told.get()
        waiting.close()  # a told rank's task ends with the verdict
        leaving.close()  # and a rank whose process died counts as accounted for
        failure = answer.get(timeout=10.0)
        assert failure is not None and failure.rank == 0 and failure.others == ()
    finally:
        failing.close()
