"""Libraries that never heard of spark-hydrogen, unchanged, with transparent mode installed (real xgboost, torch).

xgboost.spark (``SparkXGBClassifier``/``SparkXGBRegressor``, ``num_workers=2``) and pyspark's
``TorchDistributor`` (``local_mode=False``, 2-process gloo on CPU) share one ``local[2]``
session; models are tiny. Every installed run checks the coordinator served the stage (the
gang it declared for the library's own task function) and, for xgboost, that the context
the library's task code got from ``pyspark.BarrierTaskContext.get()`` is ours.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from pyspark import cloudpickle
from sparkutil import spark_session

from sparkhydrogen import transparent

xgboost = pytest.importorskip("xgboost")
np = pytest.importorskip("numpy")

pytestmark = [pytest.mark.spark, pytest.mark.timeout(420)]

# the callbacks and train functions below reach the executors by value (this module is not importable there)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    with spark_session("local[2]") as session:
        yield session
    transparent.uninstall()


@pytest.fixture
def gangs(caplog: Any) -> Any:
    """Names of the gangs spark-hydrogen declared during the test (its launch log)."""
    caplog.set_level(logging.INFO, logger="sparkhydrogen.launch")

    def names() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name.startswith("sparkhydrogen.launch")
                and r.getMessage().startswith("gang ")]

    return names


@pytest.fixture(scope="module")
def data(spark: Any) -> Any:
    from pyspark.ml.linalg import Vectors

    rng = np.random.default_rng(7)
    x = rng.normal(size=(400, 4))
    label = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    target = x @ np.array([1.0, -2.0, 0.5, 0.0])
    rows = [(Vectors.dense(r.tolist()), int(c), float(t)) for r, c, t in zip(x, label, target, strict=True)]
    return spark.createDataFrame(rows, ["features", "label", "target"]).repartition(2).cache()


class _OursInTheTask(xgboost.callback.TrainingCallback):  # type: ignore[misc]
    """Fails the fit unless xgboost's task code got spark-hydrogen's context from pyspark."""

    def before_training(self, model: Any) -> Any:
        import pyspark

        context = pyspark.BarrierTaskContext.get()
        if type(context).__module__ != "sparkhydrogen.context" or pyspark.TaskContext.get() is not context:
            raise AssertionError(f"xgboost's task got {type(context).__module__}.{type(context).__name__}")
        return model


class _RankOneFails(xgboost.callback.TrainingCallback):  # type: ignore[misc]
    def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        import pyspark

        if pyspark.TaskContext.get().partitionId() == 1 and epoch == 1:
            raise ZeroDivisionError("rank one blew up")
        return False


def _predictions(model: Any, df: Any) -> Any:
    return np.array([r.prediction for r in model.transform(df).orderBy("target").select("prediction").collect()])


@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_xgboost_fit_installed_predicts_as_native(spark: Any, data: Any, gangs: Any, kind: str) -> None:
    from xgboost.spark import SparkXGBClassifier, SparkXGBRegressor

    def estimator(**extra: Any) -> Any:
        if kind == "classifier":
            return SparkXGBClassifier(num_workers=2, n_estimators=4, max_depth=3, **extra)
        return SparkXGBRegressor(num_workers=2, n_estimators=4, max_depth=3, label_col="target", **extra)

    native = _predictions(estimator().fit(data), data)
    assert gangs() == []
    with transparent.installed():
        installed = _predictions(estimator(callbacks=[_OursInTheTask()]).fit(data), data)
    assert any("_train_booster" in g for g in gangs()), gangs()
    assert np.allclose(native, installed)
    assert not transparent.is_installed()


def test_xgboost_failing_rank_is_named_with_its_exception(spark: Any, data: Any) -> None:
    from xgboost.spark import SparkXGBClassifier

    with transparent.installed():
        with pytest.raises(Exception) as info:
            SparkXGBClassifier(num_workers=2, n_estimators=4, callbacks=[_RankOneFails()]).fit(data)
    text = str(info.value)
    assert "spark-hydrogen: raised by rank" in text  # whichever rank Spark reports names itself
    # the rank that failed first and its exception: rank 1's own note, or its peer's note quoting our verdict
    assert "rank 1 of 2 (gang attempt 0): ZeroDivisionError: rank one blew up" in text \
        or "rank 1 raised ZeroDivisionError: rank one blew up" in text, text[:4000]


def _train(value: int) -> dict[str, Any]:
    import os

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    out = {"value": value * 2, "sum": float(total.item()), "world": dist.get_world_size(), "rank": os.environ["RANK"]}
    dist.destroy_process_group()
    return out


def _train_rank_one_fails(value: int) -> int:
    import os

    if os.environ["RANK"] == "1":
        raise KeyError("torch rank one missing key")
    return value


def test_torch_distributor_runs_installed(spark: Any, gangs: Any) -> None:
    pytest.importorskip("torch")
    from pyspark.ml.torch.distributor import TorchDistributor

    with transparent.installed():
        out = TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(_train, 21)
    assert out == {"value": 42, "sum": 3.0, "world": 2, "rank": "0"}
    assert any("wrapped_train_fn" in g for g in gangs()), gangs()


def test_torch_distributor_failing_rank_is_named(spark: Any, capfd: Any) -> None:
    pytest.importorskip("torch")
    from pyspark.ml.torch.distributor import TorchDistributor

    with transparent.installed():
        with pytest.raises(Exception) as info:
            TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(_train_rank_one_fails, 1)
    text = str(info.value)
    # TorchDistributor itself turns the child's exception into "failed during training" (natively too):
    # the error names rank 1 and that exception; the child's own KeyError reaches the driver's log stream
    assert "spark-hydrogen: raised by rank 1 of 2 (gang attempt 0): RuntimeError: TorchDistributor failed" in text \
        or "rank 1 raised RuntimeError: TorchDistributor failed" in text, text[:4000]
    captured = capfd.readouterr()
    assert "KeyError: 'torch rank one missing key'" in captured.out + captured.err
