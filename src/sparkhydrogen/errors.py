"""One error tree for spark-hydrogen, rooted at :class:`HydrogenError`.

Every error the library raises on purpose is a ``HydrogenError``.  Errors that
cross the wire (coordinator -> task) are described by :class:`ErrorInfo`, a
plain JSON-able record, and rebuilt into the right class by :func:`from_info`,
so a task sees the same exception type the coordinator meant.

Validation of arguments raises the built-in ``TypeError``/``ValueError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "HydrogenError",
    "NotInGangError",
    "CollectiveError",
    "CollectiveTimeoutError",
    "CollectiveMismatchError",
    "GangAbortedError",
    "RankLostError",
    "PartitionClosedError",
    "RegistrationError",
    "GangNotFoundError",
    "PayloadError",
    "CheckpointError",
    "CoordinatorConnectionError",
    "AuthenticationError",
    "ProtocolError",
    "LaunchError",
    "InsufficientSlotsError",
    "GpuPlacementError",
    "GangFailedError",
    "GangCancelledError",
    "GangSetupError",
    "GangResizing",
    "ErrorInfo",
    "from_info",
]


class HydrogenError(Exception):
    """Root of every error raised by spark-hydrogen."""


class NotInGangError(HydrogenError, RuntimeError):
    """A task-side API was used outside a spark-hydrogen barrier task."""


class CollectiveError(HydrogenError):
    """A collective call (barrier, allGather, broadcast) could not complete."""


class CollectiveTimeoutError(CollectiveError, TimeoutError):
    """A collective did not complete within its timeout; the message names the missing ranks."""


class CollectiveMismatchError(CollectiveError):
    """Ranks made different collective calls at the same position in their call sequence."""


class GangAbortedError(CollectiveError):
    """The gang attempt was aborted because some rank failed.

    Attributes:
        failed_rank: the rank whose failure aborted the gang (``None`` if unknown).
        cause: the :class:`ErrorInfo` describing that rank's failure, if known.
    """

    def __init__(
        self, message: str, failed_rank: int | None = None, cause: ErrorInfo | None = None
    ) -> None:
        super().__init__(message)
        self.failed_rank = failed_rank
        self.cause = cause

    def __reduce__(self) -> Any:
        return (type(self), (str(self), self.failed_rank, self.cause))


class RankLostError(CollectiveError):
    """A rank's process died or lost its connection to the coordinator without reporting an error.

    The message names the rank, its host and pid, and when the coordinator last heard
    from it; its peers see it as the cause of their :class:`GangAbortedError`.
    """


class PartitionClosedError(CollectiveError):
    """A rank's partition was closed early by its consumer (e.g. a chained ``take()``) while
    its peers wait in, or later make, a collective call it will never make."""


class RegistrationError(HydrogenError):
    """A task could not join its gang (stale attempt, duplicate rank, unknown gang)."""


class GangNotFoundError(HydrogenError, LookupError):
    """No gang matches the id or name given to :func:`~sparkhydrogen.stacks` or :func:`~sparkhydrogen.report`.

    The message lists the gangs there are (live ones, or the finished attempts kept).
    """


class PayloadError(HydrogenError, TypeError):
    """A collective payload could not be serialised or exceeds the configured limit."""


class CheckpointError(HydrogenError, OSError):
    """Checkpoint state could not be written to, or read back from, ``spark.hydrogen.checkpoint.dir``."""


class CoordinatorConnectionError(HydrogenError, ConnectionError):
    """The task lost (or could not open) its connection to the coordinator."""


class AuthenticationError(CoordinatorConnectionError):
    """The coordinator and a peer could not prove they share the gang's secret."""


class ProtocolError(CoordinatorConnectionError):
    """Bytes on the coordinator channel do not follow the spark-hydrogen wire protocol."""


class LaunchError(HydrogenError):
    """The driver could not launch, or complete, a gang."""


class InsufficientSlotsError(LaunchError):
    """The cluster has fewer concurrent task slots than the gang needs."""


class GpuPlacementError(LaunchError, ValueError):
    """The GPUs Spark assigned to a rank cannot be mapped to devices of its process."""


