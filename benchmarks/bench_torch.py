"""PyTorch launcher, end to end: sparkhydrogen.torch.run against pyspark's TorchDistributor.

    .venv/bin/python benchmarks/bench_torch.py                       # prints a Markdown section
    .venv/bin/python benchmarks/bench_torch.py --output-section out.md

The job is the smallest real one: 2 processes, gloo, one all_reduce of a 1-element
tensor, result back on the driver. For each master (local[2] and
local-cluster[2,1,1024]) one SparkSession runs both launchers, alternating, so they
share the same JVMs, executors and machine load. The first run of each launcher is
reported apart (after a plain Spark job has started the Python workers, it pays for
importing torch in them); the rest are the warm runs a notebook user sees on every
call after the first.

TorchDistributor runs the function under torchrun in a child process per task and
initialises nothing itself, so its function calls init_process_group; ours gets the
process group already initialised (in the task's own Python worker by default;
``use_subprocess=True`` is also measured: a child process per rank, like TorchDistributor).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# Before pyspark starts a JVM: loopback only, and Python workers run this interpreter.
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

MASTERS = ("local[2]", "local-cluster[2,1,1024]")
OURS, OURS_SUBPROCESS, TORCH_DISTRIBUTOR = "sparkhydrogen.torch.run", "sparkhydrogen.torch.run (use_subprocess)", \
    "TorchDistributor"
TARGET_SPEEDUP = 5.0


def all_reduce_initialised() -> float:
    """Ours: torch.distributed is initialised before the function is called."""
    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_self_init() -> float:
    """TorchDistributor's: the function sets up (and tears down) the process group itself."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return float(t.item())


@dataclass
class Timings:
    master: str
    launcher: str
    seconds: list[float] = field(default_factory=list)

    @property
    def first(self) -> float:
        return self.seconds[0]

    @property
    def warm(self) -> list[float]:
        return self.seconds[1:] or self.seconds

    @property
    def median(self) -> float:
        return statistics.median(self.warm)


@contextmanager
def spark_session(master: str) -> Iterator[Any]:
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.master(master).appName("sparkhydrogen-bench-torch")
               .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
               .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1"))
    if master.startswith("local-cluster"):
        builder = builder.config("spark.executor.memory", "512m")
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        if master.startswith("local-cluster"):
            _wait_for_executors(spark.sparkContext, 2)
        yield spark
    finally:
        app_id = spark.sparkContext.applicationId
        spark.stop()
        if master.startswith("local-cluster"):
            import shutil

            import pyspark

            shutil.rmtree(os.path.join(os.path.dirname(pyspark.__file__), "work", app_id), ignore_errors=True)


def _wait_for_executors(sc: Any, count: int, timeout: float = 120.0) -> None:
    """Block until the executors registered, so no launcher is timed waiting for JVMs to start."""
    import threading

    tracker = sc._jsc.sc().statusTracker()
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while len(tracker.getExecutorInfos()) - 1 < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} executors did not register within {timeout:.0f} s")
        pause.wait(0.2)


def launchers(with_subprocess: bool) -> dict[str, Callable[[], Any]]:
    from pyspark.ml.torch.distributor import TorchDistributor

    import sparkhydrogen.torch as h2torch

    out: dict[str, Callable[[], Any]] = {
        OURS: lambda: h2torch.run(all_reduce_initialised, num_processes=2),
        TORCH_DISTRIBUTOR: lambda: TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(
            all_reduce_self_init),
    }
    if with_subprocess:
        out[OURS_SUBPROCESS] = lambda: h2torch.run(all_reduce_initialised, num_processes=2, use_subprocess=True)
    return out


