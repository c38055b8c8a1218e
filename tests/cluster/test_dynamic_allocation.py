"""Gangs under dynamic allocation: a real standalone master + 2 workers x 2 cores, executors on demand.

Spark refuses barrier stages here (SPARK-24942); spark-hydrogen runs every gang as a
coordinated stage instead: an ordinary stage whose ranks wait at the coordinator's
start gate until all have joined. One cluster and one session serve the module; the
tests that break the cluster (killing an executor, stopping a worker) come last.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sparkutil import spark_session
from standalone import standalone_cluster

import sparkhydrogen as h2
from sparkhydrogen.errors import InsufficientSlotsError

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

#: Start bounds: generous where executors must start (~30 s each on a loaded 2-core machine), short where
#: the bound itself is tested. The bound is an application setting, so each gets its own session.
LONG_START = 150
START_TIMEOUT = 20

CONF = {
    "spark.dynamicAllocation.enabled": "true",
    "spark.dynamicAllocation.shuffleTracking.enabled": "true",
    "spark.dynamicAllocation.minExecutors": "0",
    "spark.dynamicAllocation.initialExecutors": "0",
    "spark.dynamicAllocation.maxExecutors": "2",
    "spark.dynamicAllocation.schedulerBacklogTimeout": "1s",
    "spark.dynamicAllocation.executorIdleTimeout": "300s",
    "spark.executor.cores": "2",
    "spark.executor.memory": "512m",
    "spark.scheduler.mode": "FAIR",  # jobs in different pools share slots (the competing-gangs test)
    "spark.hydrogen.heartbeat.timeout": "4s",
}


class Sessions:
    """One SparkSession at a time on the module's cluster; asking for another start bound replaces it."""

    def __init__(self, master: str) -> None:
        self.master = master
        self.bound: int | None = None
        self._stack = contextlib.ExitStack()
        self.sc: Any = None

    def get(self, bound: int) -> Any:
        if self.bound != bound:
            self.close()
            conf = dict(CONF, **{"spark.hydrogen.launch.startTimeout": f"{bound}s"})
            self.sc = self._stack.enter_context(spark_session(self.master, **conf)).sparkContext
            self.bound = bound
        return self.sc

    def close(self) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self.bound, self.sc = None, None


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, Sessions]]:
    with standalone_cluster(workers=2, cores=2, memory="1g") as master:
        sessions = Sessions(master)
        try:
            yield master, sessions
        finally:
            sessions.close()


@pytest.fixture
def sc(cluster: tuple[str, Sessions]) -> Any:
    """A session whose gangs may wait long for executors to start."""
    return cluster[1].get(LONG_START)


@pytest.fixture
def short_sc(cluster: tuple[str, Sessions]) -> Any:
    """A session with a short start bound (a new application: it starts from zero executors)."""
    return cluster[1].get(START_TIMEOUT)


def executors(sc: Any) -> int:
    return len(sc._jsc.sc().statusTracker().getExecutorInfos()) - 1  # the driver is listed too


def running_tasks(sc: Any) -> int:
    return sum(int(info.numRunningTasks()) for info in sc._jsc.sc().statusTracker().getExecutorInfos())


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.2)  # polling Spark's status tracker: its only signal


def test_gang_of_4_grows_from_zero_executors_and_all_ranks_run_together(sc: Any) -> None:
    assert executors(sc) == 0  # initialExecutors=0: nothing runs yet

    def fn() -> dict[str, Any]:
        import time

        ctx = h2.BarrierTaskContext.get()
        entered = time.time()  # user code starts only after the gate opened
        ctx.barrier()
        stamps = ctx.allGather(entered)
        return {"rank": ctx.rank(), "stamps": stamps, "left": time.time(),
                "hosts": [i.address for i in ctx.getTaskInfos()]}

    submitted = time.time()
    out = h2.run(fn, 4)
    assert [o["rank"] for o in out] == [0, 1, 2, 3]
    assert executors(sc) == 2  # dynamic allocation added both executors the gang needed
    stamps = out[0]["stamps"]
    assert all(o["stamps"] == stamps for o in out) and len(stamps) == 4
    # every rank entered its code before any rank left its barrier: all four ran at the same time
    assert max(stamps) < min(o["left"] for o in out)
    assert min(stamps) > submitted
    assert all(len(o["hosts"]) == 4 and o["hosts"] == out[0]["hosts"] for o in out)


def test_native_barrier_stage_is_refused_by_spark_on_the_same_cluster(sc: Any) -> None:
    from py4j.protocol import Py4JJavaError

    with pytest.raises(Py4JJavaError, match="SPARK-24942"):
        sc.parallelize(range(2), 2).barrier().mapPartitions(lambda it: it).collect()


