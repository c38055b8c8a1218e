"""The Spark ML ``Param`` s of the estimators and models, as mixins (no torch, no Spark session needed).

Names follow ``xgboost.spark``'s Python-first style: ``batch_size``, ``features_col`` ... are
the Params' own names, so ``est.getParam("batch_size")`` works in a ``ParamGridBuilder``;
every Param has a ``setX``/``getX`` pair in pyspark's camelCase (``setBatchSize``).

Params whose values are Python objects (``model``, ``loss``, ``optimizer``, ``metrics``,
``train_fn`` ...) are listed in :data:`OBJECT_PARAMS`: they are saved with cloudpickle
next to the JSON metadata (see :mod:`sparkhydrogen.ml.persistence`).

Example:
    >>> from pyspark.ml.param import Params
    >>> class P(HasTrainingParams, Params): pass
    >>> P().getOrDefault("batch_size")
    32
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pyspark.ml.param import Param, Params, TypeConverters

from ..launch.resources import stage_resources

__all__ = ["OBJECT_PARAMS", "to_columns", "to_optional_string", "to_mapping", "to_inference_resources",
           "HasColumnParams", "HasTrainingParams", "HasInferenceParams", "HasTorchParams", "HasGangParams"]

#: Params holding Python objects: not JSON, saved with cloudpickle next to the metadata.
OBJECT_PARAMS = frozenset({"model", "loss", "optimizer", "optimizer_params", "metrics", "train_fn", "predict_fn",
                           "launcher", "trainer_params"})


def to_columns(value: Any) -> str | list[str]:
    """A column name, or a non-empty list of names (``features_col``).

    >>> to_columns("features"), to_columns(("a", "b"))
    ('features', ['a', 'b'])
    """
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Sequence) and not isinstance(value, str) and value and all(
            isinstance(v, str) and v for v in value):
        return list(value)
    raise TypeError(f"expected a column name or a non-empty list of column names, got {value!r}")


def to_optional_string(value: Any) -> str | None:
    """``None`` or a non-empty string (``validation_col``)."""
    if value is None or (isinstance(value, str) and value):
        return value
    raise TypeError(f"expected a column name or None, got {value!r}")


def to_mapping(value: Any) -> dict[str, Any]:
    """A dict with string keys (``optimizer_params``, ``metrics``); ``None`` is an empty dict."""
    if value is None:
        return {}
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return dict(value)
    raise TypeError(f"expected a dict with string keys, got {value!r}")


def _to_positive_int(value: Any) -> int:
    number = TypeConverters.toInt(value)
    if number < 1:
        raise ValueError(f"expected an int >= 1, got {value!r}")
    return number


def _to_non_negative_int(value: Any) -> int:
    number = TypeConverters.toInt(value)
    if number < 0:
        raise ValueError(f"expected an int >= 0, got {value!r}")
    return number


def _to_fraction(value: Any) -> float:
    number = TypeConverters.toFloat(value)
    if not 0.0 <= number < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {value!r}")
    return number


def _to_optional_float(value: Any) -> float | None:
    return None if value is None else TypeConverters.toFloat(value)


def to_inference_resources(value: Any) -> dict[str, Any] | None:
    """``None``, or a dict of task resources for the scoring stage (``inference_resources``).

    >>> to_inference_resources({"gpu": 1}), to_inference_resources(None)
    ({'gpu': 1}, None)
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"inference_resources must be a dict such as {{'gpu': 1}} or None, got {value!r}")
    stage_resources(value)  # validates names and amounts
    return dict(value)


def _identity(value: Any) -> Any:
    return value


def _param(name: str, doc: str, converter: Callable[[Any], Any] = _identity) -> Param[Any]:
    return Param(Params._dummy(), name, doc, typeConverter=converter)


class HasColumnParams(Params):
    """``features_col``, ``label_col``, ``prediction_col``."""

    features_col: Param[Any] = _param(
        "features_col", "the input features: a vector column (e.g. VectorAssembler's output) or a list of "
        "numeric or array columns, concatenated in order", to_columns)
    label_col: Param[str] = _param("label_col", "the label column: numeric (class index or target) or an array",
                                   TypeConverters.toString)
    prediction_col: Param[str] = _param(
        "prediction_col", "the output column: a double for a model with one output, else an array of doubles",
        TypeConverters.toString)

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(features_col="features", label_col="label", prediction_col="prediction")

    def setFeaturesCol(self, value: str | list[str]) -> Any:
        """Set ``features_col``."""
        return self._set(features_col=value)

    def getFeaturesCol(self) -> str | list[str]:
        """The ``features_col``."""
        return self.getOrDefault(self.features_col)  # type: ignore[no-any-return]

    def setLabelCol(self, value: str) -> Any:
        """Set ``label_col``."""
        return self._set(label_col=value)

    def getLabelCol(self) -> str:
        """The ``label_col``."""
        return self.getOrDefault(self.label_col)

    def setPredictionCol(self, value: str) -> Any:
        """Set ``prediction_col``."""
        return self._set(prediction_col=value)

    def getPredictionCol(self) -> str:
        """The ``prediction_col``."""
        return self.getOrDefault(self.prediction_col)


