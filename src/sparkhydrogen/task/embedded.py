"""The coordinator inside rank 0's task, for drivers that executors cannot reach (Spark Connect).

Rank 0 starts a coordinator on its executor's address and declares the gang with
the id and secret the client generated; its address (and TLS pin) reaches the other
ranks once, through Spark's native ``allGather`` (Spark's own, encrypted where Spark
encrypts); from then on every rank runs exactly as under classic Spark, through
:class:`~sparkhydrogen.task.lifecycle.RankSession`. Rank 0 keeps serving until every
peer has reported (bounded by ``spark.hydrogen.embedded.lingerTimeout``).

A failing rank's task error carries one marker line with the root cause (rank,
type, message) so the client can name it: there is no driver-side coordinator to ask.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from ..config import HydrogenConfig
from ..errors import CollectiveError, ErrorInfo, GangAbortedError, HydrogenError, LaunchError
from ..netaddr import join_host_port, split_host_port
from .lifecycle import RankSession, native_barrier_context, stage_world_size
from .spec import TaskSpec

__all__ = ["EmbeddedGang", "embedded_partition", "hosted_rank", "failure_marker", "parse_failure_marker",
           "RankTaskError"]

log = logging.getLogger("sparkhydrogen.task")

_MARKER = "[sparkhydrogen-failure]"
_MARKER_RE = re.compile(re.escape(_MARKER) + r" (\{.*\})\s*$", re.MULTILINE)  # one line: JSON escapes newlines


@dataclass(frozen=True)
class EmbeddedGang:
    """A gang whose coordinator rank 0 will host: what the client decides, carried in the task closure."""

    gang_id: str
    secret: bytes
    world_size: int | None  # None: as many ranks as the barrier stage has tasks
    config: HydrogenConfig
    gang_attempt: int = 0

    def __repr__(self) -> str:  # keep the secret out of logs
        return f"EmbeddedGang(gang_id={self.gang_id!r}, world_size={self.world_size}, attempt={self.gang_attempt})"


class RankTaskError(HydrogenError):
    """A rank's task failed; the message ends with a marker line the client parses (see :func:`failure_marker`)."""


def failure_marker(info: ErrorInfo) -> str:
    """One line describing a root cause, for the client to find in Spark's task error text."""
    data = {"rank": info.rank, "type": info.type, "message": info.message[:2000], "traceback": info.traceback[-8000:]}
    return f"{_MARKER} {json.dumps(data, separators=(',', ':'))}"


def parse_failure_marker(text: str) -> ErrorInfo | None:
    """The root cause a rank's task error names, if the text carries a marker (the first one wins)."""
    match = _MARKER_RE.search(text)
    if match is None:
        return None
    try:
        data = json.loads(match.group(1))
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    return ErrorInfo.from_json(data)


def _root_cause(exc: BaseException, rank: int) -> ErrorInfo:
    if isinstance(exc, GangAbortedError) and exc.cause is not None:
        return exc.cause
    if isinstance(exc, CollectiveError):  # the coordinator's verdict (mismatch, timeout), not this rank's bug
        return ErrorInfo(type(exc).__name__, str(exc))
    return ErrorInfo.from_exception(exc, rank, traceback.format_exc())


def _host_coordinator(gang: EmbeddedGang, world_size: int, host: str) -> Any:
    """Start rank 0's coordinator on ``host`` with the gang declared; nothing is left running if a step fails."""
    from ..coordinator.server import CoordinatorServer

    # the driver's advertised host names the driver, not this executor: tasks connect to ``host``
    coordinator = replace(gang.config.coordinator, host=host, advertise_host=None)
    server = CoordinatorServer(coordinator)
    server.start()
    try:
        server.add_gang(world_size, "embedded", gang_id=gang.gang_id, secret=gang.secret)
    except BaseException:
        server.stop()
        raise
    return server


def _offer(server: Any, host: str) -> str:
    """What rank 0 shares through ``allGather``: ``host:port#fingerprint`` (IPv6 hosts in brackets)."""
    return f"{join_host_port(host, server.address[1])}#{server.tls_fingerprint or ''}"


