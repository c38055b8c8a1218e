"""``jax.distributed`` from a gang layout: the coordinator on a port rank 0 reserved, gloo for CPU collectives."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .api import Framework, FrameworkError, GangLayout

__all__ = ["JaxDistributed"]

log = logging.getLogger("sparkhydrogen.frameworks")


@dataclass(frozen=True)
class JaxDistributed(Framework):
    """``jax.distributed.initialize(coordinator_address, num_processes, process_id)`` before ``fn``, shutdown after.

    On CPU (a rank without GPUs) cross-process collectives need
    ``jax_cpu_collectives_implementation="gloo"`` set before the backend starts; it is.
    A reused Python worker that ran JAX before has its backends cleared first (JAX
    can only be initialised before its backend exists), and again after shutdown. A
    failed rank does not wait in JAX's shutdown barrier for peers stuck in a collective
    with it: its task ends at once, so Spark aborts the stage (under Spark Connect too).

    >>> JaxDistributed().initialize_arguments(GangLayout(rank=1, hosts=("h", "h"), ports=((4001,), ())))
    ... # doctest: +NORMALIZE_WHITESPACE
    {'coordinator_address': 'h:4001', 'num_processes': 2, 'process_id': 1, 'local_device_ids': None,
     'cluster_detection_method': 'deactivate', 'initialization_timeout': 300, 'heartbeat_timeout_seconds': 100,
     'shutdown_timeout_seconds': 60}
    """

    initialization_timeout: int = 300
    heartbeat_timeout: int = 100
    shutdown_timeout: int = 60
    cpu_collectives: str = "gloo"

    name = "jax"

    def __post_init__(self) -> None:
        for field_name in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field_name} must be a positive number of seconds, got {value!r}")
        if self.cpu_collectives not in ("gloo", "mpi"):
            raise ValueError(f"cpu_collectives must be 'gloo' or 'mpi', got {self.cpu_collectives!r}")

    def ports(self, rank: int, world_size: int) -> int:
        return 1 if rank == 0 else 0

    def environment(self, layout: GangLayout) -> dict[str, str]:
        return {"JAX_COORDINATOR_ADDRESS": layout.address(0), "JAX_NUM_PROCESSES": str(layout.world_size),
                "JAX_PROCESS_ID": str(layout.rank)}

    def initialize_arguments(self, layout: GangLayout) -> dict[str, Any]:
        """Pure: the keyword arguments of ``jax.distributed.initialize`` for this rank."""
        gpus = layout.own_gpus
        # the rank's process sees exactly its task's GPUs (CUDA_VISIBLE_DEVICES, narrowed by its session),
        # so its devices are the first len(gpus) of its own view, whatever Spark's addresses were
        devices = list(range(len(gpus))) if gpus else None
        return {
            "coordinator_address": layout.address(0),
            "num_processes": layout.world_size,
            "process_id": layout.rank,
            "local_device_ids": devices,
            "cluster_detection_method": "deactivate",  # never probe cloud metadata servers
            "initialization_timeout": self.initialization_timeout,
            "heartbeat_timeout_seconds": self.heartbeat_timeout,
            "shutdown_timeout_seconds": self.shutdown_timeout,
        }

    def start(self, layout: GangLayout, holds: Sequence[Any]) -> None:
        jax = _jax()

        _recover_abandoned()
        _fresh_backends()
        if jax.distributed.is_initialized():
            raise FrameworkError(
                "jax.distributed is already initialised in this Python worker (earlier code never called "
                "jax.distributed.shutdown()); call it there")
        if not layout.own_gpus:
            jax.config.update("jax_cpu_collectives_implementation", self.cpu_collectives)
        jax.distributed.initialize(**self.initialize_arguments(layout))

    def stop(self, layout: GangLayout, failed: bool) -> None:
        import sys

        if "jax" not in sys.modules:
            return
        jax = _jax()
        if not jax.distributed.is_initialized():
            return
        if not failed:
            try:
                jax.distributed.shutdown()
            finally:
                _fresh_backends()
            return
        # A failed rank must not wait in JAX's shutdown barrier for peers that may never come (they can be
        # stuck in a collective with it): shut down on a thread, and let the task end and abort the gang now.
        thread = threading.Thread(target=_shutdown_quietly, name="sparkhydrogen-jax-shutdown", daemon=True)
        thread.start()
        _ABANDONED.append(thread)
        thread.join(_FAILED_SHUTDOWN_WAIT)


#: Seconds a failed rank gives ``jax.distributed.shutdown()`` before it lets its task end.
_FAILED_SHUTDOWN_WAIT = 1.0
#: Seconds a later launch in the same worker waits for an abandoned shutdown to finish.
_ABANDONED_WAIT = 30.0
_ABANDONED: list[threading.Thread] = []


def _jax() -> Any:
    """The ``jax`` module (imported on the ranks only; typed loosely: JAX's API is partly untyped)."""
    import importlib

    return importlib.import_module("jax")


def _shutdown_quietly() -> None:
    try:
        _jax().distributed.shutdown()
    except Exception as exc:  # the peers are gone: the state is reset below, on the next start
        log.debug("jax.distributed.shutdown() after a failed rank: %s", exc)


def _recover_abandoned() -> None:
    """After a failed launch in this worker: wait for its shutdown, and drop JAX's distributed state if it hung."""
    while _ABANDONED:
        thread = _ABANDONED.pop()
        thread.join(_ABANDONED_WAIT)
        if _jax().distributed.is_initialized():
            import importlib

            global_state: Any = importlib.import_module("jax._src.distributed").global_state

            log.warning("dropping jax.distributed state a failed launch left in this worker")
            global_state.preemption_sync_manager = None
            global_state.client = None
            global_state.service = None


def _fresh_backends() -> None:
    """Drop JAX's backends (and compiled caches) so the next ``initialize`` in this process may run."""
    import importlib

    xla_bridge: Any = importlib.import_module("jax._src.xla_bridge")
    if xla_bridge.backends_are_initialized():
        backend: Any = importlib.import_module("jax.extend.backend")
        backend.clear_backends()
