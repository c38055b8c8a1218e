"""Ranks log through the gang into the driver's MLflow run: a real tracking server, real Spark (local[4]).

Read back through ``MlflowClient``: rank 0's metrics under their names, another rank's
under ``rank_<r>/`` only with ``all_ranks``, histories by step; two gangs launched at
once from two threads each in their own run; the torch launcher's child processes log
through their rank; ``fit_run`` (params, nested runs, epochs, summary, a torch model that
``mlflow.pyfunc`` loads and that predicts as the module does); system metrics per rank.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import sparkhydrogen as h2

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def spark(mlflow_server: Any) -> Iterator[Any]:  # the tracking server boots while Spark starts
    from sparkutil import spark_session

    with spark_session("local[4]", **{"spark.hydrogen.mlflow.systemMetricsInterval": "200ms"}) as session:
        yield session


def history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def rank_body(tag: float) -> Any:
    """What every rank runs (built here: workers cannot import test modules, a local function travels by value)."""

    def ranks_log(tag: float) -> int:
        from sparkhydrogen import BarrierTaskContext
        from sparkhydrogen.mlflow import log_metric, log_metrics
        from sparkhydrogen.tracking.rank import current

        rank = BarrierTaskContext.get().rank()
        for step in range(3):
            log_metrics({"loss": tag + rank + step / 10}, step=step)  # rank 0's only
            log_metric("seen", tag + rank, step=step, all_ranks=True)
        sampler = current().sampler  # type: ignore[union-attr]
        assert sampler is not None and sampler.interval == 0.2
        deadline = time.monotonic() + 60
        while sampler.samples < 1 and time.monotonic() < deadline:  # a condition with a bound: one sample taken
            threading.Event().wait(0.05)
        return rank

    return lambda: ranks_log(tag)


def test_h2_run_ranks_reach_the_active_run(spark: Any, mlflow_uri: str, mlflow_client: Any) -> None:
    from sparkhydrogen.mlflow import fit_run

    with mlflow.start_run() as run:
        with fit_run({"lr": 1}) as tracker:  # not nested: the active run itself
            assert tracker.run_id == run.info.run_id
            assert h2.run(rank_body(5.0), num_tasks=2, spark=spark) == [0, 1]
        with fit_run({"lr": 2, "epochs": 3}):  # a second fit into the same run: lr stays (MLflow keeps params)
            pass
    run_id = run.info.run_id
    assert mlflow_client.get_run(run_id).data.params == {"lr": "1", "epochs": "3"}
    assert mlflow_client.get_run(run_id).info.status == "FINISHED"  # ended by its owner, not by fit_run
    keys = set(mlflow_client.get_run(run_id).data.metrics)
    assert {"loss", "seen", "rank_1/seen"} <= keys
    assert "rank_1/loss" not in keys and "rank_0/seen" not in keys
    assert history(mlflow_client, run_id, "loss") == [(0, 5.0), (1, 5.1), (2, 5.2)]
    assert history(mlflow_client, run_id, "rank_1/seen") == [(0, 6.0), (1, 6.0), (2, 6.0)]
    # every rank sampled its system metrics (200 ms) while its gang logged into a run
    assert {f"system/rank_{r}/{name}" for r in (0, 1) for name in ("cpu_percent", "memory_rss_mb")} <= keys
    assert mlflow_client.get_run(run_id).data.metrics["system/rank_1/memory_rss_mb"] > 1


def test_two_gangs_from_two_threads_log_into_their_own_runs(spark: Any, mlflow_uri: str, mlflow_client: Any) -> None:
    runs: dict[float, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def launch(tag: float) -> None:
        try:
            with mlflow.start_run() as run:  # MLflow's active run is per thread
                runs[tag] = run.info.run_id
                start.wait(30)
                h2.run(rank_body(tag), num_tasks=2, spark=spark)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=launch, args=(tag,)) for tag in (10.0, 20.0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    assert not errors, errors
    for tag, run_id in runs.items():
        assert history(mlflow_client, run_id, "loss") == [(0, tag), (1, tag + 0.1), (2, tag + 0.2)]
        assert history(mlflow_client, run_id, "rank_1/seen") == [(0, tag + 1), (1, tag + 1), (2, tag + 1)]


def test_fit_run_logs_nowhere_without_a_run_and_opens_one_under_autolog(spark: Any, mlflow_uri: str,
                                                                        mlflow_client: Any) -> None:
    import mlflow.pytorch

    from sparkhydrogen.mlflow import NoopTracker, fit_run
    from sparkhydrogen.tracking.sink import sink_for_launch

    assert mlflow.active_run() is None
    with fit_run({"lr": 0.5}) as tracker:  # no run, autolog off: nothing is logged
        assert isinstance(tracker, NoopTracker) and tracker.run_id is None
        assert sink_for_launch("g") is None  # a gang launched here drops its ranks' metrics
    mlflow.pytorch.autolog(log_models=False)
    try:
        with fit_run({"lr": 0.5}, name="autologged") as tracker:
            run_id = tracker.run_id
            assert run_id is not None and mlflow.active_run().info.run_id == run_id
            h2.run(rank_body(7.0), num_tasks=2, spark=spark)
    finally:
        mlflow.pytorch.autolog(disable=True)
    assert mlflow.active_run() is None  # the run fit_run started is ended
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "autologged" and run.data.params == {"lr": "0.5"}
    assert history(mlflow_client, run_id, "loss") == [(0, 7.0), (1, 7.1), (2, 7.2)]


def torch_body() -> Any:
    """What every torch rank's child process runs (a local function: pickled by value)."""

    def torch_rank(step_count: int) -> int:
        import torch.distributed as dist

        from sparkhydrogen.mlflow import log_metric
        from sparkhydrogen.tracking.rank import current

        rank = dist.get_rank()
        for step in range(step_count):
            log_metric("child_loss", 1.0 + rank + step, step=step, all_ranks=True)
        assert current() is None  # a child process: its points went through the rank's relay
        return rank

    return torch_rank


