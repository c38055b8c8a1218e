"""Task side of ``sparkhydrogen.torch.run``: rendezvous, environment, process group, the user's code.

Runs inside every rank (a Spark barrier task's Python worker, or a local-mode
process on the driver) with a :class:`~sparkhydrogen.BarrierTaskContext` installed:

1. the gang forms (:func:`sparkhydrogen.frameworks.form`): rank 0 reserves a port on its
   host and holds it; one ``allGather`` shares it and every rank's GPUs (so the port is one
   rank 0 really holds, not a guess);
2. rank 0 serves torch's ``TCPStore`` on that very socket; the others connect to it;
3. ``train`` runs in this process with ``torch.distributed`` initialised, or in a
   child process (scripts, or ``use_subprocess=True``) that finds the store
   through ``env://`` (``TORCHELASTIC_USE_AGENT_STORE``, as under torchrun);
4. a final barrier: no rank tears down its process group, or rank 0 its store, while a peer
   may still be connecting to or using them. ``init_process_group`` is no barrier: a rank is
   through it as soon as its own connections are up, and one whose ``train`` then returned at
   once (no collective) would close connections a slower peer is still making (gloo's
   ``connectFullMesh`` failing there with "Connection closed by peer").
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..context import BarrierTaskContext
from ..errors import NotInGangError
from ..frameworks import TorchDistributed, form
from ..frameworks import host_of as _host_of  # noqa: F401  (the rule lives in the framework API now)
from ..task import child
from ..task.gpus import GpuPlacementError, RankGpus
from ..task.lifecycle import environment, rank_gpus, report_failure
from ._layout import (
    DEVICE_ENV,
    DevicePlan,
    GpuAssignmentError,
    TorchLaunchError,
    assigned_gpus,
    device_plan,
    physical_gpus,
    process_environments,
    process_plans,
)

__all__ = ["RankJob", "run_job"]
#: The module the launcher's processes run (``python -m``).
ENTRY_MODULE = _ENTRY = "sparkhydrogen.torch._proc"


@dataclass(frozen=True)
class RankJob:
    """What every rank runs; travels to the ranks inside the task closure."""

    train: Callable[..., Any] | str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    backend: str = "gloo"
    use_gpu: bool = False
    use_subprocess: bool = False
    return_all: bool = False
    driver_gpus: tuple[str, ...] = ()
    store_timeout: float = 300.0
    #: Training processes each Spark task starts (``> 1``: always child processes, torch ranks ``t*k + i``).
    processes_per_task: int = 1

    @property
    def is_script(self) -> bool:
        return isinstance(self.train, str)


def run_job(job: RankJob, local_host: str | None = None) -> Any:
    """Run one rank of ``job``; return its result (``None`` on ranks > 0 unless ``job.return_all``).

    ``local_host`` is the host of every rank when they run outside Spark tasks (local mode).
    The layout (hosts, rank 0's reserved port, every rank's GPUs) is formed by the
    framework-environment API (:mod:`sparkhydrogen.frameworks`), the variables come from
    :class:`~sparkhydrogen.frameworks.TorchDistributed`.
    """
    ctx = BarrierTaskContext.get()
    rank, world = ctx.rank(), ctx.worldSize()
    several = job.processes_per_task > 1
    in_process = not (job.is_script or job.use_subprocess or several)
    placed = rank_gpus() if job.use_gpu and local_host is None else None
    ordinal = None
    if placed is not None:  # the rank's session narrowed CUDA_VISIBLE_DEVICES to these
        own, physical = list(placed.addresses), list(placed.physical)
        ordinal = _ordinal(placed) if in_process else None
    else:
        own = _own_gpus(ctx, job, rank, local_host is not None) if job.use_gpu else []
        physical = physical_gpus(own, os.environ.get("CUDA_VISIBLE_DEVICES")) if own else []
    hosts = [local_host] * world if local_host is not None else None
    layout, holds = form(_TORCH, ctx, hosts=hosts, gpus=physical)
    store = None
    try:
        env = _TORCH.environment(layout)
        if several:
            plans = process_plans(use_gpu=job.use_gpu, own_physical=physical, processes=job.processes_per_task)
        else:
            plan = device_plan(use_gpu=job.use_gpu, in_process=in_process, own=own, own_physical=physical,
                               host_peers=[list(layout.gpus[r]) for r in layout.ranks_on(layout.host)],
                               local_rank=layout.local_rank, ordinal=ordinal)
            env[DEVICE_ENV] = plan.device
        if holds:
            store = _store(layout.hosts[0], layout.ports[0][0], job.store_timeout, listen_fd=holds[0].take())
        if several:
            result = _run_children(job, process_environments(env, job.processes_per_task), plans)
        elif in_process:
            result = _run_in_process(ctx, job, env, plan, store)  # ends with the gang's barrier, before the teardown
        else:
            result = _run_child(ctx, job, env, plan)
        if not in_process:
            ctx.barrier()  # every rank's training processes are done with rank 0's store before it goes away
    finally:
        for hold in holds:
            hold.release()
        del store
    return result if rank == 0 or job.return_all else None


# rendezvous ----------------------------------------------------------------------

_TORCH = TorchDistributed()


def _store(host: str, port: int, timeout: float, listen_fd: int | None = None) -> Any:
    """Torch's ``TCPStore``: a client of rank 0's, or (``listen_fd``) rank 0's server on the socket it already holds.

    The server takes ``listen_fd`` over: it is closed when this returns or raises. Torch serves on
    a duplicate of it (closed with the store), so a store that fails to start leaves no listening
    socket behind in the Python worker, which Spark reuses: torch's libuv server, for one, keeps
    the descriptor it was given open when it raises.
    """
    from torch.distributed import TCPStore  # type: ignore[attr-defined]  # re-exported from torch._C, untyped there

    delta = datetime.timedelta(seconds=timeout)
    if listen_fd is None:
        return TCPStore(host, port, None, False, delta)
    with socket.socket(fileno=listen_fd) as listening:
        served = os.dup(listen_fd)
        try:
            return TCPStore(host, port, None, True, delta, wait_for_workers=False, master_listen_fd=served)
        except BaseException:
            _close_duplicate(served, listening)
            raise


def _close_duplicate(fd: int, original: socket.socket) -> None:
    """Close ``fd`` if it still is a duplicate of ``original``.

    A failed ``TCPStore`` may have closed it already, and another thread may have been given the
    number since; while ``original`` is open, its socket (inode) cannot be anyone else's.
    """
    try:
        ours, theirs = os.fstat(original.fileno()), os.fstat(fd)
    except OSError:  # closed (and not reused)
        return
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
        os.close(fd)


def _ordinal(placed: RankGpus) -> int:
    """This rank's first GPU as a CUDA index of this process: 0 when CUDA starts with the narrowed view."""
    try:
        return placed.ordinals()[0]
    except GpuPlacementError as exc:
        raise GpuAssignmentError(str(exc)) from exc


