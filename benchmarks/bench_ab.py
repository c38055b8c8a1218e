"""A/B in one run: barrier round p50 at N = 8 and bare gang jobs per second, two source trees alternated.

A change to the coordinator or the task side must hold ``make bench``'s barrier figure. This
runs the same measurement as section 1 of ``docs/benchmarks.md`` (``collective_rounds``: 500
``barrier()`` rounds after 20 warm-up on ``local[8]``) and a loop of trivial 4-rank
``h2.barrier(rdd)`` jobs, on the code of ``--before`` and of ``--after`` (each a checkout: its
``src`` is put first on ``PYTHONPATH``, so Spark's Python workers use it too), one fresh
process per measurement, alternating A, B, A, B, ... on the same machine state.

Usage::

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/bench_ab.py --before /tmp/before --after . --runs 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: What one measurement process runs (its benchmarks/ and src/ come from the tree under test).
CHILD = r"""
import json, sys, time
from spark_bench import OURS, collective_rounds, spark_session, warm_up
from stats import summarize
import sparkhydrogen as h2

def body(rows):
    ctx = h2.BarrierTaskContext.get()
    ctx.barrier()
    yield 1

reps, jobs = int(sys.argv[1]), int(sys.argv[2])
with spark_session(8) as sc:
    warm_up(sc, 8)
    p50 = [summarize(collective_rounds(sc, OURS, 8, "barrier", 0, 20, 500).spans_ms).p50 for _ in range(reps)]
    for _ in range(10):
        h2.barrier(sc.parallelize(range(4), 4)).mapPartitions(body).collect()
    start = time.perf_counter()
    for _ in range(jobs):
        h2.barrier(sc.parallelize(range(4), 4)).mapPartitions(body).collect()
    rate = jobs / (time.perf_counter() - start)
print(json.dumps({"p50_ms": p50, "jobs_per_s": rate, "module": h2.__file__}))
"""


def measure(tree: Path, reps: int, jobs: int) -> dict[str, object]:
    """One fresh process on ``tree``'s code: ``reps`` barrier p50s (ms) and bare jobs per second."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "src"), str(tree / "benchmarks")]),
               SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    out = subprocess.run([sys.executable, "-c", CHILD, str(reps), str(jobs)], env=env, capture_output=True,
                         text=True, check=True, timeout=1800)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    if not str(result["module"]).startswith(str(tree / "src")):
        raise RuntimeError(f"the measurement of {tree} imported sparkhydrogen from {result['module']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the code before the change")
    parser.add_argument("--after", type=Path, required=True, help="checkout of the code after it")
    parser.add_argument("--runs", type=int, default=4, help="processes per tree, alternated (default 4)")
    parser.add_argument("--reps", type=int, default=5, help="barrier measurements per process (default 5)")
    parser.add_argument("--jobs", type=int, default=200, help="bare 4-rank jobs timed per process (default 200)")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    p50s: dict[str, list[float]] = {name: [] for name in trees}
    rates: dict[str, list[float]] = {name: [] for name in trees}
    started = time.monotonic()
    for run in range(args.runs):
        for name, tree in trees.items():
            result = measure(tree, args.reps, args.jobs)
            p50s[name] += [float(v) for v in result["p50_ms"]]  # type: ignore[attr-defined]
            rates[name].append(float(result["jobs_per_s"]))  # type: ignore[arg-type]
            print(f"run {run} {name}: barrier p50 {statistics.median(p50s[name][-args.reps:]):.3f} ms, "
                  f"{rates[name][-1]:.2f} jobs/s", file=sys.stderr, flush=True)
    before, after = statistics.median(p50s["before"]), statistics.median(p50s["after"])
    print(f"| measure | before ({trees['before'].name}) | after ({trees['after'].name}) | after / before |")
    print("|---|---|---|---|")
    print(f"| barrier round p50 at N = 8, median of {len(p50s['before'])} measurements | {before:.3f} ms | "
          f"{after:.3f} ms | {after / before:.2f} |")
    rb, ra = statistics.median(rates["before"]), statistics.median(rates["after"])
    print(f"| bare 4-rank `h2.barrier` jobs, median of {args.runs} | {rb:.2f} jobs/s | {ra:.2f} jobs/s | "
          f"{ra / rb:.2f} |")
    print(f"\n{args.runs} processes per tree alternated, {time.monotonic() - started:.0f} s in all.")


if __name__ == "__main__":
    main()
