"""What the benchmarks ran on, gathered programmatically for the report."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone

__all__ = ["Machine", "describe_machine", "load_average"]


@dataclass(frozen=True)
class Machine:
    date_utc: str
    nproc: int
    cpu_model: str
    memory_gib: float | None
    os: str
    python: str
    pyspark: str
    java: str
    sparkhydrogen: str
    git: str
    load_at_start: str


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _java_version() -> str:
    java_home = os.environ.get("JAVA_HOME")
    java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
    if not java:
        return "not found"
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else "unknown"


def _git_revision(repo: str) -> str:
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (with uncommitted changes in src/)" if dirty else "")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``"0.12 0.30 0.41"``."""
    try:
        with open("/proc/loadavg", encoding="utf-8") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def describe_machine(repo: str) -> Machine:
    import pyspark

    import sparkhydrogen

    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
    return Machine(
        date_utc=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        nproc=nproc,
        cpu_model=_cpu_model(),
        memory_gib=_memory_gib(),
        os=platform.platform(),
        python=platform.python_version(),
        pyspark=pyspark.__version__,
        java=_java_version(),
        sparkhydrogen=getattr(sparkhydrogen, "__version__", "?"),
        git=_git_revision(repo),
        load_at_start=load_average(),
    )