class GangFailedError(LaunchError):
    """A gang job failed; carries the rank that failed first and its original error.

    Attributes:
        failed_rank: the rank whose failure ended the (last) attempt, or ``None`` if unknown.
        cause: the :class:`ErrorInfo` of that rank's failure, if known.
        attempts: one line per failed attempt when the gang was retried.
    """

    def __init__(
        self, message: str, failed_rank: int | None = None, cause: ErrorInfo | None = None,
        attempts: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.failed_rank = failed_rank
        self.cause = cause
        self.attempts = attempts

    def __reduce__(self) -> Any:
        return (type(self), (str(self), self.failed_rank, self.cause, self.attempts))


class GangCancelledError(LaunchError):
    """The gang's Spark job was cancelled from outside (its job group, a tag, ``cancelAllJobs``); never retried."""


class GangSetupError(LaunchError):
    """No rank could start: its task failed before joining the gang in a way a retry repeats.

    For example ``sparkhydrogen`` (or the user's module) is not importable on the
    executors, the task's closure does not unpickle there, or the coordinator's address
    is unreachable from them. The message names the Python exception; never retried.
    """


class GangResizing(HydrogenError):
    """Raised by ``ctx.checkpoint`` in every rank of an elastic gang that grows there (``grow="checkpoint"``).

    Not a failure: the checkpoint is committed, and the driver relaunches the gang at
    once at its larger size, where ``ctx.restore()`` resumes from that checkpoint. Let it
    propagate out of the rank's function (do not catch it).
    """


@dataclass(frozen=True)
class ErrorInfo:
    """A JSON-able description of an error, as it travels on the coordinator channel.

    ``type`` is the class name; for errors raised by user code it is the
    original exception's qualified name and ``traceback`` its formatted traceback.
    """

    type: str
    message: str
    rank: int | None = None
    traceback: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "message": self.message,
            "rank": self.rank,
            "traceback": self.traceback,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ErrorInfo:
        extra = data.get("extra") or {}
        cause = extra.get("cause")
        if isinstance(cause, Mapping):
            extra = {**extra, "cause": dict(cause)}
        return cls(
            type=str(data.get("type", "HydrogenError")),
            message=str(data.get("message", "")),
            rank=data.get("rank") if isinstance(data.get("rank"), int) else None,
            traceback=str(data.get("traceback", "")),
            extra=dict(extra),
        )

    @classmethod
    def from_exception(cls, exc: BaseException, rank: int | None, traceback: str = "") -> ErrorInfo:
        kind = type(exc)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        return cls(type=name, message=str(exc), rank=rank, traceback=traceback)

    @property
    def others(self) -> tuple[ErrorInfo, ...]:
        """Failures other ranks reported after this one, the attempt's first (in the order they arrived).

        The coordinator adds them while the aborted attempt settles: a rank whose own
        teardown broke its peers' connections often reports *after* the peers it broke,
        so the first report is not always the root cause.
        """
        return tuple(ErrorInfo.from_json(o) for o in self.extra.get("others") or () if isinstance(o, Mapping))

    def with_other(self, other: ErrorInfo) -> ErrorInfo:
        """This failure with ``other`` (a later report of another rank) added to :attr:`others`."""
        others = [dict(o) for o in self.extra.get("others") or () if isinstance(o, Mapping)]
        return replace(self, extra={**self.extra, "others": [*others, other.to_json()]})

    def clipped(self, max_bytes: int) -> ErrorInfo:
        """This error, cut so that its JSON (as framed on the wire) takes at most ``max_bytes`` bytes.

        A rank's report travels in a frame's control header, whose size the coordinator
        limits (64 KiB); a larger one would cost the connection and the error with it. So
        the head and tail of the message and of the traceback are kept (the tail of a
        traceback names the exception, its head where it started), the middle is replaced
        by a line saying how many characters were cut, and ``extra`` is dropped if large.

        >>> info = ErrorInfo("KeyError", "k" * 100_000, 0).clipped(4096)
        >>> len(info.message) < 4096, "cut 9" in info.message
        (True, True)
        """
        if _json_size(self.to_json()) <= max_bytes:
            return self
        extra = self.extra if _json_size(dict(self.extra)) <= max_bytes // 8 else {}
        allow = max_bytes
        while True:
            clipped = replace(self, message=_clip(self.message, allow // 4, "message"),
                              traceback=_clip(self.traceback, allow // 2, "traceback"), extra=extra)
            if _json_size(clipped.to_json()) <= max_bytes or allow < 64:
                return clipped
            allow //= 2  # escapes (\u00e9 for é, \n) made the JSON larger than its characters

    def headline(self, limit: int = 300) -> str:
        """The first line of :meth:`describe`, at most ``limit`` characters.

        >>> ErrorInfo("ValueError", "bad input\\nmore", rank=3).headline()
        'rank 3 raised ValueError: bad input'
        """
        line = (self.describe().splitlines() or [""])[0]
        return line if len(line) <= limit else line[: limit - 3] + "..."

    def summary(self, limit: int = 300) -> str:
        """:meth:`headline`, then each of :attr:`others` (``; then rank 1 raised ...``).

        >>> first = ErrorInfo("OSError", "peer closed", rank=0)
        >>> first.with_other(ErrorInfo("ZeroDivisionError", "boom", rank=1)).summary()
        'rank 0 raised OSError: peer closed; then rank 1 raised ZeroDivisionError: boom'
        """
        return "; then ".join(e.headline(limit) for e in (self, *self.others))

    def others_note(self) -> str:
        """``""``, or a line naming the failures of :attr:`others` (for an error message's end)."""
        others = self.others
        if not others:
            return ""
        more = self.extra.get("others_more")
        return "\nother ranks failed too: " + "; ".join(o.headline() for o in others) + (
            f" (and {more} more)" if isinstance(more, int) and more > 0 else "")

    def describe(self) -> str:
        """One line: ``rank 3 raised ValueError: bad input`` (or ``Type: message`` for coordinator verdicts).

        A rank that did not raise anything (its process died, its partition was closed
        early) is described by the coordinator's own sentence, which names the rank:
        ``rank 3's process died or lost its connection to the coordinator (...)``.
        """
        if self.type in _SELF_DESCRIBING:
            return self.message
        if self.rank is None:
            return f"{self.type}: {self.message}"
        return f"rank {self.rank} raised {self.type}: {self.message}"


def _json_size(data: Mapping[str, Any]) -> int:
    return len(json.dumps(data, separators=(",", ":"), default=str).encode("utf-8"))


def _clip(text: str, keep: int, what: str) -> str:
    """``text`` with at most ``keep`` characters of it kept: its head and tail, and a line saying what was cut.

    >>> _clip("abcdefghij", 4, "message")
    'ab\\n[... spark-hydrogen cut 6 of 10 characters of this message here ...]\\nij'
    """
    if len(text) <= keep:
        return text
    head = keep // 2
    tail = keep - head
    note = f"\n[... spark-hydrogen cut {len(text) - keep:,} of {len(text):,} characters of this {what} here ...]\n"
    return text[:head] + note + text[len(text) - tail:]


#: Verdicts about a rank that raised nothing: their message is the whole description. (The coordinator's
#: ``CollectiveTimeoutError`` names the ranks that never arrived; a rank's own report has a module-qualified type.)
_SELF_DESCRIBING = frozenset({"RankLostError", "PartitionClosedError", "CollectiveTimeoutError"})


_WIRE_TYPES: dict[str, type[HydrogenError]] = {
    cls.__name__: cls
    for cls in (
        HydrogenError,
        CollectiveError,
        CollectiveTimeoutError,
        CollectiveMismatchError,
        RankLostError,
        PartitionClosedError,
        RegistrationError,
        PayloadError,
        CheckpointError,
        CoordinatorConnectionError,
        AuthenticationError,
        ProtocolError,
    )
}


def from_info(info: ErrorInfo) -> HydrogenError:
    """Rebuild the exception the coordinator described (task side)."""
    if info.type == "GangAbortedError":
        cause_data = info.extra.get("cause")
        cause = ErrorInfo.from_json(cause_data) if isinstance(cause_data, Mapping) else None
        failed = info.extra.get("failed_rank")
        return GangAbortedError(info.message, failed if isinstance(failed, int) else None, cause)
    return _WIRE_TYPES.get(info.type, HydrogenError)(info.message)
