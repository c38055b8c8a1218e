"""Start and stop real SparkSessions for tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from pyspark.sql import SparkSession


@contextmanager
def spark_session(master: str, **conf: str) -> Iterator[SparkSession]:
    """A SparkSession on ``master`` that is stopped (and its local-cluster work dir removed) afterwards."""
    builder = (
        SparkSession.builder.master(master)
        .appName("sparkhydrogen-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
    )
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    app_id = spark.sparkContext.applicationId
    jvm = spark.sparkContext._jvm
    try:
        yield spark
    finally:
        spark.stop()
        # The session that launched the JVM left its conf there as Java system properties, which every
        # later SparkContext in this process would inherit: clear what this session set.
        for key in conf:
            jvm.java.lang.System.clearProperty(key)
        if master.startswith("local-cluster"):
            import pyspark

            work = os.path.join(os.path.dirname(pyspark.__file__), "work", app_id)
            shutil.rmtree(work, ignore_errors=True)


def wait_for_executors(sc: object, count: int, timeout: float = 90.0) -> None:
    """Block until ``count`` executors have registered (the cluster's own readiness signal)."""
    import time

    jsc = sc._jsc.sc()  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while len(jsc.statusTracker().getExecutorInfos()) - 1 < count:  # the driver is listed too
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} executors did not register within {timeout} s")
        time.sleep(0.2)
