"""``GangEstimator``: any framework as a Spark ML ``Estimator`` — ``train_fn`` on every rank, ``predict_fn`` to score.

``fit`` launches ``train_fn(config)`` on ``num_workers`` ranks through the chosen launcher with
the projected DataFrame as ``data=``; each rank reads its share (``config["features"]``,
``config["label"]``, ``config["valid"]`` are the column names) with the framework's loader
(``sparkhydrogen.jax.batches``, ``sparkhydrogen.data.numpy_batches``,
``sparkhydrogen.tensorflow.dataset``, ``sparkhydrogen.torch.data_loader``). Rank 0's return
value is the model state; ``transform`` applies ``predict_fn(state, features)`` in batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.util import MLReadable, MLWritable

from ..launch import run as gang_run
from .columns import FEATURES, LABEL, VALID
from .inference import function_device_predictor, function_predictor, prediction_column, staged_predictions
from .params import HasColumnParams, HasGangParams, HasInferenceParams
from .persistence import StageReader, StageWriter
from .summary import TrainingSummary
from .torch_estimator import GangTrainingMixin

__all__ = ["GangEstimator", "GangModel", "launch"]

#: the launchers a name selects
LAUNCHERS = ("gang", "torch", "jax", "tensorflow")


def launch(launcher: Any, fn: Callable[..., Any], config: dict[str, Any], *, num_workers: int, data: Any,
           max_retries: int) -> Any:
    """Run ``fn(config)`` on ``num_workers`` ranks with the named (or given) launcher; rank 0's result."""
    import importlib

    if callable(launcher):
        return launcher(fn, config, num_workers=num_workers, data=data, max_retries=max_retries)
    if launcher == "gang":
        return gang_run(fn, num_workers, args=(config,), data=data, max_retries=max_retries)[0]
    if launcher in ("torch", "jax"):
        module = importlib.import_module(f"sparkhydrogen.{launcher}")
        return module.run(fn, config, num_processes=num_workers, data=data, max_retries=max_retries)
    if launcher == "tensorflow":
        module = importlib.import_module("sparkhydrogen.tensorflow")
        return module.run(fn, config, num_workers=num_workers, data=data, max_retries=max_retries)
    raise ValueError(f"launcher must be one of {list(LAUNCHERS)} or a callable launcher(fn, config, num_workers=, "
                     f"data=, max_retries=), got {launcher!r}")


class GangModel(Model, HasColumnParams, HasInferenceParams, MLReadable["GangModel"], MLWritable):
    """Rank 0's model state and ``predict_fn`` as a Spark ML ``Model``; ``transform`` adds ``prediction_col``."""

    def __init__(self, state: Any = None, predict_fn: Callable[[Any, Any], Any] | None = None, input_width: int = 0,
                 output_width: int = 1) -> None:
        super().__init__()
        self._state = state
        self._predict_fn = predict_fn
        self._input_width = input_width
        self._output_width = output_width
        self._summary = TrainingSummary()

    @property
    def state(self) -> Any:
        """What rank 0's ``train_fn`` returned."""
        return self._state

    @property
    def output_width(self) -> int:
        """Outputs per row (1: the prediction is a double)."""
        return self._output_width

    def _transform(self, dataset: Any) -> Any:
        if self._predict_fn is None:
            raise ValueError("this GangModel has no predict_fn: create it with GangEstimator.fit() or load()")
        profile = self._scoring_profile(dataset)
        if profile is not None:
            model_id, make_on = function_device_predictor(self._predict_fn, self._state, self._output_width)
            return staged_predictions(dataset, self.getFeaturesCol(), model_id, make_on, self._output_width,
                                      self.getInferenceBatchSize(), self.getPredictionCol(), profile, uses_torch=False)
        make = function_predictor(self._predict_fn, self._state, self._output_width)
        column = prediction_column(dataset, self.getFeaturesCol(), make, self._input_width, self._output_width,
                                   self.getInferenceBatchSize())
        return dataset.withColumn(self.getPredictionCol(), column)

    def write(self) -> StageWriter:
        """An ``MLWriter``: metadata JSON plus state and ``predict_fn`` (cloudpickle) in ``<path>/data``."""
        return StageWriter(self)

    @classmethod
    def read(cls) -> StageReader:
        """An ``MLReader`` for a saved model."""
        return StageReader(cls)

    def _extra_metadata(self) -> dict[str, Any]:
        return {"input_width": self._input_width, "output_width": self._output_width}

    def _state_to_save(self) -> Any:
        return {"state": self._state, "predict_fn": self._predict_fn}

    def _restore_saved(self, saved: Any, metadata: dict[str, Any]) -> None:
        self._state, self._predict_fn = saved["state"], saved["predict_fn"]
        self._input_width, self._output_width = int(metadata["input_width"]), int(metadata["output_width"])


