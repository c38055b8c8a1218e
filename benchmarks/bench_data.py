"""The data feed, two tables: the torch loader vs Petastorm vs the floor (``--suite loader``), and the transport.

**Loader** (issue 21): 2,000,000 rows of 32 random floats + a float label, cached, 2 partitions;
gangs of 2 on local[2], batches of 1024. Each source tree (``--tree``, repeatable: an A/B in one
run) runs in a fresh process and session: a warm-up gang without data, the first ``data=`` call,
then ``run(feed_rank, 2, data=df)`` with ``sparkhydrogen.torch.data_loader(1024, cache=True)`` for
two epochs (``equal_steps`` on, then off) and a pass over the tensors held in memory, then the floor
(``df.mapInArrow`` counting rows). Petastorm (``make_spark_converter(df).make_torch_dataloader``,
default and ``BatchedDataLoader``) runs in its own environment (``make bench-petastorm-env``) as a
subprocess, ``bench_data_petastorm.py``. The sides alternate, ``--repeats`` times; medians.

**Transport**: N rows x 4 doubles; each rank only counts the rows of its Arrow batches:
``run(fn, 2, data=df)`` (2 and 5 partitions, through ``numpy_batches``, cached) vs
``h2.barrier(df).mapInArrow`` vs ``df.toPandas()``. Peak RSS is ``VmHWM`` of the process that
received the rows (reset with ``/proc/self/clear_refs`` at the start of the task).

usage: .venv/bin/python benchmarks/bench_data.py [--suite all|loader|transport] [--feed-rows 2000000]
           [--rows 4000000] [--repeats 3] [--master local[2]] [--tree CHECKOUT ...] [--no-petastorm]
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


def transport_section(rows: int, repeats: int, master: str, profile: bool) -> str:
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



# ---------------------------------------------------------------------------------------------------------------
# The loader table (issue 21): data= + torch.data_loader vs Petastorm vs the floor, in one run.
# ---------------------------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PETASTORM_PYTHON = os.path.join(REPO, ".venv-bench-petastorm", "bin", "python")


def warm_rank() -> int:
    """The warm-up gang (no data=): the session's Python workers up, torch imported, as after earlier gangs."""
    import torch  # noqa: F401

    import sparkhydrogen.torch  # noqa: F401

    return 1


def feed_rank(rows: int, equal_steps: bool, epochs: int, in_memory: bool, shuffle: bool = False) -> dict[str, Any]:
    """One rank of ``run(feed_rank, 2, data=df)``: ``epochs`` passes of ``torch.data_loader(1024, cache=True)``.

    Each pass does the per-batch op (``feed_common.Tally``); ``in_memory`` then takes one more
    pass into a list and times the same op over the tensors already in memory (the reference
    later epochs are held to); shuffled, the reference is what a user holding the share in
    memory would run for a shuffled epoch: the share as one ``(rows, columns)`` tensor, each
    batch's rows gathered by a new ``randperm`` and ``unbind`` into columns
    (``feed_common.shuffled_in_memory``, the faster of the two ways ``bench_feed_epochs.py``
    measures). The peak RSS is read before that list is made. Every timed pass after the first
    starts after a gang barrier, so that the gang's window measures the pass and not how far
    apart the ranks finished the one before.
    """
    from feed_common import BATCH, Tally, now, peak_rss, reset_peak

    reset_peak()
    entered = now()
    import sparkhydrogen.torch as h2torch

    ctx = h2.BarrierTaskContext.get()
    loader = h2torch.data_loader(BATCH, cache=True, equal_steps=equal_steps, shuffle=shuffle)
    tally = Tally(rows)
    out: dict[str, Any] = {"entered": entered, "epochs": []}
    for epoch in range(epochs):
        if epoch:
            ctx.barrier()
        start = now()
        for batch in loader:
            tally.add(batch["label"])
        out["epochs"].append(tally.result(start, now()))
    out["peak"] = peak_rss()
    if in_memory:
        held = list(loader)
        if shuffle:
            import torch

            from feed_common import shuffled_in_memory

            names = list(held[0])
            block = torch.cat([torch.stack([batch[name] for name in names], 1) for batch in held])
            del held
            ctx.barrier()
            start = now()
            for batch in shuffled_in_memory(block, names):
                tally.add(batch["label"])
        else:
            ctx.barrier()
            start = now()
            for batch in held:
                tally.add(batch["label"])
        out["memory"] = tally.result(start, now())
    return out


