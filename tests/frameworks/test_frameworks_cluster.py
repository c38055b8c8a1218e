"""Framework launchers across real executor JVMs: local-cluster[2,1,1024] (one rank per executor).

TensorFlow workers and JAX processes in different executors: the layout's hosts, ports and
TF_CONFIG come from where Spark placed the tasks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sparkutil import spark_session, wait_for_executors

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(360)]


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local-cluster[2,1,1024]") as spark:
        wait_for_executors(spark.sparkContext, 2)
        yield spark.sparkContext


def test_tensorflow_all_reduce_across_executors(sc: Any) -> None:
    pytest.importorskip("tensorflow")
    import sparkhydrogen.tensorflow as h2tf

    def step() -> tuple[float, int]:
        import tensorflow as tf

        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        task = strategy.cluster_resolver.task_id
        total = strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", tf.constant(task + 1.0)))
        return float(strategy.experimental_local_results(total)[0].numpy()), strategy.num_replicas_in_sync

    assert h2tf.run(step, num_workers=2, return_all=True) == [(3.0, 2), (3.0, 2)]


def test_jax_processes_across_executors(sc: Any) -> None:
    pytest.importorskip("jax")
    import sparkhydrogen.jax as h2jax

    def step() -> tuple[int, list[int], int]:
        import os

        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.experimental import multihost_utils

        got = np.asarray(multihost_utils.process_allgather(jnp.array([jax.process_index() * 10]))).ravel().tolist()
        return jax.process_count(), got, os.getpid()

    out = h2jax.run(step, num_processes=2, return_all=True)
    assert [o[:2] for o in out] == [(2, [0, 10])] * 2 and out[0][2] != out[1][2]
