"""The loaders' epochs: ``equal_steps`` on and off, the cache in memory and spilled, and what a resume costs.

One SparkSession (local[2]), a DataFrame of N rows x 8 double columns in 2 partitions, gangs of 2,
``numpy_batches(1024, shuffle=True, cache=True)``, three epochs; each rank times its epochs and
the figure is rows / the slower rank's time. Cases, interleaved, medians of ``--repeats``:

* ``equal_steps=True`` (the ranks agree once per window of steps) and ``equal_steps=False``;
* the cache spilled whole to local disk (``cache_memory=0``): later epochs read the Arrow file back;
* ``global_shuffle=True``: epochs 2-3 first exchange the cached rows between the ranks (peer to
  peer, Arrow streams over TCP), then shuffle them in the rank; the exchange is in the epoch's time;
* resume: a second gang loads the state the first saved at the start of epoch 2 and times its
  first batch (re-reading the share from Spark into the cache, checking its fingerprint).

Peak RSS is the rank worker's ``VmHWM`` (reset at the start of the task).

usage: .venv/bin/python benchmarks/bench_feed_state.py [--rows 2000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

import sparkhydrogen as h2  # noqa: E402


def epochs(equal: bool, cache_memory: int | None, load: dict[str, Any] | None = None,
           global_shuffle: bool = False) -> Callable[[], Any]:
    def body() -> dict[str, Any]:
        import time

        from sparkhydrogen.data import numpy_batches

        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        extra: dict[str, Any] = {} if cache_memory is None else {"cache_memory": cache_memory}
        if global_shuffle:
            extra["global_shuffle"] = True
        batches = numpy_batches(1024, shuffle=True, cache=True, equal_steps=equal, **extra)
        times: list[float] = []
        rows = 0
        if load is not None:
            batches.load_state_dict(load[h2.BarrierTaskContext.get().rank()])
            started = time.perf_counter()
            next(iter(batches))
            times.append(time.perf_counter() - started)
        else:
            for _ in range(3):
                started = time.perf_counter()
                rows = sum(len(b["id"]) for b in batches)
                times.append(time.perf_counter() - started)
        with open("/proc/self/status") as fh:
            peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))
        state = batches.state_dict() if hasattr(batches, "state_dict") else None
        return {"times": times, "rows": rows, "peak": peak, "state": state}

    return body


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.driver.host", "127.0.0.1").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    df = spark.range(args.rows, numPartitions=2).selectExpr(
        "id", *[f"cast(id * {k} AS double) AS f{k}" for k in range(7)]).cache()
    df.count()
    h2.run(epochs(False, None), 2, data=df)  # warm-up: the session's first data= call starts Python workers
    import sparkhydrogen.data as h2data

    spill = "cache_memory" in inspect.signature(h2data.numpy_batches).parameters
    cases: dict[str, tuple[bool, int | None, bool]] = {"equal_steps=True": (True, None, False),
                                                       "equal_steps=False": (False, None, False)}
    if spill:
        cases["spilled (cache_memory=0)"] = (True, 0, False)
    if "global_shuffle" in inspect.signature(h2data.numpy_batches).parameters:
        cases["global_shuffle=True"] = (True, None, True)
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
    resumes: list[float] = []
    for _ in range(args.repeats):
        for name, (equal, memory, global_) in cases.items():
            out = h2.run(epochs(equal, memory, global_shuffle=global_), 2, data=df)
            slowest = [max(rank["times"][e] for rank in out) for e in range(3)]
            total = sum(rank["rows"] for rank in out)
            peak = max(rank["peak"] for rank in out) / 2**20
            figures[name].append((total / slowest[0], total / statistics.median(slowest[1:]), peak))
            if spill and name == "equal_steps=True":
                states = {r: rank["state"] for r, rank in enumerate(out)}
                again = h2.run(epochs(True, None, load=states), 2, data=df)
                resumes.append(max(rank["times"][0] for rank in again))
    print(f"{args.rows:,} rows x 8 doubles, 2 ranks, batch 1024, shuffle, cache; medians of {args.repeats}")
    print("| case | epoch 1 rows/s | epochs 2-3 rows/s | rank peak RSS |")
    print("|---|---:|---:|---:|")
    for name, runs in figures.items():
        first, later, peak = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"| {name} | {first:,.0f} | {later:,.0f} | {peak:,.0f} MiB |")
    if resumes:
        print(f"resume at the start of epoch 2: first batch after {statistics.median(resumes):.2f} s "
              "(the share read again from Spark)")
    spark.stop()


if __name__ == "__main__":
    main()
