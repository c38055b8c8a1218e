"""What both sides of the loader benchmark share: the DataFrame, the per-batch op, the exactly-once tally, RSS.

Imports neither sparkhydrogen nor anything newer than pyspark 3.5 / pyarrow 15 / numpy 1.x: the Petastorm
side (``bench_data_petastorm.py``) runs it in its own environment (``make bench-petastorm-env``).
"""

from __future__ import annotations

import base64
import time
from typing import Any

__all__ = ["BATCH", "FEATURES", "Tally", "feature_frame", "peak_rss", "reset_peak", "session", "union_check"]

#: Rows per batch the loaders yield, and the feature columns (``f0`` ... ``f31``, float) beside ``label``.
BATCH = 1024
FEATURES = 32


def reset_peak() -> None:
    """Start this process's ``VmHWM`` afresh (Linux: writing 5 to clear_refs resets the peak RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """This process's peak resident set (bytes) since the last :func:`reset_peak`."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def session(master: str, **conf: str) -> Any:
    """A quiet local SparkSession on loopback with Arrow on."""
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.master(master).config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.driver.memory", "2g")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true"))
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def feature_frame(spark: Any, rows: int, partitions: int) -> Any:
    """``rows`` rows: ``label`` (the row's id as a float, unique below 2**24) and 32 uniform random floats."""
    from pyspark.sql import functions as F

    if rows >= 2**24:
        raise ValueError("the label is the row id as a float32: at most 16,777,215 rows")
    df = spark.range(0, rows, 1, partitions)
    columns = [F.col("id").cast("float").alias("label")]
    columns += [F.rand(seed=i).cast("float").alias(f"f{i}") for i in range(FEATURES)]
    return df.select(*columns)


class Tally:
    """Counts how often each label (row id) was seen in an epoch: the trivial torch op done per batch."""

    def __init__(self, rows: int) -> None:
        import torch

        self.seen = torch.zeros(rows, dtype=torch.int32)
        self.ones = torch.ones(BATCH, dtype=torch.int32)
        self.rows = 0

    def add(self, label: Any) -> None:
        """One batch's ``label`` tensor: ``seen[label] += 1``."""
        n = int(label.shape[0])
        ones = self.ones if n == BATCH else self.ones[:n]
        self.seen.index_add_(0, label.long(), ones)
        self.rows += n

    def result(self, start: float, end: float) -> dict[str, Any]:
        """The epoch's figures, with the set of rows seen exactly once (a packed bitmap) for the driver to join."""
        import numpy as np

        seen = self.seen.numpy()
        once = np.packbits(seen == 1)
        out = {"start": start, "end": end, "rows": self.rows, "dups": int((seen > 1).sum()),
               "once": base64.b64encode(once.tobytes()).decode()}
        self.seen.zero_()
        self.rows = 0
        return out


def union_check(epochs: list[dict[str, Any]], rows: int) -> bool:
    """Whether the ranks' epochs together saw every row exactly once (each rank's dict from :meth:`Tally.result`)."""
    import numpy as np

    total = np.zeros((rows + 7) // 8, dtype=np.uint8)
    count = 0
    for epoch in epochs:
        if epoch["dups"]:
            return False
        bits = np.frombuffer(base64.b64decode(epoch["once"]), dtype=np.uint8)
        if np.any(total & bits):
            return False
        total |= bits
        count += epoch["rows"]
    return count == rows and int(np.unpackbits(total)[:rows].sum()) == rows


def shuffled_in_memory(block: Any, names: list[str], batch: int = BATCH) -> Any:
    """A shuffled epoch over a share already in memory as one ``(rows, columns)`` tensor.

    What a user holding the share as tensors would run: each batch's rows gathered by a new
    ``torch.randperm`` and ``unbind`` into a dict of columns (the reference for our shuffled epochs).
    """
    import torch

    order = torch.randperm(block.shape[0])
    for at in range(0, block.shape[0], batch):
        yield dict(zip(names, block[order[at:at + batch]].unbind(1), strict=True))


def now() -> float:
    """Wall-clock seconds, comparable across the processes of one machine."""
    return time.time()