def measure(master: str, runs: int, with_subprocess: bool, say: Callable[[str], None]) -> list[Timings]:
    results: dict[str, Timings] = {}
    with spark_session(master) as spark:
        # start Spark's Python workers with a plain job, so neither launcher's first run pays for that
        spark.sparkContext.parallelize(range(2), 2).map(lambda x: x).collect()
        calls = launchers(with_subprocess)
        for name in calls:
            results[name] = Timings(master, name)
        for n in range(runs):
            order = list(calls) if n % 2 == 0 else list(reversed(calls))  # alternate who goes first
            for name in order:
                start = time.perf_counter()
                value = calls[name]()
                elapsed = time.perf_counter() - start
                if value != 2.0:
                    raise RuntimeError(f"{name} on {master} returned {value!r}, expected 2.0")
                results[name].seconds.append(elapsed)
                say(f"{master:24} {name:42} run {n + 1}/{runs}: {elapsed:6.2f} s")
    return list(results.values())


def render(timings: list[Timings], runs: int, elapsed: float) -> str:
    import pyspark
    import torch

    lines = [
        "## PyTorch launcher: a trivial 2-process gloo job, end to end",
        "",
        f"`benchmarks/bench_torch.py`: `sparkhydrogen.torch.run(fn, num_processes=2)` against "
        f"`TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(fn)`; `fn` does one gloo "
        f"`all_reduce` of a 1-element tensor and returns it to the driver. Wall time from the call to the "
        f"result on the driver, {runs} runs each, alternating, in one SparkSession per master whose Python "
        f"workers a plain Spark job started first (so a launcher's first run pays for importing torch) "
        f"(pyspark {pyspark.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at the end; whole benchmark {elapsed:.0f} s).",
        "",
        "| master | launcher | first run | median of the other runs | fastest | TorchDistributor / this (median) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    verdicts = []
    for master in dict.fromkeys(t.master for t in timings):
        rows = [t for t in timings if t.master == master]
        baseline = next(t for t in rows if t.launcher == TORCH_DISTRIBUTOR)
        for t in rows:
            speedup = baseline.median / t.median
            lines.append(f"| `{master}` | {t.launcher} | {t.first:.2f} s | {t.median:.2f} s | {min(t.seconds):.2f} s "
                         f"| {'-' if t is baseline else f'{speedup:.1f}x'} |")
            if t.launcher == OURS:
                verdicts.append((master, speedup, baseline.first / t.first))
    lines += ["", f"Target: at least {TARGET_SPEEDUP:.0f}x faster end to end than TorchDistributor."]
    for master, speedup, first in verdicts:
        met = "met" if speedup >= TARGET_SPEEDUP else "MISSED"
        lines.append(f"- `{master}`: {speedup:.1f}x on warm runs ({met}); {first:.1f}x on the first run.")
    lines += [
        "",
        "Why: TorchDistributor starts a log server (and sleeps 1 s for it), then in every task spawns torchrun, "
        "whose agent spawns the training process, which imports torch and rendezvouses through torchrun's own "
        "store; Spark's barrier `allGather` it uses to agree on the port polls once a second. Ours rendezvouses "
        "through the spark-hydrogen coordinator (one `allGather` of about a millisecond), serves torch's store "
        "from rank 0's task on a port it already holds, and runs the function in the Python worker that Spark "
        "keeps, where torch is imported once.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4, help="runs of each launcher per master (default 4)")
    parser.add_argument("--masters", nargs="+", default=list(MASTERS), help=f"default: {' '.join(MASTERS)}")
    parser.add_argument("--no-subprocess", action="store_true", help="skip ours with use_subprocess=True")
    parser.add_argument("--output-section", metavar="FILE", help="also write the Markdown section to FILE")
    parser.add_argument("--quick", action="store_true", help="2 runs each, to check the harness")
    args = parser.parse_args(argv)
    runs = 2 if args.quick else args.runs
    if runs < 2:
        parser.error("--runs must be at least 2 (the first run is reported apart)")
    start = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {text}", file=sys.stderr, flush=True)

    timings: list[Timings] = []
    for master in args.masters:
        timings += measure(master, runs, not args.no_subprocess, say)
    section = render(timings, runs, time.perf_counter() - start)
    print(section)
    if args.output_section:
        with open(args.output_section, "w", encoding="utf-8") as fh:
            fh.write(section)
        say(f"wrote {args.output_section}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
