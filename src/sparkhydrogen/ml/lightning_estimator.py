"""``LightningEstimator``: a ``LightningModule`` trained as a gang (DDP, one device per rank); a ``LightningModel``.

The module's ``training_step(batch, index)`` receives ``batch = (features, label)``
(features ``float32`` of shape ``(rows, width)``, the label as Spark gave it: float64 numbers
or arrays); metrics it logs with ``self.log(...)`` (``train_loss``, ``val_loss`` ...) are
gathered per epoch into the model's summary. ``transform`` calls the module's ``forward``.
"""

from __future__ import annotations

from typing import Any

from pyspark import keyword_only
from pyspark.ml import Estimator
from pyspark.ml.param import Param, Params
from pyspark.ml.util import MLReadable, MLWritable

from .lightning_rank import LightningTrainSpec, train_lightning_rank
from .params import to_mapping
from .persistence import StageReader, StageWriter
from .torch_estimator import GangTrainingMixin, TorchModel

__all__ = ["LightningEstimator", "LightningModel"]


class LightningModel(TorchModel):
    """A trained ``LightningModule`` (a :class:`TorchModel`: same ``transform``, ``summary``, persistence)."""

    @classmethod
    def read(cls) -> StageReader:
        """An ``MLReader`` for a saved model."""
        return StageReader(cls)


class LightningEstimator(Estimator[LightningModel], GangTrainingMixin, MLReadable["LightningEstimator"],
                         MLWritable):
    """Train a ``LightningModule`` on ``num_workers`` gang ranks: ``Trainer(strategy="ddp", num_nodes=num_workers,
    devices=1)`` with ``sparkhydrogen.torch.lightning_environment()``.

    Example:
        >>> est = LightningEstimator(model=make_module, batch_size=32, epochs=3, num_workers=2)  # doctest: +SKIP
        >>> est.fit(df).transform(df)                                                            # doctest: +SKIP
    """

    model: Param[Any] = Param(Params._dummy(), "model", "the LightningModule to train (copied), or a zero-argument "
                              "factory returning one")
    trainer_params: Param[dict[str, Any]] = Param(
        Params._dummy(), "trainer_params", "extra keyword arguments of lightning.pytorch.Trainer (e.g. "
        "{'gradient_clip_val': 1.0}); strategy, devices, num_nodes and max_epochs are the estimator's",
        typeConverter=to_mapping)

    @keyword_only
    def __init__(self, *, model: Any = None, trainer_params: dict[str, Any] | None = None,
                 features_col: str | list[str] = "features", label_col: str = "label",
                 prediction_col: str = "prediction", batch_size: int = 32, epochs: int = 1, num_workers: int = 1,
                 use_gpu: bool = False, validation_fraction: float = 0.0, validation_col: str | None = None,
                 shuffle: bool = True, seed: int = 0, max_retries: int = 0, inference_batch_size: int = 1024) -> None:
        super().__init__()
        self._setDefault(model=None, trainer_params={})
        self._set(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, model: Any = None, trainer_params: dict[str, Any] | None = None,
                  features_col: str | list[str] = "features", label_col: str = "label",
                  prediction_col: str = "prediction", batch_size: int = 32, epochs: int = 1, num_workers: int = 1,
                  use_gpu: bool = False, validation_fraction: float = 0.0, validation_col: str | None = None,
                  shuffle: bool = True, seed: int = 0, max_retries: int = 0,
                  inference_batch_size: int = 1024) -> LightningEstimator:
        """Set any of the constructor's Params by keyword."""
        return self._set(**self._input_kwargs)

    def setModel(self, value: Any) -> LightningEstimator:
        """Set ``model``."""
        return self._set(model=value)

    def getModel(self) -> Any:
        """The ``model``."""
        return self.getOrDefault(self.model)

    def setTrainerParams(self, value: dict[str, Any]) -> LightningEstimator:
        """Set ``trainer_params``."""
        return self._set(trainer_params=value)

    def getTrainerParams(self) -> dict[str, Any]:
        """The ``trainer_params``."""
        return self.getOrDefault(self.trainer_params)

    def _fit(self, dataset: Any) -> LightningModel:
        if self.getModel() is None:
            raise ValueError("LightningEstimator needs model=: a LightningModule or a zero-argument factory")
        if self.getUseGpu():
            raise ValueError("LightningEstimator trains on CPU ranks only for now (use_gpu=True is not supported): "
                             "use TorchEstimator(use_gpu=True), or sparkhydrogen.torch.run with Lightning directly")
        spec = LightningTrainSpec(model=self.getModel(), batch_size=self.getBatchSize(), epochs=self.getEpochs(),
                                  shuffle=self.getShuffle(), seed=self.getSeed(), validation=self._has_validation(),
                                  trainer_params=dict(self.getTrainerParams()))
        frame = self._training_frame(dataset)
        return self._train_torch(dataset, frame, train_lightning_rank, spec, LightningModel)

    def fitMultiple(self, dataset: Any, paramMaps: Any) -> Any:
        """As ``Estimator.fitMultiple``, each fit logged as a nested MLflow run."""
        return self._fit_multiple(dataset, paramMaps)

    def write(self) -> StageWriter:
        """An ``MLWriter``: metadata JSON plus the module (cloudpickle) in ``<path>/data``."""
        return StageWriter(self)

    @classmethod
    def read(cls) -> StageReader:
        """An ``MLReader`` for a saved estimator."""
        return StageReader(cls)
