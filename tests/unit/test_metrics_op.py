"""The ``metrics`` op and the rank side of ``sparkhydrogen.mlflow`` (no Spark, no MLflow).

Pure: metric keys, the wire form (round trip, arbitrary payloads only ever decode or raise
``RequestError``: hypothesis). Real sockets: a client's points reach the driver's
``on_metrics`` hook in order; the rank's sender never blocks and counts what it drops;
a child process logs through its rank's relay; outside a gang ``log_metric`` says so.
"""

from __future__ import annotations

import doctest
import math
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit import connect

from sparkhydrogen.config import CoordinatorConfig, HydrogenConfig
from sparkhydrogen.coordinator.handles import MetricRecord
from sparkhydrogen.coordinator.protocol import (
    Frame,
    FrameDecoder,
    Kind,
    Limits,
    Metrics,
    RequestError,
    decode_request,
    encode_frame,
)
from sparkhydrogen.coordinator.server import CoordinatorServer
from sparkhydrogen.errors import NotInGangError
from sparkhydrogen.mlflow import log_metric, log_metrics
from sparkhydrogen.tracking import points as points_module
from sparkhydrogen.tracking import rank as rank_module
from sparkhydrogen.tracking.points import (
    MAX_POINTS_PER_FRAME,
    MetricPoint,
    decode_points,
    encode_points,
    metric_key,
    points_from_mapping,
)
from sparkhydrogen.tracking.rank import MetricSender, RankMetrics, install, uninstall

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def request(header: dict[str, object], payload: bytes = b"") -> Frame:
    return next(iter(FrameDecoder(Limits(1 << 16, 1 << 20)).feed(encode_frame(Kind.REQUEST, header, payload))))


def test_doctests() -> None:
    for module in (points_module, rank_module):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_keys_follow_the_rank_rules_and_bad_names_are_refused() -> None:
    assert metric_key("loss", rank=0, all_ranks=False) == "loss"
    assert metric_key("loss", rank=0, all_ranks=True) == "loss"
    assert metric_key("loss", rank=3, all_ranks=False) is None
    assert metric_key("val/loss", rank=3, all_ranks=True) == "rank_3/val/loss"
    with pytest.raises(ValueError, match=r"metric key 'bad!' is not a valid MLflow metric name"):
        metric_key("bad!", rank=1, all_ranks=False)  # checked on every rank, logged or not
    with pytest.raises(TypeError, match="a metric key must be a str, got int"):
        points_from_mapping({1: 2.0})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="metric 'loss': the value must be a number, got str"):
        points_from_mapping({"loss": "low"})
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        points_from_mapping({"loss": 1.0}, -1)


def test_the_metrics_op_decodes_into_its_record() -> None:
    points = [MetricPoint("loss", 0.5, 2, 1_700_000_000_000), MetricPoint("rank_1/x", math.nan, 0, 1),
              MetricPoint("y", -math.inf, 7, 2)]
    decoded = decode_request(request({"op": "metrics", "dropped": 4}, encode_points(points)))
    assert decoded == Metrics(tuple(points), 4)


@pytest.mark.parametrize(("header", "payload", "match"), [
    ({"dropped": -1}, b"[]", r"dropped must be a non-negative integer, got -1"),
    ({}, b"{}", r"metrics payload must be a JSON list, got dict"),
    ({}, b"[[\"a\", 1, 0]]", r"a metric point must be \[key, value, step, timestamp_ms\]"),
    ({}, b"[[\"a\", \"many\", 0, 0]]", r"metric 'a': value 'many' is not a number"),
    ({}, b"[[\"a\", 1, -3, 0]]", r"step must be >= 0, got -3"),
    ({}, b"[[\"no!\", 1, 0, 0]]", r"is not a valid MLflow metric name"),
    ({}, b"[[\"a\", NaN, 0, 0]]", r"not UTF-8 JSON"),
    ({}, b"\xff", r"not UTF-8 JSON"),
    ({}, ("[" + ",".join(['["a",1,0,0]'] * (MAX_POINTS_PER_FRAME + 1)) + "]").encode(),
     rf"at most {MAX_POINTS_PER_FRAME} points"),
])
def test_bad_metrics_requests_are_refused_with_the_reason(header: dict[str, Any], payload: bytes, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        decode_request(request({"op": "metrics", **header}, payload))


keys = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_\-. :/]{0,40}", fullmatch=True)
values = st.floats(allow_nan=True, allow_infinity=True)
point_lists = st.lists(st.builds(MetricPoint, keys, values, st.integers(0, 2**40), st.integers(0, 2**45)),
                       max_size=30)


@FUZZ
@given(points=point_lists)
def test_points_survive_the_wire(points: list[MetricPoint]) -> None:
    assert decode_points(encode_points(points)) == points


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5), max_leaves=30)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300), json_values.map(lambda v: __import__("json").dumps(v).encode())),
       dropped=st.one_of(st.integers(-5, 10**12), st.text(max_size=3), st.none(), st.booleans()))
def test_arbitrary_metrics_payloads_decode_or_are_refused(raw: bytes, dropped: Any) -> None:
    try:
        decoded = decode_request(request({"op": "metrics", "dropped": dropped}, raw))
    except RequestError:
        return
    assert isinstance(decoded, Metrics) and decoded.dropped >= 0
    assert len(decoded.points) <= MAX_POINTS_PER_FRAME
    assert all(isinstance(p.value, float) and p.step >= 0 for p in decoded.points)


