"""Real local[2] Spark with Spark's own network encryption on: the coordinator follows with TLS."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2
from sparkhydrogen.launch.service import service_for

pytestmark = [pytest.mark.spark, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    conf = {"spark.authenticate": "true", "spark.authenticate.secret": "sparkhydrogen-test-secret",
            "spark.network.crypto.enabled": "true"}
    with spark_session("local[2]", **conf) as spark:
        yield spark.sparkContext


def test_spark_network_encryption_turns_on_tls_and_gangs_run_over_it(sc: Any) -> None:
    def body() -> Any:
        ctx = h2.BarrierTaskContext.get()
        ctx.barrier()
        return ctx.allGather({"rank": ctx.rank(), "blob": b"x" * 100_000})

    out = h2.run(body, num_tasks=2, spark=sc)
    assert [[g["rank"] for g in gathered] for gathered in out] == [[0, 1], [0, 1]]
    server = service_for(sc).server
    assert server.config.tls.enabled and server.config.tls.required_by == "spark.network.crypto.enabled=true"
    assert server.tls_fingerprint is not None and len(server.tls_fingerprint) == 64


def test_rdd_gangs_carry_the_certificate_fingerprint_to_their_tasks(sc: Any) -> None:
    def train(rows: Any) -> Iterator[Any]:
        ctx = h2.BarrierTaskContext.get()
        yield ctx.rank(), sum(ctx.allGather(sum(rows)))

    assert h2.barrier(sc.parallelize(range(8), 2)).mapPartitions(train).collect() == [(0, 28), (1, 28)]
