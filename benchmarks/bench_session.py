"""Session hygiene: N sequential bare barrier jobs in one SparkContext, ours vs Spark's native barrier mode.

A long-lived session (a notebook, a service) runs many small gang jobs one after the other. Each
job here is ``h2.barrier(sc.parallelize(range(4), 2)).mapPartitions(f).collect()`` (ours) or
``sc.parallelize(range(4), 2).barrier().mapPartitions(f).collect()`` (native), on ``local[2]``,
with a trivial ``f`` (``yield sum(rows)``: no collectives, so the native ~1 s round does not
swamp the per-job cost). Both loops run in the same process, one after the other, after a
short warm-up of each (counted in the gang figures: gangs are those the coordinator holds).

Reported per loop: jobs/s and per-job latency (median, p95); at every N/10 jobs the number of
gangs (and attempts, connections) registered in the driver's coordinator and the driver's RSS
(``VmRSS`` of /proc/self/status after ``gc.collect()``), plus the JVM's RSS; and the growth of
both from the start of the loop. A healthy session keeps the gang count O(1) and the RSS flat.

usage: .venv/bin/python benchmarks/bench_session.py [--jobs 10000] [--warmup 20] [--output PATH.json]

Each job costs roughly 50-150 ms on 2 cores, so the default 10,000 jobs per loop takes ~15 min
for ours plus as long again for native; ``--jobs 400`` gives a first figure in about a minute.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

import sparkhydrogen as h2  # noqa: E402
from sparkhydrogen.launch.service import service_for  # noqa: E402

MASTER = "local[2]"
PARTITIONS = 2


def rss_mb(pid: int | None = None) -> float | None:
    """Resident set size of ``pid`` (this process by default) in MiB, from /proc/<pid>/status."""
    where = "self" if pid is None else str(pid)
    try:
        with open(f"/proc/{where}/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _jvm_pid(sc: Any) -> int | None:
    proc = getattr(getattr(sc, "_gateway", None), "proc", None)  # spark-submit exec's the JVM in place
    return getattr(proc, "pid", None)


def trivial(rows: Iterator[int]) -> Iterator[int]:
    yield sum(rows)


def ours_job(sc: Any) -> list[int]:
    return h2.barrier(sc.parallelize(range(4), PARTITIONS)).mapPartitions(trivial).collect()


def native_job(sc: Any) -> list[int]:
    return sc.parallelize(range(4), PARTITIONS).barrier().mapPartitions(trivial).collect()


def _checkpoint(sc: Any, done: int, started: float, jvm: int | None) -> dict[str, Any]:
    gc.collect()
    stats = service_for(sc).server.stats()
    return {"jobs": done, "seconds": round(time.monotonic() - started, 3), "gangs": stats["gangs"],
            "attempts": stats["attempts"], "connections": stats["connections"],
            "driver_rss_mb": _round(rss_mb()), "jvm_rss_mb": _round(rss_mb(jvm))}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _growth(points: list[dict[str, Any]], key: str) -> float | None:
    first, last = points[0].get(key), points[-1].get(key)
    return None if first is None or last is None else round(last - first, 1)


def loop(sc: Any, job: Callable[[Any], list[int]], jobs: int, label: str) -> dict[str, Any]:
    """Run ``job`` ``jobs`` times; timings, and gang count and RSS at every ``jobs // 10`` jobs."""
    every = max(1, jobs // 10)
    jvm = _jvm_pid(sc)
    latencies: list[float] = []
    started = time.monotonic()
    points = [_checkpoint(sc, 0, started, jvm)]
    busy = 0.0  # time spent in jobs, without the checkpoints' gc.collect()
    for done in range(1, jobs + 1):
        t0 = time.monotonic()
        out = job(sc)
        latencies.append(time.monotonic() - t0)
        busy += latencies[-1]
        if out != [1, 5]:
            raise RuntimeError(f"{label} job {done} returned {out!r}, expected [1, 5]")
        if done % every == 0 or done == jobs:
            points.append(_checkpoint(sc, done, started, jvm))
            print(f"[{label}] {json.dumps(points[-1])}", file=sys.stderr, flush=True)
    ordered = sorted(latencies)
    return {
        "jobs": jobs,
        "seconds": round(busy, 3),
        "jobs_per_s": round(jobs / busy, 2),
        "latency_ms_p50": round(statistics.median(ordered) * 1000, 1),
        "latency_ms_p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000, 1),
        "gangs_at_end": points[-1]["gangs"],
        "driver_rss_growth_mb": _growth(points, "driver_rss_mb"),
        "jvm_rss_growth_mb": _growth(points, "jvm_rss_mb"),
        "checkpoints": points,
    }


def _session() -> Any:
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(MASTER)
        .appName("sparkhydrogen-bench-session")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _machine() -> dict[str, Any]:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(h2.__file__))))  # <repo>/src/sparkhydrogen
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from dataclasses import asdict

        from machine import describe_machine

        return asdict(describe_machine(repo))
    except Exception as exc:  # the figures stand without the machine description
        return {"error": f"could not describe the machine: {exc}"}


def main(jobs: int, warmup: int, output: str | None) -> dict[str, Any]:
    if jobs < 1 or warmup < 0:
        raise ValueError(f"--jobs must be >= 1 and --warmup >= 0, got {jobs} and {warmup}")
    spark = _session()
    sc = spark.sparkContext
    try:
        for _ in range(warmup):  # Python workers up, code paths warm; these jobs' gangs count below
            native_job(sc)
            ours_job(sc)
        report: dict[str, Any] = {
            "benchmark": "bench_session",
            "master": MASTER,
            "partitions": PARTITIONS,
            "warmup_jobs_each": warmup,
            "sparkhydrogen_file": h2.__file__,
            "pyspark_python": os.environ.get("PYSPARK_PYTHON"),
            "machine": _machine(),
            "native": loop(sc, native_job, jobs, "native"),
            "ours": loop(sc, ours_job, jobs, "ours"),
        }
    finally:
        spark.stop()
    text = json.dumps(report, indent=2)
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    ours, native = report["ours"], report["native"]
    print(f"{jobs} bare barrier jobs each on {MASTER} ({warmup} warm-up jobs each before):\n"
          f"  spark-hydrogen: {ours['jobs_per_s']} jobs/s, {ours['gangs_at_end']} gangs registered at the end, "
          f"driver RSS +{ours['driver_rss_growth_mb']} MB, JVM RSS +{ours['jvm_rss_growth_mb']} MB\n"
          f"  Spark native:   {native['jobs_per_s']} jobs/s, "
          f"driver RSS +{native['driver_rss_growth_mb']} MB, JVM RSS +{native['jvm_rss_growth_mb']} MB")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10000, help="jobs per loop (ours and native each)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up jobs of each kind before the loops")
    parser.add_argument("--output", default=None, help="write the full report (with checkpoints) as JSON here")
    args = parser.parse_args()
    main(args.jobs, args.warmup, args.output)
