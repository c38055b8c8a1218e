"""Pure GPU arithmetic of a rank: Spark's addresses, ``CUDA_VISIBLE_DEVICES``, sharing and splitting.

Spark hands a task GPU *addresses* (``TaskContext.resources()["gpu"].addresses``),
as its discovery script reported them. spark-hydrogen treats an address as an index:
without ``CUDA_VISIBLE_DEVICES`` on the executor it is the device id; with it,
address ``i`` is the ``i``-th entry of that list (an index, a UUID ``GPU-...`` or a MIG
id), as ``TorchDistributor`` maps them. While a rank runs, its process sees exactly its
task's devices (see :class:`RankGpus`); a task without GPUs leaves the environment alone.

Nothing here imports pyspark, torch or the network, so every rule is unit tested.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import GpuPlacementError

__all__ = [
    "GPU_RESOURCE",
    "GpuPlacementError",
    "RankGpus",
    "check_gpu_addresses",
    "gpus_per_task",
    "physical_gpus",
    "place",
    "process_ordinals",
    "split_gpus",
    "task_gpu_addresses",
    "tasks_per_gpu",
    "visible_devices",
    "visible_entries",
]

#: The name of GPUs among Spark's resources (``spark.task.resource.gpu.amount``).
GPU_RESOURCE = "gpu"

_GPU_ADDRESS = re.compile(r"0|[1-9][0-9]*")


def task_gpu_addresses(resources: Mapping[str, Any] | None) -> list[str]:
    """The GPU addresses of a task, from ``TaskContext.resources()`` (``[]``: the task has no GPU).

    The values are pyspark ``ResourceInformation`` objects; only ``.addresses`` is read.

    >>> from types import SimpleNamespace as Info
    >>> task_gpu_addresses({"gpu": Info(name="gpu", addresses=["1", "0"]), "fpga": Info(addresses=["7"])})
    ['1', '0']
    >>> task_gpu_addresses({}), task_gpu_addresses(None)
    ([], [])
    """
    info = (resources or {}).get(GPU_RESOURCE)
    if info is None:
        return []
    return [str(a) for a in info.addresses]


def check_gpu_addresses(addresses: Sequence[str], where: str = "Spark") -> list[str]:
    """GPU addresses as indices: non-negative integers without zero padding (surrounding blanks dropped).

    >>> check_gpu_addresses(["0", " 3 "])
    ['0', '3']
    >>> check_gpu_addresses(["GPU-1f3a"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Spark gave GPU addresses ['GPU-1f3a']; each must be a device index ...
    """
    out = [str(a).strip() for a in addresses]
    bad = [a for a in out if not _GPU_ADDRESS.fullmatch(a)]
    if bad:
        raise ValueError(
            f"{where} gave GPU addresses {list(addresses)}; each must be a device index (0, 1, ...) without "
            "zero padding, as CUDA_VISIBLE_DEVICES expects; make the GPU discovery script print indices"
        )
    return out


def visible_entries(cuda_visible_devices: str | None) -> list[str] | None:
    """The entries of a ``CUDA_VISIBLE_DEVICES`` value (``None``: unset, every device is visible).

    Entries may be indices, UUIDs (``GPU-...``) or MIG ids; blanks around them are dropped.

    >>> visible_entries(" 4, 5 "), visible_entries("GPU-1f3a,GPU-77b0"), visible_entries(None)
    (['4', '5'], ['GPU-1f3a', 'GPU-77b0'], None)
    >>> visible_entries("")  # set but empty: no device is visible
    []
    """
    if cuda_visible_devices is None:
        return None
    return [v.strip() for v in cuda_visible_devices.split(",") if v.strip()]


def physical_gpus(addresses: Sequence[str], cuda_visible_devices: str | None) -> list[str]:
    """The device ids a process must see for the ``addresses`` Spark assigned to its task.

    Without ``CUDA_VISIBLE_DEVICES`` the addresses are the ids. With it (an executor
    restricted to some devices), address ``i`` means its ``i``-th entry, which may be
    a UUID.

    >>> physical_gpus(["0", "2"], None)
    ['0', '2']
    >>> physical_gpus(["0", "2"], "4,5,6,7")
    ['4', '6']
    >>> physical_gpus(["1"], "GPU-1f3a,GPU-77b0")
    ['GPU-77b0']
    >>> physical_gpus(["2"], "4,5")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sparkhydrogen.errors.GpuPlacementError: Spark assigned GPU address 2, but CUDA_VISIBLE_DEVICES='4,5' lists ...
    """
    addresses = check_gpu_addresses(addresses)
    visible = visible_entries(cuda_visible_devices)
    if visible is None:
        return addresses
    out = []
    for address in addresses:
        index = int(address)
        if index >= len(visible):
            raise GpuPlacementError(
                f"Spark assigned GPU address {address}, but CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} lists "
                f"only {len(visible)} device(s): with CUDA_VISIBLE_DEVICES set, GPU addresses are indices into it; "
                "make the discovery script report indices of the visible devices, or unset CUDA_VISIBLE_DEVICES"
            )
        out.append(visible[index])
    return out


def visible_devices(physical: Sequence[str]) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` a rank runs with: its device ids; ``None`` (leave it alone) without GPUs.

    An empty value would hide every GPU, so a CPU task keeps the environment it had.

    >>> visible_devices(["4", "6"]), visible_devices([])
    ('4,6', None)
    """
    return ",".join(physical) if physical else None


def split_gpus(addresses: Sequence[str], processes: int, local_index: int) -> list[str]:
    """The GPUs of process ``local_index`` when one task starts ``processes`` processes on its ``addresses``.

    Each process gets a distinct contiguous slice; when the GPUs do not divide evenly
    the first processes get one more. More processes than GPUs is an error (sharing a
    GPU between processes is what a fractional ``spark.task.resource.gpu.amount`` is for).

    >>> [split_gpus(["0", "1", "2", "3"], 2, j) for j in (0, 1)]
    [['0', '1'], ['2', '3']]
    >>> [split_gpus(["0", "1", "2"], 2, j) for j in (0, 1)]
    [['0', '1'], ['2']]
    >>> split_gpus(["0"], 2, 0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sparkhydrogen.errors.GpuPlacementError: 2 processes cannot each have their own GPU: the task has 1 (['0']); ...
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be a positive integer, got {processes!r}")
    if not 0 <= local_index < processes:
        raise ValueError(f"local_index {local_index} is outside 0..{processes - 1}")
    if processes > len(addresses):
        raise GpuPlacementError(
            f"{processes} processes cannot each have their own GPU: the task has {len(addresses)} "
            f"({list(addresses)}); start at most {len(addresses)} processes per task, or raise "
            "spark.task.resource.gpu.amount"
        )
    size, extra = divmod(len(addresses), processes)
    start = local_index * size + min(local_index, extra)
    return list(addresses[start:start + size + (1 if local_index < extra else 0)])


def _check_amount(amount: float) -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount <= 0:
        raise ValueError(f"spark.task.resource.gpu.amount must be a positive number, got {amount!r}")
    if amount >= 1 and amount != int(amount):
        raise ValueError(
            f"spark.task.resource.gpu.amount={amount}: an amount of 1 or more must be a whole number of GPUs")
    if 0.5 < amount < 1:
        raise ValueError(
            f"spark.task.resource.gpu.amount={amount}: a fractional amount must be at most 0.5 (at least two "
            "tasks per GPU), as Spark requires; use 1, 0.5, 0.25, ...")
    return float(amount)


def gpus_per_task(amount: float) -> int:
    """How many GPU addresses each task gets for ``spark.task.resource.gpu.amount``.

    A whole amount is that many GPUs; a fractional one (at most 0.5) is one shared GPU.

    >>> gpus_per_task(2), gpus_per_task(1), gpus_per_task(0.5)
    (2, 1, 1)
    """
    amount = _check_amount(amount)
    return int(amount) if amount >= 1 else 1


def tasks_per_gpu(amount: float) -> int:
    """How many tasks share one GPU address for ``spark.task.resource.gpu.amount``.

    Spark floors ``1 / amount``: 0.5 is two tasks per GPU, 0.25 four, and 0.3 three
    (not 3.33). Ranks sharing an address see the same device (the same
    ``CUDA_VISIBLE_DEVICES``); Spark divides scheduling slots, not the GPU's memory
    or compute, so each must leave room for the others.

    >>> tasks_per_gpu(1), tasks_per_gpu(0.5), tasks_per_gpu(0.25), tasks_per_gpu(0.3)
    (1, 2, 4, 3)
    >>> tasks_per_gpu(0.75)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: spark.task.resource.gpu.amount=0.75: a fractional amount must be at most 0.5 ...
    """
    amount = _check_amount(amount)
    if amount >= 1:
        return 1
    return int(math.floor(1 / amount + 1e-9))  # 1/0.1 is 9.999...: allow for float rounding


def process_ordinals(physical: Sequence[str], cuda_saw: str | None) -> list[int]:
    """The CUDA device indices of ``physical`` ids in a process whose CUDA started with ``cuda_saw`` visible.

    CUDA reads ``CUDA_VISIBLE_DEVICES`` once, when it initialises; index ``i`` is then
    its ``i``-th visible device (unset: device id ``i``).

    >>> process_ordinals(["5"], "5")   # narrowed to the rank's own GPU before CUDA started
    [0]
    >>> process_ordinals(["5"], "4,5"), process_ordinals(["3"], None)
    ([1], [3])
    >>> process_ordinals(["5"], "4")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sparkhydrogen.errors.GpuPlacementError: this process's CUDA started with CUDA_VISIBLE_DEVICES='4', which ...
    """
    visible = visible_entries(cuda_saw)
    out = []
    for device in physical:
        if visible is not None and device in visible:
            out.append(visible.index(device))
        elif visible is None and _GPU_ADDRESS.fullmatch(device):
            out.append(int(device))
        else:
            raise GpuPlacementError(
                f"this process's CUDA started with CUDA_VISIBLE_DEVICES={cuda_saw!r}, which does not show this "
                f"rank's GPU {device}: CUDA was initialised earlier in this reused Python worker; set "
                "spark.python.worker.reuse=false, or keep CUDA out of code that runs before the gang"
            )
    return out


@dataclass(frozen=True)
class RankGpus:
    """The GPUs of a rank, as its session placed them.

    ``addresses`` are Spark's, ``physical`` the device ids they mean on this executor,
    ``executor_visible`` the ``CUDA_VISIBLE_DEVICES`` the worker had before (restored
    after the rank). ``cuda_saw`` is what CUDA saw when it initialised in this process:
    ``visible`` when it starts during the rank (the usual case), else the older value a
    previous task of a reused worker left (``cuda_started_before`` is then true).
    """

    addresses: tuple[str, ...]
    physical: tuple[str, ...]
    executor_visible: str | None
    cuda_started_before: bool = False
    cuda_saw: str | None = None

    @property
    def visible(self) -> str:
        """This rank's ``CUDA_VISIBLE_DEVICES``: its device ids, comma-joined."""
        return ",".join(self.physical)

    def ordinals(self) -> list[int]:
        """The CUDA indices of this rank's GPUs in its own process (``0, 1, ...`` unless CUDA started before).

        >>> RankGpus(("1",), ("5",), "4,5").ordinals()
        [0]
        >>> RankGpus(("1",), ("5",), "4,5", cuda_started_before=True, cuda_saw="4,5").ordinals()
        [1]
        """
        if not self.cuda_started_before:
            return list(range(len(self.physical)))
        return process_ordinals(self.physical, self.cuda_saw)


def place(addresses: Sequence[str], executor_visible: str | None, *, cuda_started: bool = False,
          cuda_saw: str | None = None) -> RankGpus | None:
    """Where a task's GPUs go: ``None`` without GPUs (leave the environment alone), else its :class:`RankGpus`.

    ``cuda_started``: CUDA is already initialised in this process, having seen ``cuda_saw``.

    >>> place([], "4,5") is None
    True
    >>> place(["1"], "4,5")
    RankGpus(addresses=('1',), physical=('5',), executor_visible='4,5', cuda_started_before=False, cuda_saw=None)
    """
    if not addresses:
        return None
    physical = physical_gpus(addresses, executor_visible)
    return RankGpus(tuple(check_gpu_addresses(addresses)), tuple(physical), executor_visible,
                    cuda_started_before=cuda_started, cuda_saw=cuda_saw if cuda_started else None)