class GangEstimator(Estimator[GangModel], GangTrainingMixin, HasGangParams, MLReadable["GangEstimator"],
                    MLWritable):
    """Any framework as an ``Estimator``: ``train_fn(config)`` on every rank, ``predict_fn(state, x)`` to score.

    ``config`` holds ``features``, ``label``, ``valid`` (column names; ``valid`` is ``None``
    without validation), ``batch_size``, ``epochs``, ``shuffle``, ``seed``.

    Example:
        >>> def train_fn(config):                                                        # doctest: +SKIP
        ...     for batch in sparkhydrogen.jax.batches(config["batch_size"], columns=[config["features"],
        ...                                                                      config["label"]]):
        ...         ...
        ...     return params
        >>> GangEstimator(train_fn=train_fn, predict_fn=lambda p, x: x @ p, launcher="jax",
        ...               num_workers=2).fit(df).transform(df)                            # doctest: +SKIP
    """

    @keyword_only
    def __init__(self, *, train_fn: Any = None, predict_fn: Any = None, launcher: Any = "gang",
                 features_col: str | list[str] = "features", label_col: str = "label",
                 prediction_col: str = "prediction", batch_size: int = 32, epochs: int = 1, num_workers: int = 1,
                 use_gpu: bool = False, validation_fraction: float = 0.0, validation_col: str | None = None,
                 shuffle: bool = True, seed: int = 0, max_retries: int = 0, inference_batch_size: int = 1024) -> None:
        super().__init__()
        self._set(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, train_fn: Any = None, predict_fn: Any = None, launcher: Any = "gang",
                  features_col: str | list[str] = "features", label_col: str = "label",
                  prediction_col: str = "prediction", batch_size: int = 32, epochs: int = 1, num_workers: int = 1,
                  use_gpu: bool = False, validation_fraction: float = 0.0, validation_col: str | None = None,
                  shuffle: bool = True, seed: int = 0, max_retries: int = 0,
                  inference_batch_size: int = 1024) -> GangEstimator:
        """Set any of the constructor's Params by keyword."""
        return self._set(**self._input_kwargs)

    def _config(self) -> dict[str, Any]:
        return {"features": FEATURES, "label": LABEL, "valid": VALID if self._has_validation() else None,
                "batch_size": self.getBatchSize(), "epochs": self.getEpochs(), "shuffle": self.getShuffle(),
                "seed": self.getSeed(), "use_gpu": self.getUseGpu()}

    def _fit(self, dataset: Any) -> GangModel:
        import numpy as np
        from pyspark.sql import functions as F

        train_fn, predict_fn = self.getTrainFn(), self.getPredictFn()
        if not callable(train_fn) or not callable(predict_fn):
            raise ValueError("GangEstimator needs train_fn=(config) -> state and predict_fn=(state, features) -> "
                             f"predictions, both callables (got {train_fn!r}, {predict_fn!r})")
        launcher = self.getLauncher()
        if not callable(launcher) and launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {list(LAUNCHERS)} or a callable, got {launcher!r}")
        frame = self._training_frame(dataset)
        with self._tracking():
            state = launch(launcher, train_fn, self._config(), num_workers=self.getNumWorkers(), data=frame,
                           max_retries=self.getMaxRetries())
        first = frame.select(F.size(FEATURES).alias("width")).head()  # one row: the feature width
        if first is None:
            raise ValueError("the training DataFrame is empty")
        width = int(first["width"])
        probe = np.asarray(predict_fn(state, np.zeros((1, width), dtype=np.float32)))
        return self._copyValues(GangModel(state, predict_fn, width, max(int(probe.size), 1)))

    def fitMultiple(self, dataset: Any, paramMaps: Any) -> Any:
        """As ``Estimator.fitMultiple``, each fit logged as a nested MLflow run."""
        return self._fit_multiple(dataset, paramMaps)

    def write(self) -> StageWriter:
        """An ``MLWriter``: metadata JSON plus ``train_fn``/``predict_fn``/``launcher`` (cloudpickle)."""
        return StageWriter(self)

    @classmethod
    def read(cls) -> StageReader:
        """An ``MLReader`` for a saved estimator."""
        return StageReader(cls)
