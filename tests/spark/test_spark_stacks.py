"""``sparkhydrogen.stacks(gang)`` on real Spark (local[4]): every rank's stack, even while one holds the GIL.

Rank 1 is parked where the test can see it and release it (a FIFO in ``tmp_path``: a
Python-level wait in one test, one C call that keeps the GIL in the other); the other
ranks wait in ``barrier()``. The test asks for stacks until every rank shows where it
is parked (each call bounded), then releases rank 1 and checks the gang succeeds.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2
from sparkhydrogen.launch.service import service_for

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

#: How long the test waits for the gang to reach the state it inspects (a bound, not a pause).
WITHIN = 120.0


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    # Rank 1 holds the GIL on purpose: its heartbeats stop meanwhile, at the default liveness (a busy
    # rank is reported, never failed for that alone)
    with spark_session("local[4]", **{"spark.hydrogen.stacks.gilDumpAfter": "500ms"}) as spark:
        yield spark.sparkContext


class Gang:
    """``h2.run(fn, 4)`` on a thread; :meth:`result` joins it."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self.value = h2.run(fn, 4, args=args)
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            self.error = exc

    def result(self) -> Any:
        self.thread.join(WITHIN)
        assert not self.thread.is_alive(), f"the gang did not end within {WITHIN} s"
        if self.error is not None:
            raise self.error
        return self.value


def wait_for_file(path: Path, gang: Gang) -> None:
    deadline = time.monotonic() + WITHIN
    while not path.exists():
        assert gang.thread.is_alive(), f"the gang ended before {path.name} appeared: {gang.error!r}"
        assert time.monotonic() < deadline, f"{path.name} did not appear within {WITHIN} s"
        time.sleep(0.01)


def stacks_once(sc: Any, ready: Callable[[dict[int, str]], bool], timeout: float) -> dict[int, str]:
    """Ask for stacks until ``ready(stacks)`` (each ask bounded by ``timeout``); the last answer."""
    (gang_id, name), = service_for(sc).server.live_gangs().items()
    deadline = time.monotonic() + WITHIN / 2
    while True:
        found = h2.stacks(name or gang_id, timeout=timeout)
        if ready(found) or time.monotonic() > deadline:
            return found


def release(fifo: Path) -> None:
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # rank 1 holds the FIFO open for reading
    except OSError:  # ENXIO: rank 1 stopped waiting already (its bound passed); the assertions say why
        return
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def in_barrier(text: str) -> bool:
    return "in barrier" in text and "in collective" in text


def test_stacks_show_every_rank_where_it_waits(sc: Any, tmp_path: Path) -> None:
    fifo, parked = tmp_path / "release", tmp_path / "parked"
    os.mkfifo(fifo)

    def body(fifo: str, parked: str) -> int:
        import select

        ctx = h2.BarrierTaskContext.get()

        def rank_one_parked_in_a_recognisable_function() -> None:
            fd = os.open(fifo, os.O_RDWR)  # read-write: select waits for the test's byte, never for EOF
            try:
                open(parked, "w").close()
                select.select([fd], [], [], WITHIN)
            finally:
                os.close(fd)

        if ctx.partitionId() == 1:
            rank_one_parked_in_a_recognisable_function()
        ctx.barrier()
        return ctx.partitionId()

    gang = Gang(body, str(fifo), str(parked))
    try:
        wait_for_file(parked, gang)

        def ready(found: dict[int, str]) -> bool:
            return ("in rank_one_parked_in_a_recognisable_function" in found[1]
                    and all(in_barrier(found[r]) for r in (0, 2, 3)))

        found = stacks_once(sc, ready, timeout=10)
        with pytest.raises(h2.GangNotFoundError, match="no live gang 'no-such-gang' in this application; live gangs: "):
            h2.stacks("no-such-gang")
    finally:
        release(fifo)
    assert sorted(found) == [0, 1, 2, 3]
    assert "Thread MainThread" in found[1] and "in rank_one_parked_in_a_recognisable_function" in found[1]
    assert "select.select" in found[1]
    for rank in (0, 2, 3):
        assert in_barrier(found[rank]), f"rank {rank} is not shown in barrier():\n{found[rank]}"
        assert "in body" in found[rank]
    assert "Thread sparkhydrogen-heartbeat" in found[0]  # every thread, not only the main one
    assert gang.result() == [0, 1, 2, 3]


