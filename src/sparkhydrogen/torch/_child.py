"""A rank's child process: ``python -m sparkhydrogen.torch._proc (script PATH ARGS... | function DIR)``.

Started by a rank (:mod:`._rank`) with the torchrun-style environment already set.
A script runs as ``__main__`` with ``sys.argv = [PATH, *ARGS]``, exactly as
``python PATH ARGS...`` would run it; a function (pickled into ``DIR`` by the
rank) runs with ``torch.distributed`` initialised through ``env://`` and its
result or exception is written back to ``DIR``. Either way the child dies with the
rank that started it (Linux ``PR_SET_PDEATHSIG``), so a killed Spark task leaves
no orphan training process behind, and a process group still up when the code
returns stays up until every rank's code has returned (:func:`wait_for_every_rank`).
"""

from __future__ import annotations

import datetime
import os
import runpy
import sys
import traceback

from ..task import child

__all__ = ["main", "wait_for_every_rank"]

#: How long a rank whose code returned waits for the others. Not a readiness guess: if the gang fails
#: first, this process dies with its task; the bound only ends a wait on a peer that hangs for weeks.
PEERS_TIMEOUT = datetime.timedelta(days=30)


# leaving together ------------------------------------------------------------------


def wait_for_every_rank() -> None:
    """Block until every rank of the gang has called this (a count in rank 0's store), then return.

    Call it before tearing a process group down. ``init_process_group`` is no barrier: a
    rank is through it as soon as its own connections are up, so one whose code then
    returns at once (no collective) and destroys its group (or exits) closes connections
    a slower peer is still making, and that peer fails with gloo's "connectFullMesh failed
    ... Connection closed by peer". The count lives in the store ``env://`` found
    (``MASTER_ADDR``/``MASTER_PORT``, kept by rank 0's task until every task is done),
    under this attempt's prefix; it needs no collective, so it works for every backend
    and starts no communicator.
    """
    from torch.distributed import PrefixStore, TCPStore  # type: ignore[attr-defined]  # untyped re-exports

    env = os.environ
    client = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), None, False, PEERS_TIMEOUT)
    store = PrefixStore(f"sparkhydrogen/returned/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)
    if store.add("ranks", 1) == int(env["WORLD_SIZE"]):
        store.set("all", "1")
    store.wait(["all"])


def _group_is_up() -> bool:
    """Whether code run in this process left a default process group initialised (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


# entry points ----------------------------------------------------------------------


def _run_script(path: str, args: list[str]) -> int:
    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(path))
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    if _group_is_up():  # the script left its group to the exit: keep it up until every rank's script is done
        wait_for_every_rank()
    return 0


def _run_function(folder: str) -> int:
    import torch
    import torch.distributed as dist

    from ._layout import DEVICE_ENV

    train, args, kwargs, backend, return_all = child.read_job(folder)
    rank = os.environ.get("RANK", "?")
    written = False
    try:
        device = os.environ.get(DEVICE_ENV, "cpu")
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError(f"use_gpu=True and this rank was assigned {device} (CUDA_VISIBLE_DEVICES="
                                   f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}), but torch.cuda.is_available() "
                                   "is False in its training process")
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend, init_method="env://")
        try:
            result = train(*args, **kwargs)
        except BaseException as exc:
            # before the teardown breaks the peers' connections: the cause is written before its consequences
            child.write_error(folder, exc)
            written = True
            raise
        else:
            wait_for_every_rank()  # no teardown while a peer may still be connecting
        finally:
            dist.destroy_process_group()
        if not (return_all or rank == "0"):
            result = None  # dropped by its rank as an in-process rank's would be: nothing to pickle
        child.write_result(folder, result, f"return value of rank {rank}")
    except BaseException as exc:
        if not written:
            child.write_error(folder, exc)
        traceback.print_exc()
        return 1
    return 0


def main(argv: list[str]) -> int:
    child.die_with_parent()
    if len(argv) >= 2 and argv[0] == "script":
        return _run_script(argv[1], argv[2:])
    if len(argv) == 2 and argv[0] == "function":
        return _run_function(argv[1])
    print(f"usage: python -m sparkhydrogen.torch._proc (script PATH ARGS... | function DIR); got {argv}",
          file=sys.stderr)
    return 2