def test_points_reach_the_driver_hook_in_order_and_gangs_without_a_hook_drop_them() -> None:
    server = CoordinatorServer(CoordinatorConfig(host="127.0.0.1"))
    server.start()
    records: list[MetricRecord] = []
    got = threading.Event()

    def hook(record: MetricRecord) -> None:
        records.append(record)
        if len(records) == 2:
            got.set()

    try:
        gang = server.add_gang(2, on_metrics=hook)
        quiet = server.add_gang(1)
        assert server.footprint()["metric_hooks"] == 1
        first, second, third = connect(gang), connect(gang), connect(quiet)
        first.register(0)
        second.register(1)
        third.register(0)
        third.metrics([MetricPoint("dropped_here", 1.0, 0, 0)])  # no hook: nothing, and the gang goes on
        first.metrics([MetricPoint("loss", 1.0, 0, 5), MetricPoint("loss", 0.5, 1, 6)])
        second.metrics([MetricPoint("rank_1/loss", 2.0, 0, 7)], dropped=3)
        assert got.wait(10)
        assert [(r.rank, [(p.key, p.value, p.step) for p in r.points], r.dropped) for r in records] == [
            (0, [("loss", 1.0, 0), ("loss", 0.5, 1)], 0), (1, [("rank_1/loss", 2.0, 0)], 3)]
        third.collective("barrier", timeout=10)  # still works: the points went nowhere, not refused
        with pytest.raises(ValueError, match=f"at most {MAX_POINTS_PER_FRAME} points per call"):
            first.metrics([MetricPoint("x", 0.0, 0, 0)] * (MAX_POINTS_PER_FRAME + 1))
        for client in (first, second, third):
            client.finish()
            client.close()
        server.remove_gang(gang.gang_id)
        assert server.footprint()["metric_hooks"] == 0
    finally:
        server.stop()


def test_sender_never_blocks_drops_the_oldest_and_reports_the_count() -> None:
    gate, entered = threading.Event(), threading.Event()
    batches: list[tuple[list[str], int]] = []

    def send(points: list[MetricPoint], dropped: int) -> None:
        entered.set()
        assert gate.wait(30)
        batches.append(([p.key for p in points], dropped))

    sender = MetricSender(send, max_points=3)
    sender.put([MetricPoint("first", 0.0, 0, 0)])
    assert entered.wait(10)  # the thread holds "first" and waits on the gate: put() must not wait
    sender.put([MetricPoint(f"m{n}", 0.0, 0, 0) for n in range(10)])
    assert sender.lost == 7
    gate.set()
    sender.close(timeout=10)
    assert batches == [(["first"], 0), (["m7", "m8", "m9"], 7)]
    sender.put([MetricPoint("late", 0.0, 0, 0)])  # after close: counted, not sent
    assert sender.lost == 8 and len(batches) == 2


def test_in_a_rank_points_go_to_its_sender_and_a_child_logs_through_the_relay() -> None:
    sent: list[tuple[str, float, int]] = []
    lock = threading.Lock()

    def send(points: list[MetricPoint], dropped: int) -> None:
        with lock:
            sent.extend((p.key, p.value, p.step) for p in points)

    metrics = install(1, send)
    try:
        log_metrics({"loss": 0.5}, step=2)  # rank 1, not asked for all ranks: dropped on the rank
        log_metric("loss", 0.25, step=3, all_ranks=True)
        child_code = (
            "from sparkhydrogen.mlflow import log_metric\n"
            "for step in range(3): log_metric('child', step * 1.5, step=step, all_ranks=True)\n")
        from sparkhydrogen.task.child import child_environment

        env = child_environment({"PYTHONPATH": os.pathsep.join(sys.path)})
        subprocess.run([sys.executable, "-c", child_code], env=env, check=True, timeout=60)
    finally:
        uninstall(metrics)  # closes the relay (its reader has read the child's lines) and flushes
    assert sent[0] == ("rank_1/loss", 0.25, 3)
    assert sorted(sent[1:]) == [("rank_1/child", 0.0, 0), ("rank_1/child", 1.5, 1), ("rank_1/child", 3.0, 2)]
    assert not os.path.exists(metrics.relay.path if metrics.relay else "/nonexistent")


def test_a_gang_that_logs_nowhere_drops_points_and_outside_a_gang_it_is_an_error() -> None:
    metrics = install(0, None)
    try:
        log_metric("loss", 1.0)  # no run on the driver: dropped here, silently
        assert metrics.sender is None and metrics.relay is None
    finally:
        uninstall(metrics)
    with pytest.raises(NotInGangError, match=r"outside a spark-hydrogen gang rank.*on the driver use "
                                             r"mlflow.log_metric"):
        log_metric("loss", 1.0)


def test_system_sampler_reports_cpu_and_memory_of_the_rank_and_its_children() -> None:
    pytest.importorskip("psutil")
    got: list[MetricPoint] = []
    done = threading.Event()

    def put(points: list[MetricPoint]) -> None:
        got.extend(points)
        done.set()

    metrics = RankMetrics(2, lambda points, dropped: put(points), system_interval=0.05)
    try:
        assert done.wait(30)
    finally:
        metrics.close()
    names = {p.key for p in got}
    assert {"system/rank_2/cpu_percent", "system/rank_2/memory_rss_mb", "system/rank_2/system_memory_percent"} <= names
    assert all(p.value >= 0 for p in got)


def test_the_system_metrics_interval_is_a_config_key() -> None:
    conf = {"spark.hydrogen.mlflow.systemMetricsInterval": "250ms"}
    assert HydrogenConfig.from_conf(conf.get, "127.0.0.1").launch.system_metrics_interval == 0.25
    assert HydrogenConfig.from_conf({}.get, "127.0.0.1").launch.system_metrics_interval == 10.0
    with pytest.raises(ValueError, match=r"spark.hydrogen.mlflow.systemMetricsInterval='2d'"):
        HydrogenConfig.from_conf({"spark.hydrogen.mlflow.systemMetricsInterval": "2d"}.get, "127.0.0.1")
