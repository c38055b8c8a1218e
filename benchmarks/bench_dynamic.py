"""Gang start under dynamic allocation: submission -> every rank running, broken down. One run, one table.

A real standalone cluster (master + 2 workers x 2 cores, started by pid) and a gang of 4:

* **coordinated, from zero**: dynamic allocation on, ``initialExecutors=0``; the gang's pending
  tasks make Spark request executors, their Python workers start, the ranks register and wait at
  the coordinator's start gate until all 4 are there;
* **coordinated, warm**: the same application again while its executors (and Python workers) are up;
* **native barrier, dynamic allocation off** (reference): a fixed 2 x 2-core application, the same
  gang as one Spark barrier stage (``spark.hydrogen.launch.placement=barrier``); first run (cold
  Python workers) and warm.

Breakdown of the coordinated launches (driver clock; the gate monitor polls every 50 ms):
*executor start* = submission -> first executor registered; *registration* = that -> first rank
waiting at the gate (task launch, Python worker, connect, register); *start gate* = first rank
waiting -> gate open (all 4 joined). *To all running* = submission -> the last rank's function
started (its own ``time.time()``; one host, one clock).

usage: .venv/bin/python benchmarks/bench_dynamic.py [--warm-repeats 3] [--output-section FILE]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import sparkhydrogen as h2  # noqa: E402
from sparkhydrogen.launch.coordinated import CoordinatedStage  # noqa: E402
from sparkhydrogen.launch.placement import RankCall  # noqa: E402
from sparkhydrogen.launch.run import run_gang  # noqa: E402
from sparkhydrogen.launch.session import SparkTarget  # noqa: E402

WORLD = 4
COMMON = {
    "spark.executor.cores": "2",
    "spark.executor.memory": "512m",
    "spark.ui.enabled": "false",
}
DYNAMIC = {
    **COMMON,
    "spark.dynamicAllocation.enabled": "true",
    "spark.dynamicAllocation.shuffleTracking.enabled": "true",
    "spark.dynamicAllocation.minExecutors": "0",
    "spark.dynamicAllocation.initialExecutors": "0",
    "spark.dynamicAllocation.maxExecutors": "2",
    "spark.dynamicAllocation.schedulerBacklogTimeout": "1s",
    "spark.dynamicAllocation.executorIdleTimeout": "600s",
    "spark.hydrogen.launch.startTimeout": "300s",
}
STATIC = {**COMMON, "spark.cores.max": "4", "spark.hydrogen.launch.placement": "barrier"}


@dataclass
class Launch:
    label: str
    total: float  # submission -> last rank's function started
    executor_start: float | None = None
    registration: float | None = None
    gate: float | None = None


def entered() -> float:
    ctx = h2.BarrierTaskContext.get()
    now = time.time()
    ctx.barrier()
    return now


def coordinated_launch(sc: Any, label: str) -> Launch:
    target = SparkTarget(sc=sc)
    placement = CoordinatedStage(target, poll=0.05)
    submitted = time.time()
    starts = run_gang(RankCall(entered), WORLD, target=target, placement=placement)
    monitor = placement.last_monitor
    assert monitor is not None
    launch = Launch(label, max(starts) - submitted)
    first_exec = monitor.first_executor if monitor.first_executor is not None else 0.0
    if monitor.first_joined is not None and monitor.gate_opened is not None:
        launch.executor_start = first_exec
        launch.registration = monitor.first_joined - first_exec
        launch.gate = monitor.gate_opened - monitor.first_joined
    return launch


def native_launch(sc: Any, label: str) -> Launch:
    submitted = time.time()
    starts = h2.run(entered, WORLD, spark=sc)
    return Launch(label, max(starts) - submitted)


@contextmanager
def session(master: str, conf: dict[str, str]) -> Iterator[Any]:
    from sparkutil import spark_session

    with spark_session(master, **conf) as spark:
        yield spark.sparkContext


def executors(sc: Any) -> int:
    return len(sc._jsc.sc().statusTracker().getExecutorInfos()) - 1


def wait_executors(sc: Any, count: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while executors(sc) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} executors did not register within {timeout} s")
        time.sleep(0.2)  # the status tracker is Spark's only signal


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def render(rows: list[Launch]) -> str:
    lines = [
        f"Gang of {WORLD} ranks on a standalone cluster (2 workers x 2 cores, executors of 2 cores): submission to "
        "every rank running.",
        "",
        "| launch | executor start | registration | start gate | to all running |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row.label} | {_s(row.executor_start)} | {_s(row.registration)} | {_s(row.gate)} | "
                     f"{_s(row.total)} |")
    lines += [
        "",
        "*executor start*: submission -> first executor registered (0 when they are up); *registration*: -> first "
        "rank waiting at the start gate (task launch, Python worker, connect, register); *start gate*: -> all "
        f"{WORLD} joined. Warm rows are medians. The native rows have no gate (Spark's scheduler starts the stage "
        "all at once, after the slot preflight).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-repeats", type=int, default=3)
    parser.add_argument("--output-section", help="also write the markdown table to this file")
    args = parser.parse_args()
    logging.getLogger("sparkhydrogen").setLevel(logging.ERROR)  # progress lines would bury the table
    from standalone import standalone_cluster

    rows: list[Launch] = []
    with standalone_cluster(workers=2, cores=2, memory="1g") as master:
        with session(master, DYNAMIC) as sc:
            assert executors(sc) == 0
            rows.append(coordinated_launch(sc, "coordinated, dynamic allocation, from zero executors"))
            warm = [coordinated_launch(sc, "warm") for _ in range(args.warm_repeats)]
            rows.append(Launch("coordinated, dynamic allocation, warm executors",
                               statistics.median(w.total for w in warm),
                               0.0, statistics.median(w.registration or 0.0 for w in warm),
                               statistics.median(w.gate or 0.0 for w in warm)))
        with session(master, STATIC) as sc:
            wait_executors(sc, 2)
            rows.append(native_launch(sc, "native barrier, no dynamic allocation, first job (cold Python workers)"))
            warm = [native_launch(sc, "warm") for _ in range(args.warm_repeats)]
            rows.append(Launch("native barrier, no dynamic allocation, warm", statistics.median(w.total for w in warm)))
    text = render(rows)
    print(text)
    if args.output_section:
        with open(args.output_section, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