def _own_gpus(ctx: BarrierTaskContext, job: RankJob, rank: int, local: bool) -> list[str]:
    task_gpus: list[str] | None = None
    if not local:
        try:
            info = ctx.resources().get("gpu")
        except NotInGangError:
            info = None
        task_gpus = list(info.addresses) if info is not None else None
    return assigned_gpus(task_gpus, job.driver_gpus, rank)


# in process ----------------------------------------------------------------------


def _select_device(plan: DevicePlan) -> None:
    if plan.ordinal is None:
        return
    import torch

    if not torch.cuda.is_available():
        raise GpuAssignmentError(
            f"use_gpu=True and this rank was assigned {plan.device} (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}), but torch.cuda.is_available() is False on "
            f"{socket.gethostname()} (torch {torch.__version__}): install a CUDA build of torch on the executors, "
            "or pass use_gpu=False"
        )
    torch.cuda.set_device(plan.ordinal)


def _run_in_process(ctx: BarrierTaskContext, job: RankJob, env: dict[str, str], plan: DevicePlan,
                    store: Any) -> Any:
    import torch.distributed as dist

    train = job.train
    if not callable(train):
        raise TypeError(f"a script ({train}) cannot run in process")
    with environment(env):
        try:
            _select_device(plan)
            if store is None:
                store = _store(env["MASTER_ADDR"], int(env["MASTER_PORT"]), job.store_timeout)
            if dist.is_initialized():
                raise TorchLaunchError(
                    "torch.distributed is already initialised in this Python worker (a process group from "
                    "earlier code was never destroyed); call torch.distributed.destroy_process_group() there"
                )
            dist.init_process_group(job.backend, store=store, rank=int(env["RANK"]),
                                    world_size=int(env["WORLD_SIZE"]))
        except BaseException as exc:
            report_failure(exc)
            raise
        try:
            try:
                result = train(*job.args, **job.kwargs)
            except BaseException as exc:
                better = _explain(exc)
                if better is not None:
                    report_failure(better)
                    raise better from exc
                report_failure(exc)
                raise
            # No rank destroys its group (closing its connections) while a peer may still be connecting: a rank
            # is through init_process_group once its own connections are up, and train may use no collective.
            ctx.barrier()
            return result
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def _explain(exc: BaseException) -> BaseException | None:
    """A clearer error for a known framework misstep (Lightning without our ClusterEnvironment)."""
    if "lightning" not in sys.modules and "pytorch_lightning" not in sys.modules:
        return None
    from ._lightning import explain_lightning_failure

    return explain_lightning_failure(exc)


