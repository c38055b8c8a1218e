"""Spark ML estimators for gang training: ``Pipeline``, ``CrossValidator`` and persistence as in MLlib.

    from pyspark.ml import Pipeline
    from pyspark.ml.feature import StandardScaler, VectorAssembler
    from sparkhydrogen.ml import TorchEstimator

    est = TorchEstimator(model=make_net, loss=torch.nn.CrossEntropyLoss(), optimizer=torch.optim.Adam,
                         learning_rate=1e-2, batch_size=32, epochs=3, num_workers=2, features_col="scaled")
    model = Pipeline(stages=[VectorAssembler(inputCols=cols, outputCol="raw"),
                             StandardScaler(inputCol="raw", outputCol="scaled"), est]).fit(train_df)
    model.transform(test_df)          # prediction: double (one output) or array<double>

Importing this package imports pyspark.ml, never torch, Lightning or JAX (the ranks and
``transform``'s Python workers import what they use). See ``docs/ml.md``.
"""

from .gang_estimator import GangEstimator, GangModel
from .lightning_estimator import LightningEstimator, LightningModel
from .summary import TrainingSummary
from .torch_estimator import TorchEstimator, TorchModel

__all__ = ["GangEstimator", "GangModel", "LightningEstimator", "LightningModel", "TorchEstimator", "TorchModel",
           "TrainingSummary"]
