"""Batch inference for the models: ``pyspark.ml.functions.predict_batch_udf`` over the features.

``predict_batch_udf`` loads the model once per Python worker (its ``make_predict_fn`` is
cached by the worker) and feeds it numpy batches of ``inference_batch_size`` rows. The
prediction is a ``double`` for a model with one output, ``array<double>`` otherwise.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

from ..serde import cloudpickle
from .columns import feature_expression

__all__ = ["torch_predictor", "function_predictor", "prediction_column", "prediction_type"]


def prediction_type(output_width: int) -> Any:
    """``DoubleType()`` for one output, ``ArrayType(DoubleType())`` otherwise."""
    from pyspark.sql.types import ArrayType, DoubleType

    return DoubleType() if output_width == 1 else ArrayType(DoubleType())


def torch_predictor(module: Any, output_width: int, use_gpu: bool) -> Callable[[], Callable[[Any], Any]]:
    """A ``make_predict_fn`` for a torch module: unpickles it once per Python worker, then predicts batches."""
    blob = cloudpickle.dumps(module, protocol=pickle.HIGHEST_PROTOCOL)

    def make_predict_fn() -> Callable[[Any], Any]:
        import numpy as np
        import torch

        model = pickle.loads(blob)
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model = model.to(device).eval()

        def predict(features: Any) -> Any:
            with torch.no_grad():
                out = model(torch.from_numpy(np.asarray(features, dtype=np.float32)).to(device))
            out = out.detach().cpu().numpy().astype(np.float64)
            return out.reshape(-1) if output_width == 1 else out.reshape(len(features), -1)

        return predict

    return make_predict_fn


def function_predictor(predict_fn: Callable[[Any, Any], Any], state: Any,
                       output_width: int) -> Callable[[], Callable[[Any], Any]]:
    """A ``make_predict_fn`` for ``predict_fn(state, features)`` (:class:`~sparkhydrogen.ml.GangModel`)."""
    blob = cloudpickle.dumps((predict_fn, state), protocol=pickle.HIGHEST_PROTOCOL)

    def make_predict_fn() -> Callable[[Any], Any]:
        import numpy as np

        fn, loaded = pickle.loads(blob)

        def predict(features: Any) -> Any:
            out = np.asarray(fn(loaded, np.asarray(features, dtype=np.float32)), dtype=np.float64)
            return out.reshape(-1) if output_width == 1 else out.reshape(len(features), -1)

        return predict

    return make_predict_fn


def prediction_column(dataset: Any, features_col: str | list[str], make_predict_fn: Callable[[], Any],
                      input_width: int, output_width: int, batch_size: int) -> Any:
    """The prediction as a column expression over ``dataset``'s features."""
    from pyspark.ml.functions import predict_batch_udf

    udf = predict_batch_udf(make_predict_fn, return_type=prediction_type(output_width), batch_size=batch_size,
                            input_tensor_shapes=[[input_width]])
    return udf(feature_expression(dataset, features_col))
