"""Settings: frozen dataclasses with checked defaults, read from Spark conf in one place.

Spark conf keys (all optional)::

    spark.hydrogen.coordinator.host            address to bind (default: spark.driver.host, never all interfaces)
    spark.hydrogen.coordinator.advertiseHost   address tasks connect to, when it differs from the bound one (NAT,
                                               containers: like spark.driver.host next to spark.driver.bindAddress;
                                               default: spark.driver.host when the bound host is 0.0.0.0 or ::,
                                               else the bound host)
    spark.hydrogen.coordinator.port            first port to try, 0 = any free port (default 0);
                                               or a range "7100-7115" for firewalled clusters
    spark.hydrogen.coordinator.portMaxRetries  further ports tried after a busy one (default 16)
    spark.hydrogen.coordinator.maxPayload      largest payload one call may send (default 256m)
    spark.hydrogen.coordinator.maxGangBuffer   bytes one gang may have buffered in the coordinator (default 2g)
    spark.hydrogen.coordinator.maxGangs        gangs running at once (default 256)
    spark.hydrogen.coordinator.maxConnections  open connections at once (default 4096)
    spark.hydrogen.coordinator.tls.enabled     TLS on the coordinator channel (default: on exactly when
                                               spark.network.crypto.enabled or spark.ssl.enabled says so)
    spark.hydrogen.coordinator.tls.certFile    PEM certificate (chain) of the coordinator (default: a
                                               certificate generated per application, in memory)
    spark.hydrogen.coordinator.tls.keyFile     PEM private key (default: in certFile)
    spark.hydrogen.coordinator.connectTimeout  seconds a task waits to connect (default 30s)
    spark.hydrogen.collective.timeout          default timeout of every collective (default: none)
    spark.hydrogen.launch.slotWaitTimeout      seconds to wait for enough free slots (default 0)
    spark.hydrogen.launch.placement            auto | barrier | coordinated (default auto: a coordinated stage,
                                               gated by the coordinator, exactly when Spark would refuse a
                                               barrier stage: dynamic allocation on and a non-local master)
    spark.hydrogen.launch.startTimeout         coordinated gangs: how long the ranks wait at the start gate for
                                               all of them (executors being added) before the launch fails
                                               (default 3min)
    spark.hydrogen.heartbeat.interval          how often a task says it is alive (default 1s)
    spark.hydrogen.heartbeat.timeout           silence after which a rank whose connection is up counts as busy
                                               (logged, never failed for it); also sets the TCP keepalive that
                                               finds unreachable hosts (default 8s)
    spark.hydrogen.checkpoint.maxSize          driver memory for one gang's checkpoint (default 512m)
    spark.hydrogen.checkpoint.dir              ranks write checkpoint state here, commit only paths
    spark.hydrogen.stacks.gilDumpAfter         sparkhydrogen.stacks(): a rank whose Python cannot run this long (a C
                                               call holding the GIL) has faulthandler dump its threads to the
                                               coordinator (default 5s; 0: off, faulthandler's timer left alone)
    spark.hydrogen.diagnosis.stuckAfter        a collective waiting this long logs a WARNING naming the ranks it
                                               waits for, and again every as long (default 60s)
    spark.hydrogen.embedded.lingerTimeout      Spark Connect: how long rank 0 keeps serving its peers after its
                                               own work is done (default 10min)
    spark.hydrogen.data.cacheMemoryBudget      bytes of its share a rank's loader with cache=True keeps in memory;
                                               the rest goes to an Arrow file under Spark's local dirs, removed
                                               when the rank ends (default 1g; 0: all of it on disk)

Sizes accept Spark's suffixes (``64k``, ``256m``, ``1g``); durations accept
seconds or Spark's ``500ms``/``30s``/``5min`` forms.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .netaddr import is_wildcard

__all__ = ["CoordinatorConfig", "TlsConfig", "LaunchConfig", "PLACEMENTS", "STACK_DUMP_AFTER", "DEFAULT_CACHE_MEMORY",
           "HydrogenConfig",
           "parse_size", "parse_duration", "parse_bool", "normalize_host"]

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


def parse_bool(value: str | bool, key: str = "flag") -> bool:
    """``"true"`` / ``"false"`` (any case), as Spark writes booleans."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ValueError(f"{key}={value!r} is not a boolean; use true or false")
    return text == "true"


