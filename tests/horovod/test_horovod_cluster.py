"""Horovod across two executor JVMs (local-cluster[2,1,1024])."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen.horovod as h2hvd

pytest.importorskip("torch")
pytest.importorskip("horovod.torch")

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local-cluster[2,1,1024]", **{"spark.executor.memory": "768m"}) as spark:
        yield spark.sparkContext


def test_allreduce_across_executors(sc: Any) -> None:
    def fn() -> tuple[int, int, int, float]:
        import os

        import horovod.torch as hvd
        import torch

        hvd.init()
        total = hvd.allreduce(torch.tensor([float(os.getpid())]), op=hvd.Sum).item()
        return hvd.rank(), hvd.local_rank(), hvd.local_size(), total

    out = h2hvd.run(fn, num_proc=2, spark=sc)
    assert [(r, lr, ls) for r, lr, ls, _ in out] == [(0, 0, 2), (1, 1, 2)]  # one host, two executors
    assert out[0][3] == out[1][3] and out[0][3] > 0
