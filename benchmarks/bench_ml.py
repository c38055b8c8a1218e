"""TorchEstimator.fit + transform against the same work by hand: TorchDistributor + a predict_batch_udf.

    .venv/bin/python benchmarks/bench_ml.py [--rows 20000] [--runs 2] [--output-section FILE]

One SparkSession on local[2], one run, alternating: the same MLP, loss, optimizer, batch size and epochs
on 2 ranks with DDP over the same DataFrame.

* ours: ``TorchEstimator(num_workers=2, ...).fit(df)`` (the ranks read their shares through ``data=``),
  then ``model.transform(df)`` (``predict_batch_udf``, the model loaded once per Python worker);
* by hand: the DataFrame written to Parquet (TorchDistributor has no public way to feed a DataFrame),
  ``TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(train)`` where each rank reads
  its half of the files and trains with DDP, then a hand-written ``predict_batch_udf`` with the weights.

Reported: wall time end to end (fit + scoring every row), and inference rows/s (scoring alone, the
prediction summed so that every row is computed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

WIDTH, HIDDEN, CLASSES, BATCH, EPOCHS, LR = 16, 64, 2, 64, 3, 0.05
OURS, BY_HAND = "TorchEstimator fit + transform", "TorchDistributor + predict_batch_udf"


def make_model() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(WIDTH, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES))


def make_data(spark: Any, rows: int) -> Any:
    from pyspark.sql import functions as F

    cols = [F.randn(seed=i).alias(f"x{i}") for i in range(WIDTH)]
    frame = spark.range(rows).repartition(2).select(*cols)
    logit = sum(F.col(f"x{i}") * (1.0 if i % 2 else -0.5) for i in range(WIDTH))
    return frame.withColumn("label", (logit > 0).cast("double")).cache()


def features(frame: Any) -> Any:
    from pyspark.sql import functions as F

    return F.array(*[F.col(f"x{i}").cast("float") for i in range(WIDTH)])


def score(frame: Any, column: Any) -> float:
    """Score every row, sum the first output: forces the prediction of each row."""
    from pyspark.sql import functions as F

    return float(frame.select(column.alias("p")).agg(F.sum(F.col("p")[0])).first()[0])


def ours(df: Any) -> tuple[float, float]:
    import torch

    from sparkhydrogen.ml import TorchEstimator

    cols = [f"x{i}" for i in range(WIDTH)]
    start = time.perf_counter()
    model = TorchEstimator(model=make_model, loss=torch.nn.CrossEntropyLoss(), optimizer=torch.optim.SGD,
                           learning_rate=LR, features_col=cols, batch_size=BATCH, epochs=EPOCHS, num_workers=2,
                           shuffle=False).fit(df)
    scored = model.transform(df)
    t_score = time.perf_counter()
    score(scored, scored["prediction"])
    end = time.perf_counter()
    return end - start, end - t_score


def by_hand(df: Any, folder: str) -> tuple[float, float]:
    import numpy as np
    import torch
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql.types import ArrayType, DoubleType

    start = time.perf_counter()
    path = os.path.join(folder, f"data-{time.monotonic_ns()}")
    df.write.parquet(path)
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))

    def train() -> Any:
        import pyarrow.parquet as pq
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        table = pq.read_table(files[rank::world]).to_pandas()
        x = torch.tensor(table[[f"x{i}" for i in range(WIDTH)]].to_numpy(), dtype=torch.float32)
        y = torch.tensor(table["label"].to_numpy(), dtype=torch.long)
        steps = torch.tensor([len(x) // BATCH])
        dist.all_reduce(steps, op=dist.ReduceOp.MIN)  # equal steps on every rank
        model = DistributedDataParallel(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loss = torch.nn.CrossEntropyLoss()
        for _ in range(EPOCHS):
            for k in range(int(steps)):
                opt.zero_grad()
                loss(model(x[k * BATCH:(k + 1) * BATCH]), y[k * BATCH:(k + 1) * BATCH]).backward()
                opt.step()
        state = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        dist.destroy_process_group()
        return state if rank == 0 else None

    state = TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(train)

    def make_predict_fn() -> Callable[[Any], Any]:
        module = make_model()
        module.load_state_dict(state)
        module.eval()

        def predict(x: Any) -> Any:
            with torch.no_grad():
                return module(torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy().astype(np.float64)

        return predict

    udf = predict_batch_udf(make_predict_fn, return_type=ArrayType(DoubleType()), batch_size=1024,
                            input_tensor_shapes=[[WIDTH]])
    t_score = time.perf_counter()
    score(df, udf(features(df)))
    end = time.perf_counter()
    return end - start, end - t_score


def render(rows: int, runs: int, results: dict[str, list[tuple[float, float]]], elapsed: float) -> str:
    import pyspark
    import torch

    lines = [
        "## Spark ML estimator: `TorchEstimator.fit` + `transform` against TorchDistributor + `predict_batch_udf`",
        "",
        f"`benchmarks/bench_ml.py --rows {rows} --runs {runs}`: the same {WIDTH}-{HIDDEN}-{CLASSES} MLP, SGD, "
        f"batch {BATCH} per rank, {EPOCHS} epochs, DDP on 2 ranks, over a cached {rows}-row DataFrame "
        "(2 partitions) on `local[2]`, alternating in one SparkSession. Ours: `TorchEstimator(num_workers=2)` "
        "(ranks read their shares through `data=`), then `transform` (`predict_batch_udf`). By hand: the DataFrame "
        "written to Parquet, `TorchDistributor(num_processes=2, local_mode=False)` with each rank reading its "
        "files, then a hand-written `predict_batch_udf`. End to end = fit + scoring every row; inference = "
        f"scoring alone (pyspark {pyspark.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, load "
        f"average {os.getloadavg()[0]:.2f} at the end; whole benchmark {elapsed:.0f} s).",
        "",
        "| path | end to end, first run | end to end, median of the other runs | inference rows/s (median of the "
        "other runs) |",
        "|---|---:|---:|---:|",
    ]
    def later(values: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return values[1:] or values  # the first run pays for importing torch into fresh workers

    for name, values in results.items():
        totals = [v[0] for v in later(values)]
        rates = [rows / v[1] for v in later(values)]
        lines.append(f"| {name} | {values[0][0]:.2f} s | {statistics.median(totals):.2f} s | "
                     f"{statistics.median(rates):,.0f} |")
    ours_median = statistics.median(v[0] for v in later(results[OURS]))
    hand_median = statistics.median(v[0] for v in later(results[BY_HAND]))
    lines += ["", f"End to end, the estimator takes {ours_median / hand_median:.2f}x the hand-written path's time "
              f"({hand_median / ours_median:.1f}x faster). Training: TorchDistributor starts torchrun per task, "
              "its barrier `allGather` polls once a second, and the data goes to Parquet and back; the estimator "
              "streams the cached DataFrame into ranks that run in Spark's reused Python workers. Scoring: both "
              "are `predict_batch_udf` over the same rows, yet their rates differ; not broken down here (a "
              "likely part: the scoring stage after TorchDistributor's barrier stage starts Python workers "
              "afresh, each importing torch, inside the timed scoring).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3, help="runs of each path (the first is reported apart)")
    parser.add_argument("--output-section", metavar="FILE", help="also write the Markdown section to FILE")
    parser.add_argument("--quick", action="store_true", help="2000 rows, 1 run")
    args = parser.parse_args(argv)
    rows, runs = (2000, 1) if args.quick else (args.rows, args.runs)
    from pyspark.sql import SparkSession

    began = time.perf_counter()
    spark = (SparkSession.builder.master("local[2]").appName("bench-ml").config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false").config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    results: dict[str, list[tuple[float, float]]] = {OURS: [], BY_HAND: []}
    try:
        df = make_data(spark, rows)
        df.count()
        spark.range(4).repartition(2).count()  # Python workers exist before the first timed run
        with tempfile.TemporaryDirectory(prefix="bench-ml-") as folder:
            for n in range(runs):
                for name, fn in ((OURS, lambda: ours(df)), (BY_HAND, lambda: by_hand(df, folder))):
                    results[name].append(fn())
                    total, inference = results[name][-1]
                    print(f"run {n + 1}/{runs} {name:40} {total:6.2f} s (inference {inference:.2f} s)",
                          file=sys.stderr, flush=True)
    finally:
        spark.stop()
    section = render(rows, runs, results, time.perf_counter() - began)
    print(section)
    if args.output_section:
        with open(args.output_section, "w", encoding="utf-8") as fh:
            fh.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
