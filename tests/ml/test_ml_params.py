"""Spark ML conventions of the estimators, without Spark: Params, copy, explainParams, grids, bad values."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pyspark.ml.tuning import ParamGridBuilder

import sparkhydrogen.ml as ml
from sparkhydrogen.ml import GangEstimator, LightningEstimator, TorchEstimator, TrainingSummary

NAMES = ["model", "loss", "optimizer", "optimizer_params", "features_col", "label_col", "prediction_col",
         "batch_size", "epochs", "num_workers", "use_gpu"]


def test_public_names() -> None:
    assert sorted(ml.__all__) == ["GangEstimator", "GangModel", "LightningEstimator", "LightningModel",
                                  "TorchEstimator", "TorchModel", "TrainingSummary"]


def test_importing_sparkhydrogen_ml_imports_no_framework() -> None:
    code = ("import sys, sparkhydrogen.ml; "
            "print(sorted(m for m in ('torch', 'lightning', 'jax', 'tensorflow', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_every_issue_name_is_a_param_with_default_doc_and_accessors() -> None:
    est = TorchEstimator(batch_size=8, features_col=["a", "b"], optimizer_params={"momentum": 0.9})
    for name in NAMES:
        param = est.getParam(name)
        assert param.doc and est.hasDefault(param) or est.isSet(param), name
        camel = "".join(part.capitalize() for part in name.split("_"))
        assert callable(getattr(est, f"get{camel}")) and callable(getattr(est, f"set{camel}")), name
    assert est.getBatchSize() == 8 and est.getEpochs() == 1 and est.getNumWorkers() == 1
    assert est.getFeaturesCol() == ["a", "b"] and est.getOptimizerParams() == {"momentum": 0.9}
    assert est.setEpochs(3) is est and est.getEpochs() == 3
    text = est.explainParams()
    assert "batch_size: rows per training batch on each rank" in text and "(default: 32, current: 8)" in text


def test_param_grid_and_copy() -> None:
    est = TorchEstimator(batch_size=8, learning_rate=0.1)
    grid = ParamGridBuilder().addGrid(est.getParam("batch_size"), [16, 64]) \
        .addGrid(est.getParam("learning_rate"), [0.1, 0.01]).build()
    assert len(grid) == 4
    copied = est.copy(grid[1])
    assert copied.uid == est.uid and copied is not est
    assert (copied.getBatchSize(), copied.getLearningRate()) == (16, 0.01)
    assert (est.getBatchSize(), est.getLearningRate()) == (8, 0.1)  # the original is untouched
    assert est.copy().extractParamMap() == est.extractParamMap()


def test_bad_values_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match=r"expected an int >= 1, got 0"):
        TorchEstimator(batch_size=0)
    with pytest.raises(ValueError, match=r"validation_fraction must be in \[0, 1\), got 1.5"):
        TorchEstimator(validation_fraction=1.5)
    with pytest.raises(TypeError, match=r"column name or a non-empty list"):
        TorchEstimator(features_col=[])
    with pytest.raises(TypeError):
        TorchEstimator(batch_size="many")


def test_every_estimator_has_the_shared_params() -> None:
    for est in (TorchEstimator(), LightningEstimator(), GangEstimator(launcher="jax")):
        for name in ("features_col", "label_col", "batch_size", "epochs", "num_workers", "max_retries",
                     "validation_col", "validation_fraction", "seed"):
            assert est.hasParam(name), (type(est).__name__, name)
    assert GangEstimator(launcher="jax").getLauncher() == "jax"


def test_training_summary_rank0_and_mean() -> None:
    summary = TrainingSummary.from_ranks([[{"train_loss": 1.0, "val_loss": 2.0}, {"train_loss": 3.0, "val_loss": 2.0}],
                                          [{"train_loss": 0.5, "val_loss": 1.0}, {"train_loss": 0.7, "val_loss": 1.5}]])
    assert summary.metric("train_loss") == [1.0, 0.5]
    assert summary.metric("train_loss", mean=True) == [2.0, 0.6]
    assert summary.metric("val_loss", mean=True) == [2.0, 1.25]
    assert TrainingSummary.from_json(summary.to_json()) == summary
    with pytest.raises(KeyError, match=r"no metric 'accuracy'.*\['train_loss', 'val_loss'\]"):
        summary.metric("accuracy")


def test_inference_resources_param_and_device_choice() -> None:
    from sparkhydrogen.errors import GpuPlacementError
    from sparkhydrogen.ml.inference import inference_device

    model = ml.TorchModel()
    assert model.getInferenceResources() is None  # default: predict_batch_udf with the application's resources
    assert model.setInferenceResources({"gpu": 1, "cpus": 2}).getInferenceResources() == {"gpu": 1, "cpus": 2}
    assert TorchEstimator().setInferenceResources({"gpu": 0.5}).getInferenceResources() == {"gpu": 0.5}
    with pytest.raises(ValueError, match=r"resources\['gpu'\]=0.75"):
        model.setInferenceResources({"gpu": 0.75})
    with pytest.raises(TypeError, match="inference_resources must be a dict"):
        model.setInferenceResources("gpu")
    # the device: the task's first GPU as a CUDA ordinal, the CPU without GPUs or without CUDA
    assert inference_device(["1"], None, True) == "cuda:1"
    assert inference_device(["1", "0"], "6,7", True) == "cuda:1"  # address 1 = device 7 = ordinal 1 of '6,7'
    assert inference_device([], None, True) == inference_device(["0"], None, False) == "cpu"
    with pytest.raises(GpuPlacementError, match="CUDA_VISIBLE_DEVICES='4' lists only 1 device"):
        inference_device(["1"], "4", True)
