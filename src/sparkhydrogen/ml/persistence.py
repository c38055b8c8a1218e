"""``MLWritable``/``MLReadable`` for the estimators and models: JSON metadata plus one pickled data file.

A saved stage is a directory::

    <path>/metadata/   pyspark's DefaultParamsWriter JSON (class, uid, the JSON-able Params, extra)
    <path>/data/       one Parquet row: cloudpickle of the Python-object Params and the model state

Both parts are written through the SparkSession (``createDataFrame(...).write``), so a path
works wherever Spark can write (local, HDFS, S3 ...) and a ``PipelineModel`` with these
stages saves and loads like any other. Loading unpickles the data file: load only what you
(or someone you trust) saved, as with ``pickle``.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

from pyspark.ml.param import Params
from pyspark.ml.util import DefaultParamsReader, DefaultParamsWriter, MLReader, MLWriter

from ..serde import cloudpickle
from .params import OBJECT_PARAMS

__all__ = ["StageWriter", "StageReader", "object_params", "json_params"]


def json_params(instance: Params) -> dict[str, Any]:
    """The instance's explicitly set Params that are plain JSON values."""
    return {p.name: v for p, v in instance._paramMap.items() if p.name not in OBJECT_PARAMS}


def object_params(instance: Params) -> dict[str, Any]:
    """The instance's Python-object Params (set or default), saved with cloudpickle."""
    return {p.name: instance.getOrDefault(p) for p in instance.params
            if p.name in OBJECT_PARAMS and instance.isDefined(p)}


class StageWriter(MLWriter):
    """Writes ``instance``: metadata (JSON Params and ``instance._extra_metadata()``) and the data file."""

    def __init__(self, instance: Params) -> None:
        super().__init__()
        self.instance = instance

    def saveImpl(self, path: str) -> None:
        extra: dict[str, Any] = getattr(self.instance, "_extra_metadata", dict)()
        DefaultParamsWriter.saveMetadata(self.instance, path, self.sparkSession, extraMetadata=extra,
                                         paramMap=json_params(self.instance))
        state = getattr(self.instance, "_state_to_save", None)
        payload = {"params": object_params(self.instance), "state": state() if state is not None else None}
        blob = cloudpickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        frame = self.sparkSession.createDataFrame([(bytearray(blob),)], schema="data binary")
        frame.coalesce(1).write.parquet(os.path.join(path, "data"))


class StageReader(MLReader[Any]):
    """Reads what :class:`StageWriter` wrote into a new instance of ``cls`` (the class named in the metadata)."""

    def __init__(self, cls: type) -> None:
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> Any:
        metadata = DefaultParamsReader.loadMetadata(path, self.sparkSession)
        module, _, name = metadata["class"].rpartition(".")
        import importlib

        cls = getattr(importlib.import_module(module), name)
        if not issubclass(cls, self.cls):
            raise TypeError(f"{path} holds a {metadata['class']}, not a {self.cls.__name__}")
        instance = cls()
        instance._resetUid(metadata["uid"])
        DefaultParamsReader.getAndSetParams(instance, metadata)
        row = self.sparkSession.read.parquet(os.path.join(path, "data")).head()
        if row is None:
            raise ValueError(f"{path}/data is empty: the stage was not saved completely")
        payload = pickle.loads(bytes(row[0]))
        for name, value in payload["params"].items():
            instance._set(**{name: value})
        restore = getattr(instance, "_restore_saved", None)
        if restore is not None:
            restore(payload["state"], metadata)
        return instance