def floor_rank(batches: Iterator[Any]) -> Iterator[Any]:
    """The floor: a plain ``mapInArrow`` task that only counts its rows."""
    import pyarrow as pa

    from feed_common import now, peak_rss, reset_peak

    reset_peak()
    start = now()
    rows = sum(b.num_rows for b in batches)
    yield pa.RecordBatch.from_pydict({"rows": [rows], "start": [start], "end": [now()], "peak": [peak_rss()]})


def ours_side(rows: int, partitions: int, master: str) -> dict[str, Any]:
    """This tree's cases in one fresh session: the first data= call, then each case once, then the floor."""
    from feed_common import feature_frame, now, peak_rss, reset_peak
    from feed_common import session as make_session

    spark = make_session(master)
    try:
        df = feature_frame(spark, rows, partitions).cache()
        df.count()
        h2.run(warm_rank, 2)
        result: dict[str, Any] = {"module": h2.__file__}
        for case, equal, epochs in (("first", True, 1), ("equal", True, 3), ("unequal", False, 3),
                                    ("shuffled", True, 3)):
            reset_peak()
            begin = now()
            ranks = h2.run(feed_rank, 2, data=df, args=(rows, equal, epochs, case != "first", case == "shuffled"))
            result[case] = {"begin": begin, "end": now(), "ranks": ranks, "driver_peak": peak_rss()}
        begin = now()
        df._jdf.toArrowBatchRdd().count()  # the JVM's Arrow conversion of the DataFrame alone: no Python
        result["jvm"] = {"begin": begin, "end": now()}
        begin = now()
        floor = [r.asDict() for r in df.mapInArrow(floor_rank, "rows long, start double, end double, peak long")
                 .collect()]
        result["floor"] = {"begin": begin, "end": now(), "ranks": floor}
        return result
    finally:
        spark.stop()


