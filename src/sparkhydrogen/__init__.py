"""spark-hydrogen: a first-class barrier (gang) execution mode for PySpark.

    import sparkhydrogen as h2

    out = h2.barrier(rdd).mapPartitions(train).collect()   # drop-in for rdd.barrier()
    results = h2.run(fn, num_tasks=4)                      # every rank's return value, by rank

    ctx = h2.BarrierTaskContext.get()                      # inside a task
    ctx.barrier(); ctx.allGather({"any": "picklable"}, timeout=30)

    h2.status()                                            # live gangs, rank by rank: who waits for whom
    h2.report().save("gang.html")                          # the last gang's timeline and stragglers
"""

from .config import CoordinatorConfig, HydrogenConfig, LaunchConfig
from .context import BarrierTaskContext, BarrierTaskInfo, Restored
from .diagnosis import GangReport, GangStatus, RankState, RankStatus, report, status
from .errors import (
    AuthenticationError,
    CheckpointError,
    CollectiveError,
    CollectiveMismatchError,
    CollectiveTimeoutError,
    CoordinatorConnectionError,
    ErrorInfo,
    GangAbortedError,
    GangCancelledError,
    GangFailedError,
    GangNotFoundError,
    GangResizing,
    GangSetupError,
    GpuPlacementError,
    HydrogenError,
    InsufficientSlotsError,
    LaunchError,
    NotInGangError,
    PartitionClosedError,
    PayloadError,
    ProtocolError,
    RankLostError,
    RegistrationError,
)
from .launch import RDDBarrier, SizeRange, barrier, retry, run, stacks
from .transparent import install, installed, is_installed, uninstall

__version__ = "0.1.0"

_LAUNCHERS = ("torch", "horovod", "jax", "tensorflow", "frameworks", "mlflow")


def __getattr__(name: str) -> object:
    """Launchers (``sparkhydrogen.torch``, ``.horovod``, ``.jax``, ``.tensorflow``, ``.frameworks``) and
    ``sparkhydrogen.mlflow`` load on use."""
    if name in _LAUNCHERS:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AuthenticationError",
    "BarrierTaskContext",
    "BarrierTaskInfo",
    "CheckpointError",
    "GpuPlacementError",
    "CollectiveError",
    "CollectiveMismatchError",
    "CollectiveTimeoutError",
    "CoordinatorConfig",
    "CoordinatorConnectionError",
    "ErrorInfo",
    "GangAbortedError",
    "GangCancelledError",
    "GangSetupError",
    "GangResizing",
    "GangFailedError",
    "GangReport",
    "GangStatus",
    "HydrogenError",
    "HydrogenConfig",
    "InsufficientSlotsError",
    "LaunchConfig",
    "LaunchError",
    "NotInGangError",
    "PartitionClosedError",
    "PayloadError",
    "ProtocolError",
    "RDDBarrier",
    "RankLostError",
    "RankState",
    "RankStatus",
    "RegistrationError",
    "Restored",
    "SizeRange",
    "GangNotFoundError",
    "barrier",
    "install",
    "installed",
    "is_installed",
    "report",
    "retry",
    "run",
    "stacks",
    "status",
    "uninstall",
]
