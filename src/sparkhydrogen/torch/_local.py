"""One local-mode rank: ``python -m sparkhydrogen.torch._proc local`` on the driver's machine.

The driver writes a pickled :class:`LocalRank` to this process's stdin. The process
joins the gang through the driver's coordinator exactly as a Spark task would
(authenticated connection, heartbeats, log streaming, failure reports), then runs
the rank's job (:func:`._rank.run_job`) and writes its result to ``out_dir``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import cloudpickle

from ..context import BarrierTaskContext
from ..coordinator.client import CoordinatorClient
from ..errors import CollectiveError, ErrorInfo
from ..launch.task import TaskSpec
from ..logstream import OutputCapture
from ._child import die_with_parent
from ._rank import RankJob, run_job

__all__ = ["LocalRank", "LOCAL_HOST", "error_path", "main", "result_path"]

#: Where local-mode ranks meet: they all run on the driver's machine.
LOCAL_HOST = "127.0.0.1"


@dataclass(frozen=True)
class LocalRank:
    spec: TaskSpec
    job: RankJob
    rank: int
    out_dir: str


def result_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, f"result-{rank}.pkl")


def error_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, f"error-{rank}.json")


def _run(task: LocalRank) -> int:
    spec = task.spec
    fingerprint = getattr(spec, "tls_fingerprint", None)  # the coordinator may serve TLS: pin its certificate
    pinned = {"tls_fingerprint": fingerprint} if fingerprint is not None else {}
    client = CoordinatorClient.connect((spec.host, spec.port), spec.gang_id, spec.secret, spec.connect_timeout,
                                       **pinned)
    try:
        world = client.register(task.rank, gang_attempt=spec.gang_attempt, stage_id=0, host=socket.gethostname(),
                                task_attempt_id=spec.gang_attempt * spec.world_size + task.rank)
        if spec.heartbeat_interval is not None:
            client.start_heartbeat(spec.heartbeat_interval)
        ctx = BarrierTaskContext(client, task.rank, world, None, spec.gang_attempt, spec.collective_timeout,
                                 spec.checkpoint_dir)
        BarrierTaskContext._set(ctx)
        capture = OutputCapture(client.log) if spec.stream_logs else contextlib.nullcontext()
        try:
            with capture:
                result = run_job(task.job, local_host=LOCAL_HOST)
        except BaseException as exc:
            info = ErrorInfo.from_exception(exc, task.rank, traceback.format_exc())
            with open(error_path(task.out_dir, task.rank), "w", encoding="utf-8") as fh:
                import json

                json.dump(info.to_json(), fh)
            if not isinstance(exc, CollectiveError):
                client.fail(info)
            traceback.print_exc()
            return 1
        with open(result_path(task.out_dir, task.rank), "wb") as fh:
            cloudpickle.dump(result, fh, protocol=pickle.HIGHEST_PROTOCOL)
        client.finish()
        return 0
    finally:
        BarrierTaskContext._set(None)
        client.close()


def main() -> int:
    die_with_parent()
    task = pickle.loads(sys.stdin.buffer.read())
    if not isinstance(task, LocalRank):
        print(f"{__name__}: expected a LocalRank on stdin, got {type(task).__name__}", file=sys.stderr)
        return 2
    return _run(task)
