"""Elastic gangs: a size range, and each attempt's size chosen by a pure function of the cluster's slots.

``num_tasks=(min, max)`` (the launchers' ``num_processes=(min, max)``) makes a gang
elastic: every attempt starts with as many ranks as the cluster can hold *now*, between
``min`` and ``max``, instead of waiting for ``max``. Everything here is pure (no Spark,
no clock): :func:`size_range` checks what the user passed, :func:`choose_size` picks an
attempt's size from a :class:`SlotSnapshot` and says its arithmetic, :func:`growth` says
how far a running gang may grow at a checkpoint, and :class:`SizeHistory` keeps the
sizes of a run's attempts and their causes, and says when a gang that keeps shrinking
must stop. The driver-side I/O (reading the snapshot, waiting below ``min``, offering
growth to the coordinator) is :mod:`.resize`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GROW_MODES", "SizeRange", "size_range", "SlotSnapshot", "SizeChoice", "choose_size", "growth",
           "SizeStep", "SizeHistory", "RESIZE_TYPE"]

#: When an elastic gang grows: at the next attempt boundary only, or also at a checkpoint.
GROW_MODES = ("attempt", "checkpoint")

#: The error type a rank reports when its gang is relaunched larger at a checkpoint (not a failure).
RESIZE_TYPE = "sparkhydrogen.errors.GangResizing"


@dataclass(frozen=True)
class SizeRange:
    """The sizes a gang may run at: ``low`` to ``high`` ranks (equal: a fixed-size gang).

    >>> SizeRange(2, 4).describe(), SizeRange(3, 3).elastic
    ('2..4 ranks', False)
    """

    low: int
    high: int
    grow: str = "attempt"

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"a gang size range needs 1 <= min <= max, got ({self.low}, {self.high})")
        if self.grow not in GROW_MODES:
            raise ValueError(f"grow must be one of {', '.join(map(repr, GROW_MODES))}, got {self.grow!r}")

    @property
    def elastic(self) -> bool:
        return self.high > self.low

    def describe(self) -> str:
        return f"{self.low}..{self.high} ranks" if self.elastic else f"{self.low} ranks"


def size_range(value: Any, name: str = "num_tasks", grow: str = "attempt") -> SizeRange:
    """``value`` (an int, or a ``(min, max)`` pair) as a :class:`SizeRange`; a clear error for anything else.

    >>> size_range(4), size_range((2, 4), grow="checkpoint").grow
    (SizeRange(low=4, high=4, grow='attempt'), 'checkpoint')
    >>> size_range((4, 2))
    Traceback (most recent call last):
    ...
    ValueError: num_tasks=(4, 2): min must not exceed max
    """
    if isinstance(value, SizeRange):
        return value
    if not isinstance(grow, str) or grow not in GROW_MODES:
        raise ValueError(f"grow must be one of {', '.join(map(repr, GROW_MODES))}, got {grow!r}")
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise TypeError(f"{name} must be an int or a (min, max) pair of ints, got {value!r}")
        low, high = value
        if low < 1:
            raise ValueError(f"{name}={tuple(value)}: min must be >= 1")
        if low > high:
            raise ValueError(f"{name}={tuple(value)}: min must not exceed max")
        return SizeRange(low, high, grow)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or a (min, max) pair of ints, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if grow != "attempt":
        raise ValueError(f"grow={grow!r} needs an elastic gang: pass {name}=(min, max)")
    return SizeRange(value, value, grow)


@dataclass(frozen=True)
class SlotSnapshot:
    """What the cluster holds at one moment: slots (tasks it can run at once) and tasks running on them."""

    slots: int
    busy: int = 0
    executors: int = 0

    @property
    def free(self) -> int:
        return max(self.slots - self.busy, 0)


@dataclass(frozen=True)
class SizeChoice:
    """An attempt's size (0: fewer free slots than ``min``, wait) and the arithmetic behind it, for the log."""

    size: int
    arithmetic: str

    @property
    def fits(self) -> bool:
        return self.size > 0