def test_a_gang_the_cluster_can_never_hold_is_refused_at_once_with_the_numbers(sc: Any) -> None:
    started = time.monotonic()
    with pytest.raises(InsufficientSlotsError, match=r"needs 5 slots at once but the cluster can never hold more "
                                                     r"than 4.*maxExecutors=2 x \(spark.executor.cores=2 / "
                                                     r"spark.task.cpus=1\) = 4 slots"):
        h2.run(lambda: 1, 5)
    assert time.monotonic() - started < 1.0


def test_the_capacity_check_counts_the_gangs_own_resources(sc: Any) -> None:
    started = time.monotonic()  # 4 slots by the application's settings, but 2 tasks of 2 CPUs fill the cluster
    with pytest.raises(InsufficientSlotsError, match=r"needs 3 slots at once but the cluster can never hold more "
                                                     r"than 2.*\(spark.executor.cores=2 / the gang's tasks' cpus=2\) "
                                                     r"= 2 slots for the gang's resources \(cpus=2\)"):
        h2.run(lambda: 1, 3, resources={"cpus": 2})
    assert time.monotonic() - started < 5.0


def test_bare_barrier_rdd_and_dataframe_run_coordinated(sc: Any) -> None:
    from pyspark.sql import SparkSession

    def part(rows: Any) -> Any:
        ctx = h2.BarrierTaskContext.get()
        yield ctx.rank(), sum(ctx.allGather(sum(rows)))

    assert h2.barrier(sc.parallelize(range(8), 4)).mapPartitions(part).collect() == [(r, 28) for r in range(4)]

    def batches(frames: Any) -> Any:
        import pandas as pd

        ctx = h2.BarrierTaskContext.get()
        rows = sum(len(f) for f in frames)
        yield pd.DataFrame({"rank": [ctx.rank()], "rows": [sum(ctx.allGather(rows))]})

    spark = SparkSession.builder.getOrCreate()
    got = h2.barrier(spark.range(0, 10, 1, 2), num_tasks=2).mapInPandas(batches, "rank long, rows long").collect()
    assert sorted((r["rank"], r["rows"]) for r in got) == [(0, 10), (1, 10)]


def test_transparent_mode_serves_pyspark_s_own_barrier_api_under_dynamic_allocation(sc: Any) -> None:
    from pyspark import BarrierTaskContext

    def part(rows: Any) -> Any:
        ctx = BarrierTaskContext.get()  # pyspark's own API, as libraries written for it call it
        ctx.barrier()
        yield ctx.partitionId(), ctx.allGather(str(sum(rows))), len(ctx.getTaskInfos())

    with h2.installed():  # Spark would refuse this barrier stage; a coordinated stage serves it
        out = sc.parallelize(range(4), 2).barrier().mapPartitions(part).collect()
    assert out == [(0, ["1", "5"], 2), (1, ["1", "5"], 2)]


def test_torch_launcher_under_dynamic_allocation(sc: Any) -> None:
    pytest.importorskip("torch")
    import sparkhydrogen.torch as h2torch

    def train() -> dict[str, Any]:
        import os

        import torch
        import torch.distributed as dist

        value = torch.tensor([float(dist.get_rank() + 1)])  # the launcher formed the process group
        dist.all_reduce(value)
        return {"sum": value.item(), **{k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}}

    out = h2torch.run(train, num_processes=2, return_all=True)
    assert [o["sum"] for o in out] == [3.0, 3.0]
    assert [o["RANK"] for o in out] == ["0", "1"] and {o["WORLD_SIZE"] for o in out} == {"2"}
    assert out[0]["MASTER_ADDR"] == "127.0.0.1"  # rank 0's address, from the gate's registrations


def test_horovod_launcher_under_dynamic_allocation(sc: Any) -> None:
    pytest.importorskip("horovod.torch")
    import sparkhydrogen.horovod as h2hvd

    def fn() -> tuple[int, int, float]:
        import horovod.torch as hvd
        import torch

        hvd.init()
        total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum).item()
        return hvd.rank(), hvd.size(), total

    assert h2hvd.run(fn, num_proc=2) == [(0, 2, 3.0), (1, 2, 3.0)]


def test_sigkill_of_an_executor_mid_gang_relaunches_the_gang_from_its_checkpoint(sc: Any) -> None:
    wait_for(lambda: running_tasks(sc) == 0, "no task runs")

    def executor_jvm_pid() -> int:
        """Walk up from this Python worker to the executor JVM that owns it (defined here: tasks unpickle it)."""
        pid = os.getppid()
        while pid > 1:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"CoarseGrainedExecutorBackend" in fh.read():
                    return pid
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        raise RuntimeError("no executor JVM among this worker's ancestors")

    def fn() -> tuple[int, int, int]:
        ctx = h2.BarrierTaskContext.get()
        restored = ctx.restore()
        step = restored or 0
        while step < 3:
            step += 1
            ctx.checkpoint(step)
            if ctx.gangAttempt() == 0 and step == 2 and ctx.rank() == 1:
                os.kill(executor_jvm_pid(), signal.SIGKILL)  # the whole executor dies mid-gang
                threading.Event().wait(120)  # its Python worker goes with it (never past checkpoint 2)
                raise RuntimeError("the Python worker outlived its executor JVM")
        ctx.barrier(timeout=120)
        return ctx.gangAttempt(), restored or 0, step

    out = h2.run(fn, 4, max_retries=1, retry_backoff=0.5)
    assert out == [(1, 2, 3)] * 4  # relaunched whole; every rank resumed from checkpoint 2


