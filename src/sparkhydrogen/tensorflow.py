"""TensorFlow on Spark: ``sparkhydrogen.tensorflow.run(fn, *args, num_workers=N)``.

Every rank is one TensorFlow worker with ``TF_CONFIG`` set, each listing every worker at
a port that worker reserved, so ``tf.distribute.MultiWorkerMirroredStrategy()`` just works
in ``fn``::

    import sparkhydrogen.tensorflow as h2tf

    def train():
        import tensorflow as tf
        import tf_keras as keras                      # Keras 2: model.fit under MWMS
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        with strategy.scope():
            model = keras.Sequential([keras.layers.Dense(1)])
            model.compile("sgd", "mse")
        model.fit(dataset, epochs=2)
        return model.get_weights()

    weights = h2tf.run(train, num_workers=2)

Importing this module does not import TensorFlow (``spark-hydrogen[tensorflow]`` installs it
and tf-keras on the ranks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .data.tensorflow_feed import dataset
from .frameworks import KERAS3_FIT_MESSAGE, TensorFlowMultiWorker
from .frameworks.launch import check_count
from .frameworks.launch import run as _run_framework

__all__ = ["run", "dataset", "TensorFlowMultiWorker", "KERAS3_FIT_MESSAGE"]


def run(fn: Callable[..., Any], *args: Any, num_workers: int, return_all: bool = False, max_retries: int = 0,
        retry_backoff: float = 0.5, stream_logs: bool = True, spark: Any = None,
        env: Mapping[str, str] | None = None, resources: Any = None, data: Any = None, legacy_keras: bool = True,
        **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on ``num_workers`` TensorFlow workers, one per barrier task; rank 0's result.

    * ``TF_CONFIG`` is set (worker ``i`` is task ``{"type": "worker", "index": i}``), so
      ``MultiWorkerMirroredStrategy()`` in ``fn`` forms the cluster; Keras 3's
      ``keras.distribution.initialize()`` finds ``KERAS_DISTRIBUTION_*`` too.
    * Each worker runs ``fn`` in a fresh Python process (TensorFlow sets up its collectives
      once per process). With ``legacy_keras`` (default) ``TF_USE_LEGACY_KERAS=1`` is set
      there, so ``tf.keras`` is tf-keras, whose ``model.fit`` supports the strategy; Keras 3's
      ``model.fit`` under the strategy fails with a :class:`~sparkhydrogen.frameworks.FrameworkError`
      that says so.
    * ``resources`` is :func:`sparkhydrogen.run`'s. ``data`` is refused here: the workers'
      fresh processes cannot read their task's stream; read a share with
      :func:`sparkhydrogen.tensorflow.dataset` inside ``sparkhydrogen.run(fn, n, data=df)``.
    * Returns rank 0's return value (``return_all=True``: every rank's, in rank order). A
      failing worker aborts the others and is named with its traceback; ``max_retries``
      relaunches; ``stream_logs`` prints every worker's output on the driver, ``[rank N]``.

    The keyword names above are the launcher's; every other keyword goes to ``fn``.
    """
    if isinstance(num_workers, (tuple, list)) or type(num_workers).__name__ == "SizeRange":
        raise ValueError(f"num_workers={num_workers!r}: TensorFlow gangs have a fixed size: this launcher does "
                         "not resize them (MultiWorkerMirroredStrategy fixes its cluster from TF_CONFIG, and "
                         "tf.keras's BackupAndRestore resumes on the same number of workers); pass an int "
                         "(elastic gangs: sparkhydrogen.torch, .horovod, .jax or sparkhydrogen.run; docs/elastic.md)")
    check_count("num_workers", num_workers)
    if not isinstance(legacy_keras, bool):
        raise TypeError(f"legacy_keras must be True or False, got {legacy_keras!r}")
    return _run_framework(TensorFlowMultiWorker(legacy_keras=legacy_keras), fn, *args, num_tasks=num_workers,
                          return_all=return_all, max_retries=max_retries, retry_backoff=retry_backoff,
                          stream_logs=stream_logs, spark=spark, env=env, resources=resources, data=data,
                          **kwargs)
