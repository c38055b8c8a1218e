"""Spark's job-failure text: the Python exception in it, and which ones retrying cannot cure.

The texts below are ``str(exc)`` of what pyspark 4.3.0 raised for real jobs in
``local[1]`` (classic: a barrier RDD's ``collect``, a ``Py4JJavaError``; DataFrame:
pyspark's ``PythonException``; Spark Connect: ``remote("local[1]")``), with local paths
shortened and the JVM stack cut after its first frames.
"""

from __future__ import annotations

import re

import pytest

from sparkhydrogen.launch.spark_errors import cannot_succeed, python_exception

pytestmark = pytest.mark.timeout(30)

# ---------------------------------------------------------------- real texts

#: The executors' Python has no spark-hydrogen: the closure (pickled with a reference to
#: ``sparkhydrogen.frameworks.api``) does not unpickle there (spark.pyspark.python without it).
CLASSIC_NO_SPARKHYDROGEN = (
    "An error occurred while calling z:org.apache.spark.api.python.PythonRDD.collectAndServe.\n"
    ": org.apache.spark.SparkException: Job aborted due to stage failure: Could not recover from a fa"
    "iled barrier ResultStage. Most recent failure reason: Stage failed because barrier task ResultTa"
    "sk(0, 0) finished unsuccessfully.\n"
    "org.apache.spark.api.python.PythonException: [PYTHON_EXCEPTION] An exception was thrown from the"
    " Python worker: Traceback (most recent call last):\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/python/lib/pyspark.zip/pyspark/worker.py"'
    ", line 4197, in invoke_udf\n"
    "    func, profiler, deserializer, serializer = read_command(pickleSer, init_info.udf_info)\n"
    "                                               ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/python/lib/pyspark.zip/pyspark/worker_uti'
    'l.py", line 75, in read_command\n'
    "    command = serializer.loads(file)\n"
    "              ^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/python/lib/pyspark.zip/pyspark/serializer'
    's.py", line 483, in loads\n'
    "    return cloudpickle.loads(obj, encoding=encoding)\n"
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/python/lib/pyspark.zip/pyspark/cloudpickl'
    'e/cloudpickle.py", line 469, in subimport\n'
    "    __import__(name)\n"
    "ModuleNotFoundError: No module named 'sparkhydrogen'\n"
    " SQLSTATE: 38000\n"
    "\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.handlePythonException(PythonRunn"
    "er.scala:1097)\n"
    "\tat org.apache.spark.api.python.PythonRunner$$anon$5.read(PythonRunner.scala:1642)\n"
    "\tat org.apache.spark.api.python.PythonRunner$$anon$5.read(PythonRunner.scala:1624)\n"
    "\n"
)

#: The task closure is a function of a module only the driver can import.
CLASSIC_NO_USER_MODULE = (
    "An error occurred while calling z:org.apache.spark.api.python.PythonRDD.collectAndServe.\n"
    ": org.apache.spark.SparkException: Job aborted due to stage failure: Could not recover from a fa"
    "iled barrier ResultStage. Most recent failure reason: Stage failed because barrier task ResultTa"
    "sk(1, 0) finished unsuccessfully.\n"
    "org.apache.spark.api.python.PythonException: [PYTHON_EXCEPTION] An exception was thrown from the"
    " Python worker: Traceback (most recent call last):\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/python/lib/pyspark.zip/pyspark/worker.py"'
    ", line 4197, in invoke_udf\n"
    "    func, profiler, deserializer, serializer = read_command(pickleSer, init_info.udf_info)\n"
    "                                               ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/python/lib/pyspark.zip/pyspark/worker_uti'
    'l.py", line 75, in read_command\n'
    "    command = serializer.loads(file)\n"
    "              ^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/python/lib/pyspark.zip/pyspark/serializer'
    's.py", line 483, in loads\n'
    "    return cloudpickle.loads(obj, encoding=encoding)\n"
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    "ModuleNotFoundError: No module named 'sh_user_job'\n"
    " SQLSTATE: 38000\n"
    "\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.handlePythonException(PythonRunn"
    "er.scala:1097)\n"
    "\tat org.apache.spark.api.python.PythonRunner$$anon$5.read(PythonRunner.scala:1642)\n"
    "\tat org.apache.spark.api.python.PythonRunner$$anon$5.read(PythonRunner.scala:1624)\n"
    "\n"
)

