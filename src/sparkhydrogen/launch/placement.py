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
same code for all of them, and every placement builds its stage with the one stage
builder (:func:`~.stage.build_stage`). :func:`placement_for` picks one for a target,
by the pure rule of :mod:`.choice`.
"""

from __future__ import annotations

import functools
import logging
import secrets
import uuid
from collections.abc import Callable
from typing import Any, Optional, Protocol

from ..coordinator.handles import LogRecord
from ..task.data import fed
from ..task.embedded import EmbeddedGang, parse_failure_marker
from ..task.partition import Join
from ..tracking.sink import sink_for_launch
from . import choice
from .coordinated import CoordinatedStage
from .data import GangData
from .resources import StageResources, stage_profile
from .runner import declare, failure_error, launching, translate
from .session import SparkTarget
from .stage import (
    RESULT_SCHEMA,
    FrameSource,
    RankCall,
    RddSource,
    build_stage,
    checked,
    rank_results,
    result_batches,
    result_rows,
)

__all__ = ["RankCall", "Placement", "NativeBarrierStage", "EmbeddedCoordinator", "CoordinatedStage", "placement_for",
           "embedded_gang"]

log = logging.getLogger("sparkhydrogen.launch")

OnLog = Optional[Callable[[LogRecord], None]]  # noqa: UP045  (a runtime alias: keep it valid on Python 3.10)


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
        profile, asks = stage_profile(self.target, self.resources)
        gang, attempt = declare(self.target, world_size, name, on_log=on_log, profile=profile, resources=asks)
        source = RddSource(self.target.parallelize(world_size))
        stage = build_stage(Join.barrier(gang.spec(attempt)), functools.partial(result_rows, call), source, profile)
        try:
            pairs = rank_results(stage)()
        except Exception as exc:
            raise translate(gang, exc, attempt) from exc
        gang.settle()  # every rank's finish (and streamed output) has arrived
        return checked(name, pairs, world_size)


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
        if sink_for_launch(name) is not None:
            log.info("sparkhydrogen.mlflow: under Spark Connect the ranks' log_metric calls cannot reach the driver's "
                     "MLflow run (the coordinator runs in rank 0); they are dropped")
        rank_fn: Any = functools.partial(result_batches, call)
        if self.data is not None:
            rank_fn = functools.partial(fed, rank_fn, True)
            df = self.data.source
            log.info("gang %s: data %s", name, self.data.how)
        else:
            df = self.target.spark.range(0, world_size, 1, world_size)
        stage = build_stage(Join.embedded(embedded_gang(self.target, world_size)), rank_fn,
                            FrameSource(df, "mapInArrow", RESULT_SCHEMA), stage_profile(self.target, self.resources)[0])
        try:
            pairs = rank_results(stage)()
        except Exception as exc:
            raise embedded_error(name, exc) from exc
        return checked(name, pairs, world_size)


def placement_for(target: SparkTarget, resources: StageResources | None = None,
                  data: GangData | None = None) -> Placement:
    """The placement for a target, by :func:`.choice.choose` (see :mod:`.choice` for the rule)."""
    settings = choice.settings_of(target, data=data is not None)
    chosen = choice.choose(settings)
    if chosen == "embedded":
        return EmbeddedCoordinator(target, resources, data)
    if chosen == "coordinated":
        if data is None:
            log.info("spark-hydrogen: gangs run as coordinated stages (%s)", choice.reason(settings))
        return CoordinatedStage(target, resources=resources, data=data)
    return NativeBarrierStage(target, resources)
