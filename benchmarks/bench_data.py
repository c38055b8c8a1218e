"""The data feed: rows/s into the ranks through ``run(fn, n, data=df)`` vs ``barrier(df).mapInArrow`` vs toPandas.

One SparkSession (local[2] by default), DataFrames of N rows x 4 double columns (``spark.range``),
gangs of 2. Each rank only counts the rows of the Arrow batches it receives, so the figures
are the transport: Spark's Arrow stream into the rank's Python worker. Cases:

* ``run(fn, 2, data=df)`` with df in 2 partitions (one per rank) and in 5 (grouped into 2 shares);
* ``run(fn, 2, data=df)`` through ``sparkhydrogen.data.numpy_batches(4096)`` (the loaders' core);
* ``h2.barrier(df).mapInArrow(fn)`` on the 2-partition DataFrame (the same transport, Spark's API);
* ``run(fn, 2, data=df)`` with df cached after ``repartition(2)``;
* ``df.toPandas()`` on the driver (Arrow enabled): pulling everything into one process.

Peak RSS is ``VmHWM`` of the process that received the rows (the rank's Python worker, reset
with ``/proc/self/clear_refs`` at the start of the task; the driver for ``toPandas``).

usage: .venv/bin/python benchmarks/bench_data.py [--rows 4000000] [--repeats 3] [--master local[2]]
                                                 [--output-section FILE] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

import sparkhydrogen as h2  # noqa: E402


def reset_peak() -> None:
    """Start this process's ``VmHWM`` afresh (Linux: writing 5 to clear_refs resets the peak RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def count_batches() -> tuple[int, int]:
    reset_peak()
    rows = sum(b.num_rows for b in h2.BarrierTaskContext.get().batches())
    return rows, peak_rss()


def count_numpy() -> tuple[int, int]:
    import sparkhydrogen.data as h2data

    reset_peak()
    rows = sum(len(b["a"]) for b in h2data.numpy_batches(4096, equal_steps=False))
    return rows, peak_rss()


def arrow_count(batches: Iterator[Any]) -> Iterator[Any]:
    import pyarrow as pa

    reset_peak()
    rows = sum(b.num_rows for b in batches)
    h2.BarrierTaskContext.get().barrier()
    yield pa.RecordBatch.from_pydict({"rows": [rows], "peak": [peak_rss()]})


def timed(fn: Callable[[], list[tuple[int, int]]], repeats: int, rows: int) -> tuple[float, int]:
    """Median seconds of ``repeats`` runs after a warm-up, and the largest peak RSS any run reported."""
    fn()
    times, peak = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        if sum(r for r, _ in out) != rows:
            raise RuntimeError(f"the ranks received {sum(r for r, _ in out)} rows, not {rows}")
        peak = max([peak] + [p for _, p in out])
    return statistics.median(times), peak


def section(rows: int, repeats: int, master: str, profile: bool) -> str:
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(master).config("spark.ui.enabled", "false")
             .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    try:
        def frame(partitions: int) -> Any:
            return spark.range(rows, numPartitions=partitions).selectExpr(
                "cast(id AS double) AS a", "cast(id * 0.5 AS double) AS b", "cast(id % 7 AS double) AS c",
                "cast(id AS double) AS d")

        two, five = frame(2), frame(5)
        cached = frame(2).repartition(2).cache()
        cached.count()

        def driver() -> list[tuple[int, int]]:
            reset_peak()
            n = len(two.toPandas())
            return [(n, peak_rss())]

        cases: dict[str, Callable[[], list[tuple[int, int]]]] = {
            "`run(fn, 2, data=df)`, 2 partitions": lambda: h2.run(count_batches, 2, data=two),
            "`run(fn, 2, data=df)`, 5 partitions -> 2 ranks": lambda: h2.run(count_batches, 2, data=five),
            "`run(fn, 2, data=df)` + `numpy_batches(4096)`, 2 partitions": lambda: h2.run(count_numpy, 2,
                                                                                          data=two),
            "`h2.barrier(df).mapInArrow(fn)`, 2 partitions": lambda: [
                (r["rows"], r["peak"]) for r in h2.barrier(two).mapInArrow(arrow_count, "rows long, peak long")
                .collect()],
            "`run(fn, 2, data=df)`, df cached after `repartition(2)`": lambda: h2.run(count_batches, 2,
                                                                                      data=cached),
            "`df.toPandas()` on the driver": driver,
        }
        results = {}
        for name, fn in cases.items():
            print(f"bench_data: {name}", file=sys.stderr)
            results[name] = timed(fn, repeats, rows)
        if profile:
            print_profile(two)
        mib = rows * 4 * 8 / 2**20
        lines = [
            "## Data feed: rows/s into the ranks (`data=`)",
            "",
            f"Command: `.venv/bin/python benchmarks/bench_data.py --rows {rows} --repeats {repeats} --master "
            f"'{master}'`. {rows:,} rows x 4 double columns ({mib:,.0f} MiB) from "
            f"`spark.range(rows, numPartitions=n)`; gangs of 2 on {master}; median of {repeats} runs after a "
            "warm-up. Each rank counts the rows of its Arrow batches; peak RSS "
            "is VmHWM of the process that received them (a rank's Python worker; the driver for `toPandas`).",
            "",
            "| path | median (s) | rows/s | vs mapInArrow | peak RSS (MiB) |",
            "|---|---:|---:|---:|---:|",
        ]
        reference = results["`h2.barrier(df).mapInArrow(fn)`, 2 partitions"][0]
        for name, (med, peak) in results.items():
            lines.append(f"| {name} | {med:.2f} | {rows / med:,.0f} | {reference / med:.2f}x | {peak / 2**20:,.0f} |")
        lines.append("")
        return "\n".join(lines)
    finally:
        spark.stop()


def print_profile(df: Any) -> None:
    """cProfile of one rank's task body (rank 0), printed by the rank to the driver's log stream."""

    def profiled() -> int:
        import cProfile
        import io
        import pstats

        ctx = h2.BarrierTaskContext.get()
        prof = cProfile.Profile()
        prof.enable()
        rows = sum(b.num_rows for b in ctx.batches())
        prof.disable()
        if ctx.rank() == 0:
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(15)
            print(out.getvalue())
        return rows

    h2.run(profiled, 2, data=df, stream_logs=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one rank's read")
    parser.add_argument("--output-section")
    ns = parser.parse_args()
    text = section(ns.rows, ns.repeats, ns.master, ns.profile)
    print(text)
    if ns.output_section:
        with open(ns.output_section, "w") as fh:
            fh.write(text)