# child process -------------------------------------------------------------------


def _child_env(env: Mapping[str, str], plan: DevicePlan) -> dict[str, str]:
    extra = {**env, "TORCHELASTIC_USE_AGENT_STORE": "True"}  # rank 0's task serves the store, as torchrun's agent
    if plan.visible is not None:
        extra["CUDA_VISIBLE_DEVICES"] = plan.visible
    return child.child_environment(extra)


def _start_child(job: RankJob, env: dict[str, str], plan: DevicePlan, tmp: str) -> subprocess.Popen[bytes]:
    if isinstance(job.train, str):
        script = job.train
        if not os.path.isfile(script):
            raise FileNotFoundError(
                f"training script {script} does not exist on {socket.gethostname()}: the path must exist on "
                "every executor (use a shared file system, or ship it with SparkContext.addFile and pass "
                "SparkFiles.get(name))")
        args = ["script", script, *map(str, job.args)]
    else:
        child.write_job(tmp, (job.train, job.args, dict(job.kwargs), job.backend, job.return_all))
        args = ["function", tmp]
    return child.start(_ENTRY, args, _child_env(env, plan))


def _child_outcome(job: RankJob, tmp: str, code: int, rank: int, where: str = "", settle: float | None = None) -> Any:
    """A child's result, or (reported to the coordinator first) the error it ended with.

    ``settle``: after reporting, wait that long at most for the other tasks' reports (see
    :meth:`~sparkhydrogen.task.RankSession.report_failure`), so the gang's error names them too.
    """
    if code != 0:
        exc = _child_failure(tmp, job, code, rank, where)
        try:
            raise exc
        except BaseException as raised:
            report_failure(raised, settle=settle)
            raise
    return None if job.is_script else child.read_result(tmp)


def _run_child(ctx: BarrierTaskContext, job: RankJob, env: dict[str, str], plan: DevicePlan) -> Any:
    with tempfile.TemporaryDirectory(prefix="sparkhydrogen-torch-") as tmp:
        code = child.wait_or_kill(_start_child(job, env, plan, tmp))  # torn down: the child goes too
        return _child_outcome(job, tmp, code, ctx.rank())


#: How long a task whose training process failed waits for the other tasks' reports: one process's crash
#: breaks the process group of every task, and the task holding the cause may report second.
SETTLE_TIMEOUT = 2.0


def _run_children(job: RankJob, envs: list[dict[str, str]], plans: list[DevicePlan]) -> list[Any]:
    """The task's ``processes_per_task`` training processes, each with its own ranks and GPUs; their results.

    When one fails the others are stopped at once (they would wait for it in a
    collective), and the task fails with the error of the one that failed first.
    """
    with tempfile.TemporaryDirectory(prefix="sparkhydrogen-torch-") as tmp:
        dirs = [os.path.join(tmp, str(i)) for i in range(len(envs))]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for folder, env, plan in zip(dirs, envs, plans, strict=True):
                os.mkdir(folder)
                procs.append(_start_child(job, {**env, DEVICE_ENV: plan.device}, plan, folder))
            exits = child.wait_all(procs, "training-process")
        finally:
            for proc in procs:
                if proc.poll() is None:  # we are being torn down: take the children along
                    child.stop_group(proc)
                    proc.wait()
        failed = [i for i, code in exits.items() if code != 0]  # in the order they ended
        if failed:
            # the cause is the error written first (ties: the first to end): a peer broken by its teardown
            # may well end before it
            first = min(failed, key=lambda i: child.error_time(dirs[i]) or float("inf"))
            _child_outcome(job, dirs[first], exits[first], int(envs[first]["RANK"]),
                           f"training process {first + 1} of {len(envs)} of this task "
                           f"(torch RANK={envs[first]['RANK']})", settle=SETTLE_TIMEOUT)
        return [_child_outcome(job, folder, 0, int(env["RANK"])) for folder, env in zip(dirs, envs, strict=True)]


def _child_failure(tmp: str, job: RankJob, code: int, rank: int, where: str = "") -> BaseException:
    """The exception a child process ended with (its traceback as the cause), or one saying how it ended.

    ``where`` names the process among several of one task (``training process 2 of 2 ...``).
    """
    raised = child.read_error(tmp)
    if raised is not None:
        exc, text = raised
        exc.__cause__ = child.ChildTraceback(f"in {where}:\n{text}" if where else text)
        return exc
    what = f"training script {job.train}" if job.is_script else "training process"
    return TorchLaunchError(f"rank {rank}'s {what} ended with {child.describe_exit(code)}"
                            + (f" ({where})" if where else "")
                            + " (its output is in the rank's stderr, streamed to the driver with stream_logs=True)")
