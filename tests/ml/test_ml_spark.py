"""sparkhydrogen.ml on real Spark (one local[2] session for the module): Pipeline, equivalence with one process,
persistence, CrossValidator/TrainValidationSplit with parallelism=2, resume after a killed rank, LightningEstimator
and a JAX GangEstimator.

Classes and functions the ranks unpickle are nested in the tests or are torch's own (workers cannot import test
modules). Data order: the DataFrame has 2 partitions of contiguous rows and the gang 2 ranks, so rank r reads
partition r in order (``data=`` keeps whole partitions, no shuffle); with ``shuffle=False`` and equal shares, the
k-th DDP step averages the gradients of rows ``[16k, 16k+16)`` and ``[128+16k, 128+16k+16)``, which is the gradient
of the mean loss over those 32 rows in one process (equal batch sizes, mean-reduced loss).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pyspark.ml import Pipeline, PipelineModel  # noqa: E402
from pyspark.ml.evaluation import RegressionEvaluator  # noqa: E402
from pyspark.ml.feature import StandardScaler, VectorAssembler  # noqa: E402
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder, TrainValidationSplit  # noqa: E402

from sparkhydrogen.ml import (  # noqa: E402
    GangEstimator,
    GangModel,
    LightningEstimator,
    LightningModel,
    TorchEstimator,
    TorchModel,
)

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

HALF, BATCH, EPOCHS, LR = 128, 16, 3, 0.5
COLS = ["a", "b", "c", "d"]


def net() -> Any:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def classifier(model: Any, **kw: Any) -> TorchEstimator:
    options = dict(model=model, loss=torch.nn.CrossEntropyLoss(), optimizer=torch.optim.SGD, learning_rate=LR,
                   features_col="scaled", batch_size=BATCH, epochs=EPOCHS, num_workers=2, shuffle=False)
    options.update(kw)
    return TorchEstimator(**options)


def stages() -> list[Any]:
    return [VectorAssembler(inputCols=COLS, outputCol="raw"),
            StandardScaler(inputCol="raw", outputCol="scaled", withMean=True, withStd=True)]


def one_process(module: Any, x: np.ndarray, y: np.ndarray, epochs: int = EPOCHS) -> Any:
    """Plain SGD on the global batches DDP forms (see the module docstring)."""
    module = copy.deepcopy(module)
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    loss = torch.nn.CrossEntropyLoss()
    xs, ys = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    for _ in range(epochs):
        for k in range(HALF // BATCH):
            rows = np.r_[k * BATCH:(k + 1) * BATCH, HALF + k * BATCH:HALF + (k + 1) * BATCH]
            opt.zero_grad()
            loss(module(xs[rows]), ys[rows]).backward()
            opt.step()
    return module


def scaled_rows(model: PipelineModel, df: Any) -> tuple[np.ndarray, np.ndarray]:
    prepared = PipelineModel(model.stages[:2]).transform(df).select("scaled", "label").collect()  # test side only
    return np.array([r["scaled"].toArray() for r in prepared]), np.array([r["label"] for r in prepared])


def predictions(frame: Any) -> np.ndarray:
    return np.array([r["prediction"] for r in frame.select("prediction").collect()])


@pytest.fixture(scope="module")
def fitted(df: Any) -> tuple[Any, PipelineModel]:
    start = net()
    return start, Pipeline(stages=[*stages(), classifier(start)]).fit(df)


def test_pipeline_reaches_accuracy_and_reports_epochs(df: Any, fitted: tuple[Any, PipelineModel]) -> None:
    _, model = fitted
    out = model.transform(df)
    assert dict(out.dtypes)["prediction"] == "array<double>"  # two outputs: an array of doubles
    logits = predictions(out)
    labels = np.array([r["label"] for r in df.select("label").collect()])
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    assert accuracy >= 0.9, accuracy
    summary = model.stages[-1].summary
    assert summary.epochs == EPOCHS and summary.num_workers == 2
    losses = summary.metric("train_loss")
    assert losses[-1] < losses[0]
    assert summary.metric("train_loss", mean=True) != losses  # the two ranks' shares differ


def test_predictions_equal_one_process_training(df: Any, fitted: tuple[Any, PipelineModel]) -> None:
    start, model = fitted
    x, y = scaled_rows(model, df)
    reference = one_process(start, x, y)
    trained = model.stages[-1].module
    for name, tensor in reference.state_dict().items():
        assert torch.allclose(trained.state_dict()[name], tensor, atol=1e-5), name
    with torch.no_grad():
        expected = reference(torch.tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(predictions(model.transform(df)), expected, atol=1e-5)


def test_pipeline_model_save_load_predicts_the_same(df: Any, fitted: tuple[Any, PipelineModel],
                                                    tmp_path: Any) -> None:
    _, model = fitted
    path = str(tmp_path / "pipeline")
    model.write().overwrite().save(path)
    loaded = PipelineModel.load(path)
    assert isinstance(loaded.stages[-1], TorchModel)
    assert loaded.stages[-1].summary.metric("train_loss") == model.stages[-1].summary.metric("train_loss")
    np.testing.assert_array_equal(predictions(loaded.transform(df)), predictions(model.transform(df)))
    est = classifier(net(), validation_fraction=0.25)
    est.save(str(tmp_path / "estimator"))
    back = TorchEstimator.load(str(tmp_path / "estimator"))
    assert back.uid == est.uid and back.getValidationFraction() == 0.25 and back.getBatchSize() == BATCH
    assert back.getOptimizer() is torch.optim.SGD and isinstance(back.getLoss(), torch.nn.CrossEntropyLoss)


def test_validation_fraction_and_named_metrics(df: Any, fitted: tuple[Any, PipelineModel]) -> None:
    def accuracy(output: Any, label: Any) -> float:
        return float((output.argmax(dim=1) == label.long()).float().mean())

    _, pipeline = fitted
    scaled = PipelineModel(pipeline.stages[:2]).transform(df)
    model = classifier(net(), validation_fraction=0.25, metrics={"accuracy": accuracy}, epochs=2).fit(scaled)
    summary = model.summary
    assert set(summary.names) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}
    assert all(0.0 <= a <= 1.0 for a in summary.metric("val_accuracy", mean=True))
    assert summary.metric("val_loss")[-1] < summary.metric("val_loss")[0] + 0.5


def regression_grid(est: TorchEstimator) -> list[Any]:
    return ParamGridBuilder().addGrid(est.getParam("learning_rate"), [1e-5, 0.01]).build()


def regressor(**kw: Any) -> TorchEstimator:
    def linear() -> Any:
        import torch

        torch.manual_seed(0)
        return torch.nn.Linear(4, 1)

    return TorchEstimator(model=linear, loss=torch.nn.MSELoss(), optimizer=torch.optim.SGD, features_col=COLS,
                          label_col="target", batch_size=16, epochs=2, **kw)


def test_cross_validator_parallel_gangs_pick_the_better_learning_rate(df: Any) -> None:
    est = regressor(num_workers=1)  # two one-rank gangs fit at once on local[2]
    grid = regression_grid(est)
    cv = CrossValidator(estimator=est, estimatorParamMaps=grid, evaluator=RegressionEvaluator(labelCol="target"),
                        numFolds=2, parallelism=2, seed=1)
    model = cv.fit(df)
    best = int(np.argmin(model.avgMetrics))
    assert grid[best][est.getParam("learning_rate")] == 0.01
    assert model.avgMetrics[best] < model.avgMetrics[1 - best]
    assert dict(model.transform(df).dtypes)["prediction"] == "double"  # one output: a double


def test_train_validation_split_waits_when_two_gangs_do_not_fit_at_once(df: Any) -> None:
    """Two 2-rank gangs on 2 slots: each passes the preflight (2 <= 2 slots); Spark's FIFO scheduler gives the
    earlier gang's tasks the free slots, the second gang's stage waits for them; both finish, nothing deadlocks."""
    est = regressor(num_workers=2)
    grid = regression_grid(est)
    tvs = TrainValidationSplit(estimator=est, estimatorParamMaps=grid, evaluator=RegressionEvaluator(labelCol="target"),
                               trainRatio=0.75, parallelism=2, seed=1)
    model = tvs.fit(df)
    assert grid[int(np.argmin(model.validationMetrics))][est.getParam("learning_rate")] == 0.01


def test_gang_larger_than_the_cluster_fails_with_slot_arithmetic(df: Any) -> None:
    import sparkhydrogen as h2

    with pytest.raises(h2.InsufficientSlotsError, match=r"needs 3 slots but the cluster has 2"):
        regressor(num_workers=3).fit(df)


def test_inference_resources_on_local_master_fail_naming_the_alternatives(df: Any) -> None:
    import sparkhydrogen as h2

    model = TorchModel(torch.nn.Linear(4, 1), input_width=4).setFeaturesCol(COLS).setInferenceResources({"gpu": 1})
    with pytest.raises(h2.LaunchError, match=r"master local\[2\] runs every task in the driver's JVM"):
        model.transform(df)


def test_rank_killed_mid_epoch_resumes_from_last_epoch_checkpoint(df: Any, fitted: tuple[Any, PipelineModel]) -> None:
    start, pipeline = fitted
    steps = HALF // BATCH

    class DiesOnce(torch.nn.Module):
        """Rank 1's worker process exits in the middle of epoch 1 of the first gang attempt."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner
            self.calls = 0

        def forward(self, x: Any) -> Any:
            self.calls += 1
            if (os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
                    and self.calls == steps + steps // 2):
                os._exit(3)
            return self.inner(x)

    scaled = PipelineModel(pipeline.stages[:2]).transform(df)
    model = classifier(DiesOnce(copy.deepcopy(start)), max_retries=1, shuffle=True).fit(scaled)
    assert model.summary.attempts == 2
    assert model.summary.resumed_from_epoch == 1  # epoch 0 came from the checkpoint, not trained again
    assert model.summary.epochs == EPOCHS
    # weights, optimizer and the loader's shuffled order resumed: the same as an uninterrupted run
    uninterrupted = classifier(copy.deepcopy(start), shuffle=True).fit(scaled)
    assert uninterrupted.summary.attempts == 1
    for name, tensor in uninterrupted.module.state_dict().items():
        assert torch.allclose(model.module.inner.state_dict()[name], tensor, atol=1e-5), name
    assert model.summary.metric("train_loss") == pytest.approx(uninterrupted.summary.metric("train_loss"))


# frameworks: one test each (their imports are slow) -------------------------------------------


def lightning_regressor(dies_once: bool = False) -> Any:
    """A factory of a small Lightning regressor (nested, so it travels to the ranks by value).

    ``dies_once``: rank 1's process exits in the middle of epoch 1 of the first gang attempt.
    """
    def make_module() -> Any:
        import os

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
                if (dies_once and os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
                        and self.current_epoch == 1 and index == 4):
                    os._exit(3)
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

    return make_module


def test_lightning_estimator_fits_and_transforms(df: Any, tmp_path: Any) -> None:
    pytest.importorskip("lightning")
    import torch

    make_module = lightning_regressor()
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


def test_lightning_rank_killed_mid_epoch_resumes_from_last_epoch_checkpoint(df: Any) -> None:
    pytest.importorskip("lightning")

    est = LightningEstimator(model=lightning_regressor(dies_once=True), features_col=COLS, label_col="target",
                             batch_size=16, epochs=3, num_workers=2, shuffle=False, max_retries=1)
    model = est.fit(df)  # 128 rows per rank: 8 steps per epoch, rank 1 dies at step 4 of epoch 1
    assert model.summary.attempts == 2
    assert model.summary.resumed_from_epoch >= 1  # epoch 0 came from the checkpoint, not trained again
    assert model.summary.epochs == 3
    losses = model.summary.metric("train_loss", mean=True)
    assert len(losses) == 3 and losses[-1] < losses[0]


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
    stages = [VectorAssembler(inputCols=COLS, outputCol="raw"),
              StandardScaler(inputCol="raw", outputCol="vec", withMean=True)]
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


def test_example_script_runs(ml_spark: Any) -> None:
    import runpy
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "estimator.py"
    example = runpy.run_path(str(path), run_name="estimator_example")
    result = example["run"](ml_spark, epochs=3, tune=False)  # its CrossValidator part: see the CV tests above
    assert result["accuracy"] > 0.85 and result["reloaded_accuracy"] == result["accuracy"]
    assert result["summary"].names == ["train_loss", "train_accuracy", "val_loss", "val_accuracy"]


# MLflow: a real tracking server (tests/mlflowkit.py), started by pid on loopback, stopped after ---------------


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("mlflow")
    import mlflow
    from mlflowkit import TrackingServer

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    server = TrackingServer(tmp_path_factory.mktemp("mlflow"))
    previous = mlflow.get_tracking_uri()
    try:
        uri = server.wait_ready()
        mlflow.set_tracking_uri(uri)
        yield uri
    finally:
        mlflow.set_tracking_uri(previous)
        server.stop()


def test_fit_logs_one_mlflow_run_and_a_pyfunc_model_that_predicts_the_same(df: Any, mlflow_uri: str) -> None:
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    est = TorchEstimator(model=net(), loss=torch.nn.CrossEntropyLoss(), optimizer=torch.optim.SGD, learning_rate=LR,
                         features_col=COLS, batch_size=BATCH, epochs=2, num_workers=2, validation_fraction=0.25)
    with mlflow.start_run() as run:
        model = est.fit(df)
    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id]  # one run: not one per rank, none nested
    logged = client.get_run(run.info.run_id)
    assert logged.data.params["batch_size"] == str(BATCH) and logged.data.params["learning_rate"] == str(LR)
    assert logged.data.params["num_workers"] == "2"
    for name in ("train_loss", "val_loss", "train_loss_mean", "val_loss_mean"):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [0, 1], name
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
            model.summary.metric(name.removesuffix("_mean"), mean=name.endswith("_mean")))
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    rows = df.select(*COLS).collect()
    served = np.asarray(pyfunc.predict(pd.DataFrame([[r[c] for c in COLS] for r in rows], columns=COLS)))
    np.testing.assert_allclose(served, predictions(model.transform(df)), rtol=1e-5, atol=1e-6)


def test_cross_validator_fits_log_as_nested_runs(df: Any, mlflow_uri: str) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    est = regressor(num_workers=1)
    grid = regression_grid(est)
    cv = CrossValidator(estimator=est, estimatorParamMaps=grid, evaluator=RegressionEvaluator(labelCol="target"),
                        numFolds=2, parallelism=2, seed=1)
    with mlflow.start_run() as run:
        cv.fit(df)
    client = MlflowClient(tracking_uri=mlflow_uri)
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert len(children) == 4  # 2 folds x 2 learning rates, each its own nested run
    assert sorted(c.data.params["learning_rate"] for c in children) == ["0.01", "0.01", "1e-05", "1e-05"]
    parent = client.get_run(run.info.run_id)  # the refit on the whole data with the best learning rate
    assert parent.data.params["learning_rate"] == "0.01"