#: The closure refers to ``sh_partial_mod.extra``, which the executors' copy of the module lacks.
CLASSIC_CANT_GET_ATTRIBUTE = (
    "An error occurred while calling z:org.apache.spark.api.python.PythonRDD.collectAndServe.\n"
    ": org.apache.spark.SparkException: Job aborted due to stage failure: Could not recover from a fa"
    "iled barrier ResultStage. Most recent failure reason: Stage failed because barrier task ResultTa"
    "sk(2, 0) finished unsuccessfully.\n"
    "org.apache.spark.api.python.PythonException: [PYTHON_EXCEPTION] An exception was thrown from the"
    " Python worker: Traceback (most recent call last):\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/python/lib/pyspark.zip/pyspark/worker.py"'
    ", line 4197, in invoke_udf\n"
    "    func, profiler, deserializer, serializer = read_command(pickleSer, init_info.udf_info)\n"
    "                                               ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/python/lib/pyspark.zip/pyspark/worker_uti'
    'l.py", line 75, in read_command\n'
    "    command = serializer.loads(file)\n"
    "              ^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/python/lib/pyspark.zip/pyspark/serializer'
    's.py", line 483, in loads\n'
    "    return cloudpickle.loads(obj, encoding=encoding)\n"
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    "AttributeError: Can't get attribute 'extra' on <module 'sh_partial_mod' from '/home/alice/lib/sh"
    "_partial_mod.py'>\n"
    " SQLSTATE: 38000\n"
    "\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.handlePythonException(PythonRunn"
    "er.scala:1097)\n"
    "\tat org.apache.spark.api.python.PythonRunner$$anon$5.read(PythonRunner.scala:1642)\n"
    "\tat org.apache.spark.api.python.PythonRunner$$anon$5.read(PythonRunner.scala:1624)\n"
    "\n"
)

#: The task could not connect to the coordinator (nothing listens on its port): a chained exception.
CLASSIC_COORDINATOR_UNREACHABLE = (
    "An error occurred while calling z:org.apache.spark.api.python.PythonRDD.collectAndServe.\n"
    ": org.apache.spark.SparkException: Job aborted due to stage failure: Could not recover from a fa"
    "iled barrier ResultStage. Most recent failure reason: Stage failed because barrier task ResultTa"
    "sk(0, 0) finished unsuccessfully.\n"
    "org.apache.spark.api.python.PythonException: [PYTHON_EXCEPTION] An exception was thrown from the"
    " Python worker: Traceback (most recent call last):\n"
    '  File "/opt/venv/lib/python3.11/site-packages/sparkhydrogen/coordinator/client.py", line 129, i'
    "n connect\n"
    "    sock = socket.create_connection((host, port), timeout=timeout)\n"
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/usr/lib/python3.11/socket.py", line 851, in create_connection\n'
    "    raise exceptions[0]\n"
    '  File "/usr/lib/python3.11/socket.py", line 836, in create_connection\n'
    "    sock.connect(sa)\n"
    "ConnectionRefusedError: [Errno 111] Connection refused\n"
    "\n"
    "The above exception was the direct cause of the following exception:\n"
    "\n"
    "Traceback (most recent call last):\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/python/lib/pyspark.zip/pyspark/worker.py"'
    ", line 4327, in invoke_udf\n"
    "    run_process()\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/python/lib/pyspark.zip/pyspark/worker.py"'
    ", line 4220, in process\n"
    "    out_iter = func(init_info.split_index, iterator)\n"
    "               ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/core/rdd.py", line 5292, in pipeline_func'
    "\n"
    "    return func(split, prev_func(split, iterator))\n"
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/core/rdd.py", line 5200, in func\n'
    "    return f(iterator)\n"
    "           ^^^^^^^^^^^\n"
    '  File "/home/alice/train.py", line 28, in unreachable\n'
    '    CoordinatorClient.connect(("127.0.0.1", port), "g" * 32, b"s" * 32, timeout=2.0)\n'
    '  File "/opt/venv/lib/python3.11/site-packages/sparkhydrogen/coordinator/client.py", line 131, i'
    "n connect\n"
    "    raise CoordinatorConnectionError(\n"
    "sparkhydrogen.errors.CoordinatorConnectionError: cannot reach the spark-hydrogen coordinator at "
    "127.0.0.1:36715 within 2 s: [Errno 111] Connection refused. Executors must be able to connect to"
    " the driver; set spark.hydrogen.coordinator.host/port to an address and port they can reach\n"
    " SQLSTATE: 38000\n"
    "\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.handlePythonException(PythonRunn"
    "er.scala:1097)\n"
    "\tat org.apache.spark.api.python.PythonRunner$$anon$5.read(PythonRunner.scala:1642)\n"
    "\tat org.apache.spark.api.python.PythonRunner$$anon$5.read(PythonRunner.scala:1624)\n"
    "\n"
)