class HasInferenceParams(Params):
    """``inference_batch_size``, ``use_gpu`` and ``inference_resources`` (shared by estimators and models)."""

    inference_batch_size: Param[int] = _param(
        "inference_batch_size", "rows per batch in transform() (predict_batch_udf's batch_size)", _to_positive_int)
    use_gpu: Param[bool] = _param("use_gpu", "train on each rank's Spark-assigned GPU, and predict on a GPU "
                                  "when the Python worker has one", TypeConverters.toBoolean)
    inference_resources: Param[dict[str, Any] | None] = _param(
        "inference_resources", "task resources of transform()'s scoring stage, e.g. {'gpu': 1} (stage-level "
        "scheduling; each task predicts on its assigned GPU); None: predict_batch_udf with the application's "
        "task resources", to_inference_resources)

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(inference_batch_size=1024, use_gpu=False, inference_resources=None)

    def setInferenceResources(self, value: dict[str, Any] | None) -> Any:
        """Set ``inference_resources``."""
        return self._set(inference_resources=value)

    def getInferenceResources(self) -> dict[str, Any] | None:
        """The ``inference_resources``."""
        return self.getOrDefault(self.inference_resources)

    def _scoring_profile(self, dataset: Any) -> Any:
        """The pyspark ``ResourceProfile`` of the scoring stage, or ``None`` without ``inference_resources``."""
        wanted = self.getInferenceResources()
        if wanted is None:
            return None
        from ..launch.resources import profile_for
        from ..launch.session import resolve

        resources = stage_resources(wanted)
        assert resources is not None
        return profile_for(resolve(dataset.sparkSession), resources)

    def setInferenceBatchSize(self, value: int) -> Any:
        """Set ``inference_batch_size``."""
        return self._set(inference_batch_size=value)

    def getInferenceBatchSize(self) -> int:
        """The ``inference_batch_size``."""
        return self.getOrDefault(self.inference_batch_size)

    def setUseGpu(self, value: bool) -> Any:
        """Set ``use_gpu``."""
        return self._set(use_gpu=value)

    def getUseGpu(self) -> bool:
        """The ``use_gpu``."""
        return self.getOrDefault(self.use_gpu)


class HasTrainingParams(Params):
    """What every gang estimator shares: data, epochs, gang size, validation, retries."""

    batch_size: Param[int] = _param("batch_size", "rows per training batch on each rank (the global batch is "
                                    "batch_size x num_workers)", _to_positive_int)
    epochs: Param[int] = _param("epochs", "passes over the training data", _to_positive_int)
    num_workers: Param[int] = _param("num_workers", "gang ranks (one Spark barrier task each)", _to_positive_int)
    validation_fraction: Param[float] = _param(
        "validation_fraction", "fraction of rows held out for validation (rand(seed) < fraction), 0 for none; "
        "ignored when validation_col is set", _to_fraction)
    validation_col: Param[str | None] = _param(
        "validation_col", "a boolean column marking validation rows (None: use validation_fraction)",
        to_optional_string)
    shuffle: Param[bool] = _param("shuffle", "shuffle each rank's rows every epoch (seeded by seed, rank, epoch)",
                                  TypeConverters.toBoolean)
    seed: Param[int] = _param("seed", "seeds torch on every rank, the shuffle and the validation split",
                              TypeConverters.toInt)
    max_retries: Param[int] = _param(
        "max_retries", "relaunch the whole gang this many times after a failure; training resumes from the "
        "last epoch checkpoint", _to_non_negative_int)

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(batch_size=32, epochs=1, num_workers=1, validation_fraction=0.0, validation_col=None,
                         shuffle=True, seed=0, max_retries=0)

    def setBatchSize(self, value: int) -> Any:
        """Set ``batch_size``."""
        return self._set(batch_size=value)

    def getBatchSize(self) -> int:
        """The ``batch_size``."""
        return self.getOrDefault(self.batch_size)

    def setEpochs(self, value: int) -> Any:
        """Set ``epochs``."""
        return self._set(epochs=value)

    def getEpochs(self) -> int:
        """The ``epochs``."""
        return self.getOrDefault(self.epochs)

    def setNumWorkers(self, value: int) -> Any:
        """Set ``num_workers``."""
        return self._set(num_workers=value)

    def getNumWorkers(self) -> int:
        """The ``num_workers``."""
        return self.getOrDefault(self.num_workers)

    def setValidationFraction(self, value: float) -> Any:
        """Set ``validation_fraction``."""
        return self._set(validation_fraction=value)

    def getValidationFraction(self) -> float:
        """The ``validation_fraction``."""
        return self.getOrDefault(self.validation_fraction)

    def setValidationCol(self, value: str | None) -> Any:
        """Set ``validation_col``."""
        return self._set(validation_col=value)

    def getValidationCol(self) -> str | None:
        """The ``validation_col``."""
        return self.getOrDefault(self.validation_col)

    def setShuffle(self, value: bool) -> Any:
        """Set ``shuffle``."""
        return self._set(shuffle=value)

    def getShuffle(self) -> bool:
        """The ``shuffle``."""
        return self.getOrDefault(self.shuffle)

    def setSeed(self, value: int) -> Any:
        """Set ``seed``."""
        return self._set(seed=value)

    def getSeed(self) -> int:
        """The ``seed``."""
        return self.getOrDefault(self.seed)

    def setMaxRetries(self, value: int) -> Any:
        """Set ``max_retries``."""
        return self._set(max_retries=value)

    def getMaxRetries(self) -> int:
        """The ``max_retries``."""
        return self.getOrDefault(self.max_retries)