def test_stacks_of_a_rank_inside_one_long_c_call_that_holds_the_gil(sc: Any, tmp_path: Path) -> None:
    fifo, parked = tmp_path / "release", tmp_path / "parked"
    os.mkfifo(fifo)

    def body(fifo: str, parked: str) -> int:
        import ctypes

        ctx = h2.BarrierTaskContext.get()

        class PollFd(ctypes.Structure):
            _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]

        def rank_one_holds_the_gil_in_one_c_call() -> None:
            # ctypes.PyDLL does not release the GIL around a call (CDLL does): libc's poll() blocks
            # here with the GIL held, so no other thread of this process runs Python until it returns.
            libc = ctypes.PyDLL(None)
            libc.poll.argtypes = [ctypes.POINTER(PollFd), ctypes.c_ulong, ctypes.c_int]
            fd = os.open(fifo, os.O_RDWR)
            try:
                pollfd = PollFd(fd, 1, 0)  # POLLIN
                open(parked, "w").close()
                libc.poll(ctypes.byref(pollfd), 1, int(WITHIN * 1000))
            finally:
                os.close(fd)

        if ctx.partitionId() == 1:
            rank_one_holds_the_gil_in_one_c_call()
        ctx.barrier()
        return ctx.partitionId()

    gang = Gang(body, str(fifo), str(parked))
    try:
        wait_for_file(parked, gang)
        found = stacks_once(sc, lambda f: "has held the GIL" in f[1] and all(in_barrier(f[r]) for r in (0, 2, 3)),
                            timeout=10)
    finally:
        release(fifo)
    text = found[1]
    assert text.startswith("rank 1 (host ") and "has held the GIL for at least 0.5 s" in text
    assert "so it cannot answer; faulthandler dump written" in text
    assert "Thread 0x" in text and "(most recent call first)" in text
    assert "in rank_one_holds_the_gil_in_one_c_call" in text and "in body" in text
    for rank in (0, 2, 3):
        assert in_barrier(found[rank]), f"rank {rank} is not shown in barrier():\n{found[rank]}"
    assert gang.result() == [0, 1, 2, 3]


def test_no_thread_outlives_its_rank_in_a_reused_worker(sc: Any) -> None:
    assert h2.run(lambda: h2.BarrierTaskContext.get().allGather(1), 4) == [[1, 1, 1, 1]] * 4

    def threads(_: Any) -> list[str]:
        return [t.name for t in threading.enumerate()]

    names = [n for part in sc.parallelize(range(4), 4).map(threads).collect() for n in part]
    assert "sparkhydrogen-stacks" not in names  # joined when its rank ended (faulthandler's timer cancelled)
    server, deadline = service_for(sc).server, time.monotonic() + WITHIN
    while server.footprint()["stack_channels"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.footprint()["stack_channels"] == 0, "every stack channel closed with its rank"


def test_a_rank_holding_the_gil_for_20_s_at_default_liveness_finishes_its_gang(sc: Any) -> None:
    """The heartbeat timeout is the default 8 s; rank 1 holds the GIL 20 s in one C call: busy, never failed."""

    def body() -> tuple[int, int]:
        import ctypes

        ctx = h2.BarrierTaskContext.get()
        ctx.barrier()
        if ctx.partitionId() == 1:
            ctypes.PyDLL(None).sleep(20)  # libc sleep() through PyDLL keeps the GIL: no heartbeat for 20 s
        ctx.barrier()
        return ctx.partitionId(), ctx.gangAttempt()

    assert service_for(sc).config.coordinator.liveness_timeout == 8.0  # the default, untouched by this module
    assert h2.run(body, 2, max_retries=1) == [(0, 0), (1, 0)]  # first attempt: nothing was judged dead


def test_stacks_under_transparent_mode_see_pysparks_own_barrier_api(sc: Any, tmp_path: Path) -> None:
    """After ``install()``, ``rdd.barrier()`` jobs (xgboost.spark's and TorchDistributor's way) are ours: stacks too."""
    parked = tmp_path / "parked"
    fifo = tmp_path / "release"
    os.mkfifo(fifo)

    def body(rows: Any) -> Iterator[int]:
        import select

        from pyspark import BarrierTaskContext

        ctx = BarrierTaskContext.get()

        def rank_one_in_user_code_under_transparent_mode() -> None:
            fd = os.open(str(fifo), os.O_RDWR)
            try:
                open(str(parked), "w").close()
                select.select([fd], [], [], WITHIN)
            finally:
                os.close(fd)

        if ctx.partitionId() == 1:
            rank_one_in_user_code_under_transparent_mode()
        ctx.barrier()
        yield ctx.partitionId()

    h2.install()
    try:
        result: dict[str, Any] = {}

        def job() -> None:
            result["out"] = sc.parallelize(range(4), 4).barrier().mapPartitions(body).collect()

        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        deadline = time.monotonic() + WITHIN
        while not parked.exists():
            assert thread.is_alive() and time.monotonic() < deadline, f"rank 1 did not park: {result}"
            time.sleep(0.01)
        try:
            found = stacks_once(sc, lambda f: "rank_one_in_user_code_under_transparent_mode" in f.get(1, "")
                                and all(in_barrier(f.get(r, "")) for r in (0, 2, 3)), timeout=10)
        finally:
            release(fifo)
        thread.join(WITHIN)
        assert result.get("out") == [0, 1, 2, 3]
    finally:
        h2.uninstall()
    assert "in rank_one_in_user_code_under_transparent_mode" in found[1]
    for rank in (0, 2, 3):
        assert in_barrier(found[rank]), f"rank {rank} is not shown in barrier():\n{found[rank]}"
