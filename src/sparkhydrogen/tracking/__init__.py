"""MLflow tracking through the gang: the machinery behind :mod:`sparkhydrogen.mlflow`.

Nothing here imports ``mlflow`` at import time; the core of spark-hydrogen imports only
:mod:`.points` (pure) and :mod:`.sink` (which looks at ``sys.modules`` before it ever
touches ``mlflow``), so ``import sparkhydrogen`` and the coordinator work without it.

* :mod:`.points` (pure): metric names and values, as a rank sends them and as the
  driver logs them; the ``rank_<r>/`` and ``system/rank_<r>/`` key rules;
* :mod:`.rank` (task side): the per-process sender (a bounded queue and a thread that
  ships batches on the rank's coordinator connection), the relay for a rank's child
  processes, and the system-metrics sampler;
* :mod:`.sink` (driver side): which MLflow run a gang's metrics go to, captured in the
  launching thread, and the writer thread that logs them with ``MlflowClient``;
* :mod:`.run` (driver side): :func:`fit_run` and its trackers.
"""

from __future__ import annotations

__all__: list[str] = []
