"""Framework launchers on Spark Connect (``SparkSession.builder.remote("local[2]")``): rank 0's task hosts the
coordinator, the layout forms through it as on classic Spark.
"""

from __future__ import annotations

from typing import Any

import pytest

import sparkhydrogen as h2

pytest.importorskip("grpc")

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def spark(connect_spark: Any) -> Any:
    return connect_spark  # tests/conftest.py: Connect on local[2]


def test_a_framework_of_our_own_on_connect(spark: Any) -> None:
    from sparkhydrogen.frameworks import TensorFlowMultiWorker, run

    def peek() -> str:
        import os

        return os.environ["TF_CONFIG"]

    configs = run(TensorFlowMultiWorker(), peek, num_tasks=2, spark=spark, return_all=True)
    assert configs[0].replace('"index": 0', "") == configs[1].replace('"index": 1', "")  # one cluster, two tasks


def test_jax_on_connect_and_a_failing_rank_is_named(spark: Any) -> None:
    pytest.importorskip("jax")
    import sparkhydrogen.jax as h2jax

    def step(fail: bool) -> list[int]:
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.experimental import multihost_utils

        if fail and jax.process_index() == 1:
            raise LookupError("no shard for process 1")
        return np.asarray(multihost_utils.process_allgather(jnp.array([jax.process_index() + 1]))).ravel().tolist()

    assert h2jax.run(step, False, num_processes=2, spark=spark) == [1, 2]
    with pytest.raises(h2.GangFailedError, match=r"rank 1 raised LookupError: no shard for process 1") as info:
        h2jax.run(step, True, num_processes=2, spark=spark)
    assert info.value.failed_rank == 1