def _side(command: list[str], tree: str | None, timeout: float = 1500) -> dict[str, Any]:
    import json
    import subprocess

    paths = [HERE] if tree is None else [os.path.join(tree, "src"), HERE]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), SPARK_LOCAL_IP="127.0.0.1",
               PYSPARK_PYTHON=command[0])
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[:3])} failed (exit {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def _epoch_rate(ranks: list[dict[str, Any]], index: int) -> tuple[float, float, int]:
    """Rows/s of the gang's epoch ``index`` (all rows over first start to last end), its end, and its rows."""
    epochs = [r["epochs"][index] for r in ranks]
    start, end = min(e["start"] for e in epochs), max(e["end"] for e in epochs)
    rows = sum(e["rows"] for e in epochs)
    return rows / (end - start), end, rows


def _ours_row(case: dict[str, Any], rows: int) -> dict[str, Any]:
    from feed_common import union_check

    ranks = case["ranks"]
    e1, end1, _ = _epoch_rate(ranks, 0)
    row: dict[str, Any] = {"epoch1": e1, "to_epoch1": end1 - case["begin"], "conversion": 0.0,
                           "rank_peak": max(r["peak"] for r in ranks), "driver_peak": case["driver_peak"],
                           "once": all(union_check([r["epochs"][i] for r in ranks], rows)
                                       for i in range(len(ranks[0]["epochs"])))}
    if len(ranks[0]["epochs"]) > 1:
        row["epoch2"] = _epoch_rate(ranks, 1)[0]
    if len(ranks[0]["epochs"]) > 2:
        row["epoch3"] = _epoch_rate(ranks, 2)[0]
    if "memory" in ranks[0]:
        mem = [r["memory"] for r in ranks]
        row["memory"] = sum(m["rows"] for m in mem) / (max(m["end"] for m in mem) - min(m["start"] for m in mem))
    return row


def _petastorm_row(variant: dict[str, Any], rows: int) -> dict[str, Any]:
    from feed_common import union_check

    ranks = variant["ranks"]
    e1, end1, _ = _epoch_rate(ranks, 0)
    return {"epoch1": e1, "epoch2": _epoch_rate(ranks, 1)[0], "conversion": variant["conversion_s"],
            "to_epoch1": end1 - variant["begin"], "rank_peak": max(r["peak"] for r in ranks),
            "driver_peak": variant["driver_peak"],
            "once": all(union_check([r["epochs"][i] for r in ranks], rows) for i in range(2))}


def _floor_row(case: dict[str, Any]) -> dict[str, Any]:
    ranks = case["ranks"]
    start, end = min(r["start"] for r in ranks), max(r["end"] for r in ranks)
    return {"epoch1": sum(r["rows"] for r in ranks) / (end - start), "to_epoch1": case["end"] - case["begin"],
            "rank_peak": max(r["peak"] for r in ranks)}


def loader_section(rows: int, repeats: int, master: str, trees: list[tuple[str, str]], petastorm: bool) -> str:
    """Run the sides ``repeats`` times, interleaved (every tree, then Petastorm), and render the table."""
    import tempfile

    label = {"first": "first `data=` call of the session (`equal_steps=True`)",
             "equal": "`data=` + `torch.data_loader(1024, cache=True)`", "unequal": "the same, `equal_steps=False`",
             "default": "Petastorm `make_torch_dataloader` (default)",
             "batched": "Petastorm with `BatchedDataLoader`", "floor": "floor: plain `df.mapInArrow` counting rows",
             "shuffled": "the same, `shuffle=True` (in memory: a new order gathered from one 2-D tensor)",
             "jvm": "ceiling: the JVM's Arrow conversion alone (`toArrowBatchRdd().count()`, no Python)"}
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    loads, notes = [load()], []
    partitions = 2
    for repeat in range(repeats):
        for name, tree in trees:
            print(f"bench_data loader: repeat {repeat + 1}, {name} ({tree}), load {load()}", file=sys.stderr)
            side = _side([sys.executable, os.path.abspath(__file__), "--side", "ours", "--feed-rows", str(rows),
                          "--master", master], tree)
            if not str(side["module"]).startswith(os.path.join(os.path.abspath(tree), "src")):
                raise RuntimeError(f"the side for {tree} imported sparkhydrogen from {side['module']}")
            for case in ("first", "equal", "unequal", "shuffled"):
                samples.setdefault((name, case), []).append(_ours_row(side[case], rows))
            samples.setdefault((name, "floor"), []).append(_floor_row(side["floor"]))
            jvm = side["jvm"]["end"] - side["jvm"]["begin"]
            samples.setdefault((name, "jvm"), []).append({"epoch1": rows / jvm, "to_epoch1": jvm})
        if petastorm:
            print(f"bench_data loader: repeat {repeat + 1}, Petastorm, load {load()}", file=sys.stderr)
            with tempfile.TemporaryDirectory(prefix="bench-petastorm-") as cache:
                side = _side([PETASTORM_PYTHON, os.path.join(HERE, "bench_data_petastorm.py"), str(rows),
                              str(partitions), master, cache], None)
            notes.append(side["versions"])
            for variant in ("default", "batched"):
                samples.setdefault(("Petastorm", variant), []).append(_petastorm_row(side[variant], rows))
        loads.append(load())

    def med(key: tuple[str, str], field: str) -> float | None:
        values = [s[field] for s in samples.get(key, []) if field in s]
        return statistics.median(values) if values else None

    def num(value: float | None, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    lines = [
        "## Data feed: the torch loader vs Petastorm vs the floor",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_data.py --suite loader --feed-rows {rows} --repeats {repeats}"
        + "".join(f" --tree {t}" for _, t in trees if len(trees) > 1) + "`"
        + (" (Petastorm from `make bench-petastorm-env`)" if petastorm else "") + ". "
        f"{rows:,} rows of 32 uniform random float features + a float label (the row id), cached, "
        f"{partitions} partitions; gangs of 2 ranks on {master}, batches of 1024; each rank does one torch op per "
        "batch (`seen.index_add_(0, label, 1)`), which also checks that every row came exactly once per epoch. "
        f"Median of {repeats} runs, interleaved (every source tree, then Petastorm, {repeats} times), each run a "
        "fresh process and SparkSession. Epoch rows/s: the gang's rows over its first rank's start to its last "
        "rank's end of the pass; \"DataFrame to end of epoch 1\": from the driver's call (for Petastorm, from "
        "`make_spark_converter`) to the last rank's end of epoch 1. Peak RSS: VmHWM of the rank's Python worker "
        "before the in-memory pass, and of the driver's Python process (the JVMs are not counted). Epoch 2 of a "
        "cached share pays its one-time conversion for later epochs; epoch 3 runs from it. \"In memory\": "
        "the same op over the epoch's tensors already held in a list (shuffled: over the share held as one "
        "`(rows, 33)` tensor, each batch's rows gathered by a new `torch.randperm` and unbound into columns, as a "
        "user holding it in memory would shuffle). \"Ceiling\": the JVM turning the cached DataFrame into Arrow "
        "record batches and counting them, the work every path through Spark's Arrow conversion does before any "
        "Python sees a row. Passes after the first start after a gang "
        "barrier. The first call comes after a warm-up gang "
        "without data that imports torch. Load average (1/5/15 min) before and after each repeat: "
        f"{' | '.join(loads)}.",
        "",
        "| tree | path | epoch 1 rows/s | epoch 2 rows/s | epoch 3 rows/s | in memory rows/s | one-time conversion | "
        "DataFrame to end of epoch 1 | rank peak RSS | driver peak RSS | exactly once |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key in samples:
        name, case = key
        once = [s.get("once") for s in samples[key] if "once" in s]
        conv = med(key, "conversion")
        lines.append(
            f"| {name} | {label[case]} | {num(med(key, 'epoch1'), ',.0f')} | {num(med(key, 'epoch2'), ',.0f')} | "
            f"{num(med(key, 'epoch3'), ',.0f')} | {num(med(key, 'memory'), ',.0f')} | "
            f"{'none' if conv == 0 else num(conv, '.1f') + (' s' if conv else '')}"
            f" | {num(med(key, 'to_epoch1'), '.1f')} s | "
            f"{num(None if med(key, 'rank_peak') is None else med(key, 'rank_peak') / 2**20, ',.0f')}"
            f"{' MiB' if med(key, 'rank_peak') is not None else ''} | "
            f"{num(None if med(key, 'driver_peak') is None else med(key, 'driver_peak') / 2**20, ',.0f')}"
            f"{' MiB' if med(key, 'driver_peak') is not None else ''} | "
            f"{f'{sum(map(bool, once))}/{len(once)}' if once else ''} |")
    lines.append("")
    if notes:
        lines.append(f"Petastorm side: {notes[0]}.")
        lines.append("")
    return "\n".join(lines)


def section(suite: str, ns: argparse.Namespace) -> str:
    parts = []
    if suite in ("loader", "all"):
        trees = [(os.path.basename(os.path.abspath(t.rstrip("/"))), t) for t in (ns.tree or [REPO])]
        petastorm = not ns.no_petastorm and os.path.exists(PETASTORM_PYTHON)
        if not petastorm and not ns.no_petastorm:
            print("bench_data: no .venv-bench-petastorm (make bench-petastorm-env): Petastorm left out",
                  file=sys.stderr)
        parts.append(loader_section(ns.feed_rows, ns.repeats, ns.master, trees, petastorm))
    if suite in ("transport", "all"):
        parts.append(transport_section(ns.rows, ns.repeats, ns.master, ns.profile))
    return "\n".join(parts)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", choices=("loader", "transport", "all"), default="all")
    parser.add_argument("--rows", type=int, default=4_000_000, help="rows of the transport table")
    parser.add_argument("--feed-rows", type=int, default=2_000_000, help="rows of the loader table")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--tree", action="append",
                        help="a checkout whose src/ the loader table runs (repeatable: A/B in one run; default "
                             "this one)")
    parser.add_argument("--no-petastorm", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one rank's read")
    parser.add_argument("--side", choices=("ours",), help=argparse.SUPPRESS)
    parser.add_argument("--output-section")
    ns = parser.parse_args()
    if ns.side == "ours":
        import json

        print(json.dumps(ours_side(ns.feed_rows, 2, ns.master)))
        sys.exit(0)
    text = section(ns.suite, ns)
    print(text)
    if ns.output_section:
        with open(ns.output_section, "w") as fh:
            fh.write(text)
