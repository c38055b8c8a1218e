"""Rank 0's embedded coordinator (Spark Connect), run over loopback with a stand-in for Spark's barrier context.

No Spark: ``embedded_partition`` is driven by a small fake of the native barrier task
context (its address, ``allGather``); the coordinator and the rank's client are real.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from sparkhydrogen.config import CoordinatorConfig, HydrogenConfig, LaunchConfig
from sparkhydrogen.coordinator import server as server_module
from sparkhydrogen.errors import HydrogenError
from sparkhydrogen.task import embedded
from sparkhydrogen.task.embedded import EmbeddedGang, embedded_partition

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class _Info:
    address: str


@dataclass
class FakeNative:
    """One-rank stand-in for pyspark's ``BarrierTaskContext``: what ``embedded_partition`` calls."""

    address: str
    gathered: list[str] = field(default_factory=list)
    gather_error: BaseException | None = None

    def partitionId(self) -> int:  # noqa: N802  (pyspark's names)
        return 0

    def getTaskInfos(self) -> list[_Info]:  # noqa: N802
        return [_Info(self.address)]

    def allGather(self, message: str = "") -> list[str]:  # noqa: N802
        if self.gather_error is not None:
            raise self.gather_error
        self.gathered.append(message)
        return [message]

    def stageId(self) -> int:  # noqa: N802
        return 3

    def taskAttemptId(self) -> int:  # noqa: N802
        return 17


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[server_module.CoordinatorServer]]:
    """Every coordinator ``embedded_partition`` starts in this test (stopped at the end whatever happens)."""
    servers: list[server_module.CoordinatorServer] = []
    original = server_module.CoordinatorServer.start

    def start(self: server_module.CoordinatorServer) -> tuple[str, int]:
        servers.append(self)
        return original(self)

    monkeypatch.setattr(server_module.CoordinatorServer, "start", start)
    yield servers
    for server in servers:
        server.stop()


def gang(linger: float = 600.0) -> EmbeddedGang:
    config = HydrogenConfig(CoordinatorConfig(host="127.0.0.1"), LaunchConfig(embedded_linger=linger))
    return EmbeddedGang(gang_id="e" * 32, secret=b"s" * 32, world_size=None, config=config)


def run(native: FakeNative, monkeypatch: pytest.MonkeyPatch, rows: Iterable[Any] = (1, 2, 3)) -> list[Any]:
    monkeypatch.setattr(embedded, "native_barrier_context", lambda: native)

    def body(rank: int, part: Iterable[Any]) -> Iterator[Any]:
        yield from (rank * 100 + r for r in part)

    return list(embedded_partition(gang(), body, rows))


def coordinator_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sparkhydrogen-coordinator" and t.is_alive()]


# ------------------------------------------------------- the happy path, IPv4 and IPv6


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize(
    ("task_address", "host", "offered"),
    [
        ("127.0.0.1:40000", "127.0.0.1", r"127\.0\.0\.1:\d+#"),
        pytest.param("[::1]:40000", "::1", r"\[::1\]:\d+#",
                     marks=pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")),
    ],
)
def test_rank0_hosts_the_coordinator_on_its_task_address_and_stops_it(
    task_address: str, host: str, offered: str, monkeypatch: pytest.MonkeyPatch,
    started: list[server_module.CoordinatorServer],
) -> None:
    native = FakeNative(task_address)
    assert run(native, monkeypatch) == [1, 2, 3]
    assert len(native.gathered) == 1 and re.fullmatch(offered, native.gathered[0])  # IPv6 in brackets
    [server] = started
    assert server.config.host == host  # bound bare, without the brackets of the task address
    assert not server.running and not coordinator_threads()


# ------------------------------------------------------- failures: nothing keeps running


def test_a_failing_add_gang_stops_the_coordinator_it_started(
    monkeypatch: pytest.MonkeyPatch, started: list[server_module.CoordinatorServer],
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise HydrogenError("add_gang refused in this test")

    monkeypatch.setattr(server_module.CoordinatorServer, "add_gang", refuse)
    with pytest.raises(HydrogenError, match="add_gang refused in this test"):
        run(FakeNative("127.0.0.1:40000"), monkeypatch)
    [server] = started
    assert not server.running and not coordinator_threads()


def test_a_failing_step_after_the_start_stops_the_coordinator(
    monkeypatch: pytest.MonkeyPatch, started: list[server_module.CoordinatorServer],
) -> None:
    def broken_offer(server: Any, host: str) -> str:
        raise RuntimeError("offer failed in this test")

    monkeypatch.setattr(embedded, "_offer", broken_offer)
    with pytest.raises(RuntimeError, match="offer failed in this test"):
        run(FakeNative("127.0.0.1:40000"), monkeypatch)
    [server] = started
    assert not server.running and not coordinator_threads()


def test_a_failing_all_gather_stops_the_coordinator_without_lingering(
    monkeypatch: pytest.MonkeyPatch, started: list[server_module.CoordinatorServer],
) -> None:
    lingered: list[str] = []
    monkeypatch.setattr(embedded, "_linger", lambda server, gang_id, timeout: lingered.append(gang_id))
    native = FakeNative("127.0.0.1:40000", gather_error=RuntimeError("barrier stage aborted"))
    with pytest.raises(RuntimeError, match="barrier stage aborted"):
        run(native, monkeypatch)
    [server] = started
    assert not server.running and not coordinator_threads()
    assert lingered == []  # the peers never learnt the address: nobody to serve


def test_a_failing_linger_still_stops_the_coordinator(
    monkeypatch: pytest.MonkeyPatch, started: list[server_module.CoordinatorServer],
) -> None:
    def broken_linger(server: Any, gang_id: str, timeout: float, *rest: Any) -> None:
        raise HydrogenError("linger failed in this test")

    monkeypatch.setattr(embedded, "_linger", broken_linger)
    with pytest.raises(HydrogenError, match="linger failed in this test"):
        run(FakeNative("127.0.0.1:40000"), monkeypatch)
    [server] = started
    assert not server.running and not coordinator_threads()


def test_rank0_ignores_the_drivers_advertised_host(
    monkeypatch: pytest.MonkeyPatch, started: list[server_module.CoordinatorServer],
) -> None:
    config = HydrogenConfig(CoordinatorConfig(host="127.0.0.1", advertise_host="driver.invalid"))
    native = FakeNative("127.0.0.1:40000")
    monkeypatch.setattr(embedded, "native_barrier_context", lambda: native)
    rows = list(embedded_partition(EmbeddedGang("f" * 32, b"s" * 32, None, config), lambda r, p: p, [7]))
    assert rows == [7]
    assert native.gathered[0].startswith("127.0.0.1:")  # the executor's address, not the driver's
