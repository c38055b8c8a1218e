"""Reading Spark's job-failure text: the Python exception a task raised, and whether retrying can help.

When a gang fails before any rank joined its coordinator, all the driver has is
Spark's error: ``Py4JJavaError`` ("An error occurred while calling
o123.collectAndServe ...", classic PySpark), pyspark's ``PythonException`` or a
Spark Connect exception. Somewhere in that text is the Python traceback of the
task and its last line, ``SomeError: message``. :func:`python_exception` finds it;
:func:`cannot_succeed` says when the same launch would fail the same way again
(spark-hydrogen or the user's module missing on the executors, a closure that does
not unpickle there, a coordinator the executors cannot reach), so that a launcher
reports the cause at once instead of retrying, each time paying the connect timeout.

Pure functions of text: nothing here imports pyspark or talks to Spark.

Example:
    >>> text = ("An error occurred while calling o123.collectAndServe.\\n"
    ...         "org.apache.spark.api.python.PythonException: [PYTHON_EXCEPTION] An exception was thrown "
    ...         "from the Python worker: Traceback (most recent call last):\\n"
    ...         '  File "/opt/venv/lib/python3.11/site-packages/pyspark/cloudpickle/cloudpickle.py", '
    ...         "line 469, in subimport\\n"
    ...         "    __import__(name)\\n"
    ...         "ModuleNotFoundError: No module named 'sparkhydrogen'\\n"
    ...         " SQLSTATE: 38000\\n"
    ...         "\\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.handlePythonException(...)")
    >>> python_exception(text)
    ('ModuleNotFoundError', "No module named 'sparkhydrogen'")
    >>> print(cannot_succeed(*python_exception(text)))  # doctest: +ELLIPSIS
    the executors' Python cannot import spark-hydrogen (No module named 'sparkhydrogen'): install ...
"""

from __future__ import annotations

import re

__all__ = ["python_exception", "cannot_succeed"]

_TRACEBACK = "Traceback (most recent call last):"
#: Lines that join the tracebacks of chained exceptions; the last exception of the chain is the one raised.
_CHAIN = frozenset({
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
})
#: ``ModuleNotFoundError: No module named 'x'``, ``sparkhydrogen.errors.LaunchError: ...``, ``StopIteration``.
_EXCEPTION_LINE = re.compile(r"([A-Za-z_][\w.]*)(?::\s?(.*))?")
#: Where Spark's text goes on after the Python message: its SQL state, JVM frames, further sections.
_AFTER_MESSAGE = re.compile(
    r"\s*SQLSTATE: \w+\s*$"
    r"|\tat |\s+at [\w$.<>/]+\("
    r"|(?:JVM|Driver) stacktrace:\s*$"
    r"|Caused by: [\w$.]+(?:Exception|Error)\b"
    r"|\s+\.\.\. \d+ more\s*$"
)
_NO_MODULE = re.compile(r"No module named '([^']+)'")
_CANNOT_IMPORT_FROM = re.compile(r"cannot import name '([^']+)' from '([^']+)'")
_MISSING_ATTRIBUTE = re.compile(r"Can't (?:get attribute|resolve path) '([^']+)' on <module '([^']+)'")
_UNREACHABLE = re.compile(r"(?:cannot reach|could not connect to) the spark-hydrogen coordinator at (\S+?)(?=:?\s|:?$)")
_PICKLE_TYPES = frozenset({"PicklingError", "UnpicklingError"})


def python_exception(text: str) -> tuple[str, str] | None:
    """The Python exception (type, message) in Spark's error ``text``, or ``None`` if it has no Python traceback.

    ``text`` is ``str()`` of what the job raised: a ``Py4JJavaError``, a pyspark
    ``PythonException`` (``[PYTHON_EXCEPTION] An exception was thrown from the Python
    worker: Traceback ...``) or a Spark Connect exception. Of chained exceptions
    ("The above exception was the direct cause ..."), the last one is returned: the
    one the task raised. The type is as the traceback writes it (``ValueError``,
    ``sparkhydrogen.errors.CoordinatorConnectionError``); the message keeps its
    lines, without Spark's ``SQLSTATE`` and JVM frames after it.

    >>> python_exception("An exception was thrown from the Python worker:\\nTraceback (most recent call last):\\n"
    ...                  '  File "/home/alice/train.py", line 50, in body\\n    raise ValueError("bad value 42")\\n'
    ...                  "ValueError: bad value 42")
    ('ValueError', 'bad value 42')
    >>> python_exception("org.apache.spark.SparkException: Job aborted: executor lost") is None
    True
    """
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.rstrip().endswith(_TRACEBACK)]
    if not starts:
        return None
    found: tuple[str, str] | None = None
    i, n = starts[0] + 1, len(lines)
    while i < n:
        while i < n and (lines[i][:1].isspace() or not lines[i].strip()):  # frames: indented
            i += 1
        match = _EXCEPTION_LINE.fullmatch(lines[i].rstrip()) if i < n else None
        if match is None:
            break
        message = [match.group(2) or ""]
        i += 1
        while i < n and not _ends_message(lines[i]):
            message.append(lines[i])
            i += 1
        found = (match.group(1), "\n".join(message).strip())
        while i < n and not lines[i].strip():
            i += 1
        if i >= n or lines[i].strip() not in _CHAIN:
            break
        following = [s for s in starts if s > i]  # the chained exception's traceback
        if not following:
            break
        i = following[0] + 1
    return found