class HasTorchParams(Params):
    """``model``, ``loss``, ``optimizer``, ``optimizer_params``, ``learning_rate``, ``metrics``."""

    model: Param[Any] = _param("model", "the torch.nn.Module to train (copied, never changed), or a zero-argument "
                               "factory returning one")
    loss: Param[Any] = _param("loss", "the loss: a callable (output, label) -> scalar tensor, a torch loss module, "
                              "or a loss class (instantiated without arguments)")
    optimizer: Param[Any] = _param("optimizer", "a torch optimizer class (default torch.optim.Adam), or a factory "
                                   "(parameters) -> optimizer")
    optimizer_params: Param[dict[str, Any]] = _param(
        "optimizer_params", "keyword arguments of the optimizer class, e.g. {'momentum': 0.9}", to_mapping)
    learning_rate: Param[float | None] = _param(
        "learning_rate", "the optimizer's lr (overrides optimizer_params['lr']; None: the optimizer's default)",
        _to_optional_float)
    metrics: Param[dict[str, Any]] = _param(
        "metrics", "extra per-epoch metrics: {name: fn(output, label) -> float}, averaged over rows, logged as "
        "train_<name> and val_<name>", to_mapping)

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(model=None, loss=None, optimizer=None, optimizer_params={}, learning_rate=None, metrics={})

    def setModel(self, value: Any) -> Any:
        """Set ``model``."""
        return self._set(model=value)

    def getModel(self) -> Any:
        """The ``model``."""
        return self.getOrDefault(self.model)

    def setLoss(self, value: Any) -> Any:
        """Set ``loss``."""
        return self._set(loss=value)

    def getLoss(self) -> Any:
        """The ``loss``."""
        return self.getOrDefault(self.loss)

    def setOptimizer(self, value: Any) -> Any:
        """Set ``optimizer``."""
        return self._set(optimizer=value)

    def getOptimizer(self) -> Any:
        """The ``optimizer``."""
        return self.getOrDefault(self.optimizer)

    def setOptimizerParams(self, value: Mapping[str, Any]) -> Any:
        """Set ``optimizer_params``."""
        return self._set(optimizer_params=value)

    def getOptimizerParams(self) -> dict[str, Any]:
        """The ``optimizer_params``."""
        return self.getOrDefault(self.optimizer_params)

    def setLearningRate(self, value: float | None) -> Any:
        """Set ``learning_rate``."""
        return self._set(learning_rate=value)

    def getLearningRate(self) -> float | None:
        """The ``learning_rate``."""
        return self.getOrDefault(self.learning_rate)

    def setMetrics(self, value: Mapping[str, Any]) -> Any:
        """Set ``metrics``."""
        return self._set(metrics=value)

    def getMetrics(self) -> dict[str, Any]:
        """The ``metrics``."""
        return self.getOrDefault(self.metrics)


class HasGangParams(Params):
    """``train_fn``, ``predict_fn``, ``launcher`` of :class:`~sparkhydrogen.ml.GangEstimator`."""

    train_fn: Param[Any] = _param(
        "train_fn", "runs on every rank as train_fn(config) with the rank's share readable through data=; rank 0's "
        "return value is the model state")
    predict_fn: Param[Any] = _param(
        "predict_fn", "predict_fn(state, features) -> predictions, features a float32 numpy array (rows, width)")
    launcher: Param[Any] = _param(
        "launcher", "'gang' (sparkhydrogen.run), 'torch', 'jax', 'tensorflow', or a callable launcher(fn, config, "
        "num_workers=..., data=..., max_retries=...) returning rank 0's result")

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(train_fn=None, predict_fn=None, launcher="gang")

    def setTrainFn(self, value: Any) -> Any:
        """Set ``train_fn``."""
        return self._set(train_fn=value)

    def getTrainFn(self) -> Any:
        """The ``train_fn``."""
        return self.getOrDefault(self.train_fn)

    def setPredictFn(self, value: Any) -> Any:
        """Set ``predict_fn``."""
        return self._set(predict_fn=value)

    def getPredictFn(self) -> Any:
        """The ``predict_fn``."""
        return self.getOrDefault(self.predict_fn)

    def setLauncher(self, value: Any) -> Any:
        """Set ``launcher``."""
        return self._set(launcher=value)

    def getLauncher(self) -> Any:
        """The ``launcher``."""
        return self.getOrDefault(self.launcher)
