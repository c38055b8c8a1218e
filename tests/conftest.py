"""Shared test set-up: real Spark (no mocks), loopback only, every process stopped.

Two session fixtures, both module-scoped, for any test directory:

``spark``
    Parametrized over the three kinds of session a user may hand us: ``local[4]`` (classic, one
    JVM), ``local-cluster[2,1,1024]`` (classic, two real executor JVMs) and Spark Connect
    (``SparkSession.builder.remote("local[2]")``: a Connect server inside this process, the client
    talks gRPC to it and has no RDD API). pytest runs a module's tests grouped by kind and tears
    each session down before the next kind starts: one SparkContext per process at a time.

``connect_spark``
    The Connect session alone, for modules that test Connect only. A module may set
    ``CONNECT_MASTER`` (the master the in-process server runs, default ``local[2]``) and
    ``CONNECT_CONF`` (extra builder conf) at module level.

Modules that build their own session (``sparkutil.spark_session``) define their own
``spark``/``sc`` fixture, which overrides these; both refuse to start while another
SparkContext is still alive rather than silently reusing it.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

# Executors' Python workers must run this interpreter (it has sparkhydrogen installed),
# and every server binds loopback.
os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
# Torch's JIT-built extensions (DeepSpeed's CPU comm op, built by `make frameworks`) live in this venv, not in
# the shared ~/.cache/torch_extensions that another checkout's venv rebuilds with its own paths.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

#: ids of the session kinds of ``spark``, in the order pytest runs them
KINDS = ("local[4]", "local-cluster[2,1,1024]", "connect")

#: What ``SparkSession.builder.remote(...)`` starts the in-process Connect server with (unless a
#: module using ``connect_spark`` sets its own ``CONNECT_MASTER``).
CONNECT_MASTER = "local[2]"


def _no_live_context(kind: str) -> None:
    from pyspark import SparkContext

    active = SparkContext._active_spark_context
    if active is not None:
        raise RuntimeError(
            f"cannot start the {kind} session: a SparkContext on {active.master!r} is still running "
            "(a fixture or test did not stop its session)"
        )


def _spark_system_properties(jvm: Any) -> dict[str, str]:
    props = jvm.java.lang.System.getProperties()
    return {str(k): str(props.get(k)) for k in props.stringPropertyNames() if str(k).startswith("spark.")}


#: The longest modules (measured with ``--durations``) run first, so that the two test processes of
#: ``make test`` (pytest-xdist hands out whole modules in collection order) finish at about the same time.
FIRST = ("tests/cluster/test_elastic_cluster.py", "tests/cluster/", "tests/transparent/test_transparent_frameworks.py",
         "tests/torch/", "tests/frameworks/", "tests/horovod/", "tests/ml/", "tests/mlflow/", "tests/data/")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest modules first, in :data:`FIRST`'s order (a stable sort: each module's own order is kept)."""

    def place(item: pytest.Item) -> int:
        return next((i for i, prefix in enumerate(FIRST) if item.nodeid.startswith(prefix)), len(FIRST))

    items.sort(key=place)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The shared ``spark`` runs on every kind of :data:`KINDS`, or on the module's ``SESSION_KINDS``."""
    defs = metafunc._arg2fixturedefs.get("spark")  # the fixture the test gets (a module may define its own)
    # this file's fixture, not a directory's own ``spark`` (every conftest module is named ``conftest``)
    if defs and getattr(defs[-1].func, "__code__", None) is not None and defs[-1].func.__code__.co_filename == __file__:
        kinds = getattr(metafunc.module, "SESSION_KINDS", KINDS)
        metafunc.parametrize("spark", kinds, indirect=True, scope="module", ids=list(kinds))


@pytest.fixture(scope="module")
def spark(request: Any) -> Iterator[Any]:
    """A SparkSession of one kind per parameter (classic ``local[4]``, ``local-cluster``, Connect)."""
    from sparkutil import spark_session, wait_for_executors

    kind: str = request.param
    _no_live_context(kind)
    if kind == "connect":
        pytest.importorskip("grpc")
        pytest.importorskip("pandas")
        yield from _connect_session()
    elif kind.startswith("local-cluster"):
        with spark_session(kind, **{"spark.executor.memory": "512m"}) as session:
            wait_for_executors(session.sparkContext, 2)
            yield session
    else:
        with spark_session(kind) as session:
            yield session


@pytest.fixture(scope="module")
def connect_spark(request: Any) -> Iterator[Any]:
    """A Spark Connect session (in-process server on the module's ``CONNECT_MASTER``, with its ``CONNECT_CONF``)."""
    pytest.importorskip("grpc")
    pytest.importorskip("pandas")
    _no_live_context("connect")
    master = getattr(request.module, "CONNECT_MASTER", CONNECT_MASTER)
    yield from _connect_session(master, getattr(request.module, "CONNECT_CONF", {}))


def _connect_session(master: str = CONNECT_MASTER, conf: Mapping[str, str] | None = None) -> Iterator[Any]:
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    # The in-process server listens on an ephemeral port (not 15002), so that test processes running side by
    # side (pytest-xdist) each have their own; pyspark's client finds that port only under SPARK_TESTING, which
    # is set for the session's life. The JVM is launched first, so that it does not inherit SPARK_TESTING.
    SparkContext._ensure_initialized()
    # The local Connect server is an ordinary SparkContext started in this process: its conf (spark.plugins =
    # the Connect plugin, ...) stays behind as Java system properties that every later SparkContext would
    # inherit. Put them back afterwards.
    jvm = SparkContext._jvm
    before = _spark_system_properties(jvm) if jvm is not None else {}
    builder = (
        SparkSession.builder.remote(master)
        .config("spark.app.name", "sparkhydrogen-tests")  # the in-process server's context needs one, and an
        # earlier session of this process may have taken the JVM's (system property) with it
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.connect.grpc.binding.port", "0")
    )
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    testing = os.environ.get("SPARK_TESTING")
    os.environ["SPARK_TESTING"] = "1"
    try:
        with warnings.catch_warnings():
            # The in-process server starts with this conf; the client then sets it once more as session conf,
            # which Spark refuses (with a warning each) for the static keys: nothing to report.
            warnings.filterwarnings("ignore", r"Failed to set spark\..*CANNOT_MODIFY_CONFIG", UserWarning)
            session = builder.getOrCreate()
        try:
            yield session
        finally:
            session.stop()  # local mode: also stops the in-process server's SparkContext
    finally:
        if testing is None:
            os.environ.pop("SPARK_TESTING", None)
        else:
            os.environ["SPARK_TESTING"] = testing
        server = SparkContext._active_spark_context
        if server is not None:
            server.stop()
        jvm = SparkContext._jvm
        if jvm is not None:
            system = jvm.java.lang.System
            for key, value in _spark_system_properties(jvm).items():
                if key not in before:
                    system.clearProperty(key)
                elif before[key] != value:
                    system.setProperty(key, before[key])