#: The task function itself imports a module the executors lack.
CLASSIC_IMPORT_IN_BODY = (
    "An error occurred while calling z:org.apache.spark.api.python.PythonRDD.collectAndServe.\n"
    ": org.apache.spark.SparkException: Job aborted due to stage failure: Could not recover from a fa"
    "iled barrier ResultStage. Most recent failure reason: Stage failed because barrier task ResultTa"
    "sk(0, 0) finished unsuccessfully.\n"
    "org.apache.spark.api.python.PythonException: [PYTHON_EXCEPTION] An exception was thrown from the"
    " Python worker: Traceback (most recent call last):\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/python/lib/pyspark.zip/pyspark/worker.py"'
    ", line 4327, in invoke_udf\n"
    "    run_process()\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/python/lib/pyspark.zip/pyspark/worker.py"'
    ", line 4220, in process\n"
    "    out_iter = func(init_info.split_index, iterator)\n"
    "               ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/core/rdd.py", line 5292, in pipeline_func'
    "\n"
    "    return func(split, prev_func(split, iterator))\n"
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/opt/venv/lib/python3.11/site-packages/pyspark/core/rdd.py", line 5200, in func\n'
    "    return f(iterator)\n"
    "           ^^^^^^^^^^^\n"
    '  File "/home/alice/train.py", line 22, in missing_import\n'
    "    import sparkhydrogen_not_installed  # noqa\n"
    "    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    "ModuleNotFoundError: No module named 'sparkhydrogen_not_installed'\n"
    " SQLSTATE: 38000\n"
    "\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.handlePythonException(PythonRunn"
    "er.scala:1097)\n"
    "\tat org.apache.spark.api.python.PythonRunner$$anon$5.read(PythonRunner.scala:1642)\n"
    "\tat org.apache.spark.api.python.PythonRunner$$anon$5.read(PythonRunner.scala:1624)\n"
    "\n"
)

#: A DataFrame (``mapInPandas``) function raising a plain error: pyspark's captured ``PythonException``.
DATAFRAME_VALUE_ERROR = (
    "An exception was thrown from the Python worker:\n"
    "Traceback (most recent call last):\n"
    '  File "/home/alice/train.py", line 50, in df_value\n'
    '    raise ValueError("bad value 42")\n'
    "ValueError: bad value 42"
)

#: Spark Connect's ``PythonException`` for a ``mapInPandas`` function that imports a missing module.
CONNECT_MODULE_NOT_FOUND = (
    "\n"
    "  An exception was thrown from the Python worker. Please see the stack trace below.\n"
    "[PYTHON_EXCEPTION] An exception was thrown from the Python worker: Traceback (most recent call l"
    "ast):\n"
    '  File "/home/alice/train.py", line 46, in df_missing\n'
    "    import sparkhydrogen_not_installed  # noqa\n"
    "    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    "ModuleNotFoundError: No module named 'sparkhydrogen_not_installed'\n"
    " SQLSTATE: 38000"
)

