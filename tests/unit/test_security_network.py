"""Where the coordinator listens: the driver's address only, a fixed port or range, IPv6."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import pytest
from kit import gather_body, run_gang, start_ranks

from sparkhydrogen.config import CoordinatorConfig, HydrogenConfig, TlsConfig
from sparkhydrogen.coordinator.client import CoordinatorClient
from sparkhydrogen.coordinator.server import CoordinatorServer, GangHandle
from sparkhydrogen.errors import CoordinatorConnectionError, HydrogenError
from sparkhydrogen.launch.service import read_config

pytestmark = pytest.mark.timeout(60)

LOOPBACK = "127.0.0.1"


def ipv6_loopback_problem() -> str | None:
    """Why ``::1`` cannot be used here, or ``None`` if it can."""
    if not socket.has_ipv6:
        return "this Python was built without IPv6 (socket.has_ipv6 is False)"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError as exc:
        return f"cannot bind [::1]: {exc} (IPv6 is disabled on this machine's loopback)"
    return None


needs_ipv6 = pytest.mark.skipif(ipv6_loopback_problem() is not None, reason=str(ipv6_loopback_problem()))


def gather_once(handle: GangHandle) -> dict[int, Any]:
    """One allGather of ``bytes([rank]) * 3`` by every rank; each rank's result or exception."""
    return run_gang(handle, gather_body(lambda r, i: bytes([r]) * 3))


def free_port(host: str = LOOPBACK, family: int = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class FakeConf:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)


class FakeContext:
    """Just what :func:`read_config` reads: ``getConf().get``."""

    def __init__(self, values: dict[str, str]) -> None:
        self.conf = FakeConf(values)
        self.sc = self  # read_config() takes a target holding the SparkContext as ``sc``

    def getConf(self) -> FakeConf:  # noqa: N802 - pyspark's name
        return self.conf


# ------------------------------------------------------------------ the driver's address only


def test_by_default_the_coordinator_listens_on_the_driver_host_never_all_interfaces() -> None:
    assert CoordinatorConfig().host == LOOPBACK
    assert read_config(FakeContext({"spark.driver.host": "10.1.2.3"})).coordinator.host == "10.1.2.3"
    assert read_config(FakeContext({})).coordinator.host == LOOPBACK
    assert HydrogenConfig.from_conf({}.get, "[fd00::5]").coordinator.host == "fd00::5"


def test_it_binds_exactly_the_given_address(make_server: Callable[..., CoordinatorServer]) -> None:
    server = make_server(host=LOOPBACK)
    port = server.address[1]
    assert server.listening == [(LOOPBACK, port)]
    # 127.0.0.2 is this machine too, but not the address the coordinator was given
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()
    assert gather_once(server.add_gang(2)) == {0: [b"\0" * 3, b"\1" * 3], 1: [b"\0" * 3, b"\1" * 3]}


