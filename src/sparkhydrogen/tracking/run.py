"""Driver side: :func:`fit_run`, the MLflow run an estimator's ``fit`` logs into, and its trackers.

A fit logs into MLflow only when the user asked for it: an MLflow run is active in the
calling thread (or ``parent_run_id`` names one), or ``mlflow.autolog()`` (or
``mlflow.pytorch.autolog()``) is on. Then:

* ``nested=False``: into the active run itself (it is not ended here); with autolog on
  and no run active, a run is started and ended on exit (``FINISHED``, or ``FAILED``
  when the body raised);
* ``nested=True``: into a child run of the active one (tag ``mlflow.parentRunId``),
  ended on exit.

Every gang launched from the body (in this thread) sends its ranks' metrics there
(:func:`~.sink.tracked_run`). The tracker logs by the run's id (``MlflowClient``), so
it works from any thread; a nested run is made with ``MlflowClient.create_run`` and is
not the thread's active run. With no run to log into, or without ``mlflow`` installed,
the tracker is a :class:`NoopTracker`: every method does nothing and ``run_id`` is ``None``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from .points import check_key
from .sink import tracked_run

__all__ = ["Tracker", "NoopTracker", "MlflowTracker", "fit_run", "mlflow_available", "autolog_enabled",
           "SUMMARY_ARTIFACT", "MODEL_NAME", "MAX_PARAM_CHARS"]

log = logging.getLogger("sparkhydrogen.mlflow")

#: Where :meth:`Tracker.log_summary` puts the summary in the run's artifacts.
SUMMARY_ARTIFACT = "training_summary.json"
#: The name :meth:`Tracker.log_torch_model` logs the model under.
MODEL_NAME = "model"
#: MLflow's limit on a param value; longer values are cut (and say so).
MAX_PARAM_CHARS = 6000


class Tracker(Protocol):
    """What :func:`fit_run` yields: log into the fit's run (or nowhere, for :class:`NoopTracker`)."""

    @property
    def run_id(self) -> str | None: ...

    def log_epoch(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_summary(self, summary: Mapping[str, Any]) -> None: ...

    def log_torch_model(self, module: Any, input_example_pandas: Any, output_example: Any) -> str | None: ...


class NoopTracker:
    """The tracker of a fit that logs nowhere (no MLflow, no active run, autolog off): every call does nothing.

    >>> tracker = NoopTracker()
    >>> tracker.log_epoch({"train_loss": 0.5}, step=0); tracker.run_id is None
    True
    """

    @property
    def run_id(self) -> str | None:
        return None

    def log_epoch(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        pass

    def log_torch_model(self, module: Any, input_example_pandas: Any, output_example: Any) -> str | None:
        return None


def _final_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a summary to log as final metrics: its numeric scalars with valid names.

    Lists (per-epoch histories) are not logged again: :meth:`MlflowTracker.log_epoch` logged them by step.

    >>> _final_metrics({"train_loss": [0.9, 0.4], "accuracy": 0.95, "name": "x", "bad key!": 1.0})
    {'accuracy': 0.95}
    """
    out: dict[str, float] = {}
    for key, value in summary.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        try:
            out[check_key(str(key))] = float(value)
        except ValueError:
            continue
    return out


class MlflowTracker:
    """Logs a fit into one MLflow run by its id (``MlflowClient``), and its model through the thread's active run."""

    def __init__(self, run_id: str, tracking_uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self._run_id = run_id
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping of names to values, got {type(params).__name__}")
        existing = self.client.get_run(self._run_id).data.params  # MLflow refuses to change a logged param
        entries, clashes = [], []
        for key, value in params.items():
            text = str(value)
            if len(text) > MAX_PARAM_CHARS:
                text = text[: MAX_PARAM_CHARS - 20] + f"... ({len(text)} chars)"
            if str(key) in existing:
                if existing[str(key)] != text:
                    clashes.append(f"{key}={text[:60]!r} (logged: {existing[str(key)][:60]!r})")
                continue
            entries.append(Param(str(key), text))
        if clashes:
            log.warning("MLflow run %s already has other values for param(s) %s: kept as they were (fit into a "
                        "nested run, fit_run(..., nested=True), to log each fit's own)", self._run_id,
                        ", ".join(clashes))
        for start in range(0, len(entries), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self._run_id, params=entries[start : start + 100], synchronous=True)

    def log_epoch(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` (e.g. ``{"train_loss": 0.4, "val_loss": 0.5}``) at ``step`` (the epoch)."""
        from mlflow.entities import Metric

        from .points import points_from_mapping

        points = points_from_mapping(metrics, step)
        self.client.log_batch(self._run_id, metrics=[Metric(p.key, p.value, p.timestamp_ms, p.step)
                                                     for p in points], synchronous=True)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Log ``summary`` as the JSON artifact :data:`SUMMARY_ARTIFACT`, its numeric scalars as metrics (step 0)."""
        if not isinstance(summary, Mapping):
            raise TypeError(f"summary must be a mapping, got {type(summary).__name__}")
        self.client.log_dict(self._run_id, json.loads(json.dumps(dict(summary), default=str)), SUMMARY_ARTIFACT)
        final = _final_metrics(summary)
        if final:
            from mlflow.entities import Metric

            from .points import make_point

            points = [make_point(k, v) for k, v in final.items()]
            self.client.log_batch(self._run_id, metrics=[Metric(p.key, p.value, p.timestamp_ms, p.step)
                                                         for p in points], synchronous=True)

    def log_torch_model(self, module: Any, input_example_pandas: Any, output_example: Any) -> str | None:
        """Log ``module`` as the MLflow model :data:`MODEL_NAME` (pytorch flavour, pyfunc-loadable); its URI.

        The signature is inferred from ``input_example_pandas`` (a pandas DataFrame of the
        feature columns) and ``output_example`` (the module's output for it, numpy or
        pandas): ``mlflow.pyfunc.load_model(uri).predict(df)`` takes a DataFrame of those
        columns (fed to the module as float32, as the pytorch flavour does). The model is
        pickled (the flavour's ``serialization_format="pickle"``: any module, no tracing),
        saved locally and uploaded into this run by its id, so it works from any thread;
        its requirements are the flavour's defaults (``torch`` and ``cloudpickle`` as
        installed here), not inferred.
        """
        import tempfile

        import mlflow.pytorch
        from mlflow.models import infer_signature

        signature = infer_signature(input_example_pandas, output_example)
        with tempfile.TemporaryDirectory(prefix="sparkhydrogen-model-") as tmp:
            path = f"{tmp}/{MODEL_NAME}"
            # the flavour's own requirements (torch, cloudpickle, pinned to what runs here): MLflow's inference
            # of requirements would load the model in a subprocess, tens of seconds per fit
            mlflow.pytorch.save_model(module, path, signature=signature, input_example=input_example_pandas,
                                      serialization_format="pickle",
                                      pip_requirements=mlflow.pytorch.get_default_pip_requirements())
            self.client.log_artifacts(self._run_id, path, MODEL_NAME)
        return f"runs:/{self._run_id}/{MODEL_NAME}"


def mlflow_available() -> bool:
    """Whether ``mlflow`` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ValueError, ImportError):  # sys.modules["mlflow"] = None (blocked) or a broken install
        return False


def autolog_enabled() -> bool:
    """Whether ``mlflow.autolog()`` or ``mlflow.pytorch.autolog()`` is on (MLflow's own autologging config)."""
    utils: Any = importlib.import_module("mlflow.utils.autologging_utils")  # untyped
    if utils.get_autologging_config("mlflow", "disable", True) is False:  # mlflow.autolog()
        return True
    return not utils.autologging_is_disabled("pytorch")  # mlflow.pytorch.autolog()


@contextlib.contextmanager
def fit_run(params: Mapping[str, Any], *, nested: bool = False, name: str | None = None,
            parent_run_id: str | None = None) -> Iterator[Tracker]:
    """The MLflow run a fit logs into, with ``params`` logged; a :class:`NoopTracker` when there is none.

    See the module docstring for when there is a run. ``parent_run_id`` names the run
    to nest under (or to log into with ``nested=False``) when it is not active in this
    thread (MLflow keeps active runs per thread: a ``CrossValidator`` worker thread
    does not see the caller's run).

    Example:
        >>> with fit_run({"batch_size": 32}, nested=True, name="fold-0") as tracker:   # doctest: +SKIP
        ...     tracker.log_epoch({"train_loss": 0.4}, step=0)
    """
    if not isinstance(nested, bool):
        raise TypeError(f"nested must be True or False, got {nested!r}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of names to values, got {type(params).__name__}")
    if not mlflow_available():
        yield NoopTracker()
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    active = mlflow.active_run()
    parent = parent_run_id or (active.info.run_id if active is not None else None)
    if parent is None and not autolog_enabled():
        log.debug("fit_run: no MLflow run is active and autologging is off; nothing is logged")
        yield NoopTracker()  # no store touched: a client for the default URI could create ./mlflow.db
        return
    uri = mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    started_here = False  # a fluent run of this thread (autolog): ended with mlflow.end_run
    if parent is None:
        run_id = mlflow.start_run(run_name=name).info.run_id
        started_here = True
    elif nested:
        experiment = client.get_run(parent).info.experiment_id
        run_id = client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent}).info.run_id
    else:
        run_id = parent
    ours = started_here or nested
    status = "FINISHED"
    try:
        tracker = MlflowTracker(run_id, uri)
        tracker.log_params(params)
        with tracked_run(run_id, uri):
            yield tracker
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if started_here:
            mlflow.end_run(status)
        elif ours:
            client.set_terminated(run_id, status)
