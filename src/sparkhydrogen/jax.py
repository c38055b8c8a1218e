"""JAX on Spark: ``sparkhydrogen.jax.run(fn, *args, num_processes=N)``.

Every rank is one JAX process: ``jax.distributed.initialize`` has run before ``fn``
(coordinator on a port rank 0 reserved, gloo collectives on CPU), and
``jax.distributed.shutdown`` runs after, even when ``fn`` raises::

    import sparkhydrogen.jax as h2jax

    def step():
        import jax, jax.numpy as jnp
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(jnp.array([jax.process_index()]))

    h2jax.run(step, num_processes=2)        # rank 0's result: [[0], [1]]

Importing this module does not import JAX; the ranks need it (``spark-hydrogen[jax]``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .data.jax_feed import batches
from .frameworks import JaxDistributed
from .frameworks.launch import run as _run_framework
from .launch.elastic import SizeRange, size_range

__all__ = ["run", "batches", "JaxDistributed"]


def run(fn: Callable[..., Any], *args: Any, num_processes: int | tuple[int, int] | SizeRange,
        return_all: bool = False, max_retries: int = 0,
        retry_backoff: float = 0.5, stream_logs: bool = True, spark: Any = None,
        env: Mapping[str, str] | None = None, resources: Any = None, data: Any = None,
        initialization_timeout: int = 300, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` as ``num_processes`` JAX processes, one per barrier task; rank 0's result.

    * ``jax.process_count()`` is ``num_processes`` and ``jax.process_index()`` the rank
      inside ``fn``; cross-process collectives (``multihost_utils``, ``psum`` over
      ``jax.devices()``) work on CPU through gloo.
    * ``num_processes=(min, max)`` (or a :class:`~sparkhydrogen.SizeRange`) is an elastic gang:
      each attempt is a new JAX cluster of the attempt's size (``docs/elastic.md``).
    * Returns rank 0's return value, or every rank's in rank order with ``return_all=True``.
    * A rank that raises aborts the others and is named, with its traceback, in the
      :class:`~sparkhydrogen.GangFailedError`; ``max_retries`` relaunches the whole gang.
    * ``stream_logs`` (default on) prints every rank's output on the driver, ``[rank N]``.
    * ``env`` adds variables for every rank; ``initialization_timeout`` bounds
      ``jax.distributed.initialize`` (seconds).
    * ``resources`` and ``data`` are :func:`sparkhydrogen.run`'s; read the rank's share
      of ``data`` with :func:`sparkhydrogen.jax.batches` (numpy arrays).

    The keyword names above are the launcher's; every other keyword goes to ``fn``.
    """
    wanted = size_range(num_processes, "num_processes")
    framework = JaxDistributed(initialization_timeout=initialization_timeout)
    return _run_framework(framework, fn, *args, num_tasks=wanted, return_all=return_all,
                          max_retries=max_retries, retry_backoff=retry_backoff, stream_logs=stream_logs, spark=spark,
                          env=env, resources=resources, data=data, **kwargs)
