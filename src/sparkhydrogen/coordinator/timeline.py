"""Bounded bookkeeping of one gang attempt's collective rounds, and the straggler rule (pure).

For every completed round the coordinator records when each rank's call arrived and
when the round completed, in seconds from the attempt's start. The last
:data:`MAX_ROUNDS` rounds are kept (fewer for very wide gangs: at most
:data:`MAX_POINTS` arrival times per attempt); running totals per rank never grow.

**Who made the others wait.** In one round, sort the arrivals ``t(1) <= ... <= t(n)``.
Between the ``k``-th and the ``k+1``-th arrival, ``k`` ranks wait for the ``n - k``
that have not arrived; that stretch of time is charged in equal parts to those
``n - k`` ranks. A rank's charges summed over the rounds are the seconds its peers
waited for it (:attr:`Timeline.waited_for`); over all ranks they add up to the
round's skew (last minus first arrival). One late rank is charged nearly all of the
skew; two equally late ranks share it.

**Straggler rule** (:func:`stragglers`). A rank is a straggler when, over at least
:data:`MIN_ROUNDS` rounds, its peers waited for it

* at least :data:`MIN_WAIT` seconds in all (too little to matter otherwise),
* at least :data:`MIN_SHARE` of the time the rounds spanned (first arrival of the
  first round to the completion of the last), and
* at least :data:`STANDOUT` times as long as for the average other rank.

A balanced gang has none: its skew is spread over its ranks.

Example:
    >>> t = Timeline(world_size=2, origin=0.0)
    >>> for k in range(20):
    ...     t.record(k, "barrier", [k * 1.0, k * 1.0 + 0.5], k * 1.0 + 0.5, last=1)
    >>> [s.rank for s in stragglers(t)]
    [1]
    >>> stragglers(t)[0].describe()
    'rank 1 arrived last in 100% of 20 rounds; peers waited 10 s for it in all (other ranks: 0 ms on average)'
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_ROUNDS",
    "MAX_POINTS",
    "MIN_ROUNDS",
    "MIN_WAIT",
    "MIN_SHARE",
    "STANDOUT",
    "RoundRecord",
    "Straggler",
    "Timeline",
    "stragglers",
    "format_seconds",
]

#: Completed rounds kept per attempt (the oldest are dropped first; the totals keep counting).
MAX_ROUNDS = 1000
#: Arrival times kept per attempt at most: a gang of 1,024 ranks keeps its last 48 rounds.
MAX_POINTS = 50_000
#: Rounds an attempt must have made before a straggler is named.
MIN_ROUNDS = 10
#: Seconds peers must have waited for a rank in all before it is named.
MIN_WAIT = 0.5
#: Fraction of the rounds' span peers must have waited for a rank before it is named.
MIN_SHARE = 0.05
#: How many times longer than for the average other rank peers must have waited for a straggler.
STANDOUT = 2.0


@dataclass(frozen=True)
class RoundRecord:
    """One completed collective round: ``arrivals[r]`` is when rank ``r``'s call arrived.

    Times are seconds from the attempt's start. ``seq`` counts from 0 (the log and
    :attr:`name` count from 1).
    """

    seq: int
    op: str
    arrivals: tuple[float, ...]
    completed: float

    @property
    def name(self) -> str:
        """``"barrier #12"``: the operation and its position among the rank's collective calls."""
        return f"{self.op} #{self.seq + 1}"

    @property
    def skew(self) -> float:
        """Last minus first arrival (seconds)."""
        return max(self.arrivals) - min(self.arrivals)


@dataclass(frozen=True)
class Straggler:
    """A rank its peers waited for far more than for the others, with the figures."""

    rank: int
    rounds: int
    times_last: int
    waited_for: float
    others_average: float

    def describe(self) -> str:
        """One line: ``"rank 3 arrived last in 92% of 400 rounds; peers waited 41 s for it in all (...)"``."""
        share = 100.0 * self.times_last / self.rounds if self.rounds else 0.0
        return (f"rank {self.rank} arrived last in {share:.0f}% of {self.rounds} rounds; peers waited "
                f"{format_seconds(self.waited_for)} for it in all (other ranks: "
                f"{format_seconds(self.others_average)} on average)")


def format_seconds(seconds: float) -> str:
    """``0.0123`` -> ``"12 ms"``, ``4.26`` -> ``"4.3 s"``, ``41.2`` -> ``"41 s"``.

    >>> format_seconds(0.0123), format_seconds(4.26), format_seconds(41.2)
    ('12 ms', '4.3 s', '41 s')
    """
    if seconds < 1.0:
        return f"{seconds * 1e3:.0f} ms"
    if seconds < 10.0:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s"


