"""``sparkhydrogen.barrier(rdd)``: a drop-in for ``rdd.barrier()`` served by our coordinator."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from ..task.partition import Join
from . import choice
from .jobs import stage_canceller
from .runner import stage_spec
from .session import SparkTarget
from .stage import RddSource, build_stage

__all__ = ["RDDBarrier", "barrier"]

T = TypeVar("T")
U = TypeVar("U")


def _ignore_index(f: Callable[[Iterable[Any]], Iterable[Any]], index: int, rows: Iterable[Any]) -> Iterable[Any]:
    return f(rows)


class RDDBarrier(Generic[T]):
    """Wraps an RDD so that the next ``mapPartitions`` runs as a spark-hydrogen gang.

    The result is an ordinary RDD: narrow transformations chained after it run in
    the same tasks and still see :class:`~sparkhydrogen.BarrierTaskContext`. It can be
    composed, cached and run any number of times: every Spark stage attempt that runs
    it forms its own gang (nothing is held on the driver per RDD or per job).
    """

    def __init__(self, rdd: Any) -> None:
        self.rdd = rdd

    def mapPartitions(self, f: Callable[[Iterable[T]], Iterable[U]], preservesPartitioning: bool = False) -> Any:
        """Like :meth:`pyspark.RDDBarrier.mapPartitions`; every partition is one rank."""
        if not callable(f):
            raise TypeError(f"mapPartitions needs a function, got {type(f).__name__}")
        return self._launch(functools.partial(_ignore_index, f), preservesPartitioning, _name(f))

    def mapPartitionsWithIndex(self, f: Callable[[int, Iterable[T]], Iterable[U]],
                               preservesPartitioning: bool = False) -> Any:
        """Like :meth:`pyspark.RDDBarrier.mapPartitionsWithIndex`; the index is the rank."""
        if not callable(f):
            raise TypeError(f"mapPartitionsWithIndex needs a function, got {type(f).__name__}")
        return self._launch(f, preservesPartitioning, _name(f))

    def _launch(self, f: Callable[[int, Iterable[Any]], Iterable[Any]], preserves: bool, name: str) -> Any:
        partitions = self.rdd.getNumPartitions()
        if partitions == 0:  # no task, no gang: the stage is empty and returns nothing, as pyspark's does
            return self.rdd.mapPartitionsWithIndex(f, preservesPartitioning=preserves)
        target = SparkTarget(sc=self.rdd.context)
        if choice.choose(choice.settings_of(target)) == "coordinated":  # an ordinary stage, its start gated
            join = Join.gated(stage_spec(target, partitions, name, gated=True, on_abort=stage_canceller(target)))
        else:
            join = Join.barrier(stage_spec(target, partitions, name))
        return build_stage(join, f, RddSource(self.rdd, preserves))


def _name(f: Callable[..., Any]) -> str:
    return getattr(f, "__qualname__", None) or type(f).__name__


def barrier(data: Any, num_tasks: int | None = None) -> Any:
    """Gang-schedule the next stage of ``data`` (an RDD or a DataFrame): all partitions start together.

    ``num_tasks`` sets the gang size by repartitioning first (for DataFrames it also
    spares planning the query to count partitions; under Spark Connect it is needed
    only when the plan does not end in ``repartition(n)`` or ``range(..., numPartitions)``).

    Example:
        >>> import sparkhydrogen as h2                                     # doctest: +SKIP
        >>> def f(rows):
        ...     ctx = h2.BarrierTaskContext.get()
        ...     ctx.barrier()
        ...     yield ctx.rank(), sum(ctx.allGather(sum(rows)))
        >>> h2.barrier(sc.parallelize(range(8), 4)).mapPartitions(f).collect()  # doctest: +SKIP
        [(0, 28), (1, 28), (2, 28), (3, 28)]
        >>> h2.barrier(df, num_tasks=4).mapInPandas(train, schema)          # doctest: +SKIP
    """
    if num_tasks is not None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int):
            raise TypeError(f"num_tasks must be an int, got {type(num_tasks).__name__}")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    from pyspark import RDD

    if isinstance(data, RDD):
        return RDDBarrier(data if num_tasks is None else data.repartition(num_tasks))
    if type(data).__name__ == "DataFrame" and hasattr(data, "mapInPandas"):
        from .dataframe import DataFrameBarrier

        return DataFrameBarrier(data, num_tasks)
    raise TypeError(
        f"sparkhydrogen.barrier() takes a pyspark RDD or DataFrame, got "
        f"{type(data).__module__}.{type(data).__qualname__}"
    )
