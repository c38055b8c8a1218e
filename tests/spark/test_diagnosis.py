"""Real local[4] Spark: a stuck gang and a slow one tell you why (status, the stuck line, report, browser).

* Rank 1 holds before its ``barrier()`` until the test releases it (a loopback socket the
  test owns, bounded): meanwhile ``status()`` names rank 1 as the rank the others' barrier
  waits for, and the driver logs the stuck-collective line (``stuckAfter`` set low by conf).
* Rank 2 sleeps 50 ms before each of 100 barriers: ``report()`` names it, its trace loads
  with ``json`` with one track per rank, and its HTML page is self-contained and renders in
  a real headless Chromium (``make chromium``).
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2

pytestmark = [pytest.mark.spark, pytest.mark.timeout(240)]

WORLD = 4
HOLD_BOUND = 120.0  # rank 1 never holds longer than this, whatever the test does


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local[4]", **{"spark.hydrogen.diagnosis.stuckAfter": "500ms"}) as spark:
        yield spark.sparkContext


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll a condition (the coordinator's own state, a log record) until it holds; its value."""
    pause = threading.Event()
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        pause.wait(0.02)


class Job:
    """``action()`` on a thread; :meth:`result` joins it (bounded) and returns or raises what it did."""

    def __init__(self, action: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.value = action()
            except BaseException as exc:  # noqa: BLE001 - re-raised by result()
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 120.0) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"the job still runs after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.value


