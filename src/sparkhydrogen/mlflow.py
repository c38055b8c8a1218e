"""MLflow for gangs: ranks log through the gang to the driver's run; estimators log a fit into one run.

Ranks (any launcher: ``h2.run``, ``sparkhydrogen.torch.run`` and the others, in the
task or in the training processes a launcher starts)::

    from sparkhydrogen.mlflow import log_metric, log_metrics

    def train():
        ...
        log_metrics({"loss": loss, "acc": acc}, step=epoch)   # rank 0's: "loss", "acc"
        log_metric("loss", loss, step=epoch, all_ranks=True)  # every rank's: "loss", "rank_1/loss", ...

The points travel on the rank's coordinator connection to the driver, which logs them
into the MLflow run that was active in the thread that launched the gang (or that
:func:`fit_run` opened there): executors need no network path to the tracking server
and no credentials, and ``mlflow`` need not be installed on them. With no run active,
the points are dropped (one debug line on the driver). Outside a gang rank (and its
child processes) ``log_metric`` raises :class:`~sparkhydrogen.errors.NotInGangError`: on
the driver, call ``mlflow.log_metric`` itself.

Driver (estimators, or your own training code)::

    import mlflow
    from sparkhydrogen.mlflow import fit_run

    with mlflow.start_run():
        with fit_run({"lr": 0.1}, nested=True, name="fold-0") as tracker:
            results = h2.run(train, num_tasks=2)               # ranks' metrics go to the nested run
            tracker.log_epoch({"train_loss": 0.3}, step=0)
            tracker.log_torch_model(module, features_pdf, module(x).detach().numpy())

Per-rank system metrics (CPU %, memory, GPUs where present) are sampled every
``spark.hydrogen.mlflow.systemMetricsInterval`` (default 10 s, ``0``: off) on every rank
of a gang that logs into a run, under ``system/rank_<r>/...``. See ``docs/mlflow.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import NotInGangError
from .tracking.rank import NotInRankError, log_points
from .tracking.run import MlflowTracker, NoopTracker, Tracker, fit_run

__all__ = ["log_metric", "log_metrics", "fit_run", "Tracker", "NoopTracker", "MlflowTracker"]


def log_metrics(metrics: Mapping[str, Any], step: int | None = None, *, all_ranks: bool = False) -> None:
    """Send ``metrics`` (names to numbers) from this rank to the driver's MLflow run, at ``step``.

    Rank 0's go under the names as given; other ranks' are dropped unless
    ``all_ranks=True``, then logged under ``rank_<r>/<name>``. Never blocks for long:
    the points are queued (bounded; when a rank logs faster than they can be sent, the
    oldest are dropped and the driver says how many) and sent by a thread. Names and
    values are checked on every rank (``ValueError``/``TypeError``).

    Example:
        >>> def train():                                           # doctest: +SKIP
        ...     for epoch in range(3):
        ...         log_metrics({"loss": 1.0 / (epoch + 1)}, step=epoch)
    """
    if not isinstance(all_ranks, bool):
        raise TypeError(f"all_ranks must be True or False, got {all_ranks!r}")
    try:
        log_points(metrics, step, all_ranks=all_ranks)
    except NotInRankError as exc:
        raise NotInGangError(
            "sparkhydrogen.mlflow.log_metric(s) was called outside a spark-hydrogen gang rank "
            f"({exc}): call it inside a function run by sparkhydrogen.run or a launcher (for example "
            "sparkhydrogen.torch.run); on the driver use mlflow.log_metric directly") from None


def log_metric(key: str, value: float, step: int | None = None, *, all_ranks: bool = False) -> None:
    """Send one metric from this rank to the driver's MLflow run; see :func:`log_metrics`.

    Example:
        >>> log_metric("loss", 0.25, step=3)                       # doctest: +SKIP
    """
    log_metrics({key: value}, step, all_ranks=all_ranks)
