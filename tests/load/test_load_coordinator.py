"""The coordinator under load: many ranks, many gangs, a long soak; figures in ``docs/reliability.md``.

The coordinator runs in one child process exactly as in the driver; simulated ranks run
in others and speak the real wire protocol on loopback (``loadkit.py``). Every reply is
checked byte for byte. Each test prints its figures (run with ``-s`` to see them); set
``SPARKHYDROGEN_LOAD_REPORT=path`` to also append them, one JSON object a line.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from loadkit import Child

pytestmark = [pytest.mark.load, pytest.mark.timeout(240)]

LOOPBACK = "127.0.0.1"


def report(name: str, figures: dict[str, Any]) -> None:
    line = json.dumps({"test": name, **figures})
    print(line)
    path = os.environ.get("SPARKHYDROGEN_LOAD_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


@pytest.fixture
def coordinator() -> Iterator[Callable[..., tuple[Child, dict[str, Any]]]]:
    started: list[Child] = []

    def start(**options: Any) -> tuple[Child, dict[str, Any]]:
        child = Child("serve", {"host": LOOPBACK, **options})
        started.append(child)
        return child, child.read()

    yield start
    for child in started:
        try:
            child.ask({"cmd": "stop"}, timeout=20)
        except AssertionError:
            pass
        child.stop()


@pytest.fixture
def ranks() -> Iterator[Callable[..., Child]]:
    started: list[Child] = []

    def start(gangs: list[dict[str, Any]], rounds: int, op: str, timeout: float = 200, **spec: Any) -> Child:
        child = Child("ranks", {"gangs": gangs, "rounds": rounds, "op": op, **spec}, timeout=timeout)
        started.append(child)
        return child

    yield start
    for child in started:
        child.stop()


def finish(child: Child, on_line: Callable[[dict[str, Any]], None] = lambda line: None) -> dict[str, Any]:
    """Read a ranks process's lines until its result; fail on its first error."""
    while True:
        line = child.read()
        assert "error" not in line, line["error"]
        if "result" in line:
            return line["result"]
        on_line(line)