def normalize_host(host: str) -> str:
    """``"[::1]"`` -> ``"::1"``: addresses are kept bare; brackets belong in URLs only."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        return text[1:-1]
    return text


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class TlsConfig:
    """TLS on the coordinator channel.

    With ``enabled`` and no ``cert_file``, the coordinator generates a key and a
    self-signed certificate per application, in memory; tasks verify the server by
    the certificate's SHA-256 fingerprint, which reaches them inside the task closure
    (no CA needed). ``required_by`` names the Spark setting that demands encryption;
    TLS cannot then be off (there is no silent downgrade).

    Example:
        >>> TlsConfig(enabled=True).cert_file is None
        True
    """

    enabled: bool = False
    cert_file: str | None = None
    key_file: str | None = None
    required_by: str | None = None

    def __post_init__(self) -> None:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("a TLS key_file needs its cert_file (spark.hydrogen.coordinator.tls.certFile)")
        if not self.enabled and self.required_by:
            raise ValueError(
                f"TLS for the coordinator is off, but {self.required_by} requires encrypted traffic; "
                "the coordinator never downgrades silently: enable TLS (or leave "
                "spark.hydrogen.coordinator.tls.enabled unset)"
            )
        if not self.enabled and self.cert_file is not None:
            raise ValueError("a TLS certificate was given but TLS is off "
                             "(spark.hydrogen.coordinator.tls.enabled=false)")


@dataclass(frozen=True)
class CoordinatorConfig:
    """How the coordinator listens and what it accepts.

    ``host`` is the address the coordinator binds; ``advertise_host`` the one tasks are
    told to connect to, when they differ (a driver behind NAT or in a container binds
    its local or a wildcard address and is reached by another name). ``None``: tasks
    connect to ``host``. See :attr:`advertised_host`.

    Example:
        >>> CoordinatorConfig(host="127.0.0.1", port=0).max_payload_bytes
        268435456
        >>> CoordinatorConfig(host="0.0.0.0", advertise_host="driver.example.com").advertised_host
        'driver.example.com'
    """

    host: str = "127.0.0.1"
    port: int = 0
    port_max_retries: int = 16
    max_header_bytes: int = 64 * KiB
    max_payload_bytes: int = 256 * MiB
    handshake_timeout: float = 10.0
    missing_log_interval: float = 30.0
    tick_interval: float = 0.05
    liveness_timeout: float | None = 8.0
    checkpoint_max_bytes: int = 512 * MiB
    max_gang_buffer_bytes: int = 2 * GiB
    max_gangs: int = 256
    max_connections: int = 4096
    tls: TlsConfig = field(default_factory=TlsConfig)
    advertise_host: str | None = None
    #: A collective that has waited this long for missing ranks is logged (WARNING), and again every as long.
    stuck_after: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"coordinator host must be a non-empty string, got {self.host!r}")
        if self.advertise_host is not None:
            _check_advertise_host(self.advertise_host)
        if not isinstance(self.tls, TlsConfig):
            raise TypeError(f"tls must be a TlsConfig, got {type(self.tls).__name__}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"coordinator port must be in 0..65535, got {self.port}")
        if self.port_max_retries < 0:
            raise ValueError(f"port_max_retries must be >= 0, got {self.port_max_retries}")
        for name in ("max_header_bytes", "max_payload_bytes", "handshake_timeout",
                     "missing_log_interval", "tick_interval", "checkpoint_max_bytes", "max_gang_buffer_bytes",
                     "max_gangs", "max_connections", "stuck_after"):
            _check_positive(name, getattr(self, name))
        if self.liveness_timeout is not None:
            _check_positive("liveness_timeout", self.liveness_timeout)

    @property
    def advertised_host(self) -> str:
        """The host tasks connect to: ``advertise_host`` when set, else the bound ``host``."""
        return self.advertise_host if self.advertise_host is not None else self.host


def _check_advertise_host(host: object) -> None:
    """An address tasks can connect to: a bare host name or IP address, not a wildcard, no port, no brackets."""
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"advertise_host must be a non-empty host name or address, got {host!r}")
    if is_wildcard(host):
        raise ValueError(f"advertise_host={host!r} listens on every interface but cannot be connected to; set "
                         "spark.hydrogen.coordinator.advertiseHost to the name or address executors reach the "
                         "driver by (e.g. its public DNS name)")
    if any(c.isspace() or c in "[]/" for c in host) or host.count(":") == 1:
        raise ValueError(f"advertise_host={host!r} is not a bare host: give spark.hydrogen.coordinator."
                         "advertiseHost a host name or IP address without port, brackets or scheme "
                         "(e.g. driver.example.com, 10.0.0.5 or ::1)")


#: Values of ``spark.hydrogen.launch.placement``.
PLACEMENTS = ("auto", "barrier", "coordinated")


#: Default of ``spark.hydrogen.stacks.gilDumpAfter`` (seconds): the one place it is written.
STACK_DUMP_AFTER = 5.0

#: Default of ``spark.hydrogen.data.cacheMemoryBudget`` (bytes): a rank's cached share above it spills to disk.
DEFAULT_CACHE_MEMORY = GiB


@dataclass(frozen=True)
class LaunchConfig:
    """How the driver launches gangs and how tasks talk to the coordinator."""

    connect_timeout: float = 30.0
    collective_timeout: float | None = None
    slot_wait_timeout: float = 0.0
    heartbeat_interval: float = 1.0
    checkpoint_dir: str | None = None
    embedded_linger: float = 600.0
    placement: str = "auto"
    start_timeout: float = 180.0
    #: Seconds a rank's Python may be kept from running before faulthandler dumps it for stacks(); 0: never.
    stack_dump_after: float = STACK_DUMP_AFTER
    #: Seconds between a rank's system-metrics samples for MLflow (``spark.hydrogen.mlflow.systemMetricsInterval``;
    #: only in gangs that log into a run); 0: off.
    system_metrics_interval: float = 10.0
    #: Bytes of its share a rank's ``cache=True`` loader keeps in memory; the rest spills to local disk.
    data_cache_memory: int = DEFAULT_CACHE_MEMORY

    def __post_init__(self) -> None:
        if not 0 <= self.system_metrics_interval <= 86400:
            raise ValueError(f"system_metrics_interval must be in 0..86400 seconds (0: off), "
                             f"got {self.system_metrics_interval}")
        if self.data_cache_memory < 0:
            raise ValueError(f"data_cache_memory must be >= 0 bytes (0: spill all), got {self.data_cache_memory}")
        if not 0 <= self.stack_dump_after <= 3600:
            raise ValueError(f"stack_dump_after must be in 0..3600 seconds (0: off), got {self.stack_dump_after}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        _check_positive("start_timeout", self.start_timeout)
        _check_positive("connect_timeout", self.connect_timeout)
        _check_positive("heartbeat_interval", self.heartbeat_interval)
        _check_positive("embedded_linger", self.embedded_linger)
        if self.collective_timeout is not None:
            _check_positive("collective_timeout", self.collective_timeout)
        if self.slot_wait_timeout < 0:
            raise ValueError(f"slot_wait_timeout must be >= 0, got {self.slot_wait_timeout}")


@dataclass(frozen=True)
class HydrogenConfig:
    """All settings, built from Spark conf by :meth:`from_conf`."""

    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        timeout = self.coordinator.liveness_timeout
        if timeout is not None and self.launch.heartbeat_interval >= timeout:
            raise ValueError(
                f"spark.hydrogen.heartbeat.interval ({self.launch.heartbeat_interval:g} s) must be below "
                f"spark.hydrogen.heartbeat.timeout ({timeout:g} s), or every rank would be declared dead between "
                "two heartbeats; lower the interval or raise the timeout"
            )

    @classmethod
    def from_conf(cls, get: Callable[[str], str | None], driver_host: str,
                  encryption_required_by: str | None = None) -> HydrogenConfig:
        """Read ``spark.hydrogen.*`` keys through *get* (e.g. ``SparkConf.get``).

        ``encryption_required_by`` names the Spark setting (read by the caller, e.g.
        ``"spark.network.crypto.enabled=true"``) that requires encrypted traffic: TLS is
        then on, and an explicit ``spark.hydrogen.coordinator.tls.enabled=false`` is an error.
        """

        def opt(key: str) -> str | None:
            value = get(key)
            return None if value is None or str(value).strip() == "" else str(value)

        prefix = "spark.hydrogen."
        coordinator: dict[str, tuple[str, Callable[[str, str], object]]] = {
            "host": ("coordinator.host", lambda v, k: normalize_host(v)),
            "advertise_host": ("coordinator.advertiseHost", lambda v, k: normalize_host(v)),
            "port_max_retries": ("coordinator.portMaxRetries", _parse_int),
            "max_payload_bytes": ("coordinator.maxPayload", parse_size),
            "max_gang_buffer_bytes": ("coordinator.maxGangBuffer", parse_size),
            "max_gangs": ("coordinator.maxGangs", _parse_int),
            "max_connections": ("coordinator.maxConnections", _parse_int),
            "liveness_timeout": ("heartbeat.timeout", parse_duration),
            "checkpoint_max_bytes": ("checkpoint.maxSize", parse_size),
            "stuck_after": ("diagnosis.stuckAfter", parse_duration),
        }
        launch: dict[str, tuple[str, Callable[[str, str], object]]] = {
            "connect_timeout": ("coordinator.connectTimeout", parse_duration),
            "collective_timeout": ("collective.timeout", parse_duration),
            "slot_wait_timeout": ("launch.slotWaitTimeout", parse_duration),
            "heartbeat_interval": ("heartbeat.interval", parse_duration),
            "checkpoint_dir": ("checkpoint.dir", _parse_dir),
            "embedded_linger": ("embedded.lingerTimeout", parse_duration),
            "placement": ("launch.placement", lambda v, k: v.strip().lower()),
            "start_timeout": ("launch.startTimeout", parse_duration),
            "stack_dump_after": ("stacks.gilDumpAfter", parse_duration),
            "system_metrics_interval": ("mlflow.systemMetricsInterval", parse_duration),
            "data_cache_memory": ("data.cacheMemoryBudget", parse_size),
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
                text = str(exc)  # the field the message starts with, else one it names
                for name, (key, raw) in sorted(keys.items(), key=lambda item: not text.startswith(item[0])):
                    if text.startswith(name) or f" {name} " in text:
                        raise ValueError(f"{key}={raw!r}: {exc}") from exc
                raise

        extra: dict[str, object] = {"host": normalize_host(driver_host),
                                    "tls": _tls_config(opt, prefix, encryption_required_by)}
        bind_host = opt(prefix + "coordinator.host")
        if bind_host is not None and is_wildcard(bind_host) and opt(prefix + "coordinator.advertiseHost") is None:
            extra["advertise_host"] = normalize_host(driver_host)  # tasks cannot connect to 0.0.0.0 / ::
        port_key = prefix + "coordinator.port"
        if (port_raw := opt(port_key)) is not None:
            first, last = _parse_port_range(port_raw, port_key)
            if last is not None:
                if opt(prefix + "coordinator.portMaxRetries") is not None:
                    raise ValueError(f"{port_key}={port_raw!r} is a range; do not also set "
                                     f"{prefix}coordinator.portMaxRetries")
                if not 0 < first <= last <= 65535:
                    raise ValueError(f"{port_key}={port_raw!r}: a port range must satisfy 0 < first <= last <= 65535")
                extra["port_max_retries"] = last - first
            extra["port"] = first
            if not 0 <= first <= 65535:
                raise ValueError(f"{port_key}={port_raw!r}: coordinator port must be in 0..65535, got {first}")
        coord = build(CoordinatorConfig, coordinator, extra)
        return cls(coord, build(LaunchConfig, launch, {}))  # type: ignore[arg-type]


def _parse_dir(value: str, key: str) -> str:
    if "://" in value and not value.startswith("file://"):
        raise ValueError(
            f"{key}={value!r}: only local or shared-mount paths (or file://) are supported; mount the "
            "distributed file system on every executor and give its path"
        )
    return value


def _tls_config(opt: Callable[[str], str | None], prefix: str, required_by: str | None) -> TlsConfig:
    enabled_key = prefix + "coordinator.tls.enabled"
    raw = opt(enabled_key)
    cert, key = opt(prefix + "coordinator.tls.certFile"), opt(prefix + "coordinator.tls.keyFile")
    enabled = parse_bool(raw, enabled_key) if raw is not None else bool(required_by or cert)
    if not enabled and required_by:
        raise ValueError(
            f"{enabled_key}={raw!r} but {required_by} requires encrypted traffic: the coordinator never "
            f"downgrades silently; remove {enabled_key} (TLS is then on) or set it to true"
        )
    if not enabled and cert:
        raise ValueError(f"{enabled_key}={raw!r} but {prefix}coordinator.tls.certFile is set: "
                         "remove one of the two")
    if key and not cert:
        raise ValueError(f"{prefix}coordinator.tls.keyFile is set without {prefix}coordinator.tls.certFile")
    return TlsConfig(enabled=enabled, cert_file=cert, key_file=key, required_by=required_by)


def _parse_port_range(value: str, key: str) -> tuple[int, int | None]:
    """``"7100"`` -> (7100, None); ``"7100-7115"`` -> (7100, 7115)."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
    if match:
        return int(match.group(1)), int(match.group(2))
    return _parse_int(value, key), None


def _parse_int(value: str, key: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not an integer") from None