def _ends_message(line: str) -> bool:
    return (_AFTER_MESSAGE.match(line) is not None or line.strip() in _CHAIN
            or line.rstrip().endswith(_TRACEBACK))


def cannot_succeed(exc_type: str, message: str) -> str | None:
    """Why a launch that failed with this exception before any rank joined would fail again, or ``None``.

    ``exc_type`` and ``message`` are what :func:`python_exception` returns (a type
    with or without its module). A reason is returned, naming the cause and its fix,
    when the failure is a property of the executors' environment or of the task
    closure, not of the moment:

    * ``ModuleNotFoundError`` / ``ImportError``: spark-hydrogen, one of its modules
      (another version on the executors) or the user's module is not importable there;
    * pickling errors (``PicklingError``, ``UnpicklingError``, ``cannot pickle``) and
      the ``AttributeError`` unpickling raises for a function or class the executors'
      copy of its module does not have (``Can't get attribute 'f' on <module 'm'>``);
    * a Python version that differs between driver and executors;
    * ``CoordinatorConnectionError`` "cannot reach" / "could not connect to" the
      coordinator's address: the executors cannot connect to it, and every attempt
      would wait the connect timeout again.

    A launcher reports ``reason`` instead of retrying (e.g. "not retried: <reason>").

    >>> cannot_succeed("ModuleNotFoundError", "No module named 'mytrainer'")  # doctest: +ELLIPSIS
    "the executors cannot import module 'mytrainer', which the gang's function needs (No module named ...
    >>> cannot_succeed("ValueError", "bad value 42") is None
    True
    """
    name = exc_type.rsplit(".", 1)[-1]
    text = message.strip()
    if name in ("ModuleNotFoundError", "ImportError"):
        return _import_reason(name, text)
    if name == "AttributeError" and (missing := _MISSING_ATTRIBUTE.search(text)):
        attribute, module = missing.groups()
        return (f"the executors' copy of module {module!r} has no {attribute!r}, which the task closure refers to "
                f"({_first_line(text)}): the driver and the executors run different code; ship the driver's "
                "version of the module to the executors (SparkContext.addPyFile, spark.submit.pyFiles, "
                "spark.archives) or define the function in the code you submit")
    if name in _PICKLE_TYPES or (name == "TypeError" and text.startswith("cannot pickle")):
        return (f"the task closure or its data cannot be pickled or unpickled ({name}: {_first_line(text)}): "
                "make the function and what it captures picklable (create clients, sockets and locks inside the "
                "function), and run the same Python packages on the driver and the executors")
    if "PYTHON_VERSION_MISMATCH" in text:
        return (f"the executors run another Python version than the driver ({_first_line(text)}): set "
                "spark.pyspark.python (and spark.pyspark.driver.python) to interpreters of the same minor version")
    if name == "CoordinatorConnectionError" and (unreachable := _UNREACHABLE.search(text)):
        return (f"the executors cannot connect to the spark-hydrogen coordinator at {unreachable.group(1)} "
                f"({_first_sentence(text)}): let them reach the driver there, or set spark.hydrogen.coordinator.host "
                "and .port to an address and an open port range they can reach (and "
                "spark.hydrogen.coordinator.advertiseHost when the driver is behind NAT or in a container)")
    return None


def _import_reason(name: str, text: str) -> str:
    """The reason for an import failure: spark-hydrogen missing, another spark-hydrogen, or a user's module."""
    missing = _NO_MODULE.search(text)
    source = _CANNOT_IMPORT_FROM.search(text)
    module = missing.group(1) if missing else source.group(2) if source else ""
    top = module.split(".")[0]
    if module == "sparkhydrogen":
        return (f"the executors' Python cannot import spark-hydrogen ({_first_line(text)}): install spark-hydrogen "
                "(the driver's version) in the Python environment the executors run (spark.pyspark.python), "
                "or ship it with spark.archives or spark.submit.pyFiles")
    if top == "sparkhydrogen":
        return (f"the executors run another spark-hydrogen version than the driver ({name}: {_first_line(text)}): "
                "install the driver's version of spark-hydrogen on the executors")
    if module:
        return (f"the executors cannot import module {top!r}, which the gang's function needs ({_first_line(text)}): "
                "install it in the executors' Python environment, or ship it with SparkContext.addPyFile, "
                "spark.submit.pyFiles or spark.archives")
    return (f"the executors cannot import what the gang's function needs ({name}: {_first_line(text)}): install "
            "the same Python packages (and the libraries they load) on the executors as on the driver")


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _first_sentence(text: str) -> str:
    """``"cannot reach ... refused. Executors must ..."`` -> ``"cannot reach ... refused"``."""
    return re.split(r"(?<=\.)\s+(?=[A-Z])", _first_line(text))[0].rstrip(".")
