"""Feeding a DataFrame into a gang: rows/s into the ranks' function, mapInArrow vs mapInPandas vs collect.

One SparkSession (local[4]), one cached DataFrame of N rows x 4 numeric columns, gangs of 4.
Each rank's function touches every value (a column sum), so the rows were really delivered.
"Collect to the driver" is the baseline of pulling the data into one process and handing it to
a function there (``toPandas()`` with Arrow enabled, then the same sum).

usage: .venv/bin/python benchmarks/bench_dataframe.py [--rows 2000000] [--repeats 3] [--output-section FILE]
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


def arrow_fn(batches: Iterator[Any]) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.compute as pc

    ctx = h2.BarrierTaskContext.get()
    rows, total = 0, 0.0
    for b in batches:
        rows += b.num_rows
        total += sum(float(pc.sum(col).as_py() or 0.0) for col in b.columns)
    ctx.barrier()
    yield pa.RecordBatch.from_pydict({"rows": [rows], "total": [total]})


def pandas_fn(batches: Iterator[Any]) -> Iterator[Any]:
    import pandas as pd

    ctx = h2.BarrierTaskContext.get()
    rows, total = 0, 0.0
    for b in batches:
        rows += len(b)
        total += float(b.to_numpy().sum())
    ctx.barrier()
    yield pd.DataFrame({"rows": [rows], "total": [total]})


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def section(rows: int, repeats: int) -> str:
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[4]").config("spark.ui.enabled", "false")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    try:
        df = spark.range(rows).selectExpr("cast(id AS double) AS id", "cast(id * 0.5 AS double) AS a",
                                          "cast(id % 7 AS double) AS b", "cast(id AS double) AS c")
        df = df.repartition(4).cache()
        df.count()
        schema = "rows long, total double"
        cases = {
            "`h2.barrier(df).mapInArrow`": lambda: h2.barrier(df).mapInArrow(arrow_fn, schema).collect(),
            "`h2.barrier(df).mapInPandas`": lambda: h2.barrier(df).mapInPandas(pandas_fn, schema).collect(),
            "collect to the driver (`toPandas`)": lambda: [float(df.toPandas().to_numpy().sum())],
        }
        lines = [
            "## DataFrame into a gang: rows/s into the ranks' function",
            "",
            f"{rows:,} rows x 4 numeric columns, cached, 4 partitions; gangs of 4 on local[4]; median of {repeats} "
            "runs after a warm-up, in one run of `benchmarks/bench_dataframe.py`.",
            "",
            "| path | median (s) | rows/s |",
            "|---|---|---|",
        ]
        for name, fn in cases.items():
            times, result = timed(fn, repeats)
            med = statistics.median(times)
            lines.append(f"| {name} | {med:.2f} | {rows / med:,.0f} |")
        lines.append("")
        return "\n".join(lines)
    finally:
        spark.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-section")
    ns = parser.parse_args()
    text = section(ns.rows, ns.repeats)
    print(text)
    if ns.output_section:
        with open(ns.output_section, "w") as fh:
            fh.write(text)
