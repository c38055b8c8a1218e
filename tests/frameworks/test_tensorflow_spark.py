"""sparkhydrogen.tensorflow.run on real Spark (local[2]) with real TensorFlow on CPU (MultiWorkerMirroredStrategy).

Functions shipped to ranks are defined inside the tests (workers cannot import test modules).
Every worker runs in a fresh process, so each test pays TensorFlow's import: they are few.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from sparkutil import spark_session

import sparkhydrogen as h2

pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")
import sparkhydrogen.tensorflow as h2tf  # noqa: E402

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

SAMPLES, GLOBAL_BATCH, LR, EPOCHS = 8, 4, 0.1, 2


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local[2]") as spark:
        yield spark.sparkContext


def data() -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(SAMPLES * 2, dtype="float32").reshape(SAMPLES, 2) / 10
    return x, x @ np.array([[2.0], [-1.0]], dtype="float32") + 0.5


def test_a_cross_worker_all_reduce_gives_the_sum(sc: Any) -> None:
    def step(scale: float) -> dict[str, Any]:
        import json
        import os

        import tensorflow as tf

        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        task = strategy.cluster_resolver.task_id

        def replica() -> Any:
            context = tf.distribute.get_replica_context()
            return context.all_reduce("sum", tf.constant((task + 1) * scale))

        total = strategy.experimental_local_results(strategy.run(replica))[0]
        return {"sum": float(total.numpy()), "replicas": strategy.num_replicas_in_sync, "task": task,
                "config": json.loads(os.environ["TF_CONFIG"])}

    out = h2tf.run(step, 2.0, num_workers=2, return_all=True)
    assert [o["sum"] for o in out] == [6.0, 6.0]  # (1 + 2) * 2 across the workers
    assert [o["task"] for o in out] == [0, 1] and {o["replicas"] for o in out} == {2}
    workers = out[0]["config"]["cluster"]["worker"]
    assert len(set(workers)) == 2 and all(w.startswith("127.0.0.1:") for w in workers)  # one port each


def fit_function(legacy: bool) -> Callable[[], list[Any]]:
    x, y = data()

    def fit() -> list[Any]:
        import tensorflow as tf

        if legacy:
            import tf_keras as keras
        else:
            import keras
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        with strategy.scope():
            model = keras.Sequential([keras.layers.Input((2,)), keras.layers.Dense(
                1, kernel_initializer=keras.initializers.Constant(0.5), bias_initializer="zeros")])
            model.compile(keras.optimizers.SGD(LR), "mse")
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).with_options(options)
        model.fit(dataset, epochs=EPOCHS, verbose=0, shuffle=False)
        return [w.tolist() for w in model.get_weights()]

    return fit


def single_process_reference() -> list[np.ndarray]:
    """Plain SGD on mean squared error over the same global batches, in numpy."""
    x, y = data()
    w, b = np.full((2, 1), 0.5, dtype="float64"), np.zeros(1)
    for _ in range(EPOCHS):
        for start in range(0, SAMPLES, GLOBAL_BATCH):
            xb, yb = x[start:start + GLOBAL_BATCH], y[start:start + GLOBAL_BATCH]
            err = xb @ w + b - yb
            w, b = w - LR * 2 * xb.T @ err / len(xb), b - LR * 2 * err.mean(0)
    return [w, b]


def test_tf_keras_fit_on_two_workers_equals_one_process(sc: Any) -> None:
    out = h2tf.run(fit_function(legacy=True), num_workers=2, return_all=True)
    assert out[0] == out[1]  # identical weights on both workers
    for got, want in zip(out[0], single_process_reference(), strict=True):
        np.testing.assert_allclose(np.array(got), want, atol=1e-5)


def test_keras_3_fit_under_the_strategy_fails_saying_to_use_tf_keras(sc: Any) -> None:
    with pytest.raises(h2.GangFailedError, match=r"rank \d raised sparkhydrogen\.frameworks\.FrameworkError: Keras 3 "
                                                 r"model\.fit does not support .*MultiWorkerMirroredStrategy.*use "
                                                 r"tf-keras"):
        h2tf.run(fit_function(legacy=False), num_workers=2)


def test_a_failing_worker_aborts_the_other_and_is_named(sc: Any) -> None:
    def step() -> None:
        import os

        if os.environ["TF_CONFIG"].endswith('"index": 1}}'):
            raise KeyError("worker one lost its data")
        import tensorflow as tf

        tf.distribute.MultiWorkerMirroredStrategy()  # waits for worker 1, which never comes

    with pytest.raises(h2.GangFailedError, match=r"(?s)rank 1 raised KeyError: 'worker one lost its data'.*"
                                                 r"traceback of rank 1"):
        h2tf.run(step, num_workers=2)
