"""Executor side: what runs inside a rank (a Spark task, or a process a launcher started).

Nothing here imports the driver-side :mod:`sparkhydrogen.launch`.
"""

from .lifecycle import RankSession, gang_body, is_gang_body, report_failure
from .partition import Join, run_rank
from .spec import TaskSpec

__all__ = ["Join", "RankSession", "TaskSpec", "gang_body", "is_gang_body", "report_failure", "run_rank"]
