"""MLflow is optional: nothing in the core imports it, and without it ``fit_run`` is a no-op tracker.

Each check runs in a fresh interpreter (``sys.modules`` must start clean); "without
mlflow" is ``sys.modules["mlflow"] = None``, which makes every ``import mlflow`` fail.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)


def run_python(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_core_the_coordinator_and_the_public_module_do_not_import_mlflow() -> None:
    run_python("""
        import sys
        import sparkhydrogen, sparkhydrogen.coordinator, sparkhydrogen.launch.runner, sparkhydrogen.task.lifecycle
        import sparkhydrogen.mlflow
        from sparkhydrogen.tracking.sink import sink_for_launch
        assert sink_for_launch("g") is None  # mlflow never imported here: no run can be active
        assert "mlflow" not in sys.modules, "the core imported mlflow"
        assert sparkhydrogen.mlflow is sys.modules["sparkhydrogen.mlflow"]
    """)


def test_without_mlflow_fit_run_is_a_noop_and_ranks_metrics_have_nowhere_to_go() -> None:
    run_python("""
        import sys
        sys.modules["mlflow"] = None  # blocked: "import mlflow" raises ImportError
        import sparkhydrogen as h2
        from sparkhydrogen.mlflow import NoopTracker, fit_run, log_metric
        from sparkhydrogen.tracking.rank import install, uninstall
        with fit_run({"lr": 0.1}, nested=True, name="fold") as tracker:
            assert isinstance(tracker, NoopTracker) and tracker.run_id is None
            tracker.log_epoch({"train_loss": 0.5}, step=0)
            tracker.log_summary({"train_loss": [0.5]})
            assert tracker.log_torch_model(object(), None, None) is None
        metrics = install(0, None)  # a rank of a gang that logs nowhere
        log_metric("loss", 1.0)
        uninstall(metrics)
        try:
            log_metric("loss", 1.0)
        except h2.NotInGangError as exc:
            assert "outside a spark-hydrogen gang rank" in str(exc)
        else:
            raise AssertionError("log_metric outside a gang did not raise")
    """)