class Timeline:
    """The rounds of one attempt: the last ones in full, running totals for all (bounded memory).

    ``origin`` is the attempt's start on the coordinator's clock; :meth:`record` takes
    times on that clock and keeps them relative to it.
    """

    __slots__ = ("world_size", "origin", "_rounds", "rounds", "times_last", "waited_for", "skew_total",
                 "skew_max", "first_arrival", "last_completion", "name", "closed")

    def __init__(self, world_size: int, origin: float, max_rounds: int = MAX_ROUNDS,
                 max_points: int = MAX_POINTS) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if max_rounds < 1 or max_points < 1:
            raise ValueError(f"max_rounds and max_points must be >= 1, got {max_rounds} and {max_points}")
        self.world_size = world_size
        self.origin = origin
        #: Kept rounds, oldest first: (seq, op, arrivals relative to origin, completion relative to origin).
        self._rounds: deque[tuple[int, str, array[float], float]] = deque(
            maxlen=max(1, min(max_rounds, max_points // world_size)))
        #: Rounds completed in all (kept or not).
        self.rounds = 0
        #: Per rank: rounds in which its call arrived last (completing the round).
        self.times_last = [0] * world_size
        #: Per rank: seconds its peers waited for it in all (see the module's docstring).
        self.waited_for = [0.0] * world_size
        self.skew_total = 0.0
        self.skew_max = 0.0
        self.first_arrival: float | None = None
        self.last_completion = 0.0
        #: The gang's name, for its report (the I/O layer sets it; the attempt does not know it).
        self.name = ""
        #: Set once the attempt's report has been made (it is made once).
        self.closed = False

    @property
    def capacity(self) -> int:
        """How many rounds are kept in full."""
        return self._rounds.maxlen or 0

    @property
    def kept(self) -> int:
        return len(self._rounds)

    def record(self, seq: int, op: str, arrivals: Sequence[float], completed: float, last: int) -> None:
        """Round ``seq`` of ``op`` completed at ``completed``; ``arrivals[r]``: when rank ``r`` called.

        ``last`` is the rank whose call completed the round (the last to arrive).
        Costs O(n log n) for n ranks, once per round.
        """
        origin = self.origin
        times = array("d", [a - origin for a in arrivals])
        order = sorted(range(len(times)), key=times.__getitem__)
        first = times[order[0]]
        skew = times[order[-1]] - first
        if skew > 0.0:
            n = len(order)
            charge, waited, previous = 0.0, self.waited_for, first
            for position in range(1, n):
                rank = order[position]
                at = times[rank]
                charge += (at - previous) / (n - position)  # the stretch before it, shared by everyone still out
                previous = at
                waited[rank] += charge
        self.times_last[last] += 1
        self.rounds += 1
        self.skew_total += skew
        if skew > self.skew_max:
            self.skew_max = skew
        if self.first_arrival is None:
            self.first_arrival = first
        self.last_completion = completed - origin
        self._rounds.append((seq, op, times, completed - origin))

    def close(self) -> None:
        """The attempt's report has been made: drop the kept rounds (the totals stay), never make it again."""
        self.closed = True
        self._rounds.clear()

    def kept_rounds(self) -> list[RoundRecord]:
        """The rounds kept in full, oldest first."""
        return [RoundRecord(seq, op, tuple(times), done) for seq, op, times, done in self._rounds]

    @property
    def span(self) -> float:
        """Seconds from the first round's first arrival to the last round's completion (0 before any round)."""
        return 0.0 if self.first_arrival is None else max(self.last_completion - self.first_arrival, 0.0)

    def most_often_last(self) -> int | None:
        """The rank that arrived last most often (the lowest such rank on a tie; ``None`` before any round)."""
        if not self.rounds:
            return None
        return max(range(self.world_size), key=lambda r: (self.times_last[r], -r))


def stragglers(timeline: Timeline) -> list[Straggler]:
    """The ranks the module's rule names, most waited-for first (empty for a balanced gang)."""
    n, rounds = timeline.world_size, timeline.rounds
    if n < 2 or rounds < MIN_ROUNDS:
        return []
    waited = timeline.waited_for
    total, span = sum(waited), timeline.span
    found = []
    for rank in range(n):
        mine = waited[rank]
        others = (total - mine) / (n - 1)
        if mine >= MIN_WAIT and mine >= MIN_SHARE * span and mine >= STANDOUT * others:
            found.append(Straggler(rank, rounds, timeline.times_last[rank], mine, others))
    return sorted(found, key=lambda s: -s.waited_for)
