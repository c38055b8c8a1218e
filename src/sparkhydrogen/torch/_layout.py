"""Pure arithmetic of a torch launch: node layout, rank environment, GPU mapping, backend.

Nothing here talks to Spark, torch or the network, so every rule is unit tested. The
general GPU rules (addresses, ``CUDA_VISIBLE_DEVICES``) live in
:mod:`sparkhydrogen.task.gpus`, shared by every launcher; the names stay importable here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import LaunchError
from ..task import gpus as _gpus
from ..task.gpus import GpuPlacementError, check_gpu_addresses

__all__ = [
    "DEVICE_ENV",
    "DevicePlan",
    "GpuAssignmentError",
    "NodeLayout",
    "TorchLaunchError",
    "assigned_gpus",
    "check_gpu_addresses",
    "default_backend",
    "device_plan",
    "local_mode_gpus",
    "node_layout",
    "physical_gpus",
    "process_environments",
    "process_plans",
    "rank_environment",
]

#: Environment variable telling a rank (function or script) which device is its own: "cpu" or "cuda:N".
DEVICE_ENV = "SPARKHYDROGEN_TORCH_DEVICE"

class TorchLaunchError(LaunchError):
    """A torch launch could not be set up or one of its rank processes failed."""

    __module__ = "sparkhydrogen.torch"  # its public home, as errors name it


class GpuAssignmentError(TorchLaunchError, GpuPlacementError):
    """``use_gpu=True`` but no (or no usable) GPU is assigned to a rank (a ``ValueError``, too)."""

    __module__ = "sparkhydrogen.torch"


@dataclass(frozen=True)
class NodeLayout:
    """Where a rank sits among the ranks of its host (torchrun's LOCAL_RANK / GROUP_RANK family)."""

    local_rank: int
    local_world_size: int
    group_rank: int
    group_world_size: int


def node_layout(hosts: Sequence[str], rank: int) -> NodeLayout:
    """Layout of ``rank`` given every rank's host, in rank order.

    Local ranks count the ranks of one host in rank order; hosts are numbered in
    the order their first rank appears (so the host of rank 0 is group 0).

    >>> node_layout(["a", "b", "a", "b", "a"], 4)
    NodeLayout(local_rank=2, local_world_size=3, group_rank=0, group_world_size=2)
    >>> node_layout(["a", "b", "a", "b", "a"], 3)
    NodeLayout(local_rank=1, local_world_size=2, group_rank=1, group_world_size=2)
    """
    if not 0 <= rank < len(hosts):
        raise ValueError(f"rank {rank} is outside 0..{len(hosts) - 1}")
    order = list(dict.fromkeys(hosts))
    mine = hosts[rank]
    return NodeLayout(
        local_rank=sum(1 for h in hosts[:rank] if h == mine),
        local_world_size=sum(1 for h in hosts if h == mine),
        group_rank=order.index(mine),
        group_world_size=len(order),
    )


def rank_environment(*, rank: int, world_size: int, layout: NodeLayout, master_addr: str, master_port: int,
                     restart_count: int = 0, run_id: str = "") -> dict[str, str]:
    """The environment ``torchrun`` would give this rank (``env://`` rendezvous and its relatives).

    >>> env = rank_environment(rank=3, world_size=4, layout=NodeLayout(1, 2, 1, 2),
    ...                        master_addr="10.0.0.1", master_port=29500)
    >>> env["RANK"], env["LOCAL_RANK"], env["GROUP_RANK"], env["NODE_RANK"], env["MASTER_PORT"]
    ('3', '1', '1', '1', '29500')
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if not 0 < master_port < 65536:
        raise ValueError(f"master_port must be in 1..65535, got {master_port}")
    return {
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(layout.local_rank),
        "LOCAL_WORLD_SIZE": str(layout.local_world_size),
        "GROUP_RANK": str(layout.group_rank),
        "GROUP_WORLD_SIZE": str(layout.group_world_size),
        "NODE_RANK": str(layout.group_rank),
        "ROLE_NAME": "default",
        "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(world_size),
        "TORCHELASTIC_RESTART_COUNT": str(restart_count),
        "TORCHELASTIC_RUN_ID": run_id or "sparkhydrogen",
    }


def default_backend(use_gpu: bool) -> str:
    """``nccl`` for GPU training, ``gloo`` on CPU (as torchrun users expect).

    >>> default_backend(False), default_backend(True)
    ('gloo', 'nccl')
    """
    return "nccl" if use_gpu else "gloo"


def physical_gpus(addresses: Sequence[str], cuda_visible_devices: str | None) -> list[str]:
    """The device ids a fresh process must see for ``addresses`` that Spark assigned to this task.

    The rule is :func:`sparkhydrogen.task.gpus.physical_gpus` (address ``i`` is the
    ``i``-th entry of ``CUDA_VISIBLE_DEVICES`` when it is set); a bad mapping is a
    :class:`GpuAssignmentError` here.

    >>> physical_gpus(["0", "2"], None)
    ['0', '2']
    >>> physical_gpus(["0", "2"], "4,5,6,7")
    ['4', '6']
    """
    try:
        return _gpus.physical_gpus(addresses, cuda_visible_devices)
    except GpuPlacementError as exc:
        raise GpuAssignmentError(str(exc)) from exc


def assigned_gpus(task_gpus: Sequence[str] | None, driver_gpus: Sequence[str], rank: int) -> list[str]:
    """The GPU addresses of ``rank``: its task's, else (local master, local mode) the driver's ``rank``-th.

    >>> assigned_gpus(["1"], [], 0)
    ['1']
    >>> assigned_gpus(None, ["0", "1"], 1)
    ['1']
    """
    if task_gpus:
        return check_gpu_addresses(task_gpus)
    if rank < len(driver_gpus):
        return check_gpu_addresses([driver_gpus[rank]], "the driver")
    raise GpuAssignmentError(
        f"use_gpu=True but Spark assigned no GPU to rank {rank}: set spark.task.resource.gpu.amount (and "
        "spark.executor.resource.gpu.amount with spark.executor.resource.gpu.discoveryScript), or pass use_gpu=False"
    )


def local_mode_gpus(driver_gpus: Sequence[str] | None, num_processes: int) -> list[str]:
    """The driver GPUs local-mode ranks use, one each; a clear error when there are too few.

    >>> local_mode_gpus(["0", "1", "2"], 2)
    ['0', '1']
    """
    have = check_gpu_addresses(driver_gpus or [], "the driver")
    if len(have) < num_processes:
        raise GpuAssignmentError(
            f"use_gpu=True with local_mode=True needs {num_processes} GPU(s) on the driver, one per process, but "
            f"Spark gives the driver {len(have)} ({have}): set spark.driver.resource.gpu.amount and "
            "spark.driver.resource.gpu.discoveryScript, lower num_processes, or pass use_gpu=False"
        )
    return have[:num_processes]


@dataclass(frozen=True)
class DevicePlan:
    """Which device a rank trains on.

    ``ordinal`` is the CUDA device index inside the process that runs the training
    (``None`` on CPU); ``visible`` is the ``CUDA_VISIBLE_DEVICES`` to give a child
    process (``None``: leave as is; ``""``: hide every GPU).
    """

    ordinal: int | None
    visible: str | None

    @property
    def device(self) -> str:
        return "cpu" if self.ordinal is None else f"cuda:{self.ordinal}"


def device_plan(*, use_gpu: bool, in_process: bool, own: Sequence[str] = (), own_physical: Sequence[str] = (),
                host_peers: Sequence[Sequence[str]] = (), local_rank: int = 0,
                ordinal: int | None = None) -> DevicePlan:
    """The device of a rank, and what its child process must see.

    ``own`` are Spark's addresses for this rank (indices into the visible devices
    of this process), ``own_physical`` the same as device ids, ``host_peers`` the
    device ids of every rank on this host in local-rank order (this rank's included).

    In this process, address ``i`` is ``cuda:i`` unless ``ordinal`` says otherwise: the
    rank's session narrows ``CUDA_VISIBLE_DEVICES`` to the rank's own GPUs, so its first
    GPU is ``cuda:0`` (see :meth:`sparkhydrogen.task.gpus.RankGpus.ordinals`). A child process sees the GPUs of
    every rank of its host in local-rank order when each of them has exactly one
    (so ``cuda:LOCAL_RANK`` is its own GPU, as under torchrun); otherwise only its own.

    >>> device_plan(use_gpu=True, in_process=True, own=["1"], own_physical=["5"])
    DevicePlan(ordinal=1, visible=None)
    >>> device_plan(use_gpu=True, in_process=True, own=["1"], own_physical=["5"], ordinal=0)
    DevicePlan(ordinal=0, visible=None)
    >>> device_plan(use_gpu=True, in_process=False, own=["1"], own_physical=["5"],
    ...             host_peers=[["4"], ["5"]], local_rank=1)
    DevicePlan(ordinal=1, visible='4,5')
    >>> device_plan(use_gpu=False, in_process=False)
    DevicePlan(ordinal=None, visible='')
    """
    if not use_gpu:
        return DevicePlan(ordinal=None, visible=None if in_process else "")
    if not own or len(own) != len(own_physical):
        raise GpuAssignmentError("use_gpu=True but this rank has no GPU assigned")
    if in_process:
        return DevicePlan(ordinal=int(own[0]) if ordinal is None else ordinal, visible=None)
    flat = [p[0] for p in host_peers if len(p) == 1]
    one_each = len(flat) == len(host_peers) and len(set(flat)) == len(flat) and 0 <= local_rank < len(flat)
    if one_each and flat[local_rank] == own_physical[0]:
        return DevicePlan(ordinal=local_rank, visible=",".join(flat))
    return DevicePlan(ordinal=0, visible=",".join(own_physical))


def process_environments(env: Mapping[str, str], processes: int) -> list[dict[str, str]]:
    """The torchrun variables of each of the ``processes`` processes one task starts, from the task's own.

    Task ``t`` of ``T`` holds global ranks ``t*k .. t*k+k-1`` of ``T*k``; its local
    ranks follow the task's own local rank the same way (every task starts ``k``).
    ``GROUP_RANK``/``NODE_RANK`` (the host) and ``MASTER_ADDR``/``MASTER_PORT`` stay.

    >>> task = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "7"}
    >>> [(e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]) for e in process_environments(task, 2)]
    [('2', '4', '2', '4'), ('3', '4', '3', '4')]
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be a positive integer, got {processes!r}")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local, local_world = int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
    out = []
    for i in range(processes):
        child = dict(env)
        child.update({
            "RANK": str(rank * processes + i), "WORLD_SIZE": str(world * processes),
            "LOCAL_RANK": str(local * processes + i), "LOCAL_WORLD_SIZE": str(local_world * processes),
        })
        if "ROLE_RANK" in child:
            child["ROLE_RANK"], child["ROLE_WORLD_SIZE"] = child["RANK"], child["WORLD_SIZE"]
        out.append(child)
    return out


