"""Horovod + PyTorch on spark-hydrogen: data-parallel training of a small classifier on 2 ranks.

Needs torch and Horovod (``make horovod`` builds Horovod 0.28.1 against the venv's torch).
Run: ``.venv/bin/python examples/horovod_torch.py``
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from pyspark.sql import SparkSession  # noqa: E402

import sparkhydrogen.horovod as h2hvd  # noqa: E402


def train(epochs: int = 30) -> dict:
    import horovod.torch as hvd
    import torch

    hvd.init()
    torch.manual_seed(0)
    # a synthetic 3-class problem; every rank takes its own shard of each batch
    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.5]])
    y = torch.randint(0, 3, (3000,), generator=g)
    x = centers[y] + torch.randn(3000, 2, generator=g)
    x, y = x[hvd.rank()::hvd.size()], y[hvd.rank()::hvd.size()]

    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1 * hvd.size()),
                                   named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for epoch in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if hvd.rank() == 0 and epoch % 10 == 0:
            print(f"epoch {epoch}: loss {loss.item():.3f}", flush=True)
    correct = hvd.allreduce(torch.tensor([(model(x).argmax(1) == y).float().sum().item()]), op=hvd.Sum)
    return {"rank": hvd.rank(), "size": hvd.size(), "accuracy": correct.item() / 3000}


def main() -> None:
    spark = SparkSession.builder.master("local[2]").appName("sparkhydrogen-horovod").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        results = h2hvd.run(train, num_proc=2)
        for r in results:
            print(f"rank {r['rank']} of {r['size']}: training accuracy {r['accuracy']:.3f}")
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
