"""Driver side of ``sparkhydrogen.torch.run``: check the arguments, then launch the ranks.

Both modes go through the one gang runner (:mod:`sparkhydrogen.launch.run`): distributed
mode places one rank per barrier task (a native barrier stage, or under Spark Connect a
stage whose rank 0 hosts the coordinator); local mode is a placement of its own,
:class:`LocalProcesses`, starting the ranks as processes on the driver that join the
driver's coordinator.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any, Union

from ..coordinator.handles import LogRecord
from ..coordinator.state import AttemptKey
from ..errors import ErrorInfo, GangFailedError, LaunchError
from ..launch.data import session_of
from ..launch.elastic import SizeRange, size_range
from ..launch.run import run_gang
from ..launch.runner import DeclaredGang, check_retries, declare, gang_failed
from ..launch.session import SparkTarget, resolve
from ..launch.stage import RankCall
from ..serde import cloudpickle  # the installed one, else pyspark's copy (--py-files)
from ..task.child import child_environment, describe_exit, stop_group, wait_all
from ._layout import GpuAssignmentError, default_backend, local_mode_gpus
from ._local import LocalRank, error_path, result_path
from ._rank import ENTRY_MODULE, RankJob, run_job

__all__ = ["run"]

log = logging.getLogger("sparkhydrogen.torch")

Train = Union[Callable[..., Any], str, "os.PathLike[str]"]


def run(train: Train, *args: Any, num_processes: int | tuple[int, int] | SizeRange,
        use_gpu: bool = False, local_mode: bool = False,
        backend: str | None = None, return_all: bool = False, use_subprocess: bool = False,
        max_retries: int = 0, retry_backoff: float = 0.5, stream_logs: bool = True, spark: Any = None,
        resources: Any = None, data: Any = None, processes_per_task: int = 1, **kwargs: Any) -> Any:
    """Run ``train`` on ``num_processes`` ranks with ``torch.distributed`` set up; return rank 0's result.

    ``train`` is a function, called as ``train(*args, **kwargs)`` on every rank, or
    the path of a Python script, run as ``python train *args`` (args become strings)
    like ``TorchDistributor.run``.

    * Functions run inside each barrier task's Python worker, with the default
      process group initialised before ``train`` is called and destroyed after;
      ``use_subprocess=True`` runs them in a child process instead. Scripts always
      run in a child process and call ``init_process_group(backend)`` themselves
      (``env://`` finds rank 0's store, as under torchrun).
    * Every rank gets ``MASTER_ADDR``/``MASTER_PORT`` (rank 0's host and a port rank 0
      holds), ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
      ``GROUP_RANK``/``NODE_RANK`` (counted per host), and
      ``sparkhydrogen.torch.device()`` names its device.
    * ``use_gpu=True`` trains on the GPU Spark assigned to the rank's task
      (``spark.task.resource.gpu.amount``), honouring ``CUDA_VISIBLE_DEVICES``;
      ``backend`` defaults to ``"nccl"`` then, ``"gloo"`` on CPU.
    * ``local_mode=True`` starts the ranks as processes on the driver (GPUs from
      ``spark.driver.resource.gpu.*``), still coordinated through spark-hydrogen.
    * ``resources`` (e.g. ``{"gpu": 1}``) launches the ranks' stage with its own task
      resources, as :func:`sparkhydrogen.run` does; ``data`` (a DataFrame or RDD) streams
      one share to every rank, read with :func:`sparkhydrogen.torch.data_loader` (functions
      run in the task's worker only: not with scripts, ``use_subprocess`` or ``local_mode``).
    * ``processes_per_task=k`` starts ``num_processes // k`` Spark tasks, each running ``k``
      training processes (child processes, torch ranks ``t*k .. t*k+k-1`` of task ``t``), as
      torchrun's ``--nproc-per-node`` does; with ``use_gpu`` each process gets a distinct
      slice of its task's GPUs (ask for them with ``resources={"gpu": k}``) and trains on its
      ``cuda:0``. Not with ``local_mode`` (already one process per rank) or ``data``.
    * ``num_processes=(min, max)`` (or a :class:`~sparkhydrogen.SizeRange`, e.g. with
      ``grow="checkpoint"``) is an elastic gang (``docs/elastic.md``): each attempt forms a
      new process group at the attempt's size (``WORLD_SIZE``), as many ranks as the
      cluster has free slots for; one process per task.
    * Returns rank 0's return value (``None`` for a script), or every rank's in
      rank order with ``return_all=True``.
    * With ``stream_logs`` (the default) every rank's stdout, stderr and logging
      output is printed on the driver as it is written, prefixed ``[rank N]``.
    * A rank that raises aborts all of them at once; ``max_retries`` relaunches
      the whole gang; in the end :class:`~sparkhydrogen.GangFailedError` names the
      rank, its exception and traceback.

    The keyword names above are the launcher's; every other keyword goes to ``train``.

    Example:
        >>> import sparkhydrogen.torch as h2torch                       # doctest: +SKIP
        >>> def train(lr):
        ...     import torch, torch.distributed as dist
        ...     t = torch.ones(1) * dist.get_rank()
        ...     dist.all_reduce(t)
        ...     return t.item()
        >>> h2torch.run(train, 0.1, num_processes=2)
        1.0
        >>> h2torch.run("train.py", "--epochs", "3", num_processes=4)   # a script, like TorchDistributor
    """
    job_train = _check_train(train, kwargs)
    wanted = size_range(num_processes, "num_processes")
    if wanted.elastic and (local_mode or processes_per_task != 1):
        raise ValueError(f"num_processes={num_processes!r} is an elastic gang: its ranks are Spark tasks, one process "
                         "each (not with local_mode=True or processes_per_task > 1); pass an int for those")
    for name, value in (("use_gpu", use_gpu), ("local_mode", local_mode), ("return_all", return_all),
                        ("use_subprocess", use_subprocess), ("stream_logs", stream_logs)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if backend is not None and (not isinstance(backend, str) or not backend.strip()):
        raise ValueError(f"backend must be a torch.distributed backend name such as 'gloo' or 'nccl', got {backend!r}")
    check_retries(max_retries, retry_backoff)
    tasks = wanted if wanted.elastic else _check_processes_per_task(processes_per_task, wanted.high, local_mode)
    if data is not None and (isinstance(job_train, str) or use_subprocess or local_mode or processes_per_task > 1):
        how = "a script" if isinstance(job_train, str) else ("use_subprocess=True" if use_subprocess else
                                                             "local_mode=True" if local_mode else
                                                             f"processes_per_task={processes_per_task}")
        raise ValueError(f"data= streams each rank's share into its Spark task's Python worker, so train must run "
                         f"there: a function, without use_subprocess or local_mode (got {how})")
    target = resolve(session_of(data, spark))
    if isinstance(job_train, str) and not os.path.isfile(job_train) and local_mode:
        raise ValueError(f"training script {train} does not exist")
    driver_gpus: tuple[str, ...] = ()
    if use_gpu:
        driver_gpus = _gpu_preflight(target, wanted.high, local_mode)
    job = RankJob(train=job_train, args=tuple(args), kwargs=dict(kwargs), backend=backend or default_backend(use_gpu),
                  use_gpu=use_gpu, use_subprocess=use_subprocess, return_all=return_all, driver_gpus=driver_gpus,
                  processes_per_task=processes_per_task)
    name = f"torch.run({_train_name(job_train)})"
    placement = LocalProcesses(target, job) if local_mode else None
    results = run_gang(RankCall(run_job, (job,)), tasks, target=target, max_retries=max_retries,
                       retry_backoff=retry_backoff, stream_logs=stream_logs, name=name, placement=placement,
                       resources=resources, data=data)
    if processes_per_task > 1:  # every task returned its processes' results (task 0 alone unless return_all)
        results = [r for per_task in results if per_task is not None for r in per_task]
    return results if return_all else results[0]


# validation ------------------------------------------------------------------------


def _check_train(train: Any, kwargs: dict[str, Any]) -> Callable[..., Any] | str:
    if isinstance(train, (str, os.PathLike)):
        path = os.fspath(train)
        if not isinstance(path, str) or not path:
            raise TypeError(f"train must be a function or the path of a Python script, got {train!r}")
        if kwargs:
            raise TypeError(
                f"keyword arguments {sorted(kwargs)} cannot be passed to a script; pass its command-line "
                "arguments as positional strings, e.g. run('train.py', '--lr', '0.1', num_processes=2)"
            )
        return os.path.abspath(path) if os.path.exists(path) else path
    if callable(train):
        return train  # type: ignore[no-any-return]
    raise TypeError(f"train must be a function or the path of a Python script, got {type(train).__name__}")


def _check_processes_per_task(processes_per_task: Any, num_processes: int, local_mode: bool) -> int:
    """The number of Spark tasks: ``num_processes`` split into tasks of ``processes_per_task`` processes."""
    if isinstance(processes_per_task, bool) or not isinstance(processes_per_task, int):
        raise TypeError(f"processes_per_task must be an int, got {type(processes_per_task).__name__}")
    if processes_per_task < 1:
        raise ValueError(f"processes_per_task must be >= 1, got {processes_per_task}")
    if processes_per_task > 1 and local_mode:
        raise ValueError("processes_per_task does not apply with local_mode=True (every rank is already a process "
                         "of its own on the driver): drop it, or use num_processes alone")
    if num_processes % processes_per_task:
        raise ValueError(f"num_processes={num_processes} is not a multiple of processes_per_task="
                         f"{processes_per_task}: every Spark task starts the same number of processes")
    return num_processes // processes_per_task


def _train_name(train: Callable[..., Any] | str) -> str:
    if isinstance(train, str):
        return os.path.basename(train)
    return getattr(train, "__qualname__", None) or type(train).__name__


def _gpu_preflight(target: SparkTarget, num_processes: int, local_mode: bool) -> tuple[str, ...]:
    """Fail on the driver, before launching, when Spark will give the ranks no GPU."""
    sc = target.sc
    gpu = (sc.resources or {}).get("gpu") if sc is not None else None
    driver_gpus = tuple(gpu.addresses) if gpu is not None else ()
    if local_mode:
        return tuple(local_mode_gpus(driver_gpus, num_processes))
    master = (sc.master if sc is not None else target.conf("spark.master")) or ""
    local_master = master.startswith("local") and not master.startswith("local-cluster")
    if target.conf("spark.task.resource.gpu.amount"):
        return driver_gpus if local_master else ()
    if local_master and len(driver_gpus) >= num_processes:
        return driver_gpus  # local[N]: tasks run in the driver's JVM; rank i takes the driver's i-th GPU
    raise GpuAssignmentError(
        f"use_gpu=True but Spark assigns no GPU to tasks (spark.task.resource.gpu.amount is not set, master "
        f"{master}): set spark.task.resource.gpu.amount=1 and spark.executor.resource.gpu.amount with "
        "spark.executor.resource.gpu.discoveryScript, or pass use_gpu=False"
        + ("; on a local master, spark.driver.resource.gpu.amount with as many GPUs as num_processes also works"
           if local_master else "")
    )


# local mode -----------------------------------------------------------------------


class LocalProcesses:
    """Placement of local mode: every rank is a process on the driver's machine, joining the driver's coordinator.

    Starts, supervises and stops the rank processes of one attempt at a time; a rank
    process that fails (or a coordinator abort) stops the others at once.
    """

    name = "local processes"

    def __init__(self, target: SparkTarget, job: RankJob) -> None:
        self.target = target
        self.job = job
        self._lock = threading.Lock()
        self._procs: dict[int, list[subprocess.Popen[bytes]]] = {}

    def run(self, call: RankCall, world_size: int, *, name: str,
            on_log: Callable[[LogRecord], None] | None = None) -> list[Any]:
        gang, attempt = declare(self.target, world_size, name, on_log=on_log, on_abort=self._on_abort,
                                preflight=False)
        spec = gang.spec(attempt)
        try:
            with tempfile.TemporaryDirectory(prefix="sparkhydrogen-local-") as out:
                procs = []
                try:
                    for rank in range(world_size):
                        procs.append(self._start(LocalRank(spec, self.job, rank, out)))
                finally:
                    with self._lock:
                        self._procs[attempt] = procs
                exits = wait_all(procs, "local-rank")  # one failing stops the others
                if all(code == 0 for code in exits.values()):
                    gang.settle()
                    return [self._load(result_path(out, rank)) for rank in range(world_size)]
                raise self._failure(gang, attempt, exits, out, name)
        finally:
            self.kill_all()

    def _start(self, task: LocalRank) -> subprocess.Popen[bytes]:
        # the ranks unpickle what the driver could import: give them the driver's import path
        path = os.pathsep.join([p for p in sys.path if p] + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env = child_environment({"PYTHONPATH": path})
        proc = subprocess.Popen([sys.executable, "-m", ENTRY_MODULE, "local"], stdin=subprocess.PIPE,
                                env=env, start_new_session=True)
        assert proc.stdin is not None
        try:
            proc.stdin.write(cloudpickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL))
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the process died at once; its exit code tells
        return proc

    @staticmethod
    def _load(path: str) -> Any:
        with open(path, "rb") as fh:
            return pickle.load(fh)

    def _failure(self, gang: DeclaredGang, attempt: int, exits: dict[int, int], out: str, name: str) -> LaunchError:
        failure = gang.last_failure(attempt)
        if failure is None:
            for rank, code in exits.items():  # in the order they ended
                if code != 0 and os.path.exists(error_path(out, rank)):
                    with open(error_path(out, rank), encoding="utf-8") as fh:
                        failure = ErrorInfo.from_json(json.load(fh))
                    break
        if failure is not None:
            return gang_failed(name, failure)
        rank, code = next((r, c) for r, c in exits.items() if c != 0)
        return GangFailedError(f"gang {name!r} failed: local rank {rank}'s process ended with "
                               f"{describe_exit(code)} before it reported an error", rank)

    def _on_abort(self, key: AttemptKey, cause: ErrorInfo) -> None:
        """The coordinator aborted an attempt: its processes will never finish, stop them."""
        with self._lock:
            procs = list(self._procs.get(key[0], []))
        if procs:
            log.info("stopping %d local rank process(es) of attempt %d after: %s", len(procs), key[0],
                     cause.describe())
        for proc in procs:
            stop_group(proc)

    def kill_all(self) -> None:
        with self._lock:
            procs = [p for ps in self._procs.values() for p in ps]
        for proc in procs:
            stop_group(proc)
            proc.wait()
        with self._lock:
            self._procs.clear()