def test_a_stuck_gang_names_the_missing_rank(sc: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sparkhydrogen.coordinator")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)
    port = listener.getsockname()[1]

    def body(rows: Any) -> Iterator[int]:
        ctx = h2.BarrierTaskContext.get()
        if ctx.rank() == 1:  # hold until the test sends a byte (or closes), at most HOLD_BOUND
            with socket.create_connection(("127.0.0.1", port), timeout=30) as hold:
                hold.settimeout(HOLD_BOUND)
                hold.recv(1)
        ctx.barrier()
        yield ctx.rank()

    job = Job(lambda: h2.barrier(sc.parallelize(range(WORLD), WORLD)).mapPartitions(body).collect())
    conn, _ = listener.accept()  # rank 1 is holding, before its barrier
    try:
        def stuck() -> h2.GangStatus | None:
            return next((g for g in h2.status() if g.waiting_for == [1]
                         and sum(r.state == "in a collective" for r in g.ranks) == WORLD - 1), None)

        gang = wait_for(stuck, "status() shows ranks 0, 2, 3 in a barrier waiting for rank 1")
        assert gang.state == "running" and gang.placement == "barrier" and gang.world_size == WORLD
        by_rank = {r.rank: r for r in gang.ranks}
        assert by_rank[1].state == h2.RankState.RUNNING and by_rank[1].call is None
        assert by_rank[1].pid is not None and by_rank[1].host
        assert by_rank[1].last_heard is not None
        for rank in (0, 2, 3):
            assert (by_rank[rank].call, by_rank[rank].waiting_for) == ("barrier #1", [1])
            assert by_rank[rank].seconds_in_call is not None
        assert "waiting for rank(s) 1" in str(gang) or re.search(r"barrier #1 +1 ", str(gang))
        assert "<table>" in gang._repr_html_()

        pattern = re.compile(rf"gang {gang.gang_id[:8]} attempt 0 \(stage \d+\.\d+\)( \(.*\))?: barrier \(collective "
                             r"call #1\) has waited \d+ s for rank\(s\) 1: rank 1 \(host [^,]+, pid \d+\) last heard "
                             r"[\d.]+ s ago")
        line = wait_for(lambda: next((r.getMessage() for r in caplog.records if pattern.search(r.getMessage())),
                                     None), "the stuck-collective line is logged")
        assert [r.levelname for r in caplog.records if r.getMessage() == line] == ["WARNING"]
        stack = line.split("--- rank 1 stack ---\n", 1)[1]  # the missing rank's stack, through its stack channel
        assert "in body" in stack and "recv" in stack and "--- rank 0 stack ---" not in line, line
    finally:
        conn.sendall(b"go")
        conn.close()
        listener.close()
    assert sorted(job.result()) == list(range(WORLD))
    wait_for(lambda: not any(g.gang_id == gang.gang_id for g in h2.status()), "the gang is no longer live")


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def straggler(sc: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[h2.GangReport, list[str], Path]:
    """One gang of 4 whose rank 2 sleeps 50 ms before each of 100 barriers: its report, the log, a folder."""

    def body(rows: Any) -> Iterator[int]:
        ctx = h2.BarrierTaskContext.get()
        for _ in range(100):
            if ctx.rank() == 2:
                time.sleep(0.05)
            ctx.barrier()
        yield ctx.rank()

    lines = Lines()
    logger = logging.getLogger("sparkhydrogen.coordinator")
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        assert sorted(h2.barrier(sc.parallelize(range(WORLD), WORLD)).mapPartitions(body).collect()) == [0, 1, 2, 3]
        report = wait_for(lambda: next((r for r in _reports() if r.total_rounds == 100), None),
                          "the gang's report is kept")
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    return report, lines.lines, tmp_path_factory.mktemp("report")


def _reports() -> list[h2.GangReport]:
    try:
        return [h2.report()]
    except h2.GangNotFoundError:
        return []


def test_a_straggler_is_named_and_the_trace_has_one_track_per_rank(
        straggler: tuple[h2.GangReport, list[str], Path]) -> None:
    report, lines, folder = straggler
    assert report.stragglers == [2]
    assert report.state == "finished" and report.world_size == WORLD
    assert re.search(r"straggler: rank 2 arrived last in \d+% of 100 rounds; peers waited [\d.]+ s for it in all",
                     report.summary)
    assert h2.report(report.gang_id) is report or h2.report(report.gang_id).gang_id == report.gang_id
    trace = json.loads(json.dumps(report.to_chrome_trace()))
    tracks = {e["tid"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert tracks == set(range(WORLD))
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in spans} == set(range(WORLD)) and len(spans) == WORLD * 100
    assert {e["name"] for e in spans if e["tid"] == 0} >= {"barrier #1", "barrier #100"}
    assert any(re.search(rf"gang {re.escape(report.gang_id[:8])}\S* .*finished.*; straggler: rank 2 arrived last", line)
               for line in lines)
    saved = Path(report.save(folder / "r.json"))
    assert json.loads(saved.read_text())["otherData"]["stragglers"] == [2]


def test_the_html_report_is_self_contained(straggler: tuple[h2.GangReport, list[str], Path]) -> None:
    report, _, folder = straggler
    page = Path(report.save(folder / "r.html"))
    text = page.read_text()
    assert page.exists() and text.startswith("<!DOCTYPE html>")
    assert not re.search(r"""\b(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<link" not in text and "@import" not in text and "url(" not in text


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed but CI=true: run `make chromium` (Debian's chromium package)")
        pytest.skip("chromium is not installed (make chromium installs Debian's package)")
    return found


def test_the_html_report_renders_in_headless_chromium(straggler: tuple[h2.GangReport, list[str], Path]) -> None:
    chromium = _chromium()
    report, _, folder = straggler
    page = Path(report.save(folder / "browser.html"))
    dom = subprocess.run(
        [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={folder / 'chromium-profile'}", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-rendered="true"' in dom  # the page's script ran to its end
    for rank in range(WORLD):  # every track and table row was drawn by the script (not in the page's source)
        assert re.search(rf'<g id="track-{rank}" class="track[^"]*" data-rank="{rank}">', dom), rank
        assert f'id="rank-row-{rank}"' in dom
    assert '<g id="track-2" class="track straggler"' in dom
    assert dom.count('class="wait"') == WORLD * 100
    summary = re.search(r'<pre id="summary" class="straggler">(.*?)</pre>', dom, re.S)
    assert summary is not None and html.unescape(summary.group(1)) == report.summary  # drawn by the script too