#: Spark Connect's ``SparkException`` for a barrier ``mapInArrow`` task that cannot reach the coordinator.
CONNECT_COORDINATOR_UNREACHABLE = (
    "Job aborted due to stage failure: Could not recover from a failed barrier ResultStage. Most rece"
    "nt failure reason: Stage failed because barrier task ResultTask(1, 0) finished unsuccessfully.\n"
    "org.apache.spark.api.python.PythonException: [PYTHON_EXCEPTION] An exception was thrown from the"
    " Python worker: Traceback (most recent call last):\n"
    '  File "/home/alice/train.py", line 60, in <lambda>\n'
    '    grab("connect_barrier_map_in_arrow_unreachable", lambda: cs.range(2, numPartitions=1).mapInA'
    'rrow(lambda b: unreachable(b), "id long", barrier=True).collect())\n'
    "                                                                                                "
    "               ^^^^^^^^^^^^^^\n"
    '  File "/home/alice/train.py", line 41, in unreachable\n'
    '    CoordinatorClient.connect(("127.0.0.1", port), "g" * 32, b"s" * 32, timeout=2.0)\n'
    '  File "/opt/venv/lib/python3.11/site-packages/sparkhydrogen/coordinator/client.py", line 131, i'
    "n connect\n"
    "    raise CoordinatorConnectionError(\n"
    "sparkhydrogen.errors.CoordinatorConnectionError: cannot reach the spark-hydrogen coordinator at "
    "127.0.0.1:54671 within 2 s: [Errno 111] Connection refused. Executors must be able to connect to"
    " the driver; set spark.hydrogen.coordinator.host/port to an address and port they can reach\n"
    " SQLSTATE: 38000\n"
    "\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.handlePythonException(PythonRunn"
    "er.scala:1097)\n"
    "\tat org.apache.spark.sql.execution.python.PythonArrowOutput$$anon$1.read(PythonArrowOutput.scala"
    ":145)\n"
    "\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.hasNext(PythonRunner.scala:1034)"
    "\n"
    "\n"
    "\n"
    "JVM stacktrace:\n"
    "org.apache.spark.SparkException\n"
)

UNREACHABLE_MESSAGE = (
    "cannot reach the spark-hydrogen coordinator at 127.0.0.1:{port} within 2 s: [Errno 111] Connection refused. "
    "Executors must be able to connect to the driver; set spark.hydrogen.coordinator.host/port to an address and "
    "port they can reach"
)


# ---------------------------------------------------------------- python_exception


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CLASSIC_NO_SPARKHYDROGEN, ("ModuleNotFoundError", "No module named 'sparkhydrogen'")),
        (CLASSIC_NO_USER_MODULE, ("ModuleNotFoundError", "No module named 'sh_user_job'")),
        (CLASSIC_CANT_GET_ATTRIBUTE, ("AttributeError", "Can't get attribute 'extra' on <module 'sh_partial_mod' "
                                                        "from '/home/alice/lib/sh_partial_mod.py'>")),
        (CLASSIC_COORDINATOR_UNREACHABLE, ("sparkhydrogen.errors.CoordinatorConnectionError",
                                           UNREACHABLE_MESSAGE.format(port=36715))),
        (CLASSIC_IMPORT_IN_BODY, ("ModuleNotFoundError", "No module named 'sparkhydrogen_not_installed'")),
        (DATAFRAME_VALUE_ERROR, ("ValueError", "bad value 42")),
        (CONNECT_MODULE_NOT_FOUND, ("ModuleNotFoundError", "No module named 'sparkhydrogen_not_installed'")),
        (CONNECT_COORDINATOR_UNREACHABLE, ("sparkhydrogen.errors.CoordinatorConnectionError",
                                           UNREACHABLE_MESSAGE.format(port=54671))),
    ],
    ids=["classic-no-sparkhydrogen", "classic-no-user-module", "classic-cant-get-attribute",
         "classic-unreachable-chained", "classic-import-in-body", "dataframe-value-error", "connect-module",
         "connect-unreachable"],
)
def test_python_exception_finds_the_raised_exception_in_real_spark_texts(text: str, expected: tuple[str, str]) -> None:
    assert python_exception(text) == expected