def process_plans(*, use_gpu: bool, own_physical: Sequence[str], processes: int) -> list[DevicePlan]:
    """The device of each of the ``processes`` processes of one task: a distinct slice of its GPUs each.

    Each process sees only its own GPUs (``CUDA_VISIBLE_DEVICES``), so its device is
    ``cuda:0``; without ``use_gpu`` it sees none.

    >>> process_plans(use_gpu=True, own_physical=["4", "5"], processes=2)
    [DevicePlan(ordinal=0, visible='4'), DevicePlan(ordinal=0, visible='5')]
    >>> process_plans(use_gpu=False, own_physical=[], processes=2)
    [DevicePlan(ordinal=None, visible=''), DevicePlan(ordinal=None, visible='')]
    """
    if not use_gpu:
        return [DevicePlan(ordinal=None, visible="") for _ in range(processes)]
    if not own_physical:
        raise GpuAssignmentError("use_gpu=True but this rank's task has no GPU assigned")
    try:
        slices = [_gpus.split_gpus(own_physical, processes, i) for i in range(processes)]
    except GpuPlacementError as exc:
        raise GpuAssignmentError(str(exc)) from exc
    return [DevicePlan(ordinal=0, visible=",".join(s)) for s in slices]


def env_overrides_summary(env: Mapping[str, str]) -> str:
    """A short one-line view of a rank's launch variables (for debug logs)."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    return " ".join(f"{k}={env[k]}" for k in keys if k in env)
