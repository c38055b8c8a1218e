"""Real local[4] Spark: whole-gang retries, liveness (a stopped rank is busy, not dead), checkpoint/restore."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2
from sparkhydrogen.launch.service import service_for

pytestmark = [pytest.mark.spark, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    conf = {"spark.hydrogen.heartbeat.timeout": "2s", "spark.hydrogen.heartbeat.interval": "250ms",
            "spark.hydrogen.checkpoint.maxSize": "64k"}
    with spark_session("local[4]", **conf) as spark:
        yield spark.sparkContext


def _no_running_attempts(sc: Any) -> None:
    stats = service_for(sc).server.stats()
    assert stats["gangs"] == 0 and stats["attempts"] == 0, stats


def test_rank_raising_on_first_attempt_only_is_retried(sc: Any) -> None:
    def fn() -> tuple[int, int, list[int]]:
        ctx = h2.BarrierTaskContext.get()
        if ctx.gangAttempt() == 0 and ctx.rank() == 2:
            raise RuntimeError("transient failure")
        return ctx.gangAttempt(), ctx.rank(), ctx.allGather(ctx.rank() * 2)

    out = h2.run(fn, 4, max_retries=2, retry_backoff=0.1)
    assert out == [(1, r, [0, 2, 4, 6]) for r in range(4)]
    _no_running_attempts(sc)


def test_sigkill_of_a_python_worker_is_retried(sc: Any) -> None:
    def fn() -> int:
        ctx = h2.BarrierTaskContext.get()
        ctx.barrier()
        if ctx.gangAttempt() == 0 and ctx.rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the others are waiting in the next barrier
        ctx.barrier(timeout=60)
        return ctx.gangAttempt()

    assert h2.run(fn, 4, max_retries=1, retry_backoff=0.1) == [1, 1, 1, 1]


def test_a_stopped_rank_is_busy_not_dead_and_a_collective_timeout_names_it(sc: Any, tmp_path: Any) -> None:
    """A stopped process keeps its connection (the kernel holds it) like one holding the GIL: it is not failed
    for its silent heartbeat, and a collective timeout is what bounds the wait for it."""
    pidfile = tmp_path / "frozen.pid"

    def fn() -> int:
        ctx = h2.BarrierTaskContext.get()
        ctx.barrier()
        if ctx.gangAttempt() == 0 and ctx.rank() == 3:
            pidfile.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)  # frozen: socket open, no heartbeats
        ctx.barrier(timeout=6)  # 3x the heartbeat timeout
        return ctx.gangAttempt()

    try:
        with pytest.raises(h2.GangFailedError, match=r"failed: rank 3 never reached barrier \(collective call #2\) "
                                                     r"within 6 s \(ranks 0, 1, 2 waited\): rank 3 \(host .*\) last "
                                                     r"heard .* \(busy: its connection is alive") as caught:
            h2.run(fn, 4)
        assert caught.value.failed_rank == 3
    finally:
        if pidfile.exists():  # stop what the test froze, by pid
            pid = int(pidfile.read_text())
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass


def test_always_failing_rank_exhausts_retries_with_a_clear_error(sc: Any) -> None:
    def fn() -> None:
        ctx = h2.BarrierTaskContext.get()
        if ctx.rank() == 0:
            raise ValueError(f"corrupt input on attempt {ctx.gangAttempt()}")
        ctx.barrier()

    with pytest.raises(h2.GangFailedError, match=r"gang failed on all 3 attempts") as info:
        h2.run(fn, 2, max_retries=2, retry_backoff=0.05)
    assert info.value.attempts == tuple(
        f"gang 'test_always_failing_rank_exhausts_retries_with_a_clear_error.<locals>.fn' failed: "
        f"rank 0 raised ValueError: corrupt input on attempt {a}" for a in range(3))
    assert info.value.failed_rank == 0
    _no_running_attempts(sc)


def test_checkpoint_restore_resumes_from_the_last_committed_step(sc: Any, tmp_path: Any) -> None:
    log_dir = str(tmp_path)

    def train() -> int:
        ctx = h2.BarrierTaskContext.get()
        state = ctx.restore() or {"step": 0, "weight": 0.0}
        with open(os.path.join(log_dir, f"rank{ctx.rank()}.log"), "a") as log:
            while state["step"] < 10:
                step = state["step"]
                log.write(json.dumps([ctx.gangAttempt(), step]) + "\n")
                log.flush()
                if ctx.gangAttempt() == 0 and step == 6 and ctx.rank() == 1:
                    raise RuntimeError("crash at step 6")
                grads = ctx.allGather(float(ctx.rank() + step))
                state = {"step": step + 1, "weight": state["weight"] + sum(grads)}
                ctx.checkpoint(state)
        return state["weight"]

    weights = h2.run(train, 2, max_retries=1, retry_backoff=0.1)
    expected = float(sum(2 * s + 1 for s in range(10)))
    assert weights == [expected, expected]  # same result as an uninterrupted run
    for rank in range(2):
        with open(os.path.join(log_dir, f"rank{rank}.log")) as fh:
            executed = [tuple(json.loads(line)) for line in fh]
        first = [s for a, s in executed if a == 0]
        second = [s for a, s in executed if a == 1]
        assert second == [6, 7, 8, 9], executed  # resumed after the last commit (step 6)
        assert first[:6] == [0, 1, 2, 3, 4, 5]
        # nothing before the last checkpoint is redone: only step 6 (which crashed) runs twice
        assert sorted(set(first) & set(second)) == ([6] if 6 in first else [])


def test_retry_of_a_barrier_rdd_pipeline(sc: Any) -> None:
    def body(rows: Any) -> Iterator[tuple[int, int]]:
        ctx = h2.BarrierTaskContext.get()
        if ctx.gangAttempt() == 0 and ctx.rank() == 0:
            raise OSError("disk hiccup")
        yield ctx.gangAttempt(), sum(ctx.allGather(sum(rows)))

    rdd = sc.parallelize(range(10), 2)
    out = h2.retry(lambda: h2.barrier(rdd).mapPartitions(body).map(lambda t: t).collect(), max_retries=1,
                   retry_backoff=0.1)
    assert out == [(1, 45), (1, 45)]


def test_checkpoint_above_the_limit_is_a_clear_error(sc: Any) -> None:
    def fn() -> None:
        h2.BarrierTaskContext.get().checkpoint(b"x" * 40_000)  # 2 x 40 KB > 64 KiB

    with pytest.raises(h2.GangFailedError, match=r"checkpoint of \d+ bytes .* exceeds .*checkpoint.maxSize"):
        h2.run(fn, 2)


def test_retry_argument_checks(sc: Any) -> None:
    with pytest.raises(ValueError, match="max_retries must be >= 0"):
        h2.run(lambda: None, 2, max_retries=-1)
    with pytest.raises(ValueError, match="retry_backoff must be"):
        h2.run(lambda: None, 2, retry_backoff=-2)
    with pytest.raises(TypeError, match="action must be callable"):
        h2.retry(42)  # type: ignore[arg-type]



def test_a_closure_the_executors_cannot_unpickle_is_named_and_not_retried(sc: Any, tmp_path: Any,
                                                                           monkeypatch: Any) -> None:
    """No rank can start (the task's function lives in a module only the driver can import): the error names
    the Python exception from Spark's text, and the gang is not retried, since every attempt would fail so."""
    import importlib
    import sys

    (tmp_path / "driver_only_module.py").write_text("def fn():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the driver's path only: the Python workers never see it
    module = importlib.import_module("driver_only_module")
    try:
        with pytest.raises(h2.GangSetupError, match=r"ModuleNotFoundError: No module named 'driver_only_module'") \
                as info:
            h2.run(module.fn, 2, max_retries=3, retry_backoff=0)
        assert "not retried" in str(info.value) and "attempts" not in str(info.value)
    finally:
        sys.modules.pop("driver_only_module", None)
    assert h2.run(lambda: h2.BarrierTaskContext.get().rank(), 2) == [0, 1]  # the service keeps serving