def settle(server: Child, timeout: float = 20.0) -> dict[str, Any]:
    """Server stats once every connection the ranks closed is gone."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.ask({"cmd": "stats"})
        if stats["connections"] == 0:
            return stats
        assert time.monotonic() < deadline, f"connections still open after {timeout} s: {stats}"
        time.sleep(0.05)


def test_one_gang_of_1024_ranks_for_1000_allgather_rounds(coordinator: Any, ranks: Any) -> None:
    server, ready = coordinator()
    [gang] = server.ask({"cmd": "gangs", "count": 1, "world_size": 1024})["gangs"]
    started = time.perf_counter()
    result = finish(ranks([gang], rounds=1000, op="allGather"))
    wall = time.perf_counter() - started
    stats = settle(server)
    assert result["rounds"] == 1000
    assert stats["internal_errors"] == 0
    assert stats["fds"] == ready["fds"]
    report("1024 ranks x 1000 allGather rounds", {
        "wall_s": round(wall, 1), "round_ms": result["spans_ms"], "coordinator_cpu_s": round(stats["cpu_s"], 1),
        "coordinator_rss_mib": round(stats["rss_kib"] / 1024, 1)})


def test_64_concurrent_gangs_of_8_ranks(coordinator: Any, ranks: Any) -> None:
    server, ready = coordinator()
    gangs = server.ask({"cmd": "gangs", "count": 64, "world_size": 8})["gangs"]
    started = time.perf_counter()
    done: list[str] = []
    result = finish(ranks(gangs, rounds=300, op="allGather"), lambda line: done.append(line.get("done", "")))
    wall = time.perf_counter() - started
    stats = settle(server)
    assert sorted(done) == sorted(g["gang_id"] for g in gangs)
    assert result["rounds"] == 64 * 300
    assert stats["internal_errors"] == 0 and stats["gangs"] == 64
    assert stats["fds"] == ready["fds"]
    report("64 gangs x 8 ranks x 300 allGather rounds, concurrently", {
        "wall_s": round(wall, 1), "rounds_per_s": round(result["rounds"] / wall), "round_ms": result["spans_ms"],
        "coordinator_cpu_s": round(stats["cpu_s"], 1)})


def test_soak_100000_barrier_rounds_with_gang_churn(coordinator: Any, ranks: Any) -> None:
    """One gang makes 100,000 barrier rounds while 100 short gangs come and go beside it.

    Resident memory of the coordinator may grow at most 5 % from the first 10,000
    rounds to the end, and it must hold exactly as many file descriptors at the end
    as before any rank connected.
    """
    server, ready = coordinator()
    lock = threading.Lock()  # one request/answer on the server's pipes at a time

    def ask(cmd: dict[str, Any]) -> dict[str, Any]:
        with lock:
            return server.ask(cmd)

    [long_gang] = ask({"cmd": "gangs", "count": 1, "world_size": 4})["gangs"]
    churn_gangs = ask({"cmd": "gangs", "count": 100, "world_size": 4})["gangs"]
    samples: list[tuple[int, int]] = []  # (rounds done, coordinator RSS KiB)

    def progress(line: dict[str, Any]) -> None:
        if "progress" in line:
            samples.append((line["rounds"], ask({"cmd": "stats"})["rss_kib"]))

    soak = ranks([long_gang], rounds=100_000, op="barrier", progress_every=10_000)
    churn = ranks(churn_gangs, rounds=50, op="allGather", sequential=True)
    started = time.perf_counter()
    removed: list[str] = []
    churn_outcome: list[Any] = []

    def remove(line: dict[str, Any]) -> None:  # a finished churn gang is released, as the driver does
        if "done" in line:
            ask({"cmd": "remove", "gang_ids": [line["done"]]})
            removed.append(line["done"])

    def run_churn() -> None:
        try:
            churn_outcome.append(finish(churn, remove))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            churn_outcome.append(exc)

    churner = threading.Thread(target=run_churn, name="churn", daemon=True)
    churner.start()
    result = finish(soak, progress)
    wall = time.perf_counter() - started
    churner.join(60)
    assert not churner.is_alive(), "the churning gangs did not finish"
    if isinstance(churn_outcome[0], BaseException):
        raise churn_outcome[0]
    churn_result = churn_outcome[0]
    ask({"cmd": "remove", "gang_ids": [long_gang["gang_id"]]})
    end = settle(server)
    assert result["rounds"] == 100_000 and churn_result["rounds"] == 100 * 50 and len(removed) == 100
    assert end["internal_errors"] == 0
    assert end["gangs"] == 0 and end["attempts"] == 0
    assert end["fds"] == ready["fds"], f"file descriptors: {ready['fds']} before, {end['fds']} after"
    baseline = samples[0][1]
    growth = (end["rss_kib"] - baseline) / baseline
    assert growth <= 0.05, f"coordinator RSS grew {growth:.1%}: {samples} -> {end['rss_kib']} KiB"
    report("soak: 100,000 barrier rounds (4 ranks) + 100 churning gangs", {
        "wall_s": round(wall, 1), "round_ms": result["spans_ms"],
        "rss_kib": {"start": ready["rss_kib"], "after_10k_rounds": baseline, "end": end["rss_kib"],
                    "max": max(s for _, s in samples), "samples": samples},
        "rss_growth_pct": round(100 * growth, 2), "fds": {"start": ready["fds"], "end": end["fds"]},
        "coordinator_cpu_s": round(end["cpu_s"], 1)})


def test_tls_8_concurrent_gangs_of_64_ranks(coordinator: Any, ranks: Any) -> None:
    server, ready = coordinator(tls=True)
    assert ready["tls_fingerprint"] is not None
    gangs = server.ask({"cmd": "gangs", "count": 8, "world_size": 64})["gangs"]
    assert all(g["tls_fingerprint"] == ready["tls_fingerprint"] for g in gangs)
    started = time.perf_counter()
    result = finish(ranks(gangs, rounds=200, op="allGather"))
    wall = time.perf_counter() - started
    stats = settle(server)
    assert result["rounds"] == 8 * 200
    assert stats["internal_errors"] == 0 and stats["fds"] == ready["fds"]
    report("TLS: 8 gangs x 64 ranks x 200 allGather rounds, concurrently", {
        "wall_s": round(wall, 1), "rounds_per_s": round(result["rounds"] / wall), "round_ms": result["spans_ms"],
        "coordinator_cpu_s": round(stats["cpu_s"], 1)})
