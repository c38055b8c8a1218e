"""Fixtures of the unit tests: coordinators on loopback, each stopped when its test ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kit import LOOPBACK

from sparkhydrogen.config import CoordinatorConfig
from sparkhydrogen.coordinator.server import CoordinatorServer

ServerFactory = Callable[..., CoordinatorServer]


@pytest.fixture
def make_server() -> Iterator[ServerFactory]:
    """``make_server(clock=None, start=True, **CoordinatorConfig fields)``: a coordinator (on loopback by default)."""
    servers: list[CoordinatorServer] = []

    def make(clock: Callable[[], float] | None = None, start: bool = True, **config: Any) -> CoordinatorServer:
        config.setdefault("host", LOOPBACK)
        server = CoordinatorServer(CoordinatorConfig(**config), **({"clock": clock} if clock else {}))
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: ServerFactory) -> CoordinatorServer:
    return make_server()
