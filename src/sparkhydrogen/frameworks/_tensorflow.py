"""TensorFlow's ``TF_CONFIG`` (``MultiWorkerMirroredStrategy``) and Keras 3's distribution variables from a layout."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .api import Framework, FrameworkError, GangLayout, PortSource

__all__ = ["TensorFlowMultiWorker", "KERAS3_FIT_MESSAGE"]

KERAS3_FIT_MESSAGE = (
    "Keras 3 model.fit does not support tf.distribute.MultiWorkerMirroredStrategy (keras-team/keras#20585, "
    "tensorflow/tensorflow#72388): use tf-keras (Keras 2) for model.fit across workers: `import tf_keras as "
    "keras` in fn, or `tf.keras` with sparkhydrogen.tensorflow.run(..., legacy_keras=True) (the default, which "
    "sets TF_USE_LEGACY_KERAS=1 in each worker's fresh process); install it with pip install "
    "'spark-hydrogen[tensorflow]'. Custom training loops with strategy.run work with either Keras"
)


@dataclass(frozen=True)
class TensorFlowMultiWorker(Framework):
    """``TF_CONFIG`` naming every worker at a port it reserved; Keras 3's ``KERAS_DISTRIBUTION_*`` too.

    Every worker reserves a port on its host and releases it right before its fresh
    process starts (TensorFlow's gRPC server binds it when the strategy is created).
    Each rank runs in a fresh Python process: TensorFlow configures its collective ops
    once per process, and ``TF_USE_LEGACY_KERAS`` only counts before TensorFlow is first
    imported, so neither may meet a reused Python worker that ran TensorFlow before.

    >>> env = TensorFlowMultiWorker().environment(GangLayout(rank=1, hosts=("a", "b"), ports=((1,), (2,))))
    >>> env["TF_CONFIG"]
    '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}'
    """

    legacy_keras: bool = True

    name = "tensorflow"
    port_handover = PortSource.RELEASE
    fresh_process = True

    def ports(self, rank: int, world_size: int) -> int:
        return 1

    def environment(self, layout: GangLayout) -> dict[str, str]:
        workers = layout.addresses()
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": layout.rank}}
        env = {
            "TF_CONFIG": json.dumps(config),
            "KERAS_DISTRIBUTION_JOB_ADDRESSES": ",".join(workers),
            "KERAS_DISTRIBUTION_NUM_PROCESSES": str(layout.world_size),
            "KERAS_DISTRIBUTION_PROCESS_ID": str(layout.rank),
        }
        if self.legacy_keras:
            env["TF_USE_LEGACY_KERAS"] = "1"
        return env

    def explain(self, exc: BaseException) -> BaseException | None:
        if isinstance(exc, ValueError) and "PerReplica" in str(exc):
            return FrameworkError(KERAS3_FIT_MESSAGE)
        return None
