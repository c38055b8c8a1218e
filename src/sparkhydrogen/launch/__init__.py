"""Driver side: declare gangs, preflight slots, place and launch them, translate failures, retry, release.

Nothing here runs inside a task; the executor side is :mod:`sparkhydrogen.task`.
"""

from .elastic import SizeRange
from .rdd import RDDBarrier, barrier
from .retry import retry
from .run import run
from .stacks import stacks

__all__ = ["RDDBarrier", "SizeRange", "barrier", "retry", "run", "stacks"]
