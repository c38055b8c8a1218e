"""Driver side: declare gangs, preflight slots, launch barrier stages, translate failures."""

from .rdd import RDDBarrier, barrier
from .run import run

__all__ = ["RDDBarrier", "barrier", "run"]
