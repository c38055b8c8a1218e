"""``TorchEstimator`` and ``TorchModel``: a torch ``nn.Module`` trained as a gang, scored in parallel.

``fit`` projects the DataFrame to features/label (no collect), launches
``sparkhydrogen.torch.run(train_rank, spec, num_processes=num_workers, data=frame,
max_retries=...)`` (DDP; one gang checkpoint per epoch) and returns a :class:`TorchModel`
holding rank 0's weights and the training summary. ``transform`` adds the prediction column
through ``predict_batch_udf``.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.util import MLReadable, MLWritable

from ..torch import run as torch_run
from .columns import training_frame
from .inference import prediction_column, staged_predictions, torch_device_predictor, torch_predictor
from .params import HasColumnParams, HasInferenceParams, HasTorchParams, HasTrainingParams
from .persistence import StageReader, StageWriter
from .summary import TrainingSummary
from .torch_rank import RankResult, TorchTrainSpec, build_module, train_rank
from .tracking import active_run_id, fit_tracking

__all__ = ["TorchEstimator", "TorchModel", "GangTrainingMixin"]

log = logging.getLogger("sparkhydrogen.ml")


M = TypeVar("M", bound="TorchModel")


class GangTrainingMixin(HasColumnParams, HasTrainingParams, HasInferenceParams):
    """The Params and the data projection every gang estimator shares."""

    _input_kwargs: dict[str, Any]  # set by pyspark's @keyword_only
    _nested_tracking: bool = False  # a fit started by fitMultiple (CrossValidator): a nested MLflow run
    _parent_run_id: str | None = None  # the run it nests under

    def _training_frame(self, dataset: Any, with_label: bool = True) -> Any:
        return training_frame(dataset, self.getFeaturesCol(), self.getLabelCol() if with_label else None,
                              validation_col=self.getValidationCol(),
                              validation_fraction=self.getValidationFraction(), seed=self.getSeed())

    def _has_validation(self) -> bool:
        return self.getValidationCol() is not None or self.getValidationFraction() > 0

    def _tracking(self) -> Any:
        """This fit's MLflow context: nested under the caller's run when started by :meth:`_fit_multiple`."""
        return fit_tracking(self._json_params(), nested=self._nested_tracking, parent_run_id=self._parent_run_id)

    def _train_torch(self, dataset: Any, frame: Any, rank_fn: Any, spec: Any, model_cls: type[M],
                     **launch: Any) -> M:
        """Train ``spec.model`` with ``rank_fn`` on the gang (``sparkhydrogen.torch.run`` over ``frame``) and
        return the fitted ``model_cls`` with its training summary, logged into this fit's MLflow run."""
        with self._tracking() as tracker:
            result: RankResult = torch_run(rank_fn, spec, num_processes=self.getNumWorkers(), data=frame,
                                           max_retries=self.getMaxRetries(), **launch)
            module = build_module(spec.model)
            module.load_state_dict(result.state_dict)
            summary = TrainingSummary.from_ranks(result.history, resumed_from_epoch=result.resumed_from_epoch,
                                                 attempts=result.attempts)
            model = self._copyValues(model_cls(module, result.input_width, result.output_width, summary))
            tracker.log_fit(summary, model, dataset)
        return model

    def _fit_multiple(self, dataset: Any, paramMaps: Any) -> Any:
        """``Estimator.fitMultiple`` with every fit logged as a nested run of the caller's active MLflow run
        (``CrossValidator``/``TrainValidationSplit`` fit in worker threads, which do not see that run)."""
        estimator = self.copy()
        estimator._nested_tracking = True
        estimator._parent_run_id = active_run_id()
        return Estimator.fitMultiple(estimator, dataset, paramMaps)  # type: ignore[arg-type]

    def _json_params(self) -> dict[str, Any]:
        """The Params as plain values (for tracking): objects by their names."""
        values: dict[str, Any] = {}
        for param in self.params:
            if not self.isDefined(param):
                continue
            value = self.getOrDefault(param)
            if value is None or isinstance(value, (bool, int, float, str)):
                values[param.name] = value
            elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                values[param.name] = ",".join(value)
            elif isinstance(value, dict):
                values[param.name] = {k: v if isinstance(v, (bool, int, float, str)) else _name(v)
                                      for k, v in value.items()}
            else:
                values[param.name] = _name(value)
        return values


