"""Transparent mode's rank attribution shows in the formatted traceback on every supported Python (3.10 too)."""

from __future__ import annotations

import pickle
import sys
import traceback

import pytest

from sparkhydrogen.transparent import add_notes

NOTE = "spark-hydrogen: raised by rank 1 of 2 (gang attempt 0): X"


class LibraryError(Exception):
    """A library's own exception class (a heap type)."""


def formatted(exc: BaseException) -> str:
    try:
        raise exc
    except BaseException as raised:
        add_notes(raised, [NOTE])
        return traceback.format_exc()


@pytest.mark.parametrize("exc", [ValueError("bad shard"), LibraryError("loss is NaN"), RuntimeError("x")],
                         ids=["builtin", "library", "runtime"])
def test_the_note_is_in_the_traceback_spark_reports(exc: BaseException) -> None:
    text = formatted(exc)
    name = type(exc).__name__
    assert f"{name}: {exc.args[0]}\n{NOTE}\n" in text  # the type keeps its own name, the note follows
    assert exc.__notes__ == [NOTE]
    assert isinstance(exc, type(exc))


def test_a_noted_library_exception_keeps_its_class_for_pickle() -> None:
    exc = LibraryError("loss is NaN")
    formatted(exc)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is LibraryError and back.args == ("loss is NaN",)


@pytest.mark.skipif(sys.version_info >= (3, 11), reason="3.11+ prints every note")
def test_on_310_an_exception_whose_text_is_not_its_message_keeps_the_note_aside() -> None:
    exc = KeyError("weight")
    text = formatted(exc)
    assert "KeyError: 'weight'" in text and exc.__notes__ == [NOTE]
