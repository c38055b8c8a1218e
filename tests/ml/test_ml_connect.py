"""sparkhydrogen.ml on Spark Connect (an in-process Connect server on local[2]): fit and transform a Connect
DataFrame, alone and after Connect's own VectorAssembler/StandardScaler in a Pipeline."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from mldata import synthetic

torch = pytest.importorskip("torch")

from pyspark.ml import Pipeline, PipelineModel  # noqa: E402
from pyspark.ml.feature import StandardScaler, VectorAssembler  # noqa: E402

from sparkhydrogen.ml import TorchEstimator, TorchModel  # noqa: E402

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

COLS = ["a", "b", "c", "d"]


def test_fit_and_transform_on_a_connect_dataframe(connect_spark: Any, tmp_path: Any) -> None:
    df = connect_spark.createDataFrame(synthetic())
    est = TorchEstimator(model=lambda: torch.nn.Linear(4, 2), loss=torch.nn.CrossEntropyLoss(),
                         optimizer=torch.optim.SGD, learning_rate=0.5, features_col="scaled", batch_size=16,
                         epochs=3, num_workers=2)
    stages = [VectorAssembler(inputCols=COLS, outputCol="raw"),
              StandardScaler(inputCol="raw", outputCol="scaled", withMean=True, withStd=True), est]
    model = Pipeline(stages=stages).fit(df)
    assert isinstance(model.stages[-1], TorchModel) and model.stages[-1].summary.epochs == 3
    out = model.transform(df).select("label", "prediction").toPandas()
    accuracy = float((np.stack(out["prediction"].to_numpy()).argmax(axis=1) == out["label"].to_numpy()).mean())
    assert accuracy >= 0.9, accuracy
    path = str(tmp_path / "connect-pipeline")
    model.write().save(path)
    again = PipelineModel.load(path).transform(df).select("prediction").toPandas()
    np.testing.assert_allclose(np.stack(again["prediction"].to_numpy()), np.stack(out["prediction"].to_numpy()))
