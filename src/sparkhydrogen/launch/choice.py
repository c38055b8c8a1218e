"""Which placement runs a gang: chosen once, by a pure function of a snapshot of settings.

* ``embedded``: Spark Connect. The client is not reachable from executors, so rank 0's
  task hosts the coordinator, in a DataFrame barrier stage.
* ``coordinated``: an ordinary stage whose start the coordinator gates (all ranks or
  none run user code): when Spark would refuse a barrier stage (dynamic allocation on a
  master that honours it), when ``spark.hydrogen.launch.placement=coordinated`` says so,
  or when the gang reads ``data=`` (its shares are coalesced partitions, which Spark
  refuses in a barrier stage).
* ``barrier``: a Spark barrier stage, all-or-nothing by Spark's scheduler.

Reading the snapshot (:func:`settings_of`) reads a few conf values and starts nothing:
the coordinator starts when a gang is launched, not when its placement is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PLACEMENTS
from .preflight import barrier_refused
from .session import SparkTarget, dynamic_allocation_enabled

__all__ = ["PlacementSettings", "choose", "reason", "settings_of", "PLACEMENT_KEY"]

#: The conf key that forces a placement (``auto``, ``barrier`` or ``coordinated``).
PLACEMENT_KEY = "spark.hydrogen.launch.placement"


@dataclass(frozen=True)
class PlacementSettings:
    """What the choice of placement depends on, read once from the target."""

    connect: bool
    master: str = ""
    dynamic_allocation: bool = False
    mode: str = "auto"  # spark.hydrogen.launch.placement
    data: bool = False  # the gang reads data=

    def __post_init__(self) -> None:
        if self.mode not in PLACEMENTS:
            raise ValueError(f"{PLACEMENT_KEY} must be one of {', '.join(PLACEMENTS)}, got {self.mode!r}")


def choose(settings: PlacementSettings) -> str:
    """``"embedded"``, ``"coordinated"`` or ``"barrier"`` (pure).

    >>> choose(PlacementSettings(connect=False, master="spark://m:7077", dynamic_allocation=True))
    'coordinated'
    >>> choose(PlacementSettings(connect=False, master="local[4]", dynamic_allocation=True))
    'barrier'
    >>> choose(PlacementSettings(connect=True, mode="coordinated"))
    'embedded'
    """
    if settings.connect:
        return "embedded"
    if settings.data or settings.mode == "coordinated":
        return "coordinated"
    if settings.mode == "barrier":
        return "barrier"
    return "coordinated" if barrier_refused(settings.master, settings.dynamic_allocation) else "barrier"


def reason(settings: PlacementSettings) -> str:
    """Why :func:`choose` chose what it did, for the driver's log (pure)."""
    chosen = choose(settings)
    if chosen == "embedded":
        return "Spark Connect: the coordinator runs inside rank 0's task"
    if chosen == "barrier":
        return f"a Spark barrier stage on {settings.master}"
    if settings.data:
        return "the gang reads data= (its shares are coalesced partitions, refused in a barrier stage)"
    if settings.mode == "coordinated":
        return f"{PLACEMENT_KEY}=coordinated"
    return (f"spark.dynamicAllocation.enabled=true on {settings.master}: Spark refuses barrier stages "
            "(SPARK-24942), so the coordinator gates the start")


def settings_of(target: SparkTarget, data: bool = False) -> PlacementSettings:
    """The snapshot of ``target``'s settings the choice depends on (a few conf reads; starts nothing)."""
    if target.connect:
        return PlacementSettings(connect=True, data=data)
    mode = (target.conf(PLACEMENT_KEY) or "auto").strip().lower()
    return PlacementSettings(connect=False, master=target.master,
                             dynamic_allocation=dynamic_allocation_enabled(target), mode=mode, data=data)
