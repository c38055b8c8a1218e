"""Real local[4] Spark: a gang leaves the user's session as it found it.

* the user's job group still governs gang jobs: cancelling it stops ``h2.run`` promptly;
* every local property set before ``h2.run`` / ``h2.retry`` is the same afterwards, whether
  the gang succeeded or failed;
* bare jobs (``h2.barrier(rdd).mapPartitions(f).collect()`` with no ``retry`` around them) do
  not pile up gangs in the coordinator.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2
from sparkhydrogen.launch.service import service_for

pytestmark = [pytest.mark.spark, pytest.mark.timeout(180)]

#: the local properties a user sets through SparkContext's own API
PROPERTIES = ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel", "x")


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local[4]") as spark:
        yield spark.sparkContext


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a real signal (a file, Spark's status tracker) until it holds, for at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        pause.wait(0.05)


def _blocking_gang_fn(folder: str, run_for: float) -> Callable[[], int]:
    """A gang body that announces it is running, then keeps the gang busy in barriers for ``run_for`` s."""

    def fn() -> int:
        ctx = h2.BarrierTaskContext.get()
        ctx.barrier(timeout=60)
        open(os.path.join(folder, f"running-rank{ctx.rank()}-attempt{ctx.gangAttempt()}"), "w").close()
        deadline = time.monotonic() + run_for
        rounds = 0
        while time.monotonic() < deadline:
            ctx.barrier(timeout=30)
            rounds += 1
        return rounds

    return fn


def _in_job_group_thread(sc: Any, action: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``action`` on a new thread whose job group is the user's ("mine", interrupt on cancel)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        sc.setJobGroup("mine", "the user's own group", interruptOnCancel=True)
        try:
            outcome["result"] = action()
        except BaseException as exc:  # recorded for the main thread's assertions
            outcome["error"] = exc
        finally:
            outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=target, name="user-job-group", daemon=True)
    thread.start()
    return thread, outcome


def _spark_jobs_settle(sc: Any) -> bool:
    return not sc.statusTracker().getActiveJobsIds()


@pytest.mark.parametrize("max_retries", [0, 2], ids=["no-retries", "retries-not-used-on-cancel"])
def test_cancelling_the_users_job_group_stops_run_promptly(sc: Any, tmp_path: Any, max_retries: int) -> None:
    folder = str(tmp_path)
    fn = _blocking_gang_fn(folder, run_for=45.0)  # ends by itself only long after the bound below
    thread, outcome = _in_job_group_thread(sc, lambda: h2.run(fn, 2, max_retries=max_retries, retry_backoff=0.1))
    try:
        _wait_until(lambda: len(os.listdir(folder)) == 2, 60, "both ranks running")
        cancelled = time.monotonic()
        sc.cancelJobGroup("mine")
        thread.join(timeout=20)
        assert not thread.is_alive(), "h2.run kept running 20 s after the user's job group was cancelled"
        assert "error" in outcome, f"h2.run returned {outcome.get('result')!r} instead of raising"
        assert isinstance(outcome["error"], h2.GangCancelledError), repr(outcome["error"])
        assert outcome["ended"] - cancelled < 20
        assert not any("attempt1" in name for name in os.listdir(folder)), "a cancelled run was retried"
        _wait_until(lambda: _spark_jobs_settle(sc), 20, "the gang's Spark job ending")
    finally:
        thread.join(timeout=60)  # the gang ends by itself after 45 s: leave no job behind for the next test
        sc.cancelJobGroup("mine")


def _properties(sc: Any) -> dict[str, Any]:
    props: dict[str, Any] = {key: sc.getLocalProperty(key) for key in PROPERTIES}
    props["tags"] = set(sc.getJobTags())
    return props


def _set_user_properties(sc: Any, interrupt: bool) -> None:
    sc.setJobGroup("mine", "my description", interruptOnCancel=interrupt)
    sc.addJobTag("my-tag")
    sc.setLocalProperty("x", "y")


def _clear_user_properties(sc: Any) -> None:
    for key in PROPERTIES:  # pyspark has no clearJobGroup(): a None value removes a local property
        sc.setLocalProperty(key, None)
    sc.clearJobTags()


def _gang_actions(sc: Any) -> dict[str, Callable[[], Any]]:
    def ok() -> int:
        return h2.BarrierTaskContext.get().rank()

    def bad() -> None:
        ctx = h2.BarrierTaskContext.get()
        if ctx.rank() == 1:
            raise ValueError("fails on purpose")
        ctx.barrier(timeout=60)

    def ok_rows(rows: Any) -> Iterator[int]:
        yield h2.BarrierTaskContext.get().rank()

    def bad_rows(rows: Any) -> Iterator[int]:
        bad()
        yield 0

    rdd = sc.parallelize(range(2), 2)
    return {
        "run": lambda: h2.run(ok, 2),
        "run-fails": lambda: h2.run(bad, 2),
        "run-retried-then-fails": lambda: h2.run(bad, 2, max_retries=1, retry_backoff=0.05),
        "retry": lambda: h2.retry(lambda: h2.barrier(rdd).mapPartitions(ok_rows).collect()),
        "retry-fails": lambda: h2.retry(lambda: h2.barrier(rdd).mapPartitions(bad_rows).collect(), max_retries=0),
        "bare-barrier": lambda: h2.barrier(rdd).mapPartitions(ok_rows).collect(),
    }


@pytest.mark.parametrize("action", ["run", "run-fails", "run-retried-then-fails", "retry", "retry-fails",
                                    "bare-barrier"])
@pytest.mark.parametrize("user_set", ["interrupt-false", "interrupt-true", "nothing-set"])
def test_local_properties_are_the_same_after_a_gang(sc: Any, action: str, user_set: str) -> None:
    _clear_user_properties(sc)
    if user_set != "nothing-set":
        _set_user_properties(sc, interrupt=user_set == "interrupt-true")
    before = _properties(sc)
    error: BaseException | None = None
    try:
        _gang_actions(sc)[action]()
    except h2.GangFailedError as exc:
        error = exc
    finally:
        after = _properties(sc)
        _clear_user_properties(sc)
    assert (error is not None) == action.endswith("fails"), error
    assert after == before


@pytest.mark.timeout(300)
def test_bare_jobs_do_not_accumulate_gangs(sc: Any) -> None:
    def f(rows: Any) -> Iterator[int]:
        ctx = h2.BarrierTaskContext.get()
        ctx.barrier()
        yield sum(ctx.allGather(sum(rows)))

    server = service_for(sc).server
    gc.collect()
    start = server.stats()["gangs"]
    for _ in range(100):
        assert h2.barrier(sc.parallelize(range(4), 2)).mapPartitions(f).collect() == [6, 6]
    gc.collect()
    stats = server.stats()
    assert stats["gangs"] - start <= 8, f"100 bare barrier jobs left {stats['gangs'] - start} gangs registered: {stats}"
