"""The launchers on Spark Connect (``SparkSession.builder.remote``): torch (distributed and local mode) and Horovod.

Under Connect the client is not reachable from executors: rank 0's task hosts the coordinator
(and, for Horovod, the gloo rendezvous); local mode runs its ranks on this machine.
"""

from __future__ import annotations

from typing import Any

import pytest

import sparkhydrogen as h2

pytest.importorskip("grpc")
pytest.importorskip("torch")

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def spark(connect_spark: Any) -> Any:
    return connect_spark  # tests/conftest.py: Connect on local[2]


def _allreduce() -> Any:
    def train(scale: float) -> float:  # nested: pickled by value (the tests are not importable on executors)
        import torch
        import torch.distributed as dist

        t = torch.ones(1) * (dist.get_rank() + 1) * scale
        dist.all_reduce(t)
        return float(t.item())

    return train


def test_torch_run_distributed_on_connect(spark: Any) -> None:
    import sparkhydrogen.torch as h2torch

    assert h2torch.run(_allreduce(), 2.0, num_processes=2, spark=spark, return_all=True) == [6.0, 6.0]


def test_torch_run_local_mode_on_connect(spark: Any) -> None:
    import sparkhydrogen.torch as h2torch

    assert h2torch.run(_allreduce(), 1.0, num_processes=2, local_mode=True, spark=spark) == 3.0


def test_torch_failure_on_connect_names_the_rank(spark: Any) -> None:
    import sparkhydrogen.torch as h2torch

    def train() -> None:
        import torch.distributed as dist

        if dist.get_rank() == 1:
            raise KeyError("missing_feature")
        dist.barrier()

    with pytest.raises(h2.GangFailedError, match=r"rank 1 raised KeyError: 'missing_feature'") as info:
        h2torch.run(train, num_processes=2, spark=spark)
    assert info.value.failed_rank == 1


def test_horovod_run_on_connect(spark: Any) -> None:
    pytest.importorskip("horovod.torch")
    import sparkhydrogen.horovod as h2hvd

    def fn() -> float:
        import horovod.torch as hvd
        import torch

        hvd.init()
        return float(hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum).item())

    assert h2hvd.run(fn, num_proc=2, spark=spark) == [3.0, 3.0]