def _name(value: Any) -> str:
    kind = value if isinstance(value, type) else type(value)
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}".lstrip(".")
    return f"{kind.__module__}.{kind.__qualname__}"


class TorchModel(Model, HasColumnParams, HasInferenceParams, MLReadable["TorchModel"], MLWritable):
    """A trained torch module as a Spark ML ``Model``: ``transform`` adds ``prediction_col``.

    ``module`` is the trained ``nn.Module`` (on the CPU), ``summary`` the
    :class:`~sparkhydrogen.ml.TrainingSummary` of the fit.

    Example:
        >>> model = TorchEstimator(model=net, loss=torch.nn.MSELoss(), epochs=2).fit(df)   # doctest: +SKIP
        >>> model.transform(df).select("prediction").show()                                  # doctest: +SKIP
    """

    def __init__(self, module: Any = None, input_width: int = 0, output_width: int = 1,
                 summary: TrainingSummary | None = None) -> None:
        super().__init__()
        self._module = module
        self._input_width = input_width
        self._output_width = output_width
        self._summary = summary

    @property
    def module(self) -> Any:
        """The trained ``torch.nn.Module``."""
        return self._module

    @property
    def input_width(self) -> int:
        """How many features a row has."""
        return self._input_width

    @property
    def output_width(self) -> int:
        """How many outputs the module has per row (1: the prediction is a double)."""
        return self._output_width

    @property
    def hasSummary(self) -> bool:
        """Whether a training summary exists (it does after ``fit`` and after loading a saved model)."""
        return self._summary is not None

    @property
    def summary(self) -> TrainingSummary:
        """Per-epoch ``train_loss``/``val_loss`` (and named metrics): rank 0's and the mean over ranks."""
        if self._summary is None:
            raise RuntimeError(f"no training summary available for this {type(self).__name__}")
        return self._summary

    def input_example(self, dataset: Any, rows: int = 5) -> tuple[Any, Any] | None:
        """A few rows of ``dataset``'s features as a pandas DataFrame (one column per feature: the
        ``features_col`` names, or ``<features_col>_<i>`` for a vector/array), and the module's output for them.

        What MLflow's model signature is made of; ``None`` for an empty DataFrame.
        """
        import numpy as np
        import pandas as pd
        import torch

        from .columns import FEATURES, feature_expression

        found = dataset.select(feature_expression(dataset, self.getFeaturesCol()).alias(FEATURES)).limit(rows)
        values = [r[FEATURES] for r in found.collect()]
        if not values:
            return None
        x = np.asarray(values, dtype=np.float32)
        names = self.getFeaturesCol()
        columns = names if isinstance(names, list) and len(names) == x.shape[1] else [
            f"{names if isinstance(names, str) else 'features'}_{i}" for i in range(x.shape[1])]
        with torch.no_grad():
            output = self._module(torch.from_numpy(x)).detach().numpy()
        return pd.DataFrame(x.astype(np.float64), columns=columns), output  # Spark's doubles; fed as float32

    def _make_predict_fn(self) -> Any:
        return torch_predictor(self._module, self._output_width, self.getUseGpu())

    def _transform(self, dataset: Any) -> Any:
        if self._module is None:
            raise ValueError(f"this {type(self).__name__} has no trained module: create it with fit() or load()")
        profile = self._scoring_profile(dataset)
        if profile is not None:
            model_id, make = torch_device_predictor(self._module, self._output_width)
            return staged_predictions(dataset, self.getFeaturesCol(), model_id, make, self._output_width,
                                      self.getInferenceBatchSize(), self.getPredictionCol(), profile, uses_torch=True)
        column = prediction_column(dataset, self.getFeaturesCol(), self._make_predict_fn(), self._input_width,
                                   self._output_width, self.getInferenceBatchSize())
        return dataset.withColumn(self.getPredictionCol(), column)

    # persistence ------------------------------------------------------------
    def write(self) -> StageWriter:
        """An ``MLWriter``: metadata JSON plus the module (cloudpickle) in ``<path>/data``."""
        return StageWriter(self)

    @classmethod
    def read(cls) -> StageReader:
        """An ``MLReader`` for a saved model."""
        return StageReader(cls)

    def _extra_metadata(self) -> dict[str, Any]:
        return {"input_width": self._input_width, "output_width": self._output_width,
                "summary": self._summary.to_json() if self._summary is not None else None}

    def _state_to_save(self) -> Any:
        return self._module

    def _restore_saved(self, state: Any, metadata: dict[str, Any]) -> None:
        self._module = state
        self._input_width = int(metadata["input_width"])
        self._output_width = int(metadata["output_width"])
        summary = metadata.get("summary")
        self._summary = TrainingSummary.from_json(summary) if summary else None


