"""Ours vs Spark's native barrier mode on a real ``local[N]`` SparkContext.

Every collective benchmark runs as one barrier job whose tasks time their own
loop of rounds (``time.monotonic_ns()`` around each call) and return the
timestamps; the driver turns them into round spans (first rank's call to the
last rank's return, see :mod:`stats`).  The trivial-job benchmark is timed on
the driver, around ``collect()``.

The task functions below are shipped to the Python workers *by value*
(``pyspark.cloudpickle.register_pickle_by_value``), so the workers need nothing from
``benchmarks/`` on their path: only ``sparkhydrogen`` and ``pyspark``.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyspark import cloudpickle as spark_cloudpickle

from stats import loop_ms_per_round, round_spans_ms

__all__ = [
    "CollectiveResult",
    "TrivialJobResult",
    "spark_session",
    "collective_rounds",
    "trivial_jobs",
    "warm_up",
]

# pyspark pickles closures with its own copy of cloudpickle: register there.
spark_cloudpickle.register_pickle_by_value(sys.modules[__name__])

OURS = "ours"
NATIVE = "native"


# -- task side ---------------------------------------------------------------------------
def _measure(ctx: Any, rank: int, world: int, op: str, size: int, warmup: int, rounds: int) -> tuple:
    """Run ``warmup`` + ``rounds`` calls of ``op`` on ``ctx``.

    Returns this rank's call timestamps and the CPU time its Python worker used in
    the measured loop (the checks of the results included).

    Works for both contexts: ours and pyspark's have the same ``barrier()`` /
    ``allGather(str)`` surface.  The message is built here, not shipped in the closure.
    """
    import time as _time

    message = "x" * size
    ctx.barrier()  # every rank has started; not measured

    def call() -> Any:
        return ctx.barrier() if op == "barrier" else ctx.allGather(message)

    def check(out: Any) -> None:
        if op == "allGather" and (len(out) != world or any(len(m) != size for m in out)):
            raise RuntimeError(f"allGather returned {len(out)} messages of sizes {sorted({len(m) for m in out})}")

    for _ in range(warmup):
        check(call())
    starts: list[int] = []
    ends: list[int] = []
    cpu0 = _time.process_time()
    for _ in range(rounds):
        t0 = _time.monotonic_ns()
        out = call()
        t1 = _time.monotonic_ns()
        starts.append(t0)
        ends.append(t1)
        check(out)
    return rank, starts, ends, _time.process_time() - cpu0


def _ours_body(op: str, size: int, warmup: int, rounds: int) -> Callable[[Iterable[Any]], Iterator[tuple]]:
    def body(rows: Iterable[Any]) -> Iterator[tuple]:
        import sparkhydrogen as h2

        ctx = h2.BarrierTaskContext.get()
        yield _measure(ctx, ctx.rank(), ctx.worldSize(), op, size, warmup, rounds)

    return body


def _native_body(op: str, size: int, warmup: int, rounds: int) -> Callable[[Iterable[Any]], Iterator[tuple]]:
    def body(rows: Iterable[Any]) -> Iterator[tuple]:
        from pyspark import BarrierTaskContext

        ctx = BarrierTaskContext.get()
        yield _measure(ctx, ctx.partitionId(), len(ctx.getTaskInfos()), op, size, warmup, rounds)

    return body


def _trivial_ours(rows: Iterable[Any]) -> Iterator[int]:
    import sparkhydrogen as h2

    ctx = h2.BarrierTaskContext.get()
    ctx.barrier()
    yield ctx.rank()


def _trivial_run() -> int:
    import sparkhydrogen as h2

    ctx = h2.BarrierTaskContext.get()
    ctx.barrier()
    return ctx.rank()


def _trivial_native(rows: Iterable[Any]) -> Iterator[int]:
    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    ctx.barrier()
    yield ctx.partitionId()


def _no_collective(rows: Iterable[Any]) -> Iterator[int]:
    from pyspark import BarrierTaskContext

    yield BarrierTaskContext.get().partitionId()


# -- driver side -------------------------------------------------------------------------
@contextmanager
def spark_session(num_threads: int) -> Iterator[Any]:
    """One SparkSession on ``local[num_threads]``, stopped on exit; yields its SparkContext."""
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(f"local[{num_threads}]")
        .appName(f"sparkhydrogen-bench-local{num_threads}")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield spark.sparkContext
    finally:
        spark.stop()


@dataclass(frozen=True)
class CollectiveResult:
    impl: str
    world: int
    op: str
    size: int
    warmup: int
    spans_ms: list[float]
    loop_ms_per_round: float
    wall_s: float
    #: ours only: CPU time of the driver's coordinator thread per collective round of the job
    coordinator_cpu_ms_per_round: float | None = None
    #: CPU time of all ranks' Python workers together per measured round
    ranks_cpu_ms_per_round: float = 0.0


def _coordinator_cpu_s() -> float | None:
    """CPU seconds used so far by this process's coordinator thread (``None`` if it is not running)."""
    for thread in threading.enumerate():
        if thread.name == "sparkhydrogen-coordinator" and thread.ident is not None:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return None


