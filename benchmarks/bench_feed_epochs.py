"""Cached epochs of the torch loader in one process, no Spark: rows per CPU-second vs the same tensors in a list.

The loader's hot path alone (issue 21): ``--rows`` rows of 32 float32 features + a float32
label as Arrow record batches of 10,000 rows (Spark's ``maxRecordsPerBatch``) fed to
:class:`sparkhydrogen.data.Batches` with ``cache=True`` inside ``sparkhydrogen.torch``'s
``RankDataLoader``, batches of 1024, the bench's per-batch op (``seen.index_add_``). Epoch 1
includes the one-time conversion; "in memory" is the op over an epoch's tensors held in a
list (the same batches again). Shuffled epochs also get the references a user holding the
share in memory would run, a new random order each epoch: "shuffled, per column" indexes each
column tensor by the batch's rows of a ``torch.randperm`` (what a ``TensorDataset`` with a
batch sampler does), "shuffled, one 2-D tensor" gathers the batch's rows of one ``(rows, 33)``
tensor and ``unbind`` s it into columns (``feed_common.shuffled_in_memory``). CPU time
(``time.process_time``), so a loaded machine slows the figures less than wall time would.
Each ``--tree`` runs in its own process (``PYTHONPATH=<tree>/src``), alternated ``--repeats``
times; medians.

usage: .venv/bin/python benchmarks/bench_feed_epochs.py [--rows 1000000] [--repeats 3] [--tree CHECKOUT ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def side(rows: int, shuffle: bool, epochs: int = 3) -> dict[str, Any]:
    """One tree's figures for one setting: rows per CPU-second of each epoch and of the in-memory pass."""
    import numpy as np
    import pyarrow as pa
    import torch

    from feed_common import shuffled_in_memory
    from sparkhydrogen.data import Batches, FeedOptions
    from sparkhydrogen.data.torch_feed import RankDataLoader, RankDataset

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    columns = {"label": np.arange(rows, dtype=np.float32)}
    columns.update({f"f{i}": rng.random(rows, dtype=np.float32) for i in range(32)})
    source = pa.table(columns).to_batches(max_chunksize=10_000)
    feed = Batches(lambda: iter(source), FeedOptions(batch_size=1024, cache=True, shuffle=shuffle,
                                                     equal_steps=False))
    loader = RankDataLoader(RankDataset(feed), batch_size=None, num_workers=0, collate_fn=lambda b: b)
    seen = torch.zeros(rows, dtype=torch.int32)
    ones = torch.ones(1024, dtype=torch.int32)

    def timed(batches: Any) -> float:
        start = time.process_time()
        for batch in batches:
            label = batch["label"]
            seen.index_add_(0, label.long(), ones[:label.shape[0]])
        return rows / (time.process_time() - start)

    rates = [timed(loader) for _ in range(epochs)]
    held = list(loader)
    out = {"epochs": rates, "memory": timed(held), "module": sys.modules["sparkhydrogen"].__file__}
    if shuffle:
        tensors = {name: torch.from_numpy(array) for name, array in columns.items()}
        block = torch.from_numpy(np.stack(list(columns.values()), axis=1))

        def per_column() -> Any:
            order = torch.randperm(rows)
            for at in range(0, rows, 1024):
                index = order[at:at + 1024]
                yield {name: tensor[index] for name, tensor in tensors.items()}

        out["per_column"] = timed(per_column())
        out["one_block"] = timed(shuffled_in_memory(block, list(tensors)))
    if int(seen.min()) != int(seen.max()):
        raise RuntimeError("a row came more or less often than the others")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tree", action="append", help="a checkout whose src/ to run (repeatable: an A/B)")
    parser.add_argument("--side", choices=("plain", "shuffled"), help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.side:
        print(json.dumps(side(ns.rows, ns.side == "shuffled")))
        return
    trees = ns.tree or [os.path.dirname(HERE)]
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(ns.repeats):
        for tree in trees:
            for setting in ("plain", "shuffled"):
                env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(tree), "src"))
                proc = subprocess.run([sys.executable, __file__, "--rows", str(ns.rows), "--side", setting],
                                      env=env, capture_output=True, text=True, check=True)
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                if not str(result["module"]).startswith(os.path.join(os.path.abspath(tree), "src")):
                    raise RuntimeError(f"the side for {tree} imported sparkhydrogen from {result['module']}")
                samples.setdefault((tree, setting), []).append(result)
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"{ns.rows:,} rows, batches of 1024, median of {ns.repeats}; M rows per CPU-second; load after: {load}\n")
    print("| tree | shuffle | epoch 1 | epoch 2 | epoch 3 | in memory, same batches | in memory / epoch 3 | "
          "in memory, shuffled, per column | in memory, shuffled, one 2-D tensor | epoch 3 / best shuffled in memory |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (tree, setting), runs in samples.items():
        epochs = [statistics.median(r["epochs"][i] for r in runs) / 1e6 for i in range(3)]
        memory = statistics.median(r["memory"] for r in runs) / 1e6
        line = (f"| {tree} | {setting == 'shuffled'} | {epochs[0]:.2f} | {epochs[1]:.2f} | {epochs[2]:.2f} | "
                f"{memory:.1f} | {memory / epochs[2]:.1f}x |")
        if setting == "shuffled":
            column = statistics.median(r["per_column"] for r in runs) / 1e6
            block = statistics.median(r["one_block"] for r in runs) / 1e6
            line += f" {column:.2f} | {block:.2f} | {epochs[2] / max(column, block):.2f}x |"
        else:
            line += "  |  |  |"
        print(line)


if __name__ == "__main__":
    main()
