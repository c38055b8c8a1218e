"""A rank's fresh process for frameworks that can be set up only once per process (TensorFlow).

``python -m sparkhydrogen.frameworks._child DIR``: loads ``(framework, layout, fn, args,
kwargs)`` from ``DIR``, runs ``framework.start``, ``fn``, ``framework.stop`` with the
environment its rank already set, and writes the result or the exception back. It dies
with the rank that started it (Linux ``PR_SET_PDEATHSIG``), so a killed task leaves no
orphan.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

from ..task import child
from .api import Framework, FrameworkError, GangLayout

__all__ = ["run_in_child", "main"]


def run_in_child(framework: Framework, layout: GangLayout, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
    """Run ``fn`` inside ``framework`` in a fresh Python process with this process's environment; its result."""
    with tempfile.TemporaryDirectory(prefix=f"sparkhydrogen-{framework.name}-") as tmp:
        child.write_job(tmp, (framework, layout, fn, args, kwargs))
        code = child.wait_or_kill(child.start(__name__, [tmp], child.child_environment()))
        if code == 0:
            return child.read_result(tmp)
        raised = child.read_error(tmp)
        if raised is None:
            raise FrameworkError(f"rank {layout.rank}'s {framework.name} process ended with "
                                 f"{child.describe_exit(code)} before it reported an error (its output is in the "
                                 "rank's stderr)")
        exc, text = raised
        if text:
            exc.__cause__ = child.ChildTraceback(text)
        raise exc


def _run(folder: str) -> int:
    framework, layout, fn, args, kwargs = child.read_job(folder)
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
        child.write_result(folder, result, f"return value of rank {layout.rank}")
    except BaseException as exc:
        child.write_error(folder, exc)
        traceback.print_exc()
        return 1
    return 0


def main(argv: list[str]) -> int:
    child.die_with_parent()
    if len(argv) != 1:
        print(f"usage: python -m {__name__} DIR; got {argv}", file=sys.stderr)
        return 2
    return _run(argv[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