def collective_rounds(sc: Any, impl: str, world: int, op: str, size: int, warmup: int,
                      rounds: int) -> CollectiveResult:
    """One barrier job of ``world`` tasks making ``warmup + rounds`` calls of ``op``."""
    import sparkhydrogen as h2

    rdd = sc.parallelize(range(world), world)
    cpu_before = _coordinator_cpu_s()
    started = time.perf_counter()
    if impl == OURS:
        out = h2.barrier(rdd).mapPartitions(_ours_body(op, size, warmup, rounds)).collect()
    elif impl == NATIVE:
        out = rdd.barrier().mapPartitions(_native_body(op, size, warmup, rounds)).collect()
    else:
        raise ValueError(f"impl must be {OURS!r} or {NATIVE!r}, got {impl!r}")
    wall = time.perf_counter() - started
    cpu_after = _coordinator_cpu_s()
    cpu_ms = None
    if impl == OURS and cpu_before is not None and cpu_after is not None:
        cpu_ms = (cpu_after - cpu_before) * 1e3 / (1 + warmup + rounds)  # + the aligning barrier()
    out.sort(key=lambda item: item[0])
    if [item[0] for item in out] != list(range(world)):
        raise RuntimeError(f"{impl} {op}: expected ranks 0..{world - 1}, got {[item[0] for item in out]}")
    starts, ends = [item[1] for item in out], [item[2] for item in out]
    ranks_cpu_ms = sum(item[3] for item in out) * 1e3 / rounds
    return CollectiveResult(impl, world, op, size, warmup, round_spans_ms(starts, ends),
                            loop_ms_per_round(starts, ends), wall, cpu_ms, ranks_cpu_ms)


@dataclass(frozen=True)
class TrivialJobResult:
    world: int
    runs: int
    median_ms: dict[str, float]
    samples_ms: dict[str, list[float]]


#: The jobs of the trivial-job benchmark, in the order they are interleaved.
TRIVIAL_JOBS = ("ours_barrier", "ours_run", "native", "native_no_barrier")


def _trivial_job(sc: Any, world: int, which: str) -> list[int]:
    import sparkhydrogen as h2

    if which == "ours_run":
        return h2.run(_trivial_run, world, spark=sc)
    rdd = sc.parallelize(range(world), world)
    if which == "ours_barrier":
        return h2.barrier(rdd).mapPartitions(_trivial_ours).collect()
    if which == "native":
        return rdd.barrier().mapPartitions(_trivial_native).collect()
    if which == "native_no_barrier":
        return rdd.barrier().mapPartitions(_no_collective).collect()
    raise ValueError(f"unknown trivial job {which!r}")


def warm_up(sc: Any, world: int) -> None:
    """One job of each kind: starts the Python workers and our coordinator before anything is timed."""
    for name in ("ours_barrier", "native_no_barrier"):
        _trivial_job(sc, world, name)


def trivial_jobs(sc: Any, world: int, runs: int) -> TrivialJobResult:
    """Warm up every job once, then time ``runs`` rounds of all of them, interleaved."""
    samples: dict[str, list[float]] = {name: [] for name in TRIVIAL_JOBS}
    for name in TRIVIAL_JOBS:
        _trivial_job(sc, world, name)
    for _ in range(runs):
        for name in TRIVIAL_JOBS:
            started = time.perf_counter()
            out = _trivial_job(sc, world, name)
            samples[name].append((time.perf_counter() - started) * 1e3)
            if sorted(out) != list(range(world)):
                raise RuntimeError(f"trivial job {name} returned {out}, expected ranks 0..{world - 1}")
    return TrivialJobResult(world, runs, {k: statistics.median(v) for k, v in samples.items()}, samples)
