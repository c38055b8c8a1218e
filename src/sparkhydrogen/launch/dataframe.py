"""``sparkhydrogen.barrier(df)``: gang-scheduled ``mapInPandas`` / ``mapInArrow`` on DataFrames.

Classic PySpark: the coordinator runs in the driver, as for RDDs. Spark Connect: the
client is not reachable from executors, so the coordinator runs inside rank 0's task
(:mod:`sparkhydrogen.task.embedded`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

from ..task.partition import Join
from . import choice
from .data import planned_partitions
from .jobs import stage_canceller
from .placement import embedded_gang
from .runner import current_scope, stage_spec
from .session import SparkTarget, is_connect
from .stage import FrameSource, build_stage

__all__ = ["DataFrameBarrier", "is_connect", "planned_partitions"]

log = logging.getLogger("sparkhydrogen.launch")

def _ignore_index(fn: Callable[[Iterable[Any]], Iterable[Any]], index: int, batches: Iterable[Any]) -> Iterable[Any]:
    return fn(batches)


class DataFrameBarrier:
    """Wraps a DataFrame so that the next ``mapInPandas``/``mapInArrow`` runs as a gang.

    Each partition is one rank; it receives its partition's rows as pandas DataFrames
    (or Arrow record batches) and has the full :class:`~sparkhydrogen.BarrierTaskContext`.

    Example:
        >>> def train(batches):                                              # doctest: +SKIP
        ...     ctx = h2.BarrierTaskContext.get()
        ...     n = sum(len(b) for b in batches)
        ...     yield pd.DataFrame({"rank": [ctx.rank()], "rows": [sum(ctx.allGather(n))]})
        >>> h2.barrier(df, num_tasks=4).mapInPandas(train, "rank long, rows long").show()  # doctest: +SKIP
    """

    def __init__(self, df: Any, num_tasks: int | None = None) -> None:
        self._df = df if num_tasks is None else df.repartition(num_tasks)
        self._num_tasks = num_tasks

    def mapInPandas(self, fn: Callable[[Iterable[Any]], Iterable[Any]], schema: Any) -> Any:
        """Like ``DataFrame.mapInPandas(fn, schema, barrier=True)``, served by our coordinator."""
        return self._launch("mapInPandas", fn, schema)

    def mapInArrow(self, fn: Callable[[Iterable[Any]], Iterable[Any]], schema: Any) -> Any:
        """Like ``DataFrame.mapInArrow(fn, schema, barrier=True)``, served by our coordinator."""
        return self._launch("mapInArrow", fn, schema)

    def _launch(self, method: str, fn: Callable[[Iterable[Any]], Iterable[Any]], schema: Any) -> Any:
        if not callable(fn):
            raise TypeError(f"{method} needs a function, got {type(fn).__name__}")
        rank_fn = functools.partial(_ignore_index, fn)
        source = FrameSource(self._df, method, schema)
        if is_connect(self._df):
            target = SparkTarget(spark=self._df.sparkSession)
            size = self._num_tasks if self._num_tasks is not None else planned_partitions(self._df)
            return build_stage(Join.embedded(embedded_gang(target, size)), rank_fn, source)
        target = SparkTarget(sc=self._df.sparkSession.sparkContext)
        name = getattr(fn, "__qualname__", method)
        if choice.choose(choice.settings_of(target)) == "coordinated":  # an ordinary stage, its start gated
            world = self._num_tasks if self._num_tasks is not None else int(self._df.rdd.getNumPartitions())
            if world == 0:  # no task, no gang: the stage is empty
                return getattr(self._df, method)(fn, schema)
            spec = stage_spec(target, world, name, gated=True, on_abort=stage_canceller(target))
            return build_stage(Join.gated(spec), rank_fn, source)
        # a barrier stage: outside a scope the gang has as many ranks as the stage has tasks (the query is not
        # planned here); a scope's gang is declared with its size
        world = self._num_tasks or (int(self._df.rdd.getNumPartitions()) if current_scope() is not None else 0)
        return build_stage(Join.barrier(stage_spec(target, world, name)), rank_fn, source)
