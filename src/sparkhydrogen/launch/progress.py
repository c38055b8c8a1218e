"""A waiting launch shows its progress: a line that updates in a terminal, a progress bar in a notebook.

While a coordinated gang waits at its start gate (executors starting under dynamic
allocation, ranks joining), the driver shows what Spark's console progress bar shows for
a stage: ranks joined of those needed, executors alive and pending, and the time left
before the start bound. Where it goes:

* in a Jupyter/IPython kernel: an HTML ``<progress>`` bar, updated in place;
* on a terminal (standard error is a TTY) when ``spark.ui.showConsoleProgress`` is not
  ``false``: one line rewritten with ``\\r`` and ended when the wait ends;
* nowhere else: the driver's log lines (:mod:`.coordinated`) say the same every 10 s.

The text is a pure function of a :class:`LaunchState`, so it is tested without a terminal.
"""

from __future__ import annotations

import html
import sys
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

__all__ = ["LaunchState", "ProgressView", "progress_line", "progress_html", "progress_view"]


@dataclass(frozen=True)
class LaunchState:
    """One look at a waiting launch."""

    label: str  # "gang 1a2b3c4d (train) attempt 0"
    joined: int
    needed: int
    waited: float
    bound: float | None  # the start bound in seconds (None: unbounded)
    executors: int = 0
    requested: int | None = None  # dynamic allocation's target (None: not under dynamic allocation)

    @property
    def pending(self) -> int:
        """Executors asked for and not there yet."""
        return max(self.requested - self.executors, 0) if self.requested is not None else 0

    @property
    def left(self) -> float | None:
        return None if self.bound is None else max(self.bound - self.waited, 0.0)


def progress_line(state: LaunchState, width: int = 20) -> str:
    """The terminal line (pure).

    >>> progress_line(LaunchState("gang ab", 3, 4, 62.0, 180.0, 2, 3))
    '[gang ab] [###############     ] 3/4 ranks joined | 2 executor(s) alive, 1 pending | 118 s left of 180 s'
    """
    done = 0 if state.needed <= 0 else min(width, width * state.joined // state.needed)
    bar = "#" * done + " " * (width - done)
    executors = f"{state.executors} executor(s) alive" + (f", {state.pending} pending" if state.requested is not None
                                                           else "")
    left = (f"{state.left:.0f} s left of {state.bound:.0f} s" if state.left is not None
            else f"waited {state.waited:.0f} s")
    return f"[{state.label}] [{bar}] {state.joined}/{state.needed} ranks joined | {executors} | {left}"


def progress_html(state: LaunchState) -> str:
    """The notebook view (pure): a ``<progress>`` bar and the same figures as the terminal line."""
    executors = f"{state.executors} executor(s) alive" + (f", {state.pending} pending" if state.requested is not None
                                                           else "")
    left = (f"{state.left:.0f} s left of {state.bound:.0f} s" if state.left is not None
            else f"waited {state.waited:.0f} s")
    return (f'<div class="sparkhydrogen-progress"><b>{html.escape(state.label)}</b> '
            f'<progress value="{state.joined}" max="{max(state.needed, 1)}"></progress> '
            f"{state.joined}/{state.needed} ranks joined &middot; {html.escape(executors)} &middot; "
            f"{html.escape(left)}</div>")


class ProgressView(Protocol):
    def show(self, state: LaunchState) -> None: ...

    def close(self, outcome: str) -> None: ...


class _Nowhere:
    def show(self, state: LaunchState) -> None:
        pass

    def close(self, outcome: str) -> None:
        pass


class TerminalView:
    """One line on ``stream``, rewritten in place; :meth:`close` ends it with the outcome."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._width = 0
        self._shown = False

    def show(self, state: LaunchState) -> None:
        text = progress_line(state)
        self.stream.write("\r" + text + " " * max(self._width - len(text), 0))
        self.stream.flush()
        self._width, self._shown = len(text), True

    def close(self, outcome: str) -> None:
        if self._shown:
            self.stream.write(f" -> {outcome}\n")
            self.stream.flush()
            self._shown = False


class NotebookView:
    """An HTML progress bar in the running notebook cell, updated in place through IPython's display handle."""

    def __init__(self, display: Any, html_type: Any) -> None:
        self._display = display
        self._html = html_type
        self._handle: Any = None
        self._last: LaunchState | None = None

    def show(self, state: LaunchState) -> None:
        content = self._html(progress_html(state))
        if self._handle is None:
            self._handle = self._display(content, display_id=True)
        else:
            self._handle.update(content)
        self._last = state

    def close(self, outcome: str) -> None:
        if self._handle is not None and self._last is not None:
            self._handle.update(self._html(progress_html(self._last) + f"<div>{html.escape(outcome)}</div>"))


def _kernel() -> tuple[Any, Any] | None:
    """IPython's ``display`` and ``HTML`` when running in a notebook kernel (not a terminal IPython)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return None
    try:
        shell = ipython.get_ipython()
        if shell is None or "IPKernelApp" not in getattr(shell, "config", {}):
            return None
        from IPython.display import HTML, display

        return display, HTML
    except Exception:  # an IPython without display support: no bar
        return None


def progress_view(show_console_progress: bool = True, stream: TextIO | None = None) -> ProgressView:
    """Where a waiting launch shows its progress: a notebook bar, a terminal line, or nowhere.

    ``show_console_progress`` is Spark's ``spark.ui.showConsoleProgress``: ``False``
    keeps the terminal quiet (the notebook bar is shown regardless).
    """
    kernel = _kernel()
    if kernel is not None:
        return NotebookView(*kernel)
    out = sys.stderr if stream is None else stream
    if show_console_progress and getattr(out, "isatty", lambda: False)():
        return TerminalView(out)
    return _Nowhere()
