"""The one child-process runner of a rank: fresh Python processes that die with their rank.

The torch launcher (scripts, ``use_subprocess=True``, ``processes_per_task``, local mode)
and frameworks that can be set up only once per process (TensorFlow) run a rank's
training code in a child process. Both sides use this module:

* the rank (parent) writes the job into a folder (:func:`write_job`), starts the child in
  its own process group (:func:`start`), waits for it, taking it (and its group) along if
  the rank itself is torn down (:func:`wait_or_kill`, :func:`wait_all`, :func:`stop_group`),
  and reads back its result or its exception with the traceback (:func:`outcome`);
* the child arms :func:`die_with_parent` first (Linux ``PR_SET_PDEATHSIG``: a killed
  Spark task leaves no orphan), reads the job (:func:`read_job`) and writes the result
  (:func:`write_result`) or the exception (:func:`write_error`); a result that cannot be
  pickled is reported as that exception (a ``PayloadError`` naming the rank and the type).

Files are written atomically (a temporary name, then ``os.replace``).
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from .. import serde
from ..serde import cloudpickle
from ..tracking.rank import relay_environment

__all__ = ["PARENT_PID_ENV", "ChildTraceback", "die_with_parent", "child_environment", "start", "wait_or_kill",
           "wait_all", "stop_group", "describe_exit", "write_job", "read_job", "write_result", "read_result",
           "write_error", "read_error", "error_time"]

#: Environment variable with the pid a child process must die with.
PARENT_PID_ENV = "SPARKHYDROGEN_PARENT_PID"

_JOB, _RESULT, _ERROR = "job.pkl", "result.pkl", "error.pkl"
_PR_SET_PDEATHSIG = 1


class ChildTraceback(Exception):
    """The traceback of an exception raised in a rank's child process (shown as its cause)."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0]).rstrip()


# the child's side ---------------------------------------------------------------------


def die_with_parent(parent_env: str = PARENT_PID_ENV) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; exit now if it already has."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the rank kills its child on the way out instead
        return
    expected = os.environ.get(parent_env)
    if expected and expected.isdigit() and os.getppid() != int(expected):
        os._exit(1)  # the parent died before the death signal was armed


# the parent's side --------------------------------------------------------------------


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``extra``, with the parent's pid and unbuffered output (lines stream live).

    Inside a rank it also names the rank's metric relay (:func:`~sparkhydrogen.tracking.rank.relay_environment`).
    """
    env = dict(os.environ)
    env.update(extra or {})
    env.update(relay_environment())  # sparkhydrogen.mlflow.log_metric in the child: through this rank
    env[PARENT_PID_ENV] = str(os.getpid())
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start(module: str, args: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """``python -m module args...`` in its own process group (so it and its children can be stopped together)."""
    return subprocess.Popen([sys.executable, "-m", module, *args], env=dict(env), stdin=subprocess.DEVNULL,
                            start_new_session=True)


def wait_or_kill(proc: subprocess.Popen[Any]) -> int:
    """Wait for ``proc``; if this wait is interrupted (the rank is torn down), SIGKILL its group first."""
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            stop_group(proc)
            proc.wait()


def wait_all(procs: list[subprocess.Popen[bytes]], what: str) -> dict[int, int]:
    """Wait for every process (its exit code by index, in the order they ended); the first failure stops the rest."""
    done: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
    for index, proc in enumerate(procs):
        threading.Thread(target=lambda i=index, p=proc: done.put((i, p.wait())), daemon=True,
                         name=f"sparkhydrogen-{what}-{index}").start()
    exits: dict[int, int] = {}
    try:
        while len(exits) < len(procs):
            index, code = done.get()
            exits[index] = code
            if code != 0:
                for proc in procs:
                    stop_group(proc)
    finally:
        for proc in procs:
            stop_group(proc)
    return exits


def stop_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a process and its process group (its children included), by pid, if it still runs."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def describe_exit(code: int) -> str:
    """``exit code 3`` or ``signal SIGKILL`` (a negative ``Popen.returncode``).

    >>> describe_exit(3), describe_exit(-9)
    ('exit code 3', 'signal SIGKILL')
    """
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


# the files both sides share -----------------------------------------------------------


def _write(folder: str, name: str, obj: Any) -> None:
    tmp = os.path.join(folder, name + ".tmp")
    with open(tmp, "wb") as fh:
        cloudpickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, os.path.join(folder, name))


def _write_bytes(folder: str, name: str, data: bytes) -> None:
    tmp = os.path.join(folder, name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, os.path.join(folder, name))


def _read(folder: str, name: str) -> Any:
    with open(os.path.join(folder, name), "rb") as fh:
        return pickle.load(fh)


def write_job(folder: str, job: Any) -> None:
    """The job the child runs (pickled by value where needed: cloudpickle)."""
    _write(folder, _JOB, job)


def read_job(folder: str) -> Any:
    return _read(folder, _JOB)


def write_result(folder: str, result: Any, what: str = "return value") -> None:
    """The child's result, for its rank to read back.

    Raises :class:`~sparkhydrogen.PayloadError` naming ``what`` (``"return value of rank 3"``)
    and the value's type when it cannot be pickled, before anything is written: the child
    then reports it with :func:`write_error`, as an in-process rank would raise it.
    """
    _write_bytes(folder, _RESULT, serde.dumps(result, what))


def read_result(folder: str) -> Any:
    return _read(folder, _RESULT)


def write_error(folder: str, exc: BaseException, text: str | None = None) -> None:
    """The exception the child's code raised and its formatted traceback (of the one being handled by default)."""
    text = traceback.format_exc() if text is None else text
    try:
        _write(folder, _ERROR, (exc, text))
    except Exception:  # the exception itself does not pickle: keep its type, message and traceback
        _write(folder, _ERROR, (RuntimeError(f"{type(exc).__qualname__}: {exc}"), text))


def error_time(folder: str) -> int | None:
    """When the process in ``folder`` wrote its error (ns since the epoch), ``None`` if it wrote none."""
    try:
        return os.stat(os.path.join(folder, _ERROR)).st_mtime_ns
    except OSError:
        return None


def read_error(folder: str) -> tuple[BaseException, str] | None:
    """The exception (and formatted traceback) the child's code raised, if it wrote one."""
    path = os.path.join(folder, _ERROR)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        exc, text = pickle.loads(data)
    except Exception as load_error:  # e.g. an exception class only the child could import
        return RuntimeError(f"the child process raised an exception that cannot be unpickled here "
                            f"({load_error})"), ""
    return exc, text
