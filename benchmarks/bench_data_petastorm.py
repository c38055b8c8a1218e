"""The Petastorm side of ``bench_data.py``'s loader table, run in Petastorm's own environment.

``make bench-petastorm-env`` makes ``.venv-bench-petastorm`` (petastorm 0.13.1, pyarrow 15, pyspark 3.5,
torch CPU): Petastorm pins ``setuptools<70`` and imports ``pyarrow.filesystem`` (gone in pyarrow 16), so it
cannot share the project's environment. ``bench_data.py`` starts this script there once per repeat; it
prints one JSON line: per variant, the conversion time, each rank's epochs and peak RSS, the driver's peak.

The same DataFrame as the other side (``feed_common.feature_frame``), cached; ``make_spark_converter``
materializes it as Parquet (timed: the one-time conversion a user pays), then a barrier stage of 2 tasks
(one per rank, ``cur_shard=rank, shard_count=2``) iterates ``make_torch_dataloader(batch_size=1024)`` for
two epochs (a loader with ``num_epochs=1`` per epoch), doing the same per-batch op.

usage: .venv-bench-petastorm/bin/python benchmarks/bench_data_petastorm.py ROWS PARTITIONS MASTER CACHE_DIR
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
warnings.filterwarnings("ignore", category=FutureWarning)

from feed_common import BATCH, Tally, feature_frame, now, peak_rss, reset_peak, session  # noqa: E402

VARIANTS = ("default", "batched")


def warm(_: Iterator[Any]) -> Iterator[int]:
    """Start the Python workers and import what the ranks import, as the other side's warm-up gang does."""
    import petastorm.pytorch  # noqa: F401
    import torch  # noqa: F401

    yield 1


def rank(converter: Any, variant: str, rows: int, epochs: int, _: Iterator[Any]) -> Iterator[str]:
    """One rank: ``epochs`` passes over its shard, each through a new ``make_torch_dataloader``."""
    from pyspark import BarrierTaskContext

    reset_peak()
    entered = now()
    me = BarrierTaskContext.get().partitionId()
    kwargs: dict[str, Any] = {"batch_size": BATCH, "num_epochs": 1, "cur_shard": me, "shard_count": 2}
    if variant == "batched":
        from petastorm.pytorch import BatchedDataLoader

        kwargs["data_loader_fn"] = BatchedDataLoader
    tally = Tally(rows)
    out: list[dict[str, Any]] = []
    for _epoch in range(epochs):
        start = now()
        with converter.make_torch_dataloader(**kwargs) as loader:
            for batch in loader:
                tally.add(batch["label"])
        out.append(tally.result(start, now()))
    yield json.dumps({"rank": me, "entered": entered, "epochs": out, "peak": peak_rss()})


def main(rows: int, partitions: int, master: str, cache_dir: str) -> dict[str, Any]:
    import petastorm
    import pyarrow
    import pyspark
    from petastorm.spark import SparkDatasetConverter, make_spark_converter

    spark = session(master, **{SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF: "file://" + cache_dir})
    try:
        df = feature_frame(spark, rows, partitions).cache()
        df.count()
        sc = spark.sparkContext
        sc.parallelize(range(2), 2).barrier().mapPartitions(warm).collect()
        result: dict[str, Any] = {"versions": {"petastorm": petastorm.__version__, "pyarrow": pyarrow.__version__,
                                               "pyspark": pyspark.__version__}}
        for variant in VARIANTS:
            reset_peak()
            begin = now()
            converter = make_spark_converter(df)
            converted = now()
            try:
                body = functools.partial(rank, converter, variant, rows, 2)
                ranks = [json.loads(line) for line in sc.parallelize(range(2), 2).barrier().mapPartitions(body)
                         .collect()]
            finally:
                converter.delete()
            result[variant] = {"begin": begin, "conversion_s": converted - begin, "ranks": ranks,
                               "driver_peak": peak_rss()}
        return result
    finally:
        spark.stop()


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])))