def test_two_gangs_competing_for_the_slots_do_not_deadlock_silently(short_sc: Any, tmp_path: Path) -> None:
    """Two gangs of 3 on 4 slots, each holding 2 at its gate (fair pools): the start bound resolves the deadlock.

    A plain job holds 2 slots while gang A takes the other 2; gang B waits; when the
    plain job ends, the fair scheduler gives its 2 slots to B's pool (it runs nothing).
    Now each gang holds 2 of the 3 slots it needs.
    """
    sc = short_sc
    sc.parallelize(range(4), 4).count()  # a new application: let dynamic allocation bring both executors
    wait_for(lambda: running_tasks(sc) == 0 and executors(sc) == 2, "two idle executors", 120)
    release = tmp_path / "release"
    outcomes: dict[str, Any] = {}

    def in_pool(pool: str, action: Any) -> threading.Thread:
        def run() -> None:
            sc.setLocalProperty("spark.scheduler.pool", pool)
            try:
                outcomes[pool] = action()
            except Exception as exc:  # noqa: BLE001 - examined below
                outcomes[pool] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def hold(_: Any) -> None:
        import os
        import time

        deadline = time.monotonic() + 120
        while not os.path.exists(str(release)) and time.monotonic() < deadline:
            time.sleep(0.1)

    def active_jobs() -> int:
        return len(sc._jsc.sc().statusTracker().getActiveJobIds())

    blocker = in_pool("plain", lambda: sc.parallelize(range(2), 2).foreach(hold))
    wait_for(lambda: running_tasks(sc) == 2, "the plain job holds 2 slots")
    gang_a = in_pool("a", lambda: h2.run(lambda: h2.BarrierTaskContext.get().allGather(1), 3))
    wait_for(lambda: running_tasks(sc) == 4, "gang A holds the other 2 slots")
    gang_b = in_pool("b", lambda: h2.run(lambda: h2.BarrierTaskContext.get().allGather(2), 3))
    wait_for(lambda: active_jobs() == 3, "gang B's job is submitted")
    release.write_text("go")
    for thread in (blocker, gang_a, gang_b):
        thread.join(START_TIMEOUT * 3)
    assert not any(t.is_alive() for t in (blocker, gang_a, gang_b))
    assert outcomes["plain"] is None
    error = outcomes["a"]  # the first bound to expire: A's
    assert isinstance(error, InsufficientSlotsError), outcomes
    assert "only 2 of 3 ranks joined" in str(error) and "Another gang holds slots" in str(error), str(error)
    assert "has 2 of 3 ranks waiting at its start gate" in str(error)
    # A's cancelled job gave its slots back: B started then, unless its own bound (counted from its
    # submission, moments after A's) had expired first; either way it did not wait in silence
    assert outcomes["b"] == [[2, 2, 2]] * 3 or (
        isinstance(outcomes["b"], InsufficientSlotsError) and "only 2 of 3 ranks joined" in str(outcomes["b"]))
    wait_for(lambda: running_tasks(sc) == 0, "no task of either gang holds a slot", 30)


def _worker_pids(master: str) -> list[int]:
    """This cluster's worker JVMs (their command line names its master's URL)."""
    found = subprocess.run(["pgrep", "-f", f"deploy.worker.Worker.*{master}"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_a_gang_whose_executors_never_arrive_fails_at_the_bound_naming_missing_ranks(
        cluster: tuple[str, Sessions], short_sc: Any) -> None:
    master, sc = cluster[0], short_sc
    wait_for(lambda: running_tasks(sc) == 0, "no task runs")
    workers = _worker_pids(master)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGTERM)  # one worker (and its executor) gone: 2 of the 4 slots remain
    wait_for(lambda: not Path(f"/proc/{workers[1]}").exists(), "the worker exited", 30)
    wait_for(lambda: executors(sc) <= 1, "its executor is gone", 60)

    started = time.monotonic()
    with pytest.raises(InsufficientSlotsError) as info:
        h2.run(lambda: h2.BarrierTaskContext.get().allGather(1), 4)
    waited = time.monotonic() - started
    text = str(info.value)
    assert "only 2 of 4 ranks joined the start gate" in text, text
    assert "missing rank(s)" in text and "executor(s) alive" in text and "spark.hydrogen.launch.startTimeout" in text
    assert START_TIMEOUT - 1 <= waited <= START_TIMEOUT + 30
    wait_for(lambda: running_tasks(sc) == 0, "no executor is left busy", 30)
