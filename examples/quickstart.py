"""spark-hydrogen quickstart: a real barrier job on local[4].

Run it with ``make demo`` (or ``.venv/bin/python examples/quickstart.py``).
It shows barrier sync, allGather of Python objects, broadcast, results by rank,
and what a rank failure looks like on the driver.
"""

from __future__ import annotations

import logging
import os
import sys
import time

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # executors use this interpreter

from pyspark.sql import SparkSession  # noqa: E402

import sparkhydrogen as h2  # noqa: E402


def train_shard(rows):
    """One rank: sum its shard, agree on the global mean with its peers, then return stats."""
    ctx = h2.BarrierTaskContext.get()
    ctx.barrier()  # everyone is up
    values = list(rows)
    stats = ctx.allGather({"rank": ctx.rank(), "n": len(values), "sum": sum(values)})
    mean = sum(s["sum"] for s in stats) / sum(s["n"] for s in stats)
    plan = ctx.broadcast({"lr": 0.05, "epochs": 3} if ctx.rank() == 0 else None, root=0)
    start = time.perf_counter()
    for _ in range(100):
        ctx.barrier()
    per_barrier_ms = (time.perf_counter() - start) * 10
    yield {"rank": ctx.rank(), "n": len(values), "global_mean": mean, "plan": plan,
           "barrier_ms": round(per_barrier_ms, 3)}


def flaky():
    ctx = h2.BarrierTaskContext.get()
    if ctx.rank() == ctx.worldSize() - 1:
        raise RuntimeError(f"rank {ctx.rank()} ran out of data")
    ctx.barrier()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    builder = SparkSession.builder.appName("sparkhydrogen-quickstart").config("spark.ui.showConsoleProgress", "false")
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # launched by spark-submit: its --master wins
        builder = builder.master("local[4]")
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    sc = spark.sparkContext
    ranks = min(4, sc.defaultParallelism)
    try:
        print(f"1. h2.barrier(rdd).mapPartitions(...): {ranks} ranks launched together on {sc.master}")
        t0 = time.perf_counter()
        out = h2.barrier(sc.parallelize(range(1000), ranks)).mapPartitions(train_shard).collect()
        for row in out:
            print(f"   rank {row['rank']}: {row['n']} rows, global mean {row['global_mean']:.1f}, "
                  f"plan {row['plan']}, barrier() {row['barrier_ms']} ms")
        print(f"   job took {time.perf_counter() - t0:.2f} s including 101 barriers per rank")

        print(f"2. h2.run(fn, num_tasks={ranks}): return values by rank")
        hosts = h2.run(lambda: (h2.BarrierTaskContext.get().rank(), os.getpid()), num_tasks=ranks)
        print(f"   (rank, worker pid): {hosts}")

        print("3. a rank that raises: peers abort at once, the driver names the rank")
        sc.setLogLevel("OFF")  # the failure below is on purpose: keep Spark's task logs quiet
        logging.getLogger("sparkhydrogen").setLevel(logging.CRITICAL)
        try:
            h2.run(flaky, num_tasks=ranks)
        except h2.GangFailedError as exc:
            print(f"   GangFailedError: {str(exc).splitlines()[0]} (failed_rank={exc.failed_rank})")
        finally:
            sc.setLogLevel("ERROR")
    finally:
        spark.stop()
    print("done")


if __name__ == "__main__":
    main()
