"""A Spark ML pipeline whose last stage trains a PyTorch model as a gang: ``sparkhydrogen.ml.TorchEstimator``.

    .venv/bin/pip install 'spark-hydrogen[torch]'
    .venv/bin/python examples/estimator.py

1. Raw features -> ``VectorAssembler`` -> ``StandardScaler`` (ordinary Spark stages);
2. ``TorchEstimator`` trains a small MLP with DDP on 2 ranks, each reading its share of the
   DataFrame through ``data=`` (nothing is collected on the driver), 20% of the rows held out
   for ``val_loss``;
3. ``transform`` scores every row with ``predict_batch_udf`` (the model loaded once per Python
   worker), the pipeline is saved and loaded back, and a ``CrossValidator`` picks a learning
   rate fitting two gangs at once (``parallelism=2``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

FEATURES = ["f0", "f1", "f2", "f3"]


def make_data(spark: Any, rows: int = 2000, seed: int = 0) -> Any:
    """Two classes separated by a linear boundary in raw features of different scales."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4)) * [1.0, 10.0, 0.1, 3.0] + [0.0, 50.0, -1.0, 2.0]
    z = (x - [0.0, 50.0, -1.0, 2.0]) / [1.0, 10.0, 0.1, 3.0]
    label = (z @ [2.0, -1.0, 1.5, 0.5] + rng.normal(scale=0.3, size=rows) > 0).astype(float)
    return spark.createDataFrame(pd.DataFrame({**{f: x[:, i] for i, f in enumerate(FEATURES)}, "label": label}))


def make_model() -> Any:
    """The network: a zero-argument factory, called on every rank (seeded there by the estimator's seed)."""
    import torch

    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def accuracy(output: Any, label: Any) -> float:
    """A metric the estimator reports per epoch, as train_accuracy and val_accuracy."""
    return float((output.argmax(dim=1) == label.long()).float().mean())


def build_pipeline(num_workers: int = 2, epochs: int = 5) -> Any:
    import torch
    from pyspark.ml import Pipeline
    from pyspark.ml.feature import StandardScaler, VectorAssembler

    from sparkhydrogen.ml import TorchEstimator

    estimator = TorchEstimator(model=make_model, loss=torch.nn.CrossEntropyLoss(), optimizer=torch.optim.Adam,
                               learning_rate=0.01, metrics={"accuracy": accuracy}, features_col="scaled",
                               label_col="label", batch_size=32, epochs=epochs, num_workers=num_workers,
                               validation_fraction=0.2, max_retries=1)
    return Pipeline(stages=[VectorAssembler(inputCols=FEATURES, outputCol="raw"),
                            StandardScaler(inputCol="raw", outputCol="scaled", withMean=True, withStd=True),
                            estimator])


def accuracy_of(scored: Any) -> float:
    """The share of rows whose predicted class (argmax of the two logits) is the label, computed in Spark."""
    from pyspark.sql import functions as F

    hit = F.when((F.col("prediction")[1] > F.col("prediction")[0]) == (F.col("label") > 0.5), 1.0).otherwise(0.0)
    return float(scored.select(F.avg(hit)).first()[0])


def make_accuracy_evaluator() -> Any:
    """A Python ``Evaluator`` for the two-logit prediction column (computed in Spark, see accuracy_of)."""
    from pyspark.ml.evaluation import Evaluator

    class Accuracy(Evaluator):
        def _evaluate(self, dataset: Any) -> float:
            return accuracy_of(dataset)

        def isLargerBetter(self) -> bool:
            return True

    return Accuracy()


def run(spark: Any, epochs: int = 5, tune: bool = True) -> dict[str, Any]:
    """Fit, score, save/load, and (``tune``) cross-validate the learning rate; returns the figures."""
    from pyspark.ml import PipelineModel
    from pyspark.ml.tuning import CrossValidator, ParamGridBuilder

    train, test = make_data(spark).randomSplit([0.8, 0.2], seed=1)
    model = build_pipeline(epochs=epochs).fit(train)
    summary = model.stages[-1].summary
    for epoch in range(summary.epochs):
        print(f"epoch {epoch}: " + ", ".join(f"{k}={v:.3f}" for k, v in summary.mean[epoch].items()))
    result = {"accuracy": accuracy_of(model.transform(test)), "summary": summary}
    with tempfile.TemporaryDirectory() as tmp:
        model.write().overwrite().save(f"{tmp}/pipeline")
        loaded = PipelineModel.load(f"{tmp}/pipeline")
        result["reloaded_accuracy"] = accuracy_of(loaded.transform(test))
    print(f"test accuracy {result['accuracy']:.3f} (after save/load: {result['reloaded_accuracy']:.3f})")
    if tune:
        estimator = build_pipeline(num_workers=1, epochs=2)
        torch_stage = estimator.getStages()[-1]
        grid = ParamGridBuilder().addGrid(torch_stage.getParam("learning_rate"), [1e-5, 1e-2]).build()
        cv = CrossValidator(estimator=estimator, estimatorParamMaps=grid, evaluator=make_accuracy_evaluator(),
                            numFolds=2, parallelism=2, seed=2).fit(train)
        best = grid[max(range(len(grid)), key=lambda i: cv.avgMetrics[i])]  # accuracy: larger is better
        result["best_learning_rate"] = best[torch_stage.getParam("learning_rate")]
        print(f"CrossValidator (2 gangs at once): accuracy by learning rate {cv.avgMetrics}, "
              f"best {result['best_learning_rate']}")
    return result


def main() -> int:
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").appName("sparkhydrogen-estimator")
             .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    try:
        result = run(spark)
    finally:
        spark.stop()
    return 0 if result["accuracy"] > 0.85 else 1


if __name__ == "__main__":
    sys.exit(main())
