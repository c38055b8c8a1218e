"""Placement: where a gang's ranks run and who guarantees they start all together.

* :class:`NativeBarrierStage` (classic Spark): one Spark barrier stage, placed
  all-or-nothing by Spark's scheduler; the coordinator runs in the driver.
* :class:`EmbeddedCoordinator` (Spark Connect): one DataFrame barrier stage
  (``mapInArrow(..., barrier=True)``); the coordinator runs inside rank 0's task.
* :class:`~.coordinated.CoordinatedStage` (classic Spark, dynamic allocation): an
  ordinary stage whose ranks wait at the coordinator's start gate until all have
  joined (all-or-nothing by the coordinator, not the scheduler).
* Launchers may bring their own (the torch launcher's local mode starts processes
  on the driver's machine).

Everything above placement (collectives, aborts, retries, checkpoints, logs) is the
same code for all of them. :func:`placement_for` picks one for a target.
"""

from __future__ import annotations

import functools
import logging
import secrets
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from .. import serde
from ..coordinator.handles import LogRecord
from ..task.data import fed
from ..task.embedded import EmbeddedGang, embedded_partition, parse_failure_marker
from ..task.lifecycle import gang_body, run_partition
from .coordinated import CoordinatedStage, placement_reason, uses_coordinated
from .data import GangData
from .resources import StageResources, arrow_profile_kwargs, stage_profile, with_profile
from .runner import declare, failure_error, launching, translate
from .session import SparkTarget

__all__ = ["RankCall", "Placement", "NativeBarrierStage", "EmbeddedCoordinator", "CoordinatedStage", "placement_for",
           "embedded_gang"]

log = logging.getLogger("sparkhydrogen.launch")

OnLog = Optional[Callable[[LogRecord], None]]  # noqa: UP045  (a runtime alias: keep it valid on Python 3.10)


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


def _result_rows(call: RankCall, rank: int, rows: Iterable[Any]) -> Iterator[tuple[int, bytes]]:
    yield rank, serde.dumps(call(), f"return value of rank {rank}")


def _result_batches(call: RankCall, rank: int, batches: Iterable[Any]) -> Iterator[Any]:
    import pyarrow as pa

    payload = serde.dumps(call(), f"return value of rank {rank}")
    yield pa.RecordBatch.from_pydict({"rank": [rank], "value": [payload]},
                                     schema=pa.schema([("rank", pa.int64()), ("value", pa.binary())]))


def _by_rank(pairs: Iterable[tuple[int, bytes]]) -> list[Any]:
    return [serde.loads(payload, "return value") for _, payload in sorted(pairs, key=lambda kv: kv[0])]


class Placement(Protocol):
    """Starts every rank of one gang attempt together and returns their results in rank order."""

    name: str

    def run(self, call: RankCall, world_size: int, *, name: str, on_log: OnLog = None) -> list[Any]:
        ...


class NativeBarrierStage:
    """Classic Spark: the gang is one Spark barrier stage of ``world_size`` tasks."""

    name = "native barrier stage"

    def __init__(self, target: SparkTarget, resources: StageResources | None = None) -> None:
        self.target = target
        self.resources = resources

    def run(self, call: RankCall, world_size: int, *, name: str, on_log: OnLog = None) -> list[Any]:
        sc = self.target.sc
        profile, asks = stage_profile(self.target, self.resources)
        gang, attempt = declare(self.target, world_size, name, on_log=on_log, profile=profile, resources=asks)
        body = gang_body(functools.partial(run_partition, gang.spec(attempt), functools.partial(_result_rows, call)))
        rdd = with_profile(sc.parallelize(range(world_size), world_size).barrier().mapPartitionsWithIndex(body),
                           profile)
        try:
            pairs = rdd.collect()
        except Exception as exc:
            raise translate(gang, exc, attempt) from exc
        gang.settle()  # every rank's finish (and streamed output) has arrived
        return _by_rank(pairs)


def embedded_gang(target: SparkTarget, world_size: int | None) -> EmbeddedGang:
    """A new gang for rank 0 to host, numbered as the current attempt of the enclosing scope."""
    return EmbeddedGang(gang_id=uuid.uuid4().hex, secret=secrets.token_bytes(32), world_size=world_size,
                        config=target.config(), gang_attempt=launching())


def embedded_error(name: str, exc: BaseException) -> Exception:
    """Our error for a failed Connect gang job, from the root cause its failing task named."""
    return failure_error(name, parse_failure_marker(str(exc)), exc)


class EmbeddedCoordinator:
    """Spark Connect: one DataFrame barrier stage; rank 0's task hosts the coordinator."""

    name = "embedded coordinator (Spark Connect)"

    def __init__(self, target: SparkTarget, resources: StageResources | None = None,
                 data: GangData | None = None) -> None:
        self.target = target
        self.resources = resources
        self.data = data

    def run(self, call: RankCall, world_size: int, *, name: str, on_log: OnLog = None) -> list[Any]:
        if on_log is not None:
            log.info("stream_logs: under Spark Connect the ranks' output stays in the executors' logs")
        gang = embedded_gang(self.target, world_size)
        rank_fn: Any = functools.partial(_result_batches, call)
        if self.data is not None:
            rank_fn = functools.partial(fed, rank_fn, True)
            df = self.data.source
            log.info("gang %s: data %s", name, self.data.how)
        else:
            df = self.target.spark.range(0, world_size, 1, world_size)
        body = gang_body(functools.partial(embedded_partition, gang, rank_fn))
        extra = arrow_profile_kwargs(stage_profile(self.target, self.resources)[0])
        try:
            rows = df.mapInArrow(body, "rank long, value binary", barrier=True, **extra).collect()
        except Exception as exc:
            raise embedded_error(name, exc) from exc
        return _by_rank((int(row["rank"]), bytes(row["value"])) for row in rows)


def placement_for(target: SparkTarget, resources: StageResources | None = None,
                  data: GangData | None = None) -> Placement:
    """The placement for a target: an embedded coordinator under Connect; else a native barrier stage, or a
    coordinated stage when Spark would refuse a barrier stage (dynamic allocation),
    ``spark.hydrogen.launch.placement=coordinated`` says so, or the gang reads ``data``
    (its shares are coalesced partitions, which Spark refuses in a barrier stage).
    """
    if target.connect:
        return EmbeddedCoordinator(target, resources, data)
    if data is not None:
        return CoordinatedStage(target, resources=resources, data=data)
    if uses_coordinated(target):
        log.info("spark-hydrogen: gangs run as coordinated stages (%s)", placement_reason(target))
        return CoordinatedStage(target, resources=resources)
    return NativeBarrierStage(target, resources)