def test_the_last_exception_of_a_chain_is_the_one_raised() -> None:
    text = "\n".join([
        "org.apache.spark.api.python.PythonException: Traceback (most recent call last):",
        '  File "a.py", line 1, in f',
        "KeyError: 'rank'",
        "",
        "During handling of the above exception, another exception occurred:",
        "",
        "Traceback (most recent call last):",
        '  File "a.py", line 3, in f',
        "sparkhydrogen.errors.LaunchError: no rank in the environment",
        " SQLSTATE: 38000",
    ])
    assert python_exception(text) == ("sparkhydrogen.errors.LaunchError", "no rank in the environment")


def test_a_message_keeps_its_lines_and_ends_before_spark_text() -> None:
    marker = '[sparkhydrogen-failure] {"rank":1,"traceback":"Traceback (most recent call last):\\n  File"}'
    text = "\n".join([
        "[PYTHON_EXCEPTION] An exception was thrown from the Python worker: Traceback (most recent call last):",
        '  File "/x/embedded.py", line 170, in embedded_partition',
        "    raise RankTaskError(...)",
        "sparkhydrogen.task.embedded.RankTaskError: rank 1 failed: ValueError: bad shard",
        marker,
        " SQLSTATE: 38000",
        "\tat org.apache.spark.api.python.PythonRunner$$anon$5.read(PythonRunner.scala:1642)",
        "Traceback (most recent call last):",
        "OtherError: not this one",
    ])
    assert python_exception(text) == ("sparkhydrogen.task.embedded.RankTaskError",
                                      f"rank 1 failed: ValueError: bad shard\n{marker}")


@pytest.mark.parametrize(
    ("last_line", "expected"),
    [("StopIteration", ("StopIteration", "")), ("KeyboardInterrupt:", ("KeyboardInterrupt", "")),
     ("ValueError:no space", ("ValueError", "no space"))],
)
def test_exceptions_without_a_message(last_line: str, expected: tuple[str, str]) -> None:
    assert python_exception(f"Traceback (most recent call last):\n  File \"a.py\", line 1\n{last_line}\n") == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "An error occurred while calling o123.collectAndServe.\n: org.apache.spark.SparkException: Job aborted due "
        "to stage failure: Task 0 in stage 1.0 failed 1 times, most recent failure: ExecutorLostFailure (executor 1 "
        "exited caused by one of the running tasks) Reason: Remote RPC client disassociated.",
        "Traceback (most recent call last):\n",
        "Traceback (most recent call last):\n  File \"a.py\", line 1\n",
    ],
    ids=["empty", "executor-lost", "no-exception-line", "frames-only"],
)
def test_no_python_exception(text: str) -> None:
    assert python_exception(text) is None


# ---------------------------------------------------------------- cannot_succeed


def reason_of(text: str) -> str | None:
    found = python_exception(text)
    assert found is not None
    return cannot_succeed(*found)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (CLASSIC_NO_SPARKHYDROGEN,
         r"^the executors' Python cannot import spark-hydrogen \(No module named 'sparkhydrogen'\): install "
         r"spark-hydrogen \(the driver's version\) in the Python environment the executors run"),
        (CLASSIC_NO_USER_MODULE,
         r"^the executors cannot import module 'sh_user_job', which the gang's function needs \(No module named "
         r"'sh_user_job'\): install it in the executors' Python environment, or ship it with SparkContext\.addPyFile"),
        (CLASSIC_IMPORT_IN_BODY, r"^the executors cannot import module 'sparkhydrogen_not_installed'"),
        (CONNECT_MODULE_NOT_FOUND, r"^the executors cannot import module 'sparkhydrogen_not_installed'"),
        (CLASSIC_CANT_GET_ATTRIBUTE,
         r"^the executors' copy of module 'sh_partial_mod' has no 'extra', which the task closure refers to .*: the "
         r"driver and the executors run different code; ship the driver's version of the module"),
        (CLASSIC_COORDINATOR_UNREACHABLE,
         r"^the executors cannot connect to the spark-hydrogen coordinator at 127\.0\.0\.1:36715 \(cannot reach the "
         r"spark-hydrogen coordinator at 127\.0\.0\.1:36715 within 2 s: \[Errno 111\] Connection refused\): let them "
         r"reach the driver there, or set spark\.hydrogen\.coordinator\.host and \.port .*advertiseHost"),
        (CONNECT_COORDINATOR_UNREACHABLE, r"coordinator at 127\.0\.0\.1:54671 \("),
    ],
    ids=["no-sparkhydrogen", "no-user-module", "import-in-body", "connect-module", "cant-get-attribute",
         "unreachable", "connect-unreachable"],
)
def test_failures_retrying_cannot_cure_name_the_cause_and_the_fix(text: str, match: str) -> None:
    reason = reason_of(text)
    assert reason is not None
    assert re.search(match, reason), reason