def test_all_interfaces_only_when_asked_and_then_with_a_warning(
    make_server: Callable[..., CoordinatorServer], caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="sparkhydrogen.coordinator"):
        server = make_server(host="0.0.0.0")
    assert server.listening == [("0.0.0.0", server.address[1])]
    assert any("listening on ALL interfaces" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ ports


def test_a_fixed_port_is_used_exactly(make_server: Callable[..., CoordinatorServer]) -> None:
    port = free_port()
    server = make_server(host=LOOPBACK, port=port, port_max_retries=0)
    assert server.address == (LOOPBACK, port)


def test_a_busy_fixed_port_fails_with_the_range_and_the_keys_to_change() -> None:
    with socket.create_server((LOOPBACK, 0)) as busy:
        port = busy.getsockname()[1]
        server = CoordinatorServer(CoordinatorConfig(host=LOOPBACK, port=port, port_max_retries=0))
        with pytest.raises(HydrogenError, match=rf"could not bind 127\.0\.0\.1 on any port of {port}\.\.{port}: .*"
                                                r"spark\.hydrogen\.coordinator\.port / portMaxRetries"):
            server.start()
        assert not server.running


def test_a_port_range_from_conf_takes_the_first_free_port(make_server: Callable[..., CoordinatorServer]) -> None:
    for _ in range(20):  # find two consecutive free ports
        first = free_port()
        if first < 65535 and _is_free(first + 1):
            break
    cfg = HydrogenConfig.from_conf({"spark.hydrogen.coordinator.port": f"{first}-{first + 1}"}.get, LOOPBACK)
    assert (cfg.coordinator.port, cfg.coordinator.port_max_retries) == (first, 1)
    with socket.create_server((LOOPBACK, first)):  # the first port of the range is taken
        server = make_server(**{f: getattr(cfg.coordinator, f) for f in ("host", "port", "port_max_retries")})
        assert server.address == (LOOPBACK, first + 1)


def _is_free(port: int) -> bool:
    try:
        with socket.create_server((LOOPBACK, port)):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(("value", "match"), [
    ("7200-7100", "a port range must satisfy"),
    ("0-10", "a port range must satisfy"),
    ("7100-70000", "a port range must satisfy"),
])
def test_bad_port_ranges_name_the_key(value: str, match: str) -> None:
    with pytest.raises(ValueError, match=rf"spark\.hydrogen\.coordinator\.port='{value}'.*{match}"):
        HydrogenConfig.from_conf({"spark.hydrogen.coordinator.port": value}.get, LOOPBACK)


def test_a_port_range_and_port_max_retries_together_are_refused() -> None:
    with pytest.raises(ValueError, match="is a range; do not also set spark.hydrogen.coordinator.portMaxRetries"):
        HydrogenConfig.from_conf({"spark.hydrogen.coordinator.port": "7100-7110",
                                  "spark.hydrogen.coordinator.portMaxRetries": "3"}.get, LOOPBACK)


def test_an_unresolvable_host_is_a_clear_error() -> None:
    server = CoordinatorServer(CoordinatorConfig(host="no-such-host.invalid"))
    with pytest.raises(HydrogenError, match=r"coordinator host 'no-such-host\.invalid' does not resolve"):
        server.start()


# ------------------------------------------------------------------ IPv6


@needs_ipv6
@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_an_ipv6_driver_address_works(make_server: Callable[..., CoordinatorServer], tls: bool) -> None:
    server = make_server(host="::1", tls=TlsConfig(enabled=tls))
    handle = server.add_gang(3)
    assert handle.host == "::1" and server.listening == [("::1", handle.port)]
    out = gather_once(handle)
    assert out == {r: [b"\0" * 3, b"\1" * 3, b"\2" * 3] for r in range(3)}, out


@needs_ipv6
def test_ipv6_addresses_are_bracketed_in_messages(make_server: Callable[..., CoordinatorServer]) -> None:
    server = make_server(host="::1")
    handle = server.add_gang(1)
    with pytest.raises(CoordinatorConnectionError, match=rf"\[::1\]:{handle.port}"):
        CoordinatorClient.connect(("::1", handle.port), "0" * 32, b"x" * 32, timeout=5)


@needs_ipv6
def test_a_host_name_with_v4_and_v6_addresses_listens_on_both_with_one_port(
    make_server: Callable[..., CoordinatorServer], monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = asyncio.base_events.BaseEventLoop.getaddrinfo

    async def dual_stack(self: Any, host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "dual.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (LOOPBACK, 0)),
                    (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0))]
        return await real(self, host, *args, **kwargs)

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "getaddrinfo", dual_stack)
    server = make_server(host="dual.test")
    port = server.address[1]
    assert sorted(server.listening) == sorted([(LOOPBACK, port), ("::1", port)])
    handle = server.add_gang(2)
    # one rank over each address family, in one gang
    body = gather_body(lambda r, i: (LOOPBACK if r == 0 else "::1").encode())
    v4 = start_ranks(handle, body, ranks=[0], address=(LOOPBACK, port))
    v6 = start_ranks(handle, body, ranks=[1], address=("::1", port))
    assert {**v4.values(), **v6.values()} == {r: [LOOPBACK.encode(), b"::1"] for r in range(2)}
