"""Where a fit reports to MLflow: a no-op unless ``sparkhydrogen.mlflow`` is there and a run is active.

:func:`fit_tracking` wraps one ``fit``: the estimator's Params, then per-epoch metrics
(``train_loss``, ``val_loss``, ... rank 0's, and ``<name>_mean`` over ranks; step = epoch),
the training summary and the model. Without ``sparkhydrogen.mlflow`` (or without mlflow)
nothing is logged and nothing is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

__all__ = ["FitTracker", "fit_tracking", "active_run_id"]

log = logging.getLogger("sparkhydrogen.ml")


class FitTracker:
    """Logs a finished fit through a ``sparkhydrogen.mlflow`` tracker (``None``: logs nothing)."""

    def __init__(self, tracker: Any = None) -> None:
        self.tracker = tracker

    def log_fit(self, summary: Any, model: Any, dataset: Any) -> None:
        """Per-epoch metrics, the summary and (for torch models) the model with an input example."""
        if self.tracker is None:
            return
        for epoch, (rank0, mean) in enumerate(zip(summary.rank0, summary.mean, strict=True)):
            metrics = dict(rank0)
            metrics.update({f"{name}_mean": value for name, value in mean.items()})
            self.tracker.log_epoch(metrics, step=epoch)
        self.tracker.log_summary(summary.to_json())
        module = getattr(model, "module", None)
        if module is not None and hasattr(self.tracker, "log_torch_model"):
            example = model.input_example(dataset) if hasattr(model, "input_example") else None
            if example is not None:
                self.tracker.log_torch_model(module, example[0], example[1])


def _tracking_module() -> Any:
    try:
        return importlib.import_module("sparkhydrogen.mlflow")
    except ImportError:
        return None


def active_run_id() -> str | None:
    """The MLflow run active in this thread, if mlflow is installed (``CrossValidator`` fits in other threads,
    which do not see it: :meth:`fitMultiple` hands its id to them)."""
    if importlib.util.find_spec("mlflow") is None:
        return None
    run = importlib.import_module("mlflow").active_run()
    return None if run is None else str(run.info.run_id)


@contextmanager
def fit_tracking(params: Mapping[str, Any], *, nested: bool = False,
                 parent_run_id: str | None = None) -> Iterator[FitTracker]:
    """The fit's MLflow context (``sparkhydrogen.mlflow.fit_run``), or a tracker that logs nothing."""
    module = _tracking_module()
    if module is None or not hasattr(module, "fit_run"):
        yield FitTracker()
        return
    with module.fit_run(params, nested=nested, parent_run_id=parent_run_id) as tracker:
        yield FitTracker(tracker)
