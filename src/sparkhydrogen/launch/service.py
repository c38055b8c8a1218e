"""One coordinator per SparkContext: started lazily on first use, stopped with the SparkContext."""

from __future__ import annotations

import atexit
import functools
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..config import HydrogenConfig
from ..coordinator.server import CoordinatorServer

__all__ = ["DriverService", "service_for", "stop_all", "read_config", "encryption_required_by", "ENCRYPTION_KEYS"]

log = logging.getLogger("sparkhydrogen.launch")

_lock = threading.Lock()
_services: dict[str, "DriverService"] = {}


@dataclass(frozen=True)
class DriverService:
    """The running coordinator of one SparkContext and the settings read from its conf."""

    app_id: str
    config: HydrogenConfig
    server: CoordinatorServer


#: Spark settings that say the application's network traffic must be encrypted. When one
#: is true, the coordinator serves TLS too (and refuses to be told otherwise).
ENCRYPTION_KEYS = (
    "spark.network.crypto.enabled",  # AES-based RPC encryption
    "spark.authenticate.enableSaslEncryption",  # SASL-encrypted RPC (legacy)
    "spark.ssl.rpc.enabled",  # TLS for RPC (Spark 4)
    "spark.ssl.enabled",  # TLS for every Spark protocol that supports it
)


def encryption_required_by(get: Callable[[str], Optional[str]]) -> Optional[str]:
    """The first of :data:`ENCRYPTION_KEYS` set to true, as ``"key=true"``; ``None`` if none is."""
    for key in ENCRYPTION_KEYS:
        value = get(key)
        if value is not None and str(value).strip().lower() == "true":
            return f"{key}=true"
    return None


def read_config(sc: Any) -> HydrogenConfig:
    """All ``spark.hydrogen.*`` settings of ``sc``'s conf, and whether Spark requires encryption
    (the one place Spark conf is read)."""
    conf = sc.getConf()
    driver_host = conf.get("spark.driver.host") or "127.0.0.1"
    return HydrogenConfig.from_conf(conf.get, driver_host=driver_host,
                                    encryption_required_by=encryption_required_by(conf.get))


def service_for(sc: Any) -> DriverService:
    """The coordinator of ``sc``, starting it (once) if needed."""
    if getattr(sc, "_jsc", None) is None:
        raise ValueError("the SparkContext has been stopped; create a new SparkSession first")
    app_id = sc.applicationId
    with _lock:
        service = _services.get(app_id)
        if service is not None and service.server.running:
            return service
        for other in [s for a, s in _services.items() if a != app_id]:  # contexts stopped without stop()
            _stop(other)
        config = read_config(sc)
        server = CoordinatorServer(config.coordinator)
        server.start()
        service = DriverService(app_id, config, server)
        _services[app_id] = service
        _stop_with(sc, app_id)
        return service


def _stop_with(sc: Any, app_id: str) -> None:
    """Make ``sc.stop()`` (and so ``SparkSession.stop()``) stop our coordinator first."""
    original = sc.stop
    if getattr(original, "_sparkhydrogen_app", None) == app_id:
        return

    @functools.wraps(original)
    def stop(*args: Any, **kwargs: Any) -> Any:
        with _lock:
            service = _services.pop(app_id, None)
        if service is not None:
            service.server.stop()
        return original(*args, **kwargs)

    stop._sparkhydrogen_app = app_id  # type: ignore[attr-defined]
    sc.stop = stop


def _stop(service: DriverService) -> None:
    _services.pop(service.app_id, None)
    service.server.stop()


def stop_all() -> None:
    """Stop every coordinator this process started (also registered with ``atexit``)."""
    with _lock:
        for service in list(_services.values()):
            _stop(service)


atexit.register(stop_all)
