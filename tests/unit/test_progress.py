"""A waiting launch's progress: the terminal line and the notebook bar (pure text, a real stream)."""

from __future__ import annotations

import io
from typing import Any

from sparkhydrogen.launch.progress import (
    LaunchState,
    NotebookView,
    TerminalView,
    progress_html,
    progress_line,
    progress_view,
)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_line_says_ranks_executors_and_time_left() -> None:
    state = LaunchState("gang ab (train) attempt 0", 1, 4, 30.0, 180.0, executors=1, requested=4)
    line = progress_line(state, width=8)
    assert line == ("[gang ab (train) attempt 0] [##      ] 1/4 ranks joined | 1 executor(s) alive, 3 pending | "
                    "150 s left of 180 s")
    unbounded = progress_line(LaunchState("g", 0, 2, 12.0, None), width=4)
    assert unbounded.endswith("0/2 ranks joined | 0 executor(s) alive | waited 12 s")
    assert progress_line(LaunchState("g", 2, 2, 500.0, 180.0)).endswith("0 s left of 180 s")


def test_a_terminal_line_is_rewritten_in_place_and_ended_once() -> None:
    out = _Tty()
    view = progress_view(True, stream=out)
    assert isinstance(view, TerminalView)
    view.show(LaunchState("g", 1, 3, 2.0, 60.0))
    view.show(LaunchState("g", 3, 3, 3.0, 60.0))
    view.close("all 3 ranks joined after 3.0 s")
    view.close("again")  # ended once
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith(" -> all 3 ranks joined after 3.0 s\n")
    assert "1/3 ranks joined" in text and "3/3 ranks joined" in text and "again" not in text


def test_no_terminal_line_when_spark_shows_no_console_progress_or_not_a_tty() -> None:
    assert not isinstance(progress_view(False, stream=_Tty()), TerminalView)
    assert not isinstance(progress_view(True, stream=io.StringIO()), TerminalView)


def test_the_notebook_bar_is_one_display_updated_in_place() -> None:
    shown: list[tuple[str, str]] = []

    class Handle:
        def update(self, content: str) -> None:
            shown.append(("update", content))

    def display(content: str, display_id: bool = False) -> Any:
        assert display_id
        shown.append(("display", content))
        return Handle()

    view = NotebookView(display, str)
    view.show(LaunchState("gang <x>", 1, 4, 5.0, 60.0, 1, 2))
    view.show(LaunchState("gang <x>", 2, 4, 6.0, 60.0, 2, 2))
    view.close("all 4 ranks joined after 7.0 s")
    assert [kind for kind, _ in shown] == ["display", "update", "update"]
    assert '<progress value="2" max="4">' in shown[1][1] and "gang &lt;x&gt;" in shown[0][1]
    assert "all 4 ranks joined" in shown[2][1]
    assert progress_html(LaunchState("g", 0, 0, 0.0, None)).count('max="1"') == 1  # never a zero maximum