def test_fit_run_nested_with_torch_children_and_a_pyfunc_model(spark: Any, mlflow_uri: str,
                                                                mlflow_client: Any) -> None:
    import numpy as np
    import pandas as pd
    import torch

    import sparkhydrogen.torch as h2torch
    from sparkhydrogen.mlflow import fit_run

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    features = pd.DataFrame(np.random.default_rng(0).normal(size=(8, 3)), columns=["a", "b", "c"])
    expected = module(torch.tensor(features.to_numpy(), dtype=torch.float32)).detach().numpy()
    with mlflow.start_run() as parent:
        with fit_run({"lr": 0.01, "batch_size": 16}, nested=True, name="fold-0") as tracker:
            h2torch.run(torch_body(), 2, num_processes=2, use_subprocess=True, spark=spark)
            for epoch, loss in enumerate([0.9, 0.5]):
                tracker.log_epoch({"train_loss": loss, "val_loss": loss + 0.1}, step=epoch)
            tracker.log_summary({"train_loss": [0.9, 0.5], "accuracy": 0.75})
            model_uri = tracker.log_torch_model(module, features, expected)
            child_id = tracker.run_id
    run = mlflow_client.get_run(child_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.01", "batch_size": "16"}
    assert history(mlflow_client, child_id, "train_loss") == [(0, 0.9), (1, 0.5)]
    assert history(mlflow_client, child_id, "child_loss") == [(0, 1.0), (1, 2.0)]
    assert history(mlflow_client, child_id, "rank_1/child_loss") == [(0, 2.0), (1, 3.0)]
    assert run.data.metrics["accuracy"] == 0.75
    assert "child_loss" not in mlflow_client.get_run(parent.info.run_id).data.metrics  # the nested run's own
    loaded = mlflow.pyfunc.load_model(model_uri)
    np.testing.assert_allclose(np.asarray(loaded.predict(features)).reshape(-1), expected.reshape(-1), rtol=1e-5)