class TorchEstimator(Estimator[TorchModel], GangTrainingMixin, HasTorchParams, MLReadable["TorchEstimator"],
                     MLWritable):
    """Train a ``torch.nn.Module`` on ``num_workers`` gang ranks with DDP; ``fit`` returns a :class:`TorchModel`.

    Every keyword is a Spark ML ``Param`` (``est.getParam("batch_size")`` works in a
    ``ParamGridBuilder``); see ``docs/ml.md`` for the data flow, the checkpoints and
    what each rank reads.

    Example:
        >>> est = TorchEstimator(model=lambda: torch.nn.Linear(4, 2), loss=torch.nn.CrossEntropyLoss(),
        ...                      optimizer=torch.optim.SGD, learning_rate=0.1, batch_size=32, epochs=3,
        ...                      num_workers=2, features_col="features", label_col="label")   # doctest: +SKIP
        >>> Pipeline(stages=[VectorAssembler(...), StandardScaler(...), est]).fit(df)       # doctest: +SKIP
    """

    @keyword_only
    def __init__(self, *, model: Any = None, loss: Any = None, optimizer: Any = None,
                 optimizer_params: dict[str, Any] | None = None, learning_rate: float | None = None,
                 metrics: dict[str, Any] | None = None, features_col: str | list[str] = "features",
                 label_col: str = "label", prediction_col: str = "prediction", batch_size: int = 32,
                 epochs: int = 1, num_workers: int = 1, use_gpu: bool = False, validation_fraction: float = 0.0,
                 validation_col: str | None = None, shuffle: bool = True, seed: int = 0, max_retries: int = 0,
                 inference_batch_size: int = 1024) -> None:
        super().__init__()
        self._set(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, model: Any = None, loss: Any = None, optimizer: Any = None,
                  optimizer_params: dict[str, Any] | None = None, learning_rate: float | None = None,
                  metrics: dict[str, Any] | None = None, features_col: str | list[str] = "features",
                  label_col: str = "label", prediction_col: str = "prediction", batch_size: int = 32,
                  epochs: int = 1, num_workers: int = 1, use_gpu: bool = False, validation_fraction: float = 0.0,
                  validation_col: str | None = None, shuffle: bool = True, seed: int = 0, max_retries: int = 0,
                  inference_batch_size: int = 1024) -> TorchEstimator:
        """Set any of the constructor's Params by keyword."""
        return self._set(**self._input_kwargs)

    def _spec(self) -> TorchTrainSpec:
        if self.getModel() is None:
            raise ValueError("TorchEstimator needs model=: a torch.nn.Module or a zero-argument factory")
        if self.getLoss() is None:
            raise ValueError("TorchEstimator needs loss=: e.g. torch.nn.CrossEntropyLoss() or a callable "
                             "(output, label) -> scalar tensor")
        options = dict(self.getOptimizerParams())
        if self.getLearningRate() is not None:
            options["lr"] = self.getLearningRate()
        return TorchTrainSpec(model=self.getModel(), loss=self.getLoss(), optimizer=self.getOptimizer(),
                              optimizer_params=options, batch_size=self.getBatchSize(), epochs=self.getEpochs(),
                              shuffle=self.getShuffle(), seed=self.getSeed(), validation=self._has_validation(),
                              metrics=dict(self.getMetrics()))

    def _fit(self, dataset: Any) -> TorchModel:
        spec = self._spec()
        frame = self._training_frame(dataset)
        return self._train_torch(dataset, frame, train_rank, spec, TorchModel, use_gpu=self.getUseGpu())

    def fitMultiple(self, dataset: Any, paramMaps: Any) -> Any:
        """As ``Estimator.fitMultiple``, each fit logged as a nested MLflow run (``CrossValidator``'s folds)."""
        return self._fit_multiple(dataset, paramMaps)

    # persistence ------------------------------------------------------------
    def write(self) -> StageWriter:
        """An ``MLWriter``: metadata JSON plus the object Params (cloudpickle) in ``<path>/data``."""
        return StageWriter(self)

    @classmethod
    def read(cls) -> StageReader:
        """An ``MLReader`` for a saved estimator."""
        return StageReader(cls)
