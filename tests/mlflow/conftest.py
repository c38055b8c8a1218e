"""A real MLflow tracking server per test module (``tests/mlflowkit.py``), and a ``local[4]`` session.

``mlflow_server`` starts the server (by pid, loopback, SQLite store, proxied artifacts) and
stops it after the module; ``mlflow_uri`` waits until it answers and points this process's
MLflow at it. Modules that need Spark too ask for ``spark`` after ``mlflow_server``, so the
server boots while Spark starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (mlflowkit, sparkutil)

from mlflowkit import TrackingServer  # noqa: E402

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    pytest.importorskip("mlflow")
    server = TrackingServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_uri(mlflow_server: TrackingServer) -> Iterator[str]:
    """The server's URI once it answers; this process's MLflow logs there for the module."""
    import mlflow

    uri = mlflow_server.wait_ready()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def mlflow_client(mlflow_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_uri)