def choose_size(wanted: SizeRange, snapshot: SlotSnapshot) -> SizeChoice:
    """The size of the next attempt: ``min(max, free slots)``, or 0 below ``min`` (pure).

    >>> choose_size(SizeRange(2, 4), SlotSnapshot(slots=3, busy=0, executors=3)).arithmetic
    'min(max 4, free slots 3 = 3 slots on 3 executor(s) - 0 busy) = 3 ranks'
    >>> choose_size(SizeRange(2, 4), SlotSnapshot(slots=2, busy=1)).size
    0
    """
    free = snapshot.free
    slots = f"{free} = {snapshot.slots} slots on {snapshot.executors} executor(s) - {snapshot.busy} busy"
    size = min(wanted.high, free)
    if size < wanted.low:
        return SizeChoice(0, f"free slots {slots} < min {wanted.low}: wait for slots")
    return SizeChoice(size, f"min(max {wanted.high}, free slots {slots}) = {size} ranks")


def growth(wanted: SizeRange, current: int, snapshot: SlotSnapshot) -> int | None:
    """How many ranks a running gang of ``current`` ranks could have now, if more; else ``None`` (pure).

    ``snapshot.busy`` counts the gang's own running ranks: the free slots are what it can add.

    >>> every = SizeRange(2, 4, grow="checkpoint")
    >>> growth(every, 2, SlotSnapshot(slots=4, busy=2)), growth(every, 4, SlotSnapshot(slots=6))
    (4, None)
    """
    if wanted.grow != "checkpoint" or current >= wanted.high:
        return None
    target = min(wanted.high, current + snapshot.free)
    return target if target > current else None


@dataclass(frozen=True)
class SizeStep:
    """One attempt of an elastic run: its number, size, why it has that size, and the arithmetic of the choice."""

    attempt: int
    size: int
    cause: str
    arithmetic: str = ""


@dataclass
class SizeHistory:
    """The sizes a run's attempts ran at, and why; bounds a gang that keeps shrinking.

    >>> h = SizeHistory(SizeRange(2, 4))
    >>> h.record(SizeStep(0, 4, "start")); h.record(SizeStep(1, 3, "rank 2 lost"))
    >>> h.sizes, h.shrinks, h.describe()
    ([4, 3], 1, 'sizes 4 -> 3 (attempt 0: 4 ranks, start; attempt 1: 3 ranks, rank 2 lost)')
    """

    wanted: SizeRange
    steps: list[SizeStep] = field(default_factory=list)

    def record(self, step: SizeStep) -> None:
        """Add the size of an attempt; an attempt sized again before it launched replaces its own step."""
        if self.steps and self.steps[-1].attempt == step.attempt:
            self.steps[-1] = step
        else:
            self.steps.append(step)

    @property
    def sizes(self) -> list[int]:
        return [step.size for step in self.steps]

    @property
    def shrinks(self) -> int:
        return _count(self.sizes, lambda a, b: b < a)

    @property
    def resizes(self) -> int:
        return _count(self.sizes, lambda a, b: b != a)

    @property
    def last(self) -> int | None:
        return self.steps[-1].size if self.steps else None

    def describe(self) -> str:
        if not self.steps:
            return "no attempt started"
        detail = "; ".join(f"attempt {s.attempt}: {s.size} ranks, {s.cause}" for s in self.steps)
        return f"sizes {' -> '.join(map(str, self.sizes))} ({detail})"

    def too_many_shrinks(self, max_retries: int) -> str | None:
        """Why the run must stop shrinking (more than ``max_retries`` shrinks), with the history; else ``None``."""
        if self.shrinks <= max_retries:
            return None
        return (f"the elastic gang ({self.wanted.describe()}) shrank {self.shrinks} times, more than "
                f"max_retries={max_retries}: {self.describe()}")


def _count(sizes: Sequence[int], changed: Any) -> int:
    return sum(1 for a, b in zip(sizes, sizes[1:], strict=False) if changed(a, b))