def _stop_coordinator(server: Any, gang_id: str, linger: float | None, world_size: int = 1,
                      join_bound: float = 0.0) -> None:
    """Stop rank 0's coordinator, first serving the peers for up to ``linger`` s (``None``: they never learnt it)."""
    try:
        if linger is not None:
            _linger(server, gang_id, linger, world_size, join_bound)
    finally:
        server.stop()


def _linger(server: Any, gang_id: str, timeout: float, world_size: int = 1, join_bound: float = 0.0) -> None:
    """Rank 0 keeps serving until the other ranks are done: reported, or told of an abort and gone.

    Every rank learnt the address in the same ``allGather``, so each one connects: rank 0
    also waits (at most ``join_bound`` s, the connect timeout) until all ``world_size`` have
    registered, so that a rank that failed at once does not stop serving before a slower
    peer has even connected (the peer would then fail with "connection refused", and its
    error, not the root cause, could be the one Spark reports).
    """
    started = time.monotonic()
    deadline = started + timeout
    next_note = started + 30.0
    pause = threading.Event()

    def done() -> bool:
        if not server.gang_settled(gang_id):
            return False
        footprint = server.footprint()
        everyone = footprint["members"] >= world_size or time.monotonic() > started + join_bound
        return bool(footprint["connections"] == 0 and everyone)

    while not done():
        now = time.monotonic()
        if now > deadline:
            log.warning("rank 0 stops the embedded coordinator after %.0f s with ranks still connected "
                        "(spark.hydrogen.embedded.lingerTimeout)", timeout)
            return
        if now > next_note:
            next_note = now + 30.0
            log.info("rank 0 keeps serving its peers (%d still connected)", server.stats()["connections"])
        pause.wait(0.02)


def embedded_partition(gang: EmbeddedGang, fn: Callable[[int, Iterable[Any]], Iterable[Any]],
                       rows: Iterable[Any]) -> Iterator[Any]:
    """Body of one barrier task whose gang's coordinator runs in rank 0 (``mapInArrow``/``mapInPandas`` signature)."""
    native = native_barrier_context()
    yield from hosted_rank(gang, native, native.partitionId(), fn, rows)


def hosted_rank(gang: EmbeddedGang, native: Any, rank: int, fn: Callable[[int, Iterable[Any]], Iterable[Any]],
                rows: Iterable[Any]) -> Iterator[Any]:
    """Rank ``rank`` of a gang whose coordinator rank 0 hosts: rank 0 starts it, every rank learns its address
    through Spark's native ``allGather``, then joins as under classic Spark (the join mode ``embedded`` of
    :func:`sparkhydrogen.task.partition.run_rank`)."""
    infos = native.getTaskInfos()
    world_size = stage_world_size(gang.world_size, len(infos))
    server = None
    shared = False  # whether the peers learnt rank 0's address (then it serves them before stopping)
    try:
        offer = ""
        if rank == 0:
            host = split_host_port(infos[0].address)[0]
            server = _host_coordinator(gang, world_size, host)
            offer = _offer(server, host)
        address, _, pin = native.allGather(offer)[0].partition("#")  # once per gang: the ~1 s native round
        shared = True
        host, port = split_host_port(address)
        if port is None:
            raise LaunchError(f"rank 0 shared the coordinator address {address!r} without a port: the ranks of "
                              "this gang run different spark-hydrogen versions; install the same one everywhere")
        spec = TaskSpec.build(gang.config.launch, gang_id=gang.gang_id, secret=gang.secret, host=host, port=port,
                              world_size=world_size, gang_attempt=gang.gang_attempt, tls_fingerprint=pin or None)
        try:
            with RankSession(spec, rank, native=native, stage_id=native.stageId(),
                             task_attempt_id=native.taskAttemptId()):
                yield from fn(rank, rows)
        except GeneratorExit:
            raise
        except BaseException as exc:
            cause = _root_cause(exc, rank)
            raise RankTaskError(f"rank {rank} failed: {cause.describe()}\n{failure_marker(cause)}") from exc
    finally:
        if server is not None:
            _stop_coordinator(server, gang.gang_id, gang.config.launch.embedded_linger if shared else None,
                              world_size, gang.config.launch.connect_timeout + 5.0)
