"""The advertised coordinator address: tasks are told a name other than the bound one (NAT, containers).

Over loopback: the coordinator binds ``127.0.0.1`` and advertises ``localhost``, a
different name for it, as a driver in a container binds its own address and is
reached by the host's name. (Binding ``0.0.0.0`` is not done in tests.)
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from kit import LOOPBACK, gather_body, run_gang

from sparkhydrogen.config import HydrogenConfig
from sparkhydrogen.coordinator.server import CoordinatorServer

pytestmark = pytest.mark.timeout(60)

ADVERTISED = "localhost"


def test_tasks_are_told_the_advertised_host_and_connect_through_it(
    make_server: Callable[..., CoordinatorServer],
) -> None:
    server = make_server(host=LOOPBACK, advertise_host=ADVERTISED)
    port = server.address[1]
    assert server.address == (ADVERTISED, port)
    assert server.listening == [(LOOPBACK, port)]  # bound where told, not at the advertised name
    handle = server.add_gang(2)
    assert (handle.host, handle.port) == (ADVERTISED, port)
    # every rank connects to (handle.host, handle.port), the advertised name, and the gang works
    assert run_gang(handle, lambda client, rank: (client.address, client.collective("allGather", bytes([rank])))) == {
        rank: ((ADVERTISED, port), [b"\0", b"\1"]) for rank in (0, 1)}


def test_without_an_advertised_host_tasks_are_told_the_bound_one(server: CoordinatorServer) -> None:
    handle = server.add_gang(1)
    assert server.address == (LOOPBACK, handle.port)
    assert handle.host == LOOPBACK


def test_the_advertised_host_comes_from_spark_conf(make_server: Callable[..., CoordinatorServer]) -> None:
    conf = {"spark.hydrogen.coordinator.host": LOOPBACK, "spark.hydrogen.coordinator.advertiseHost": ADVERTISED}
    config = HydrogenConfig.from_conf(conf.get, driver_host="10.255.255.1").coordinator
    assert (config.host, config.advertise_host) == (LOOPBACK, ADVERTISED)
    server = make_server(**{f: getattr(config, f) for f in ("host", "advertise_host", "port", "tls")})
    handle = server.add_gang(1)
    assert handle.host == ADVERTISED
    assert run_gang(handle, gather_body(lambda r, i: b"ok")) == {0: [b"ok"]}