@pytest.mark.parametrize(
    ("exc_type", "message", "match"),
    [
        ("ModuleNotFoundError", "No module named 'sparkhydrogen.task.embedded'",
         r"^the executors run another spark-hydrogen version than the driver \(ModuleNotFoundError: No module named "
         r"'sparkhydrogen\.task\.embedded'\): install the driver's version"),
        ("ImportError", "cannot import name 'release_with' from 'sparkhydrogen.launch.runner' (/opt/x/runner.py)",
         r"^the executors run another spark-hydrogen version than the driver"),
        ("ImportError", "cannot import name 'Trainer' from 'mylib.train' (/opt/mylib/train.py)",
         r"^the executors cannot import module 'mylib'"),
        ("ImportError", "libcudart.so.12: cannot open shared object file: No such file or directory",
         r"^the executors cannot import what the gang's function needs \(ImportError: libcudart"),
        ("builtins.AttributeError", "Can't get attribute 'Model' on <module '__main__' from '/opt/worker.py'>",
         r"^the executors' copy of module '__main__' has no 'Model'"),
        ("_pickle.UnpicklingError", "invalid load key, '\\x00'.",
         r"^the task closure or its data cannot be pickled or unpickled \(UnpicklingError: invalid load key"),
        ("pickle.PicklingError", "Can't pickle <function <lambda>>: attribute lookup <lambda> on __main__ failed",
         r"\(PicklingError: Can't pickle"),
        ("TypeError", "cannot pickle '_thread.lock' object", r"\(TypeError: cannot pickle '_thread\.lock' object\)"),
        ("PySparkRuntimeError", "[PYTHON_VERSION_MISMATCH] Python in worker has different version: 3.10 than that "
         "in driver: 3.11, PySpark cannot run with different minor versions.",
         r"^the executors run another Python version than the driver .*spark\.pyspark\.python"),
        ("CoordinatorConnectionError", "could not connect to the spark-hydrogen coordinator at [::1]:7100: refused",
         r"coordinator at \[::1\]:7100 \("),
    ],
)
def test_cannot_succeed(exc_type: str, message: str, match: str) -> None:
    reason = cannot_succeed(exc_type, message)
    assert reason is not None
    assert re.search(match, reason), reason


@pytest.mark.parametrize(
    ("exc_type", "message"),
    [
        ("ValueError", "bad value 42"),
        ("AttributeError", "'NoneType' object has no attribute 'shape'"),  # the user's bug, not unpickling
        ("TypeError", "unsupported operand type(s) for +: 'int' and 'str'"),
        ("sparkhydrogen.errors.CoordinatorConnectionError",
         "lost the connection to the coordinator at 10.0.0.5:7100: [Errno 104] Connection reset by peer"),
        ("sparkhydrogen.errors.AuthenticationError",
         "the coordinator at 10.0.0.5:7100 refused this task's credentials for gang 1234abcd"),
        ("ConnectionRefusedError", "[Errno 111] Connection refused"),
        ("sparkhydrogen.errors.GangAbortedError", "gang aborted: rank 1 raised ValueError: bad shard"),
    ],
)
def test_failures_that_may_pass_on_retry_give_none(exc_type: str, message: str) -> None:
    assert cannot_succeed(exc_type, message) is None


def test_the_value_error_of_a_real_job_may_be_retried() -> None:
    assert reason_of(DATAFRAME_VALUE_ERROR) is None
