"""One ``spark`` fixture over the three kinds of session a user may hand us.

``local[4]`` (classic, one JVM), ``local-cluster[2,1,1024]`` (classic, two real executor JVMs)
and Spark Connect (``SparkSession.builder.remote("local[2]")``: a Connect server inside this
process, the client talks gRPC to it and has no RDD API).

The fixture is module-scoped and parametrized, so pytest runs a module's tests grouped by
kind and tears each session down before the next kind starts: one SparkContext per process
at a time. Modules that build their own session (``sparkutil.spark_session``) define their
own ``spark``/``sc`` fixture, which overrides this one; this fixture refuses to start while
another SparkContext is still alive rather than silently reusing it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sparkutil import spark_session, wait_for_executors

#: ids of the session kinds, in the order pytest runs them
KINDS = ("local[4]", "local-cluster[2,1,1024]", "connect")

#: What ``SparkSession.builder.remote(...)`` starts the in-process Connect server with.
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


@pytest.fixture(scope="module", params=KINDS)
def spark(request: Any) -> Iterator[Any]:
    """A SparkSession of one kind per parameter (classic ``local[4]``, ``local-cluster``, Connect)."""
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


def _connect_session() -> Iterator[Any]:
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    # The local Connect server is an ordinary SparkContext started in this process; if it is the
    # session that launches the JVM, its conf (spark.plugins = the Connect plugin, ...) stays behind
    # as Java system properties that every later SparkContext would inherit. Put them back afterwards.
    jvm = SparkContext._jvm
    before = _spark_system_properties(jvm) if jvm is not None else {}
    session = (
        SparkSession.builder.remote(CONNECT_MASTER)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .getOrCreate()
    )
    try:
        yield session
    finally:
        session.stop()  # local mode: also stops the in-process server's SparkContext
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
