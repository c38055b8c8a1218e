"""Batch inference for the models: ``pyspark.ml.functions.predict_batch_udf`` over the features.

``predict_batch_udf`` loads the model once per Python worker (its ``make_predict_fn`` is
cached by the worker) and feeds it numpy batches of ``inference_batch_size`` rows. The
prediction is a ``double`` for a model with one output, ``array<double>`` otherwise.

With ``inference_resources`` (e.g. ``{"gpu": 1}``) ``transform`` instead scores in a
``mapInArrow`` stage with its own task resources (stage-level scheduling): each task
predicts on the GPU Spark assigned it, with the model loaded once per Python worker.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import pickle
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..serde import cloudpickle
from ..task.gpus import physical_gpus, process_ordinals, task_gpu_addresses
from .columns import feature_expression

__all__ = ["torch_predictor", "function_predictor", "prediction_column", "prediction_type", "STAGED_FEATURES",
           "inference_device", "torch_device_predictor", "function_device_predictor", "cached_predictor",
           "staged_predictions"]

log = logging.getLogger("sparkhydrogen.ml")


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


# stage-level resources: transform() as its own mapInArrow stage -------------------------------------------------

#: The temporary column holding the features of a row while the scoring stage runs.
STAGED_FEATURES = "__sparkhydrogen_features"

#: Models a Python worker keeps loaded for scoring stages (the most recently used; a long session
#: that scores with many models holds at most this many per worker).
CACHED_MODELS = 4

_cache_lock = threading.Lock()
_cached: collections.OrderedDict[tuple[str, str], Callable[[Any], Any]] = collections.OrderedDict()
_warned: set[str] = set()


def inference_device(addresses: Sequence[str], cuda_visible_devices: str | None, cuda_available: bool) -> str:
    """The torch device a scoring task predicts on, from the GPU addresses Spark assigned it (pure).

    Address ``i`` maps to a CUDA ordinal as it does for a rank (:mod:`sparkhydrogen.task.gpus`).
    A task without GPUs, or a process whose torch sees no CUDA, predicts on ``"cpu"``
    (:func:`staged_predictions` warns once per process in the second case).

    >>> inference_device(["1"], None, True), inference_device(["1"], "4,5", True)
    ('cuda:1', 'cuda:1')
    >>> inference_device([], None, True), inference_device(["0"], None, False)
    ('cpu', 'cpu')
    """
    if not addresses or not cuda_available:
        return "cpu"
    ordinal = process_ordinals(physical_gpus(list(addresses)[:1], cuda_visible_devices), cuda_visible_devices)[0]
    return f"cuda:{ordinal}"


def torch_device_predictor(module: Any, output_width: int) -> tuple[str, Callable[[str], Callable[[Any], Any]]]:
    """``(model_id, make(device) -> predict)`` for a torch module; the id keys the per-process cache."""
    blob = cloudpickle.dumps(module, protocol=pickle.HIGHEST_PROTOCOL)
    model_id = hashlib.sha256(blob).hexdigest()[:16]

    def make(device_name: str) -> Callable[[Any], Any]:
        import numpy as np
        import torch

        device = torch.device(device_name)
        model = pickle.loads(blob).to(device).eval()

        def predict(features: Any) -> Any:
            with torch.no_grad():
                out = model(torch.from_numpy(np.asarray(features, dtype=np.float32)).to(device))
            out = out.detach().cpu().numpy().astype(np.float64)
            return out.reshape(-1) if output_width == 1 else out.reshape(len(features), -1)

        return predict

    return model_id, make


def function_device_predictor(predict_fn: Callable[[Any, Any], Any], state: Any,
                              output_width: int) -> tuple[str, Callable[[str], Callable[[Any], Any]]]:
    """``(model_id, make(device) -> predict)`` for ``predict_fn(state, x)``; it reads its own device, if any."""
    blob = cloudpickle.dumps((predict_fn, state), protocol=pickle.HIGHEST_PROTOCOL)
    model_id = hashlib.sha256(blob).hexdigest()[:16]
    make_fn = function_predictor(predict_fn, state, output_width)
    return model_id, lambda _device: make_fn()


def cached_predictor(model_id: str, device: str, make: Callable[[str], Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """The predictor of ``model_id`` on ``device``, loaded once per Python worker process.

    The worker keeps the :data:`CACHED_MODELS` most recently used predictors; older ones are dropped.

    >>> loads = []
    >>> for i in [1, 2, 1, 3, 4, 5, 1]:
    ...     _ = cached_predictor(f"doc-{i}", "cpu", lambda device, i=i: loads.append(i) or str)
    >>> loads
    [1, 2, 3, 4, 5]
    """
    key = (model_id, device)
    with _cache_lock:
        found = _cached.get(key)
        if found is None:
            found = _cached[key] = make(device)
            while len(_cached) > CACHED_MODELS:
                _cached.popitem(last=False)
        else:
            _cached.move_to_end(key)
        return found


def _task_device(uses_torch: bool) -> str:
    import os

    from pyspark import TaskContext

    context = TaskContext.get()
    addresses = task_gpu_addresses(context.resources() if context is not None else None)
    if not uses_torch:
        return "cpu"
    import torch

    cuda = bool(torch.cuda.is_available())
    if addresses and not cuda and "cuda" not in _warned:
        _warned.add("cuda")
        log.warning("this scoring task was assigned GPU %s, but torch in this Python worker sees no CUDA: "
                    "predicting on the CPU (install a CUDA build of torch on the executors)", ",".join(addresses))
    return inference_device(addresses, os.environ.get("CUDA_VISIBLE_DEVICES"), cuda)


def staged_predictions(dataset: Any, features_col: str | list[str], model_id: str,
                       make: Callable[[str], Callable[[Any], Any]], output_width: int, batch_size: int,
                       prediction_col: str, profile: Any, uses_torch: bool) -> Any:
    """``dataset`` plus ``prediction_col``, scored in a ``mapInArrow`` stage that runs with ``profile``.

    Each task picks its device from the GPUs Spark assigned it (:func:`inference_device`)
    and reuses the model its Python worker already loaded for that device.
    """
    from pyspark.sql.types import StructField, StructType

    from ..launch.resources import arrow_profile_kwargs

    base = dataset.drop(prediction_col) if prediction_col in dataset.columns else dataset
    schema = StructType([*base.schema.fields, StructField(prediction_col, prediction_type(output_width))])
    staged = base.withColumn(STAGED_FEATURES, feature_expression(base, features_col))

    def score(batches: Any) -> Any:
        import numpy as np
        import pyarrow as pa

        predict = cached_predictor(model_id, _task_device(uses_torch), make)
        for batch in batches:
            features = batch.column(batch.schema.get_field_index(STAGED_FEATURES))
            rows = np.asarray(features.to_pylist(), dtype=np.float32).reshape(batch.num_rows, -1)
            parts = [predict(rows[i:i + batch_size]) for i in range(0, batch.num_rows, batch_size)]
            out = np.concatenate(parts) if parts else np.zeros((0,) if output_width == 1 else (0, output_width))
            column = pa.array(out.tolist(), type=pa.float64() if output_width == 1 else pa.list_(pa.float64()))
            kept = [name for name in batch.schema.names if name != STAGED_FEATURES]
            yield pa.RecordBatch.from_arrays([batch.column(batch.schema.get_field_index(n)) for n in kept] + [column],
                                             names=[*kept, prediction_col])

    return staged.mapInArrow(score, schema, **arrow_profile_kwargs(profile))
