"""Elastic vs fixed-size gangs: time from an executor's SIGKILL to the gang running again.

A real standalone cluster (master + 3 one-core workers, started by pid) runs a gang of 3
that checkpoints, then waits in ``barrier()``; the benchmark SIGKILLs one worker (and its
executor) and at once starts a replacement worker, as a cluster manager replacing a lost
node would. Measured from the SIGKILL to the first rank of the next attempt running its
function again (one host clock; the ranks write timestamps to a scratch folder):

* elastic, ``num_tasks=(2, 3)``: the next attempt starts at the 2 slots still there;
* fixed, ``num_tasks=3``: the next attempt waits for the replacement executor.

Both on the same cluster, in one run, alternating.

usage: .venv/bin/python benchmarks/bench_elastic.py [--repeats 2] [--output-section FILE]
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from standalone import Cluster, elastic_cluster  # noqa: E402

import sparkhydrogen as h2  # noqa: E402

WORKERS = 3


def _executors(sc: Any) -> int:
    return len(sc._jsc.sc().statusTracker().getExecutorInfos()) - 1


def _busy(sc: Any) -> int:
    return sum(int(i.numRunningTasks()) for i in sc._jsc.sc().statusTracker().getExecutorInfos())


def _wait(predicate: Any, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark: {what} not reached in {timeout} s")
        time.sleep(0.1)  # polling Spark's status tracker: its only signal


def _gang(folder: str) -> Any:
    def fn() -> int:
        ctx = h2.BarrierTaskContext.get()
        with open(os.path.join(folder, f"start-{ctx.gangAttempt()}-{ctx.rank()}"), "w") as fh:
            fh.write(repr(time.time()))
        ctx.checkpoint(ctx.gangAttempt())
        if ctx.gangAttempt() == 0:
            if ctx.rank() == 0:  # holds the others in barrier() until a worker holding a rank was SIGKILLed
                open(os.path.join(folder, "ready"), "w").close()
                deadline = time.monotonic() + 300
                while not os.path.exists(os.path.join(folder, "killed")) and time.monotonic() < deadline:
                    time.sleep(0.05)  # the benchmark's marker file is the signal
            ctx.barrier(timeout=300)  # raises GangAbortedError: a rank's executor is gone
        return ctx.worldSize()

    return fn


def once(cluster: Cluster, sc: Any, size: Any) -> tuple[float, int]:
    """One kill: seconds from the SIGKILL to the next attempt's first rank running, and that attempt's size."""
    _wait(lambda: _executors(sc) == WORKERS and _busy(sc) == 0, f"{WORKERS} idle executors")
    with tempfile.TemporaryDirectory() as folder:
        killed: list[float] = []

        def kill() -> None:
            _wait(lambda: os.path.exists(os.path.join(folder, "ready")), "the gang's first checkpoint", 300)
            killed.append(time.time())
            cluster.kill_worker(cluster.workers()[-1])
            open(os.path.join(folder, "killed"), "w").close()
            cluster.add_worker()  # the replacement, started at once

        killer = threading.Thread(target=kill, daemon=True)
        killer.start()
        sizes = h2.run(_gang(folder), size, max_retries=2, retry_backoff=0.0)
        killer.join(60)
        starts = []
        for path in glob.glob(os.path.join(folder, "start-1-*")):
            with open(path) as fh:
                starts.append(float(fh.read()))
        return min(starts) - killed[0], sizes[0]


def section(repeats: int) -> str:
    from pyspark.sql import SparkSession

    logging.getLogger("sparkhydrogen").setLevel(logging.ERROR)
    rows: dict[str, list[tuple[float, int]]] = {"elastic": [], "fixed": []}
    with elastic_cluster(workers=WORKERS, cores=1, memory="768m") as cluster:
        spark = (SparkSession.builder.master(cluster.master).config("spark.ui.enabled", "false")
                 .config("spark.ui.showConsoleProgress", "false").config("spark.executor.memory", "512m")
                 .config("spark.driver.host", "127.0.0.1").config("spark.hydrogen.heartbeat.timeout", "4s")
                 .getOrCreate())
        sc = spark.sparkContext
        sc.setLogLevel("OFF")
        try:
            _wait(lambda: _executors(sc) == WORKERS, f"{WORKERS} executors registered")
            h2.run(lambda: 0, WORKERS)  # warm-up: Python workers up on every executor
            for _ in range(repeats):
                rows["elastic"].append(once(cluster, sc, (2, WORKERS)))
                rows["fixed"].append(once(cluster, sc, WORKERS))
        finally:
            spark.stop()

    def fmt(name: str) -> str:
        xs = [seconds for seconds, _ in rows[name]]
        return f"{statistics.median(xs):.1f} s ({', '.join(f'{x:.1f}' for x in xs)})"

    def sizes(name: str) -> str:
        return ", ".join(str(size) for _, size in rows[name])

    return "\n".join([
        "## Elastic gangs: executor SIGKILL to training running again",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_elastic.py --repeats {repeats}` (a standalone master and "
        f"{WORKERS} one-core workers started by pid; a gang of {WORKERS} checkpoints and waits in `barrier()`, one "
        "worker and its executor are SIGKILLed and a replacement worker is started at once; from the SIGKILL to the "
        "first rank of the next attempt running). Median (runs), alternating on the same cluster in one run.",
        "",
        "| gang | SIGKILL -> running again | size of the next attempt |",
        "|---|---:|---:|",
        f"| elastic `num_tasks=(2, {WORKERS})` | {fmt('elastic')} | {sizes('elastic')} |",
        f"| fixed `num_tasks={WORKERS}` (waits for the replacement executor) | {fmt('fixed')} | {sizes('fixed')} |",
        "",
    ])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output-section")
    ns = parser.parse_args()
    text = section(ns.repeats)
    print(text)
    if ns.output_section:
        with open(ns.output_section, "w") as fh:
            fh.write(text)
