"""One partition body for every gang stage, with the way a rank joins its gang as a parameter.

Every Spark task of a gang runs :func:`run_rank`: it finds the task's Spark context,
checks that the partition is the rank it claims to be, joins the gang as its
:class:`Join` says, runs the rank's function inside a
:class:`~sparkhydrogen.task.lifecycle.RankSession` (context installed, outcome
reported exactly once) and cleans up. The join modes:

* ``barrier``: a Spark barrier stage (all-or-nothing by Spark's scheduler), the
  coordinator in the driver; the gang has as many ranks as the stage has tasks;
* ``gated``: an ordinary stage whose start the coordinator gates (all ranks or none
  run user code), for dynamic allocation and ``data=``;
* ``embedded``: a barrier stage whose coordinator rank 0 hosts (Spark Connect).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from ..errors import LaunchError
from .embedded import EmbeddedGang, hosted_rank
from .lifecycle import RankSession, stage_world_size, task_context
from .spec import TaskSpec

__all__ = ["Join", "JOIN_MODES", "run_rank"]

#: How a rank can join its gang (see the module's docstring).
JOIN_MODES = ("barrier", "gated", "embedded")

RankFn = Callable[[int, Iterable[Any]], Iterable[Any]]


@dataclass(frozen=True)
class Join:
    """How the ranks of one gang stage join their gang: the mode and what it needs (travels in the task closure).

    Example:
        >>> Join.gated(spec).barrier_stage                               # doctest: +SKIP
        False
    """

    mode: str
    spec: TaskSpec | None = None
    hosted: EmbeddedGang | None = None

    def __post_init__(self) -> None:
        if self.mode not in JOIN_MODES:
            raise ValueError(f"join mode must be one of {', '.join(JOIN_MODES)}, got {self.mode!r}")
        if (self.mode == "embedded") != (self.hosted is not None) or (self.mode != "embedded") != (
                self.spec is not None):
            raise ValueError(f"join mode {self.mode!r} takes " + ("an EmbeddedGang" if self.mode == "embedded"
                                                                 else "a TaskSpec"))
        if self.spec is not None and self.spec.gated != (self.mode == "gated"):
            raise ValueError(f"join mode {self.mode!r} does not match the spec (gated={self.spec.gated})")

    @classmethod
    def barrier(cls, spec: TaskSpec) -> Join:
        return cls("barrier", spec=spec)

    @classmethod
    def gated(cls, spec: TaskSpec) -> Join:
        return cls("gated", spec=spec)

    @classmethod
    def embedded(cls, gang: EmbeddedGang) -> Join:
        return cls("embedded", hosted=gang)

    @property
    def barrier_stage(self) -> bool:
        """Whether the stage must be a Spark barrier stage (else an ordinary one, gated by the coordinator)."""
        return self.mode != "gated"


def run_rank(join: Join, fn: RankFn, *args: Any) -> Iterator[Any]:
    """The body of one gang task: ``(index, rows)`` for RDDs, ``(batches,)`` for ``mapInPandas``/``mapInArrow``.

    The context stays installed for the life of the partition, so narrow
    transformations chained after the gang stage see it too.
    """
    if len(args) == 2:
        index, rows = args
    elif len(args) == 1:
        index, rows = None, args[0]
    else:
        raise TypeError(f"run_rank takes (index, rows) or (batches,), got {len(args)} arguments")
    native = task_context(barrier=join.barrier_stage)
    rank = native.partitionId()
    if index is not None and rank != index:
        raise LaunchError(f"partition index {index} differs from the task's partition id {rank}")
    if join.hosted is not None:
        yield from hosted_rank(join.hosted, native, rank, fn, rows)
        return
    spec = join.spec
    if spec is None:  # guarded by Join.__post_init__
        raise LaunchError(f"join mode {join.mode!r} without a task spec")
    if join.mode == "barrier":
        size = stage_world_size(spec.world_size, len(native.getTaskInfos()))
        if size != spec.world_size:  # a stage gang: as many ranks as the stage has tasks
            spec = replace(spec, world_size=size)
    with RankSession(spec, rank, native=native, stage_id=native.stageId(), task_attempt_id=native.taskAttemptId()):
        yield from fn(rank, rows)

