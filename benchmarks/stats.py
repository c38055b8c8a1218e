"""Latency statistics shared by every benchmark: nearest-rank percentiles of round spans.

A *round span* is the time from the first rank's call of a round to the last rank's
return from it.  All timestamps come from ``time.monotonic_ns()``, which on Linux is
``CLOCK_MONOTONIC``: one clock for every process of the machine, so timestamps taken
by different Python workers (or by the rank simulator) can be compared directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Summary", "loop_ms_per_round", "percentile", "round_spans_ms", "summarize"]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sample.

    With fewer than 100 samples, p99 is the maximum.

    >>> percentile([5.0, 1.0, 3.0], 50)
    3.0
    >>> percentile([1.0, 2.0, 3.0, 4.0], 99)
    4.0
    """
    if not values:
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in 0..100, got {q}")
    ordered = sorted(values)
    index = max(math.ceil(q / 100 * len(ordered)) - 1, 0)
    return ordered[index]


def round_spans_ms(starts: Sequence[Sequence[int]], ends: Sequence[Sequence[int]]) -> list[float]:
    """Per round: last rank's return minus first rank's call, in ms.

    ``starts[r][k]`` / ``ends[r][k]`` are rank ``r``'s monotonic-ns timestamps around
    its ``k``-th measured call.

    >>> round_spans_ms([[0, 10_000_000], [1_000_000, 10_500_000]], [[2_000_000, 12_000_000], [2_000_000, 11_000_000]])
    [2.0, 2.0]
    """
    if not starts or len(starts) != len(ends):
        raise ValueError("need the same, non-zero number of ranks in starts and ends")
    rounds = len(starts[0])
    if any(len(s) != rounds for s in starts) or any(len(e) != rounds for e in ends):
        raise ValueError("every rank must report the same number of rounds")
    return [
        (max(e[k] for e in ends) - min(s[k] for s in starts)) / 1e6
        for k in range(rounds)
    ]


def loop_ms_per_round(starts: Sequence[Sequence[int]], ends: Sequence[Sequence[int]]) -> float:
    """Throughput view: from the first call of the first round to the last return of the last, per round.

    >>> starts = [[0, 10_000_000], [1_000_000, 10_500_000]]
    >>> loop_ms_per_round(starts, [[2_000_000, 12_000_000], [2_000_000, 11_000_000]])
    6.0
    """
    rounds = len(starts[0])
    return (max(e[-1] for e in ends) - min(s[0] for s in starts)) / 1e6 / rounds


@dataclass(frozen=True)
class Summary:
    """p50 / p99 / mean of one sample of latencies (ms)."""

    n: int
    p50: float
    p99: float
    mean: float
    minimum: float
    maximum: float


def summarize(values_ms: Sequence[float]) -> Summary:
    """Summary of a non-empty sample of latencies in ms."""
    if not values_ms:
        raise ValueError("cannot summarize an empty sample")
    return Summary(
        n=len(values_ms),
        p50=percentile(values_ms, 50),
        p99=percentile(values_ms, 99),
        mean=sum(values_ms) / len(values_ms),
        minimum=min(values_ms),
        maximum=max(values_ms),
    )
