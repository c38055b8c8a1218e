"""Launch to first collective, JAX and TensorFlow: spark-hydrogen's launchers vs a hand-written barrier job.

    .venv/bin/python benchmarks/bench_frameworks.py                 # prints a Markdown table
    .venv/bin/python benchmarks/bench_frameworks.py --runs 5 --skip-tensorflow

One ``local[2]`` SparkSession runs everything, alternating ours and the baseline so both see
the same JVM, Python workers and machine load. Each run is timed on the driver from the
launch call until the last rank has finished its first cross-process collective (rank clocks
are the driver's: one machine).

* JAX, ours: ``sparkhydrogen.jax.run(fn, num_processes=2)``; ``fn`` does one
  ``process_allgather``.
* JAX, baseline: ``rdd.barrier().mapPartitions(task)``: rank 0 picks a free port (bind,
  close), one native ``allGather`` of addresses, ``jax.distributed.initialize`` by hand, the
  same ``process_allgather``, ``jax.distributed.shutdown``.
* TensorFlow, ours: ``sparkhydrogen.tensorflow.run(fn, num_workers=2)``; ``fn`` creates
  ``MultiWorkerMirroredStrategy`` and does one cross-worker all-reduce. Each worker runs in a
  fresh process, so every run pays TensorFlow's import.
* TensorFlow, baseline: native barrier job, every rank picks a free port, one native
  ``allGather``, ``TF_CONFIG`` by hand, the same strategy and all-reduce in a fresh
  ``python -c`` process (TensorFlow's collectives cannot be set up twice in a reused worker).
  spark-tensorflow-distributor is not measured: its last release (2021) needs TensorFlow < 2.12.

The first run of each kind is a warm-up (imports in the Python workers); figures are medians
of the rest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

RANKS = 2


def _session() -> Any:
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(f"local[{RANKS}]").appName("bench-frameworks")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


# JAX --------------------------------------------------------------------------------


def _jax_first_collective() -> float:
    import time

    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    multihost_utils.process_allgather(jnp.array([jax.process_index()]))
    return time.time()


def jax_ours(spark: Any) -> float:
    import sparkhydrogen.jax as h2jax

    return max(h2jax.run(_jax_first_collective, num_processes=RANKS, return_all=True, stream_logs=False))


def _jax_baseline_task(_: Any) -> Any:
    import socket

    import jax
    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    host = ctx.getTaskInfos()[0].address.rsplit(":", 1)[0]
    port = 0
    if ctx.partitionId() == 0:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    ports = ctx.allGather(str(port))
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        from jax.extend.backend import clear_backends

        clear_backends()
    jax.distributed.initialize(coordinator_address=f"{host}:{ports[0]}", num_processes=RANKS,
                               process_id=ctx.partitionId(), cluster_detection_method="deactivate")
    try:
        done = _jax_first_collective()
    finally:
        jax.distributed.shutdown()
    yield done


def jax_baseline(spark: Any) -> float:
    sc = spark.sparkContext
    return max(sc.parallelize(range(RANKS), RANKS).barrier().mapPartitions(_jax_baseline_task).collect())


# TensorFlow ---------------------------------------------------------------------------

_TF_CHILD = """
import time, tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
def replica():
    return tf.distribute.get_replica_context().all_reduce("sum", tf.constant(1.0))
strategy.run(replica)
print(time.time())
"""


def _tf_first_collective() -> float:
    import time

    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", tf.constant(1.0)))
    return time.time()


def tf_ours(spark: Any) -> float:
    import sparkhydrogen.tensorflow as h2tf

    return max(h2tf.run(_tf_first_collective, num_workers=RANKS, return_all=True, stream_logs=False))


def _tf_baseline_task(_: Any) -> Any:
    import json
    import os
    import socket
    import subprocess
    import sys

    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    host = ctx.getTaskInfos()[ctx.partitionId()].address.rsplit(":", 1)[0]
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    workers = ctx.allGather(f"{host}:{port}")
    env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                                 "task": {"type": "worker", "index": ctx.partitionId()}}))
    out = subprocess.run([sys.executable, "-c", _TF_CHILD], env=env, capture_output=True, text=True, check=True)
    yield float(out.stdout.strip().splitlines()[-1])


def tf_baseline(spark: Any) -> float:
    sc = spark.sparkContext
    return max(sc.parallelize(range(RANKS), RANKS).barrier().mapPartitions(_tf_baseline_task).collect())


# driver -------------------------------------------------------------------------------


def measure(spark: Any, pairs: list[tuple[str, Callable[[Any], float], Callable[[Any], float]]],
            runs: int) -> list[tuple[str, float, float]]:
    rows = []
    for label, ours, baseline in pairs:
        times: dict[str, list[float]] = {"ours": [], "baseline": []}
        for attempt in range(runs + 1):
            for kind, fn in (("ours", ours), ("baseline", baseline)):
                start = time.time()
                done = fn(spark)
                if attempt:  # the first is a warm-up
                    times[kind].append(done - start)
        rows.append((label, statistics.median(times["ours"]), statistics.median(times["baseline"])))
        print(f"{label}: ours {times['ours']}, baseline {times['baseline']}", file=sys.stderr)
    return rows


def table(rows: list[tuple[str, float, float]], runs: int) -> str:
    lines = [f"Launch to first collective, {RANKS} ranks on local[{RANKS}], median of {runs} runs after a warm-up:",
             "", "| framework | spark-hydrogen | hand-written barrier job | difference |", "|---|---:|---:|---:|"]
    for label, ours, baseline in rows:
        lines.append(f"| {label} | {ours:.2f} s | {baseline:.2f} s | {ours - baseline:+.2f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-tensorflow", action="store_true")
    parser.add_argument("--skip-jax", action="store_true")
    args = parser.parse_args(argv)
    pairs: list[tuple[str, Callable[[Any], float], Callable[[Any], float]]] = []
    if not args.skip_jax:
        pairs.append(("JAX (`jax.distributed`, `process_allgather`)", jax_ours, jax_baseline))
    if not args.skip_tensorflow:
        pairs.append(("TensorFlow (`MultiWorkerMirroredStrategy`, all-reduce)", tf_ours, tf_baseline))
    spark = _session()
    try:
        print(table(measure(spark, pairs, args.runs), args.runs))
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
