"""Driver side: declare gangs, preflight slots, launch barrier stages, translate failures."""

from .rdd import RDDBarrier, barrier
from .retry import retry
from .run import run

__all__ = ["RDDBarrier", "barrier", "retry", "run"]
