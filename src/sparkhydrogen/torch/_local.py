"""One local-mode rank: ``python -m sparkhydrogen.torch._proc local`` on the driver's machine.

The driver writes a pickled :class:`LocalRank` to this process's stdin. The process
joins the gang through the driver's coordinator exactly as a Spark task would
(authenticated connection, heartbeats, log streaming, failure reports), then runs
the rank's job (:func:`._rank.run_job`) and writes its result to ``out_dir``.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import traceback
from dataclasses import dataclass

from .. import serde
from ..task.child import die_with_parent
from ..task.lifecycle import RankSession
from ..task.spec import TaskSpec
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
    """Join the gang as ``task.rank`` (outside Spark: no native task), run the job, leave the result for the driver."""
    try:
        with RankSession(task.spec, task.rank) as _ctx:
            result = run_job(task.job, local_host=LOCAL_HOST)
            data = serde.dumps(result, f"return value of rank {task.rank}")  # PayloadError: reported as the rank's
            with open(result_path(task.out_dir, task.rank), "wb") as fh:
                fh.write(data)
    except BaseException as exc:
        from ..errors import ErrorInfo

        info = ErrorInfo.from_exception(exc, task.rank, traceback.format_exc())
        with open(error_path(task.out_dir, task.rank), "w", encoding="utf-8") as fh:
            json.dump(info.to_json(), fh)
        traceback.print_exc()
        return 1
    return 0


def main() -> int:
    die_with_parent()
    task = pickle.loads(sys.stdin.buffer.read())
    if not isinstance(task, LocalRank):
        print(f"{__name__}: expected a LocalRank on stdin, got {type(task).__name__}", file=sys.stderr)
        return 2
    return _run(task)
