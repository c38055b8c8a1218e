"""The one stage builder: every gang's Spark stage is built here, from (join, rank body, source).

``run()``, ``barrier(rdd)``, ``barrier(df)``, transparent mode and every launcher hand
this module the same three things:

* a :class:`~sparkhydrogen.task.partition.Join`: how the ranks join their gang (a
  Spark barrier stage with the driver's coordinator, an ordinary stage gated by the
  coordinator, or a barrier stage whose coordinator rank 0 hosts);
* the rank body ``fn(rank, rows)``;
* a source: an RDD (:class:`RddSource`, ``mapPartitionsWithIndex``) or a DataFrame
  (:class:`FrameSource`, ``mapInPandas``/``mapInArrow``), with an optional stage profile.

and get back the lazy RDD or DataFrame of the gang stage; nothing runs until an action.
The task side is one body, :func:`~sparkhydrogen.task.partition.run_rank`. What a
gang that returns values needs on top (one result per rank, collected and put in rank
order) is :func:`rank_results` and :func:`by_rank`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import serde
from ..errors import LaunchError
from ..task.lifecycle import gang_body
from ..task.partition import Join, run_rank
from .resources import arrow_profile_kwargs, with_profile

__all__ = ["RankCall", "RddSource", "FrameSource", "build_stage", "result_rows", "result_batches", "by_rank",
           "rank_results", "checked", "RESULT_SCHEMA"]

#: The schema of a DataFrame gang stage whose ranks each return one value.
RESULT_SCHEMA = "rank long, value binary"

RankFn = Callable[[int, Iterable[Any]], Iterable[Any]]


@dataclass(frozen=True)
class RankCall:
    """``fn(*args, **kwargs)`` on every rank: what ``run()`` and the launchers hand to a placement."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", None) or type(self.fn).__name__

    def __call__(self) -> Any:
        return self.fn(*self.args, **self.kwargs)


@dataclass(frozen=True)
class RddSource:
    """The gang stage maps the partitions of ``rdd`` (one rank per partition)."""

    rdd: Any
    preserves_partitioning: bool = False


@dataclass(frozen=True)
class FrameSource:
    """The gang stage is ``df.<method>(body, schema)``, ``method`` being ``mapInPandas`` or ``mapInArrow``."""

    df: Any
    method: str
    schema: Any

    def __post_init__(self) -> None:
        if self.method not in ("mapInPandas", "mapInArrow"):
            raise ValueError(f"a DataFrame gang stage is mapInPandas or mapInArrow, got {self.method!r}")


def build_stage(join: Join, fn: RankFn, source: RddSource | FrameSource, profile: Any = None) -> Any:
    """The lazy Spark object of one gang stage: ``fn(rank, rows)`` on every partition of ``source``.

    A barrier stage for the ``barrier`` and ``embedded`` joins, an ordinary one for
    ``gated``; ``profile`` (a pyspark ``ResourceProfile``) gives the stage its own task
    resources.

    Example:
        >>> build_stage(Join.barrier(spec), fn, RddSource(sc.parallelize(range(4), 4)))  # doctest: +SKIP
    """
    body = gang_body(functools.partial(run_rank, join, fn))
    if isinstance(source, RddSource):
        rdd = source.rdd.barrier() if join.barrier_stage else source.rdd
        return with_profile(rdd.mapPartitionsWithIndex(body, preservesPartitioning=source.preserves_partitioning),
                            profile)
    kwargs: dict[str, Any] = {"barrier": True} if join.barrier_stage else {}
    kwargs.update(arrow_profile_kwargs(profile))
    return getattr(source.df, source.method)(body, source.schema, **kwargs)


def result_rows(call: RankCall, rank: int, rows: Iterable[Any]) -> Iterator[tuple[int, bytes]]:
    """Rank body of an RDD gang stage returning ``call()``'s value: one ``(rank, pickled value)`` row."""
    yield rank, serde.dumps(call(), f"return value of rank {rank}")


def result_batches(call: RankCall, rank: int, batches: Iterable[Any]) -> Iterator[Any]:
    """Rank body of a DataFrame (``mapInArrow``) gang stage returning ``call()``'s value, as one Arrow row."""
    import pyarrow as pa

    payload = serde.dumps(call(), f"return value of rank {rank}")
    yield pa.RecordBatch.from_pydict({"rank": [rank], "value": [payload]},
                                     schema=pa.schema([("rank", pa.int64()), ("value", pa.binary())]))


def by_rank(pairs: Iterable[tuple[int, bytes]]) -> list[Any]:
    """Every rank's value, unpickled, in rank order."""
    return [serde.loads(payload, "return value") for _, payload in sorted(pairs, key=lambda kv: kv[0])]


def rank_results(stage: Any) -> Callable[[], list[tuple[int, bytes]]]:
    """The action collecting a value-returning gang stage (RDD or DataFrame) as ``(rank, payload)`` pairs."""
    if hasattr(stage, "mapPartitionsWithIndex"):  # an RDD
        return stage.collect  # type: ignore[no-any-return]
    return lambda: [(int(row["rank"]), bytes(row["value"])) for row in stage.collect()]


def checked(name: str, pairs: list[tuple[int, bytes]], world_size: int) -> list[Any]:
    """Every rank's value in rank order, after checking there is exactly one per rank (never silently short)."""
    ranks = sorted(rank for rank, _ in pairs)
    if ranks != list(range(world_size)):
        raise LaunchError(f"gang {name!r} returned {len(pairs)} results for {world_size} ranks "
                          f"(ranks {ranks[:16]}{'...' if len(ranks) > 16 else ''})")
    return by_rank(pairs)
