"""Train a small classifier with DistributedDataParallel on 4 ranks, and check it really averaged.

    .venv/bin/pip install 'spark-hydrogen[torch]' scikit-learn
    .venv/bin/python examples/torch_ddp.py

Data: scikit-learn's handwritten digits (1797 8x8 images, shipped inside the package).
Every step draws one global batch; rank r trains on its r-th quarter of it. DDP
averages the four ranks' gradients, so after N steps the parameters must equal
those of one process trained on the whole global batches -- which this script checks.
"""

from __future__ import annotations

import os
import sys
from typing import Any

STEPS = 30
GLOBAL_BATCH = 64
LEARNING_RATE = 0.1
SEED = 0


def global_batches(steps: int = STEPS, batch: int = GLOBAL_BATCH, seed: int = SEED) -> tuple[Any, Any, Any]:
    """The digits data set (scaled to [0, 1]) and, per step, the sample indices of that step's global batch."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(x)) for _ in range(steps * batch // len(x) + 1)])
    return x, y, order[: steps * batch].reshape(steps, batch)


def make_model() -> Any:
    """The same initial weights everywhere (DDP broadcasts rank 0's anyway)."""
    import torch

    torch.manual_seed(SEED)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def train_ddp(steps: int = STEPS, batch: int = GLOBAL_BATCH, lr: float = LEARNING_RATE) -> dict[str, Any]:
    """One rank of DDP training (runs with torch.distributed initialised by sparkhydrogen.torch.run)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import sparkhydrogen.torch as h2torch

    rank, world = dist.get_rank(), dist.get_world_size()
    if batch % world:
        raise ValueError(f"the global batch ({batch}) must split evenly over {world} ranks")
    x, y, batches = global_batches(steps, batch)
    device = h2torch.device()
    model = DistributedDataParallel(make_model().to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    share = batch // world
    for step, indices in enumerate(batches):
        mine = indices[rank * share:(rank + 1) * share]
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[mine]).to(device)),
                                                 torch.from_numpy(y[mine]).to(device))
        loss.backward()  # DDP all-reduces (averages) the gradients here
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d} local loss {loss.item():.4f}")
    return {name: t.detach().cpu() for name, t in model.module.state_dict().items()}


def train_single(steps: int = STEPS, batch: int = GLOBAL_BATCH, lr: float = LEARNING_RATE,
                 shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """The same training in one process on the whole global batches (or only on ``shard=(rank, world)``)."""
    import torch

    x, y, batches = global_batches(steps, batch)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for indices in batches:
        if shard is not None:
            rank, world = shard
            indices = indices[rank * (batch // world):(rank + 1) * (batch // world)]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x[indices])), torch.from_numpy(y[indices])).backward()
        optimizer.step()
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main() -> int:
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    import torch
    from pyspark.sql import SparkSession

    import sparkhydrogen.torch as h2torch

    spark = (SparkSession.builder.master("local[4]").appName("sparkhydrogen-torch-ddp")
             .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    try:
        ddp = h2torch.run(train_ddp, num_processes=4)
    finally:
        spark.stop()
    single = train_single()
    alone = train_single(shard=(0, 4))
    same = all(torch.allclose(ddp[k], single[k], rtol=1e-4, atol=1e-6) for k in ddp)
    print(f"DDP on 4 ranks vs one process on the same global batches: max |difference| "
          f"{max_difference(ddp, single):.2e} -> {'equal' if same else 'DIFFERENT'}")
    print(f"(rank 0's quarter alone would differ by {max_difference(ddp, alone):.2e})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
