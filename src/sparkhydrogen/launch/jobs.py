"""Job identity by Spark job tags: ours sit beside the user's job group, tags and local properties.

Each gang attempt's Spark jobs carry one tag (``SparkContext.addJobTag``, or the
Connect session's ``addTag``), so spark-hydrogen can cancel exactly them
(``cancelJobsWithTag``) while the user's own job group stays in force: cancelling the
user's group cancels a gang started inside it. Every local property set here is put
back as it was.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from types import TracebackType

from ..coordinator.state import AttemptKey
from ..errors import ErrorInfo
from .session import SparkTarget

__all__ = ["AttemptTag", "is_cancellation", "stage_canceller"]

log = logging.getLogger("sparkhydrogen.launch")

#: How Spark words a job cancelled from outside (DAGScheduler), and how Connect reports an interrupted operation.
_CANCELLED = re.compile(r"Job \d+ cancelled|OPERATION_CANCELED|operation was interrupted|INTERRUPTED")


class AttemptTag:
    """``with AttemptTag(target, tag):`` tags the Spark jobs this thread starts; :meth:`cancel` stops them.

    Inside, jobs also interrupt their task threads when cancelled, so ranks busy
    outside a collective stop at once; the user's previous setting is restored after.
    """

    def __init__(self, target: SparkTarget, tag: str) -> None:
        self.target = target
        self.tag = tag
        self._interrupt: str | None = None
        self._entered = False

    def __enter__(self) -> AttemptTag:
        self._interrupt = self.target.tag_jobs(self.tag)
        self._entered = True
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._entered:
            return
        self._entered = False
        self.target.untag_jobs(self.tag, self._interrupt)

    def cancel(self, why: str) -> None:
        """Cancel every running job carrying this tag (from any thread)."""
        try:
            self.target.cancel_tagged(self.tag)
            log.info("cancelled the Spark jobs tagged %s after: %s", self.tag, why)
        except Exception as exc:  # the context may be stopping; nothing else to cancel then
            log.debug("could not cancel jobs tagged %s: %s", self.tag, exc)


def is_cancellation(exc: BaseException) -> str | None:
    """The line saying a failed Spark action was cancelled from outside (job group, tag, interrupt), if it was."""
    for line in str(exc).splitlines():
        if _CANCELLED.search(line):
            return line.strip()
    return None


def stage_canceller(target: SparkTarget) -> Callable[[AttemptKey, ErrorInfo], None]:
    """An abort hook cancelling the aborted attempt's Spark stage (bare ``barrier()`` jobs carry no tag of ours)."""

    def cancel(key: AttemptKey, cause: ErrorInfo) -> None:
        stage = key[1]
        if stage < 0:
            return
        try:
            if target.cancel_stage(stage, f"spark-hydrogen gang aborted: {cause.summary()[:1000]}"):
                log.info("cancelled Spark stage %d after: %s", stage, cause.describe().splitlines()[0])
        except Exception as exc:  # the context may be stopping
            log.debug("could not cancel stage %d: %s", stage, exc)

    return cancel
