"""``sparkhydrogen.stacks(gang)``: every rank's current Python stacks, collected through the coordinator.

Validates its arguments, finds the gang among the live gangs of this process's
coordinators, then hands over to :meth:`CoordinatorServer.stacks`.
"""

from __future__ import annotations

import logging
from typing import Any

from ..coordinator.server import CoordinatorServer
from ..coordinator.stacks import DEFAULT_TIMEOUT
from ..errors import GangNotFoundError
from .service import running_services

__all__ = ["stacks", "find_live_gang"]

log = logging.getLogger("sparkhydrogen.launch")

#: A gang id prefix at least this long is accepted when it names one live gang (messages show 8 characters).
MIN_ID_PREFIX = 6


def stacks(gang: Any, timeout: float = DEFAULT_TIMEOUT) -> dict[int, str]:
    """Every rank's current Python stacks (all threads), ``{rank: text}``, for a live gang of this application.

    ``gang`` is a gang id (or a prefix of at least 6 characters of one, as messages
    show it), a gang name, or any object with a ``gang_id`` attribute (such as a gang
    status). Each rank answers with the stack of every thread (most recent call last).
    A rank that does not answer within ``timeout`` seconds gets a text saying so; if its
    Python threads cannot run because one holds the GIL in a long C call, that text
    carries the dump faulthandler's watchdog wrote for it without the GIL (most recent
    call first). A rank not joined yet, finished, or gone gets a line saying so.

    Runs on the driver of classic Spark. Under Spark Connect a gang's coordinator runs
    inside its rank 0 on an executor, which this process cannot reach: its gangs are
    not found here (the error says so).

    Raises :class:`ValueError` for an unknown gang (naming the live ones) and
    :class:`TypeError` for a ``gang`` of another type.

    Example:
        >>> import sparkhydrogen as h2
        >>> for rank, text in h2.stacks("train").items():   # doctest: +SKIP
        ...     print(f"----- rank {rank}\\n{text}")
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 600:
        raise ValueError(f"timeout must be a number of seconds in (0, 600], got {timeout!r}")
    server, gang_id = find_live_gang(gang)
    return _collect(server, gang_id, timeout=float(timeout))


def _collect(server: CoordinatorServer, gang_id: str, *, timeout: float) -> dict[int, str]:
    log.info("collecting the stacks of gang %s (at most %g s)", gang_id[:14], timeout)
    return server.stacks(gang_id, timeout=timeout)


def find_live_gang(gang: Any) -> tuple[CoordinatorServer, str]:
    """The coordinator running ``gang`` (an id, unique id prefix, name, or object with ``gang_id``) and its id."""
    wanted = getattr(gang, "gang_id", gang)
    if not isinstance(wanted, str) or not wanted:
        raise TypeError(f"gang must be a gang id, a gang name or an object with a gang_id, got {gang!r}")
    services = running_services()
    live = [(service.server, gid, name) for service in services for gid, name in service.server.live_gangs().items()]
    for matches in ([g for g in live if g[1] == wanted],
                    [g for g in live if g[2] == wanted],
                    [g for g in live if len(wanted) >= MIN_ID_PREFIX and g[1].startswith(wanted)]):
        if len(matches) == 1:
            return matches[0][0], matches[0][1]
        if len(matches) > 1:
            raise ValueError(f"{wanted!r} names {len(matches)} live gangs: "
                             + ", ".join(f"{gid} ({name or 'unnamed'})" for _, gid, name in matches)
                             + "; pass one gang id")
    listing = ", ".join(f"{gid} ({name or 'unnamed'})" for _, gid, name in live) or "none"
    connect = "" if any(not s.app_id.startswith("connect-") for s in services) else (
        ". Under Spark Connect a gang's coordinator runs inside its rank 0 on an executor, out of this "
        "process's reach, so stacks() cannot see those gangs")
    raise GangNotFoundError(f"no live gang {wanted!r} in this application; live gangs: {listing}{connect}")
