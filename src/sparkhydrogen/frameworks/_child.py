"""A rank's fresh process for frameworks that can be set up only once per process (TensorFlow).

``python -m sparkhydrogen.frameworks._child DIR``: loads ``(framework, layout, fn, args,
kwargs)`` from ``DIR``, runs ``framework.start``, ``fn``, ``framework.stop`` with the
environment its rank already set, and writes the result or the exception back. It dies
with the rank that started it (Linux ``PR_SET_PDEATHSIG``), so a killed task leaves no
orphan.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

from ..serde import cloudpickle
from ..torch._child import die_with_parent, read_error, read_result
from .api import Framework, FrameworkError, GangLayout

__all__ = ["run_in_child", "main"]

_JOB, _RESULT, _ERROR = "job.pkl", "result.pkl", "error.pkl"
PARENT_PID_ENV = "SPARKHYDROGEN_PARENT_PID"


class ChildTraceback(Exception):
    """The traceback of an exception raised in a rank's child process (shown as its cause)."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0]).rstrip()


def _write(folder: str, name: str, obj: Any) -> None:
    tmp = os.path.join(folder, name + ".tmp")
    with open(tmp, "wb") as fh:
        cloudpickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, os.path.join(folder, name))


def run_in_child(framework: Framework, layout: GangLayout, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
    """Run ``fn`` inside ``framework`` in a fresh Python process with this process's environment; its result."""
    with tempfile.TemporaryDirectory(prefix=f"sparkhydrogen-{framework.name}-") as tmp:
        _write(tmp, _JOB, (framework, layout, fn, args, kwargs))
        env = dict(os.environ)
        env[PARENT_PID_ENV] = str(os.getpid())
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = subprocess.Popen([sys.executable, "-m", __name__, tmp], env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:  # we are being torn down: take the child (and its group) along
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
                proc.wait()
        if code == 0:
            return read_result(tmp)
        raised = read_error(tmp)
        if raised is None:
            raise FrameworkError(f"rank {layout.rank}'s {framework.name} process ended with exit code {code} "
                                 "before it reported an error (its output is in the rank's stderr)")
        exc, text = raised
        if text:
            exc.__cause__ = ChildTraceback(text)
        raise exc


def _run(folder: str) -> int:
    with open(os.path.join(folder, _JOB), "rb") as fh:
        framework, layout, fn, args, kwargs = pickle.load(fh)
    failed = False
    try:
        framework.start(layout, ())
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            failed = True
            better = framework.explain(exc)
            if better is not None:
                raise better from exc
            raise
        finally:
            framework.stop(layout, failed)
    except BaseException as exc:
        text = traceback.format_exc()
        try:
            _write(folder, _ERROR, (exc, text))
        except Exception:  # the exception itself does not pickle: keep its type, message and traceback
            _write(folder, _ERROR, (RuntimeError(f"{type(exc).__qualname__}: {exc}"), text))
        traceback.print_exc()
        return 1
    _write(folder, _RESULT, result)
    return 0


def main(argv: list[str]) -> int:
    die_with_parent(PARENT_PID_ENV)
    if len(argv) != 1:
        print(f"usage: python -m {__name__} DIR; got {argv}", file=sys.stderr)
        return 2
    return _run(argv[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
