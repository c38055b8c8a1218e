"""Run every benchmark, ours vs Spark's native barrier mode side by side, and write the report.

    make bench        # = .venv/bin/python benchmarks/run_all.py --output docs/benchmarks.md

Takes 3-4 minutes on 2 cores (most of it waiting for native rounds of ~1 s).
``--quick`` runs a few rounds of everything to check the harness (a minute or so).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

# Before pyspark starts a JVM: loopback only, and the Python workers run this interpreter
# (it has sparkhydrogen installed).
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from coordinator_bench import simulate  # noqa: E402
from machine import describe_machine, load_average  # noqa: E402
from report import Results, evaluate_targets, render  # noqa: E402
from spark_bench import NATIVE, OURS, collective_rounds, spark_session, trivial_jobs, warm_up  # noqa: E402
from stats import summarize  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KiB, MiB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Plan:
    """How many rounds and runs each benchmark makes."""

    worlds: tuple[int, ...] = (2, 4, 8)
    ours_warmup: int = 20
    ours_barrier_rounds: int = 500
    native_barrier_rounds: int = 10
    allgather_sizes: tuple[int, ...] = (10, 10 * KiB, MiB)
    ours_allgather_rounds: tuple[int, ...] = (300, 300, 100)  # per size
    native_allgather_rounds: int = 7
    trivial_runs: int = 9
    simulated: tuple[tuple[int, str, int, int], ...] = (  # ranks, op, payload bytes, rounds
        (64, "barrier", 0, 200),
        (256, "barrier", 0, 100),
        (1024, "barrier", 0, 50),
        (1024, "allGather", 10, 30),
        (8, "allGather", MiB, 50),
    )
    sim_warmup: int = 5
    profiled: tuple[tuple[int, str, int, int], ...] = (  # ranks, op, payload bytes, rounds
        (1024, "barrier", 0, 20),
        (8, "allGather", MiB, 30),
    )


QUICK = Plan(ours_warmup=2, ours_barrier_rounds=50, native_barrier_rounds=2, ours_allgather_rounds=(20, 20, 10),
             native_allgather_rounds=1, trivial_runs=2,
             simulated=((64, "barrier", 0, 50), (1024, "barrier", 0, 20), (8, "allGather", MiB, 10)),
             profiled=((1024, "barrier", 0, 5), (8, "allGather", MiB, 5)))


class Progress:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {text}", file=sys.stderr, flush=True)


def run_spark(plan: Plan, results: Results, say: Progress) -> None:
    for world in plan.worlds:
        say(f"local[{world}]: starting SparkSession")
        with spark_session(world) as sc:
            warm_up(sc, world)
            for impl, warmup, rounds in ((OURS, plan.ours_warmup, plan.ours_barrier_rounds),
                                         (NATIVE, 0, plan.native_barrier_rounds)):
                res = collective_rounds(sc, impl, world, "barrier", 0, warmup, rounds)
                results.collective.append(res)
                say(f"local[{world}] {impl:6} barrier x{rounds}: p50 {summarize(res.spans_ms).p50:.2f} ms")
            for size, ours_rounds in zip(plan.allgather_sizes, plan.ours_allgather_rounds, strict=True):
                for impl, warmup, rounds in ((OURS, plan.ours_warmup, ours_rounds),
                                             (NATIVE, 0, plan.native_allgather_rounds)):
                    res = collective_rounds(sc, impl, world, "allGather", size, warmup, rounds)
                    results.collective.append(res)
                    say(f"local[{world}] {impl:6} allGather {size} B x{rounds}: "
                        f"p50 {summarize(res.spans_ms).p50:.2f} ms")
            trivial = trivial_jobs(sc, world, plan.trivial_runs)
            results.trivial.append(trivial)
            say(f"local[{world}] trivial job medians: "
                + ", ".join(f"{k} {v:.0f} ms" for k, v in trivial.median_ms.items()))


def run_coordinator(plan: Plan, results: Results, say: Progress) -> None:
    for ranks, op, size, rounds in plan.simulated:
        res = simulate(ranks, op, size, warmup=plan.sim_warmup, rounds=rounds)
        results.simulated.append(res)
        say(f"coordinator {ranks} simulated ranks {op} x{rounds}: p50 {summarize(res.spans_ms).p50:.2f} ms, "
            f"coordinator CPU {res.coordinator_cpu_ms_per_round:.1f} ms/round")
    for ranks, op, size, rounds in plan.profiled:
        results.profiles.append(simulate(ranks, op, size, warmup=plan.sim_warmup, rounds=rounds, profile=True))
        say(f"coordinator {ranks} simulated ranks {op} profiled")


#: Stand-alone benchmarks of other features, appended to the report as their own sections.
EXTRAS = ("bench_recovery.py", "bench_dataframe.py", "bench_torch.py", "bench_horovod.py", "bench_data.py",
          "bench_elastic.py", "bench_ml.py")


def run_extras(say: Progress) -> str:
    """Run each ``bench_*.py`` in its own process (its own SparkSession) and collect its section."""
    import subprocess
    import tempfile

    sections = []
    for script in EXTRAS:
        path = os.path.join(REPO, "benchmarks", script)
        if not os.path.exists(path):
            continue
        with tempfile.NamedTemporaryFile("r", suffix=".md") as out:
            say(f"{script}: running")
            proc = subprocess.run([sys.executable, path, "--output-section", out.name], capture_output=True,
                                  text=True, timeout=1200)
            text = out.read()
        if proc.returncode != 0 or not text.strip():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            text = f"## {script}\n\nNot measured in this run: it failed (exit {proc.returncode}):\n\n" + \
                "\n".join(f"    {line}" for line in tail) + "\n"
        sections.append(f"<!-- from benchmarks/{script} -->\n{text.strip()}\n")
        say(f"{script}: done")
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks.md"),
                        help="where to write the Markdown report (default: docs/benchmarks.md)")
    parser.add_argument("--quick", action="store_true", help="a few rounds of everything, to check the harness")
    parser.add_argument("--skip-spark", action="store_true", help="only the coordinator with simulated ranks")
    parser.add_argument("--skip-coordinator", action="store_true", help="only the Spark benchmarks")
    parser.add_argument("--skip-extras", action="store_true",
                        help="leave out the stand-alone bench_*.py sections (recovery, DataFrame, launchers)")
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else Plan()
    say = Progress()
    if args.quick or args.skip_spark or args.skip_coordinator or args.skip_extras:
        command = " ".join(["benchmarks/run_all.py", *(argv if argv is not None else sys.argv[1:])])
    else:
        command = "make bench"
    results = Results(command=command, machine=describe_machine(REPO))
    say(f"load average at start: {results.machine.load_at_start} on {results.machine.nproc} CPUs")
    if not args.skip_coordinator:
        run_coordinator(plan, results, say)
    if not args.skip_spark:
        run_spark(plan, results, say)
    extras = "" if args.skip_extras or args.quick else run_extras(say)
    results.elapsed_s = time.perf_counter() - say.start
    results.load_at_end = load_average()

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(render(results))
        if extras:
            f.write("\n# Other benchmarks (same run)\n\n" + extras)
    say(f"wrote {args.output}")
    for target in evaluate_targets(results):
        verdict = "n/a" if target.met is None else ("met" if target.met else "MISSED")
        print(f"{verdict:>6}  {target.name}: {target.measured} (goal {target.goal})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
