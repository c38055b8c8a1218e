"""pyspark's own barrier-mode scenarios, unchanged pyspark code, with transparent mode installed.

The scenarios of pyspark's ``test_taskcontext.py`` / ``test_rddbarrier.py`` (which the pyspark
wheel does not ship): barrier, allGather, getTaskInfos, the context in and out of barrier
stages, Python worker reuse and resources -- on ``local[4]`` (installed after the session
exists) and ``local-cluster[2,1,1024]`` (installed before it exists, with one "gpu" per
executor from a discovery script). Every function below is plain pyspark code.
"""

from __future__ import annotations

import inspect
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pyspark import BarrierTaskContext, BarrierTaskInfo, TaskContext
from sparkutil import spark_session, wait_for_executors

import sparkhydrogen as h2
from sparkhydrogen import transparent

pytestmark = [pytest.mark.spark, pytest.mark.timeout(240)]

OURS = "sparkhydrogen.context"


@pytest.fixture(scope="module", params=["local[4]", "local-cluster[2,1,1024]"])
def sc(request: Any, tmp_path_factory: Any) -> Iterator[Any]:
    master = request.param
    conf: dict[str, str] = {}
    if master.startswith("local-cluster"):
        script = tmp_path_factory.mktemp("gpu") / "gpus.sh"
        script.write_text('#!/bin/sh\necho \'{"name": "gpu", "addresses": ["0"]}\'\n')
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        conf = {"spark.worker.resource.gpu.amount": "1", "spark.worker.resource.gpu.discoveryScript": str(script),
                "spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "1"}
        transparent.install()  # before the SparkSession exists
    with spark_session(master, **conf) as spark:
        context = spark.sparkContext
        if master.startswith("local-cluster"):
            wait_for_executors(context, 2)
        else:
            transparent.install()  # after it exists
        context.slots = 2 if master.startswith("local-cluster") else 4  # type: ignore[attr-defined]
        context.gpus = bool(conf)  # type: ignore[attr-defined]
        try:
            yield context
        finally:
            transparent.uninstall()


@pytest.fixture(autouse=True)
def still_installed() -> Iterator[None]:
    assert transparent.is_installed()
    yield
    transparent.install()  # a test that uninstalled leaves the module's state as it found it


# ------------------------------------------------------------------ barrier, allGather, getTaskInfos


def test_barrier_releases_every_task_together(sc: Any) -> None:
    def f(index: int, it: Any) -> Iterator[float]:
        time.sleep(0.1 * index)  # arrive at different times
        BarrierTaskContext.get().barrier()
        yield time.time()

    times = sc.parallelize(range(sc.slots), sc.slots).barrier().mapPartitionsWithIndex(f).collect()
    assert len(times) == sc.slots and max(times) - min(times) < 1.0


def test_all_gather_returns_strings_in_partition_order(sc: Any) -> None:
    def f(it: Any) -> Iterator[list[str]]:
        context = BarrierTaskContext.get()
        yield context.allGather(f"p{context.partitionId()}")

    out = sc.parallelize(range(sc.slots), sc.slots).barrier().mapPartitions(f).collect()
    assert out == [[f"p{i}" for i in range(sc.slots)]] * sc.slots
    assert all(isinstance(m, str) for row in out for m in row)


def test_get_task_infos(sc: Any) -> None:
    def f(it: Any) -> Iterator[Any]:
        context = BarrierTaskContext.get()
        infos = context.getTaskInfos()
        yield ([i.address for i in infos], all(isinstance(i, BarrierTaskInfo) for i in infos),
               context.getLocalProperty("addresses"))

    out = sc.parallelize(range(sc.slots), sc.slots).barrier().mapPartitions(f).collect()
    for addresses, are_infos, native in out:
        assert len(addresses) == sc.slots and are_infos
        assert all(":" in a for a in addresses) and addresses == [a.strip() for a in native.split(",")]


def test_rounds_are_served_by_the_coordinator(sc: Any) -> None:
    """Ten barrier + allGather rounds: Spark's native mode needs about 1 s per round, ours well under."""

    def f(it: Any) -> Iterator[Any]:
        context = BarrierTaskContext.get()
        context.barrier()
        start = time.perf_counter()
        for i in range(10):
            context.barrier()
            context.allGather(str(i))
        yield time.perf_counter() - start, type(context).__module__

    out = sc.parallelize(range(sc.slots), sc.slots).barrier().mapPartitions(f).collect()
    assert all(module == OURS for _, module in out)
    assert max(elapsed for elapsed, _ in out) < 5.0  # 20 native rounds would take ~20 s


# ------------------------------------------------------------------ the context in and out of barrier stages


def test_context_in_a_barrier_stage_is_ours_and_a_pyspark_barrier_context(sc: Any) -> None:
    sc.setLocalProperty("testkey", "testvalue")

    def f(it: Any) -> Iterator[Any]:
        context = TaskContext.get()
        native = context._native
        yield (isinstance(context, BarrierTaskContext), type(context).__module__,
               context is BarrierTaskContext.get() is h2.BarrierTaskContext.get(),
               (context.stageId(), context.partitionId(), context.attemptNumber(), context.taskAttemptId(),
                context.cpus()),
               (native.stageId(), native.partitionId(), native.attemptNumber(), native.taskAttemptId(), native.cpus()),
               context.getLocalProperty("testkey"), context.getLocalProperty("missing"))

    try:
        out = sc.parallelize(range(sc.slots), sc.slots).barrier().mapPartitions(f).collect()
    finally:
        sc.setLocalProperty("testkey", None)
    assert [row[3][1] for row in out] == list(range(sc.slots))
    for is_barrier, module, same, ours, native, prop, missing in out:
        assert is_barrier and module == OURS and same
        assert ours == native and ours[2] == 0 and ours[4] == 1
        assert prop == "testvalue" and missing is None


def test_context_outside_barrier_stages_is_pysparks(sc: Any) -> None:
    def f(_: Any) -> Any:
        context = TaskContext.get()
        try:
            BarrierTaskContext.get()
            barrier_error = None
        except Exception as exc:  # noqa: BLE001 - pyspark's own error, asserted below
            barrier_error = type(exc).__name__
        try:
            h2.BarrierTaskContext.get()
            ours_error = None
        except h2.NotInGangError:
            ours_error = "NotInGangError"
        return type(context).__module__, isinstance(context, BarrierTaskContext), barrier_error, ours_error

    out = sc.parallelize(range(2), 2).map(f).collect()
    assert out == [("pyspark.taskcontext", False, "PySparkRuntimeError", "NotInGangError")] * 2


def test_python_worker_reuse_keeps_contexts_apart(sc: Any) -> None:
    def barrier_task(it: Any) -> Iterator[Any]:
        context = TaskContext.get()
        yield os.getpid(), type(context).__module__, isinstance(context, BarrierTaskContext)

    def plain_task(_: Any) -> Any:
        context = TaskContext.get()
        return os.getpid(), type(context).__module__, isinstance(context, BarrierTaskContext)

    rdd = sc.parallelize(range(sc.slots), sc.slots)
    first = rdd.barrier().mapPartitions(barrier_task).collect()
    plain = rdd.map(plain_task).collect()
    second = rdd.barrier().mapPartitions(barrier_task).collect()
    assert all(row[1:] == (OURS, True) for row in first + second)
    assert all(row[1:] == ("pyspark.taskcontext", False) for row in plain)
    pids = {row[0] for row in first}
    assert pids & {row[0] for row in plain + second}, "no Python worker was reused"


def test_resources(sc: Any) -> None:
    def f(it: Any) -> Iterator[Any]:
        context = BarrierTaskContext.get()
        yield ({k: (v.name, list(v.addresses)) for k, v in context.resources().items()},
               {k: (v.name, list(v.addresses)) for k, v in context._native.resources().items()})

    out = sc.parallelize(range(sc.slots), sc.slots).barrier().mapPartitions(f).collect()
    for ours, native in out:
        assert ours == native
        assert ours == ({"gpu": ("gpu", ["0"])} if sc.gpus else {})


# ------------------------------------------------------------------ more of pyspark's barrier API


def test_narrow_transformations_after_the_barrier_see_the_context(sc: Any) -> None:
    def after(x: int) -> tuple[int, str]:
        context = BarrierTaskContext.get()
        return context.partitionId(), context.allGather(str(x))[-1]

    out = sc.parallelize(range(sc.slots), sc.slots).barrier().mapPartitions(lambda it: it).map(after).collect()
    assert out == [(i, str(sc.slots - 1)) for i in range(sc.slots)]


def test_dataframe_map_in_pandas_and_arrow_with_barrier(sc: Any) -> None:
    import pandas as pd
    import pyarrow as pa
    from pyspark.sql import SparkSession

    spark = SparkSession(sc)
    df = spark.range(0, 4 * sc.slots, numPartitions=sc.slots)

    def in_pandas(batches: Any) -> Iterator[Any]:
        context = BarrierTaskContext.get()
        n = sum(len(b) for b in batches)
        yield pd.DataFrame({"m": [type(context).__module__], "g": [",".join(context.allGather(str(n)))]})

    def in_arrow(batches: Any) -> Iterator[Any]:
        context = TaskContext.get()
        n = sum(b.num_rows for b in batches)
        yield pa.RecordBatch.from_pydict({"m": [type(context).__module__], "g": [",".join(context.allGather(str(n)))]})

    expected = [(OURS, ",".join(["4"] * sc.slots))] * sc.slots
    assert [tuple(r) for r in df.mapInPandas(in_pandas, "m string, g string", barrier=True).collect()] == expected
    assert [tuple(r) for r in df.mapInArrow(func=in_arrow, schema="m string, g string", barrier=True).collect()] \
        == expected
    # without barrier=True nothing changes: an ordinary stage with pyspark's TaskContext
    plain = df.mapInPandas(lambda bs: (pd.DataFrame({"m": [type(TaskContext.get()).__module__]}) for _ in [0]),
                           "m string").collect()
    assert {r.m for r in plain} == {"pyspark.taskcontext"}


def test_profile_argument_is_refused_clearly(sc: Any) -> None:
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests
    from pyspark.sql import SparkSession

    df = SparkSession(sc).range(2)
    if "profile" not in inspect.signature(type(df).mapInPandas).parameters:
        pytest.skip("this pyspark's mapInPandas has no profile= (added in pyspark 4.0)")
    profile = ResourceProfileBuilder().require(TaskResourceRequests().cpus(1)).build
    with pytest.raises(ValueError, match=r"profile= is not served by spark-hydrogen's transparent mode"):
        df.mapInPandas(lambda it: it, "id long", barrier=True, profile=profile)


def test_sparkhydrogen_own_launches_do_not_recurse(sc: Any) -> None:
    out = h2.barrier(sc.parallelize(range(2), 2)).mapPartitions(
        lambda it: [h2.BarrierTaskContext.get().allGather(1)]).collect()
    assert out == [[1, 1]] * 2
    assert h2.run(lambda: type(TaskContext.get()).__module__, 2) == [OURS] * 2


def test_failing_rank_is_named_and_peers_are_not_left_waiting(sc: Any) -> None:
    def f(it: Any) -> Iterator[int]:
        context = BarrierTaskContext.get()
        if context.partitionId() == 1:
            raise ValueError("bad shard")
        context.barrier()  # the peers wait here: the failure must release them at once
        yield 0

    start = time.monotonic()
    # Spark reports whichever task failed first: rank 1 itself (its note) or a peer (our abort verdict)
    with pytest.raises(Exception, match=r"(raised by rank 1 of \d \(gang attempt 0\): |aborted: rank 1 raised )"
                                        r"ValueError: bad shard"):
        sc.parallelize(range(sc.slots), sc.slots).barrier().mapPartitions(f).collect()
    assert time.monotonic() - start < 60


def test_the_real_cause_is_named_even_when_its_report_comes_after_the_failures_it_caused(sc: Any) -> None:
    def f(it: Any) -> Iterator[int]:
        context = BarrierTaskContext.get()
        context.barrier()  # every rank is in, as in a job that trained together for a while
        if context.partitionId() != 1:
            raise ConnectionResetError("peer closed the ring")  # what rank 1's teardown did to the others
        try:
            context.barrier()  # still tearing down: its own error surfaces only after theirs reached the coordinator
        except h2.GangAbortedError:
            pass
        raise ZeroDivisionError("the real cause")
        yield 0

    # whichever task Spark reports: rank 1's own note, or a peer's note naming rank 1's later report
    with pytest.raises(Exception, match=r"(raised by rank 1 of \d \(gang attempt 0\): |another rank failed too: "
                                        r"rank 1 raised |then rank 1 raised )ZeroDivisionError: the real cause"):
        sc.parallelize(range(sc.slots), sc.slots).barrier().mapPartitions(f).collect()


def test_job_launched_while_installed_finishes_after_uninstall(sc: Any) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(120)
    port = server.getsockname()[1]

    def f(it: Any) -> Iterator[Any]:
        context = BarrierTaskContext.get()
        context.barrier()
        with socket.create_connection(("127.0.0.1", port), timeout=120) as conn:
            conn.sendall(b"r")
            assert conn.recv(1) == b"g"  # the driver has uninstalled transparent mode meanwhile
        yield type(context).__module__, context.allGather(str(context.partitionId()))

    result: dict[str, Any] = {}

    def job() -> None:
        try:
            result["out"] = sc.parallelize(range(sc.slots), sc.slots).barrier().mapPartitions(f).collect()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            result["error"] = exc

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    conns = []
    try:
        for _ in range(sc.slots):  # every rank is running its gang body
            conn, _ = server.accept()
            assert conn.recv(1) == b"r"
            conns.append(conn)
        transparent.uninstall()
        assert not transparent.is_installed()
        for conn in conns:
            conn.sendall(b"g")
        thread.join(120)
    finally:
        for conn in conns:
            conn.close()
        server.close()
    assert not thread.is_alive() and "error" not in result, result.get("error")
    assert result["out"] == [(OURS, [str(i) for i in range(sc.slots)])] * sc.slots
    # and the next job is pyspark's own again
    native = sc.parallelize(range(2), 2).barrier().mapPartitions(
        lambda it: [type(BarrierTaskContext.get()).__module__]).collect()
    assert native == ["pyspark.taskcontext"] * 2


def test_retry_around_pysparks_barrier_job(sc: Any) -> None:
    def f(it: Any) -> Iterator[Any]:
        context = BarrierTaskContext.get()
        if context.partitionId() == 1 and h2.BarrierTaskContext.get().gangAttempt() == 0:
            raise RuntimeError("first attempt fails")
        yield h2.BarrierTaskContext.get().gangAttempt(), context.allGather("ok")

    out = h2.retry(lambda: sc.parallelize(range(2), 2).barrier().mapPartitions(f).collect(), max_retries=1,
                   retry_backoff=0.1)
    assert out == [(1, ["ok", "ok"])] * 2
