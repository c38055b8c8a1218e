"""Fault recovery across real processes: local-cluster and a standalone master + 2 workers."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from sparkutil import spark_session, wait_for_executors
from standalone import standalone_cluster

import sparkhydrogen as h2

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def standalone() -> Iterator[Any]:
    with standalone_cluster(workers=2, cores=1, memory="1g") as master:
        conf = {"spark.executor.memory": "512m", "spark.executor.cores": "1",
                "spark.hydrogen.heartbeat.timeout": "3s"}
        with spark_session(master, **conf) as spark:
            wait_for_executors(spark.sparkContext, 2)
            yield spark.sparkContext


def test_executor_jvm_killed_mid_job_gang_is_relaunched(standalone: Any) -> None:
    def executor_jvm_pid() -> int:
        """Walk up from this Python worker to the executor JVM that owns it."""
        pid = os.getppid()
        while pid > 1:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"CoarseGrainedExecutorBackend" in fh.read():
                    return pid
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        raise RuntimeError("no executor JVM among this worker's ancestors")

    def fn() -> tuple[int, int]:
        ctx = h2.BarrierTaskContext.get()
        ctx.barrier()
        if ctx.gangAttempt() == 0 and ctx.rank() == 1:
            os.kill(executor_jvm_pid(), signal.SIGKILL)  # the whole executor dies, Python worker included
        ctx.barrier(timeout=120)
        return ctx.gangAttempt(), sum(ctx.allGather(ctx.rank()))

    out = h2.run(fn, 2, max_retries=2, retry_backoff=0.5)
    assert [total for _, total in out] == [1, 1]
    assert out[0][0] >= 1  # finished on a later attempt, after the executor was replaced


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[Any]:
    with spark_session("local-cluster[2,1,1024]", **{"spark.executor.memory": "512m"}) as spark:
        yield spark.sparkContext


def test_sigkill_python_worker_on_local_cluster_is_retried(local_cluster: Any) -> None:
    def fn() -> int:
        ctx = h2.BarrierTaskContext.get()
        ctx.barrier()
        if ctx.gangAttempt() == 0 and ctx.rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        ctx.barrier(timeout=120)
        return ctx.gangAttempt()

    assert h2.run(fn, 2, max_retries=1, retry_backoff=0.1) == [1, 1]
