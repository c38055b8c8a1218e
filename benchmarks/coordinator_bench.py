"""The coordinator alone, loaded by N simulated ranks living in a separate process.

The coordinator runs here, exactly as the driver runs it (an asyncio loop on a
daemon thread of this process); the ranks run in :mod:`sim_ranks`, a child
process, so neither side's Python work stalls the other behind one GIL.  Besides
the round spans the child measures, this side reads the coordinator thread's CPU
clock around the measured rounds, which says how much of a round is the
coordinator's own work.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from sim_ranks import raise_fd_limit
from sparkhydrogen.config import CoordinatorConfig
from sparkhydrogen.coordinator import CoordinatorServer

__all__ = ["SimResult", "simulate"]

_SIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sim_ranks.py")


@dataclass(frozen=True)
class SimResult:
    ranks: int
    op: str
    size: int
    warmup: int
    spans_ms: list[float]
    phases_ms: dict[str, list[float]]
    setup_s: float
    coordinator_cpu_ms_per_round: float
    profile: Profile | None = None


@dataclass(frozen=True)
class ProfileRow:
    function: str  # "path/file.py:line(name)", shortened
    calls: int
    own_s: float
    cumulative_s: float


@dataclass(frozen=True)
class Profile:
    """The coordinator thread's cProfile over the measured rounds, top functions by own time."""

    total_s: float
    rows: list[ProfileRow]


def _coordinator_thread() -> threading.Thread:
    for thread in threading.enumerate():
        if thread.name == "sparkhydrogen-coordinator":
            return thread
    raise RuntimeError("the coordinator thread is not running")


def _thread_cpu_s(thread: threading.Thread) -> float:
    if thread.ident is None:
        raise RuntimeError("the coordinator thread has not started")
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def simulate(ranks: int, op: str = "barrier", size: int = 0, warmup: int = 5, rounds: int = 50,
             profile: bool = False, timeout: float = 300.0) -> SimResult:
    """One gang of ``ranks`` simulated ranks making ``warmup + rounds`` calls of ``op``.

    With ``profile=True`` the coordinator thread runs under cProfile during the
    measured rounds (which slows it down) and the top functions are returned.
    """
    raise_fd_limit(ranks + 256)
    server = CoordinatorServer(CoordinatorConfig(host="127.0.0.1"))
    host, port = server.start()
    child: subprocess.Popen[str] | None = None
    try:
        gang = server.add_gang(ranks, name=f"simulated-{ranks}")
        child = subprocess.Popen([sys.executable, _SIM], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdin is not None and child.stdout is not None
        spec = {"host": host, "port": port, "gang_id": gang.gang_id, "secret": gang.secret.hex(),
                "ranks": ranks, "op": op, "size": size, "warmup": warmup, "rounds": rounds}
        child.stdin.write(json.dumps(spec) + "\n")
        child.stdin.flush()
        ready = _read_json(child, "connected")
        thread = _coordinator_thread()
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            server._on_loop(profiler.enable)  # cProfile only sees the thread that enables it
        cpu0 = _thread_cpu_s(thread)
        child.stdin.write("go\n")
        child.stdin.flush()
        result = _read_json(child, "spans_ms")
        cpu1 = _thread_cpu_s(thread)
        report = None
        if profiler is not None:
            server._on_loop(profiler.disable)
            report = _top_functions(profiler)
        child.stdin.close()
        child.wait(timeout=timeout)
        if child.returncode != 0:
            raise RuntimeError(f"rank simulator exited with {child.returncode}")
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        server.stop()
    phases = {k: v for k, v in result.items() if k != "spans_ms"}
    return SimResult(ranks, op, size, warmup, result["spans_ms"], phases, ready["setup_s"],
                     (cpu1 - cpu0) * 1e3 / (warmup + rounds), report)


def _top_functions(profiler: cProfile.Profile, limit: int = 12) -> Profile:
    stats = pstats.Stats(profiler, stream=io.StringIO())
    entries = stats.stats  # type: ignore[attr-defined]  # {(file, line, name): (cc, nc, tt, ct, callers)}
    rows = [
        ProfileRow(_label(file, line, name), int(nc), float(tt), float(ct))
        for (file, line, name), (_cc, nc, tt, ct, _callers) in entries.items()
    ]
    rows.sort(key=lambda row: row.own_s, reverse=True)
    return Profile(total_s=float(stats.total_tt), rows=rows[:limit])  # type: ignore[attr-defined]


def _label(file: str, line: int, name: str) -> str:
    if file == "~":
        return name  # a C function: "{method 'recv' of '_socket.socket' objects}"
    parts = file.replace(os.sep, "/").split("/")
    short = "/".join(parts[parts.index("sparkhydrogen"):]) if "sparkhydrogen" in parts else "/".join(parts[-2:])
    return f"{short}:{line}({name})"


def _read_json(child: subprocess.Popen[str], key: str) -> dict:
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        child.wait(timeout=30)
        raise RuntimeError(f"rank simulator exited with {child.returncode} before reporting {key!r}")
    message = json.loads(line)
    if key not in message:
        raise RuntimeError(f"rank simulator said {message!r}, expected {key!r}")
    return message
