"""Why a gang is stuck or slow: live status, and the report of a finished gang attempt.

The driver's coordinator sees every rank's every collective call as it happens.
:func:`status` shows the live gangs of this application rank by rank (where each rank
is, which collective it waits in and for whom, when it was last heard from);
:func:`report` tells a finished attempt's story: which rank its peers waited for
(stragglers), and the timeline of its collective rounds as a Chrome trace or a
self-contained HTML page. See ``docs/diagnosis.md``.

Spark Connect: a gang's coordinator runs inside its rank 0's task, out of the client's
reach; :func:`status` and :func:`report` see only gangs of the client's own coordinator
(ranks run as local processes) and say so in a log line.

Example:
    >>> import sparkhydrogen as h2
    >>> for gang in h2.status():            # doctest: +SKIP
    ...     print(gang)                     # which rank is in which call, waiting for whom
    >>> h2.report().save("gang.html")       # doctest: +SKIP
"""

from __future__ import annotations

import logging

from .coordinator.timeline import RoundRecord, Straggler
from .coordinator.views import GangReport, GangStatus, RankState, RankStatus
from .errors import GangNotFoundError
from .launch.service import DriverService, running_services

__all__ = ["status", "report", "GangStatus", "RankStatus", "RankState", "GangReport", "RoundRecord", "Straggler"]

log = logging.getLogger("sparkhydrogen.diagnosis")


def _services() -> list[DriverService]:
    services = running_services()
    if any(s.app_id.startswith("connect-") for s in services):
        log.info("spark-hydrogen: under Spark Connect each gang's coordinator runs inside its rank 0's task, out of "
                 "this client's reach: status() and report() show only gangs whose ranks run on this machine")
    return services


def status() -> list[GangStatus]:
    """The live gangs of this application, rank by rank: a list of :class:`GangStatus`.

    Each has ``name``, ``gang_id``, ``attempt``, ``state``, ``placement`` and ``ranks``
    (:class:`RankStatus`: ``host``, ``pid``, ``state``, ``call`` such as ``"barrier #12"``,
    ``waiting_for``, ``seconds_in_call``, ``last_heard``). Thread-safe; call it from any
    thread while a job runs. Empty when no coordinator has started or no gang runs.

    Example:
        >>> stuck = [r for g in sparkhydrogen.status() for r in g.ranks if r.waiting_for]   # doctest: +SKIP
    """
    return [gang for service in _services() for gang in service.server.status()]


def report(gang: str | GangStatus | None = None) -> GangReport:
    """The :class:`GangReport` of the most recent finished gang attempt, or of ``gang``.

    ``gang``: a :class:`GangStatus`, a gang id (or its first 8 or more characters, as
    logs print it) or a gang name. Only the newest few attempts are kept (8 per
    coordinator); raises :class:`~sparkhydrogen.GangNotFoundError` (a ``LookupError``) when none matches.

    Example:
        >>> r = sparkhydrogen.report()        # doctest: +SKIP
        >>> r.stragglers, print(r.summary)    # doctest: +SKIP
        >>> r.save("timeline.json")           # open in https://ui.perfetto.dev  # doctest: +SKIP
    """
    if gang is not None and not isinstance(gang, (str, GangStatus)):
        raise TypeError(f"gang must be a GangStatus, a gang id or a gang name, got {type(gang).__name__}")
    kept = [r for service in _services() for r in service.server.reports()]
    if not kept:
        raise GangNotFoundError("no finished gang attempt to report on: no gang has finished in this application yet "
                          "(reports are kept for the 8 most recent attempts of the driver's coordinator)")
    if gang is None:
        return kept[-1]
    if isinstance(gang, GangStatus):
        found = [r for r in kept if r.gang_id == gang.gang_id and r.attempt == gang.attempt]
    else:
        found = [r for r in kept if r.gang_id == gang or (len(gang) >= 8 and r.gang_id.startswith(gang))
                 or (r.name and r.name == gang)]
    if not found:
        known = ", ".join(sorted({f"{r.gang_id[:8]} ({r.name or 'unnamed'})" for r in kept}))
        raise GangNotFoundError(f"no finished gang attempt matches {gang if isinstance(gang, str) else gang.gang_id!r} "
                          f"among the {len(kept)} kept: {known}")
    return found[-1]
