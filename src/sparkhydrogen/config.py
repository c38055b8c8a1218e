"""Settings: frozen dataclasses with checked defaults, read from Spark conf in one place.

Spark conf keys (all optional)::

    spark.hydrogen.coordinator.host            address to bind (default: spark.driver.host)
    spark.hydrogen.coordinator.port            first port to try, 0 = any free port (default 0)
    spark.hydrogen.coordinator.portMaxRetries  further ports tried after a busy one (default 16)
    spark.hydrogen.coordinator.maxPayload      largest payload one call may send (default 256m)
    spark.hydrogen.coordinator.connectTimeout  seconds a task waits to connect (default 30s)
    spark.hydrogen.collective.timeout          default timeout of every collective (default: none)
    spark.hydrogen.launch.slotWaitTimeout      seconds to wait for enough free slots (default 0)
    spark.hydrogen.heartbeat.interval          how often a task says it is alive (default 1s)
    spark.hydrogen.heartbeat.timeout           silence after which a rank counts as failed (default 8s)
    spark.hydrogen.checkpoint.maxSize          driver memory for one gang's checkpoint (default 512m)
    spark.hydrogen.checkpoint.dir              ranks write checkpoint state here, commit only paths

Sizes accept Spark's suffixes (``64k``, ``256m``, ``1g``); durations accept
seconds or Spark's ``500ms``/``30s``/``5min`` forms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

__all__ = ["CoordinatorConfig", "LaunchConfig", "HydrogenConfig", "parse_size", "parse_duration"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SIZE_UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "m": MiB, "mb": MiB, "g": GiB, "gb": GiB}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "min": 60.0, "m": 60.0, "h": 3600.0}


def parse_size(value: str | int, key: str = "size") -> int:
    """``"64m"`` -> 67108864. Raises ``ValueError`` naming *key* on bad input."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{key}={value!r} is not a size; use bytes or a suffix k, m, g (e.g. '256m')")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_duration(value: str | float, key: str = "duration") -> float:
    """``"500ms"`` -> 0.5, ``"30s"`` -> 30.0, ``"2"`` -> 2.0 seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _TIME_UNITS:
        raise ValueError(f"{key}={value!r} is not a duration; use seconds or a suffix ms, s, min (e.g. '30s')")
    return float(match.group(1)) * _TIME_UNITS[match.group(2).lower()]


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class CoordinatorConfig:
    """How the coordinator listens and what it accepts.

    Example:
        >>> CoordinatorConfig(host="127.0.0.1", port=0).max_payload_bytes
        268435456
    """

    host: str = "127.0.0.1"
    port: int = 0
    port_max_retries: int = 16
    max_header_bytes: int = 64 * KiB
    max_payload_bytes: int = 256 * MiB
    handshake_timeout: float = 10.0
    missing_log_interval: float = 30.0
    tick_interval: float = 0.05
    liveness_timeout: Optional[float] = 8.0
    checkpoint_max_bytes: int = 512 * MiB

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"coordinator host must be a non-empty string, got {self.host!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"coordinator port must be in 0..65535, got {self.port}")
        if self.port_max_retries < 0:
            raise ValueError(f"port_max_retries must be >= 0, got {self.port_max_retries}")
        for name in ("max_header_bytes", "max_payload_bytes", "handshake_timeout",
                     "missing_log_interval", "tick_interval", "checkpoint_max_bytes"):
            _check_positive(name, getattr(self, name))
        if self.liveness_timeout is not None:
            _check_positive("liveness_timeout", self.liveness_timeout)


@dataclass(frozen=True)
class LaunchConfig:
    """How the driver launches gangs and how tasks talk to the coordinator."""

    connect_timeout: float = 30.0
    collective_timeout: Optional[float] = None
    slot_wait_timeout: float = 0.0
    heartbeat_interval: float = 1.0
    checkpoint_dir: Optional[str] = None

    def __post_init__(self) -> None:
        _check_positive("connect_timeout", self.connect_timeout)
        _check_positive("heartbeat_interval", self.heartbeat_interval)
        if self.collective_timeout is not None:
            _check_positive("collective_timeout", self.collective_timeout)
        if self.slot_wait_timeout < 0:
            raise ValueError(f"slot_wait_timeout must be >= 0, got {self.slot_wait_timeout}")


@dataclass(frozen=True)
class HydrogenConfig:
    """All settings, built from Spark conf by :meth:`from_conf`."""

    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    @classmethod
    def from_conf(cls, get: Callable[[str], Optional[str]], driver_host: str) -> "HydrogenConfig":
        """Read ``spark.hydrogen.*`` keys through *get* (e.g. ``SparkConf.get``)."""

        def opt(key: str) -> Optional[str]:
            value = get(key)
            return None if value is None or str(value).strip() == "" else str(value)

        prefix = "spark.hydrogen."
        coordinator: dict[str, tuple[str, Callable[[str, str], object]]] = {
            "host": ("coordinator.host", lambda v, k: v),
            "port": ("coordinator.port", _parse_int),
            "port_max_retries": ("coordinator.portMaxRetries", _parse_int),
            "max_payload_bytes": ("coordinator.maxPayload", parse_size),
            "liveness_timeout": ("heartbeat.timeout", parse_duration),
            "checkpoint_max_bytes": ("checkpoint.maxSize", parse_size),
        }
        launch: dict[str, tuple[str, Callable[[str, str], object]]] = {
            "connect_timeout": ("coordinator.connectTimeout", parse_duration),
            "collective_timeout": ("collective.timeout", parse_duration),
            "slot_wait_timeout": ("launch.slotWaitTimeout", parse_duration),
            "heartbeat_interval": ("heartbeat.interval", parse_duration),
            "checkpoint_dir": ("checkpoint.dir", _parse_dir),
        }

        def build(cls: type, fields: dict[str, tuple[str, Callable[[str, str], object]]],
                  extra: dict[str, object]) -> object:
            kwargs, keys = dict(extra), {}
            for name, (suffix, parse) in fields.items():
                key = prefix + suffix
                if (raw := opt(key)) is not None:
                    kwargs[name], keys[name] = parse(raw, key), (key, raw)
            try:
                return cls(**kwargs)
            except ValueError as exc:
                for name, (key, raw) in keys.items():
                    if str(exc).startswith(name) or f" {name} " in str(exc):
                        raise ValueError(f"{key}={raw!r}: {exc}") from exc
                raise

        coord = build(CoordinatorConfig, coordinator, {"host": driver_host})
        return cls(coord, build(LaunchConfig, launch, {}))  # type: ignore[arg-type]


def _parse_dir(value: str, key: str) -> str:
    if "://" in value and not value.startswith("file://"):
        raise ValueError(
            f"{key}={value!r}: only local or shared-mount paths (or file://) are supported; mount the "
            "distributed file system on every executor and give its path"
        )
    return value


def _parse_int(value: str, key: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not an integer") from None
