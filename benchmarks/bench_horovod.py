"""Launch to first allreduce: sparkhydrogen.horovod.run vs `horovodrun --gloo -np 2`, same machine, one run.

Ours is measured from the call of ``run()`` on a warm SparkSession (local[2]) to the moment
the slowest rank's first ``hvd.allreduce`` returned; horovodrun from starting the command
to the same moment in its slowest rank. Both print wall-clock stamps from the same host clock.

usage: .venv/bin/python benchmarks/bench_horovod.py [--repeats 3] [--output-section FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

FIRST_ALLREDUCE = """
import time
import horovod.torch as hvd
import torch
hvd.init()
hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum)
print("FIRST_ALLREDUCE", time.time(), flush=True)
"""


def first_allreduce() -> float:
    import horovod.torch as hvd
    import torch

    hvd.init()
    hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum)
    return time.time()


def ours(repeats: int) -> list[float]:
    from pyspark.sql import SparkSession

    import sparkhydrogen.horovod as h2hvd

    spark = SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        h2hvd.run(first_allreduce, num_proc=2)  # warm-up: Python workers, torch import
        times = []
        for _ in range(repeats):
            start = time.time()
            stamps = h2hvd.run(first_allreduce, num_proc=2)
            times.append(max(stamps) - start)
        return times
    finally:
        spark.stop()


def horovodrun(repeats: int) -> list[float]:
    runner = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "first_allreduce.py")
        with open(script, "w") as fh:
            fh.write(FIRST_ALLREDUCE)
        for _ in range(repeats):
            start = time.time()
            out = subprocess.run([runner, "--gloo", "-np", "2", "-H", "localhost:2", sys.executable, script],
                                 capture_output=True, text=True, timeout=300, check=True).stdout
            stamps = [float(line.split()[-1]) for line in out.splitlines() if "FIRST_ALLREDUCE" in line]
            if len(stamps) != 2:
                raise RuntimeError(f"horovodrun printed {len(stamps)} stamps:\n{out}")
            times.append(max(stamps) - start)
    return times


def section(repeats: int) -> str:
    mine, theirs = ours(repeats), horovodrun(repeats)
    m, t = statistics.median(mine), statistics.median(theirs)
    return "\n".join([
        "## Horovod: launch to first allreduce (2 ranks, gloo, CPU)",
        "",
        f"Median of {repeats} runs each, in one process run of `benchmarks/bench_horovod.py`; ours on a warm "
        "local[2] SparkSession (one warm-up job first), horovodrun from a cold command.",
        "",
        "| launcher | median (s) | runs (s) |",
        "|---|---|---|",
        f"| `sparkhydrogen.horovod.run(num_proc=2)` | {m:.2f} | {', '.join(f'{x:.2f}' for x in mine)} |",
        f"| `horovodrun --gloo -np 2` | {t:.2f} | {', '.join(f'{x:.2f}' for x in theirs)} |",
        "",
        f"Ratio: ours is {t / m:.1f}x {'faster' if m < t else 'slower'} than horovodrun.",
        "",
    ])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-section")
    ns = parser.parse_args()
    text = section(ns.repeats)
    print(text)
    if ns.output_section:
        with open(ns.output_section, "w") as fh:
            fh.write(text)
