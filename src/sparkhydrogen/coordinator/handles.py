"""What the driver side holds for a gang: the handle tasks join with, the log and metric records ranks stream.

Small and dependency-free so that launchers can import these types without the server.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..tracking.points import MetricPoint

__all__ = ["GangHandle", "LogRecord", "MetricRecord"]


@dataclass(frozen=True)
class LogRecord:
    """Output a rank streamed to the driver: ``text`` (whole lines) from ``stream``.

    ``dropped`` counts lines the rank had to discard before this record because
    its bounded buffer overflowed.
    """

    gang_attempt: int
    rank: int
    stream: str
    text: str
    dropped: int = 0


@dataclass(frozen=True)
class MetricRecord:
    """Metric points a rank sent to the driver (``sparkhydrogen.mlflow.log_metric``), keys already final.

    ``dropped`` counts points the rank had to discard before these because its
    bounded queue overflowed.
    """

    gang_attempt: int
    rank: int
    points: tuple[MetricPoint, ...]
    dropped: int = 0


@dataclass(frozen=True)
class GangHandle:
    """What the driver hands to tasks so they can join a gang."""

    gang_id: str
    secret: bytes
    world_size: int
    host: str
    port: int
    tls_fingerprint: str | None = None  # SHA-256 of the coordinator's certificate, when it serves TLS

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return (f"GangHandle(gang_id={self.gang_id!r}, world_size={self.world_size}, host={self.host!r}, "
                f"port={self.port}, tls={self.tls_fingerprint is not None})")
