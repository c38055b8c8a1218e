"""LightningEstimator and a JAX GangEstimator fit and transform on real Spark (the package's local[2] session).

Classes and functions the ranks unpickle are nested in the tests (workers cannot import test modules).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pyspark.ml import Pipeline
from pyspark.ml.feature import StandardScaler, VectorAssembler

from sparkhydrogen.ml import GangEstimator, GangModel, LightningEstimator, LightningModel

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

COLS = ["a", "b", "c", "d"]


def test_lightning_estimator_fits_and_transforms(df: Any, tmp_path: Any) -> None:
    pytest.importorskip("lightning")
    import torch

    def make_module() -> Any:
        import lightning.pytorch as pl
        import torch

        class Regressor(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(0)
                self.layer = torch.nn.Linear(4, 1)

            def forward(self, x: Any) -> Any:
                return self.layer(x)

            def training_step(self, batch: Any, index: int) -> Any:
                x, y = batch
                loss = torch.nn.functional.mse_loss(self(x).squeeze(-1), y.float())
                self.log("train_loss", loss, on_epoch=True, on_step=False)
                return loss

            def validation_step(self, batch: Any, index: int) -> None:
                x, y = batch
                self.log("val_loss", torch.nn.functional.mse_loss(self(x).squeeze(-1), y.float()))

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=0.01)

        return Regressor()

    est = LightningEstimator(model=make_module, features_col=COLS, label_col="target", batch_size=16, epochs=3,
                             num_workers=2, shuffle=False, validation_fraction=0.2)
    model = est.fit(df)
    assert isinstance(model, LightningModel)
    summary = model.summary
    assert summary.epochs == 3 and {"train_loss", "val_loss"} <= set(summary.names)
    losses = summary.metric("train_loss", mean=True)
    assert losses[-1] < losses[0]
    out = model.transform(df).select(*COLS, "prediction").collect()
    x = torch.tensor([[r[c] for c in COLS] for r in out], dtype=torch.float32)
    with torch.no_grad():
        expected = model.module(x).squeeze(-1).numpy()
    np.testing.assert_allclose([r["prediction"] for r in out], expected, rtol=1e-5, atol=1e-5)
    model.save(str(tmp_path / "lightning"))
    loaded = LightningModel.load(str(tmp_path / "lightning"))
    assert [r["prediction"] for r in loaded.transform(df).select("prediction").collect()] == \
        [r["prediction"] for r in out]


def test_jax_gang_estimator_fits_and_transforms(df: Any, tmp_path: Any) -> None:
    pytest.importorskip("jax")

    def train_fn(config: dict[str, Any]) -> Any:
        """Full-batch gradient descent on a linear model; gradients averaged over the JAX processes."""
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.experimental import multihost_utils

        import sparkhydrogen.jax as h2jax

        rows = list(h2jax.batches(config["batch_size"], columns=[config["features"], config["label"]]))
        x = jnp.asarray(np.concatenate([b[config["features"]] for b in rows]))
        y = jnp.asarray(np.concatenate([b[config["label"]] for b in rows]))

        def loss(w: Any) -> Any:
            return jnp.mean((x @ w[:-1] + w[-1] - y) ** 2)

        grad = jax.jit(jax.grad(loss))
        w = jnp.zeros(x.shape[1] + 1)
        for _ in range(config["epochs"]):
            g = multihost_utils.process_allgather(grad(w)).mean(axis=0)  # every process's gradient
            w = w - 0.5 * g
        return np.asarray(w)

    def predict_fn(w: Any, features: Any) -> Any:
        return features @ w[:-1] + w[-1]

    est = GangEstimator(train_fn=train_fn, predict_fn=predict_fn, launcher="jax", features_col="vec",
                        label_col="target", batch_size=64, epochs=40, num_workers=2)
    stages = [VectorAssembler(inputCols=COLS, outputCol="raw"), StandardScaler(inputCol="raw", outputCol="vec", withMean=True)]
    prepared = Pipeline(stages=stages).fit(df).transform(df)
    model = est.fit(prepared)
    assert isinstance(model, GangModel) and model.output_width == 1
    assert np.all(np.isfinite(model.state)), model.state
    out = model.transform(prepared).select("vec", "target", "prediction").collect()
    x = np.array([r["vec"].toArray() for r in out])
    y = np.array([r["target"] for r in out])
    np.testing.assert_allclose([r["prediction"] for r in out], x @ model.state[:-1] + model.state[-1], rtol=1e-4,
                               atol=1e-4)
    baseline = float(np.mean((y - y.mean()) ** 2))
    assert float(np.mean((np.array([r["prediction"] for r in out]) - y) ** 2)) < 0.5 * baseline
    model.save(str(tmp_path / "gang"))
    again = GangModel.load(str(tmp_path / "gang"))
    np.testing.assert_array_equal(again.state, model.state)
