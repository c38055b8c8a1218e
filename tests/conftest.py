"""Shared test set-up: real Spark (no mocks), loopback only, every process stopped."""

from __future__ import annotations

import os
import sys

# Executors' Python workers must run this interpreter (it has sparkhydrogen installed),
# and every server binds loopback.
os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
