"""Horovod for real (gloo, CPU) through sparkhydrogen.horovod.run on local[N] and local-cluster."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2
import sparkhydrogen.horovod as h2hvd

pytest.importorskip("torch")
pytest.importorskip("horovod.torch")  # built by `make horovod`, which `make test` runs first

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local[4]") as spark:
        yield spark.sparkContext


@pytest.mark.parametrize("num_proc", [2, 4])
def test_allreduce_and_broadcast_parameters(sc: Any, num_proc: int) -> None:
    def fn(scale: float) -> dict[str, Any]:
        import horovod.torch as hvd
        import torch

        hvd.init()
        total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1) * scale]), op=hvd.Sum)
        model = torch.nn.Linear(3, 1)
        if hvd.rank() == 0:
            with torch.no_grad():
                model.weight.fill_(0.25)
                model.bias.fill_(-1.0)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return {"rank": hvd.rank(), "size": hvd.size(), "local": (hvd.local_rank(), hvd.local_size()),
                "total": total.item(), "w": model.weight.flatten().tolist(), "b": model.bias.item()}

    out = h2hvd.run(fn, args=(2.0,), num_proc=num_proc, spark=sc)
    expected_total = 2.0 * sum(range(1, num_proc + 1))
    assert [o["rank"] for o in out] == list(range(num_proc))
    for o in out:
        assert o["size"] == num_proc and o["total"] == expected_total
        assert o["local"] == (o["rank"], num_proc)  # local[N]: every rank on one host
        assert o["w"] == [0.25, 0.25, 0.25] and o["b"] == -1.0


def test_distributed_optimizer_matches_single_process(sc: Any) -> None:
    def make_data() -> Any:
        import torch

        g = torch.Generator().manual_seed(7)
        x = torch.randn(64, 5, generator=g)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0], [3.0]]) + 0.1 * torch.randn(64, 1, generator=g)
        return x, y

    def train(steps: int) -> list[float]:
        import horovod.torch as hvd
        import torch

        hvd.init()
        torch.manual_seed(0)
        x, y = make_data()
        model = torch.nn.Linear(5, 1)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        shard = slice(hvd.rank() * 32, (hvd.rank() + 1) * 32)  # each rank: its half of every global batch
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
            opt.step()  # gradients averaged over ranks
        return [p.item() for p in model.parameters() for p in p.flatten()]

    distributed = h2hvd.run(train, args=(20,), num_proc=2, spark=sc)

    import torch

    torch.manual_seed(0)
    x, y = make_data()
    model = torch.nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()  # the same global batch in one process
        opt.step()
    single = [p.item() for p in model.parameters() for p in p.flatten()]
    assert distributed[0] == pytest.approx(distributed[1])
    assert distributed[0] == pytest.approx(single, rel=1e-5, abs=1e-6)


def test_rank_failure_aborts_and_retries_recover(sc: Any) -> None:
    def fn() -> float:
        import horovod.torch as hvd
        import torch

        ctx = h2.BarrierTaskContext.get()
        if ctx.gangAttempt() == 0 and ctx.rank() == 1:
            raise RuntimeError("rank 1 lost its data shard")
        hvd.init()
        return hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum).item()

    with pytest.raises(h2.GangFailedError, match="rank 1 raised RuntimeError: rank 1 lost its data shard"):
        h2hvd.run(fn, num_proc=2, spark=sc)
    assert h2hvd.run(fn, num_proc=2, max_retries=1, retry_backoff=0.1, spark=sc) == [2.0, 2.0]


def test_bad_arguments(sc: Any) -> None:
    with pytest.raises(TypeError, match="fn must be callable"):
        h2hvd.run("train", spark=sc)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_proc must be a positive int"):
        h2hvd.run(lambda: 0, num_proc=0, spark=sc)


def test_an_elastic_range_starts_at_the_slots_there_are(sc: Any) -> None:
    """``num_proc=(2, 8)`` on local[4]: Horovod is initialised at the 4 ranks the slots hold."""

    def fn() -> tuple[int, int, float]:
        import horovod.torch as hvd
        import torch

        hvd.init()
        return hvd.rank(), hvd.size(), hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum).item()

    out = h2hvd.run(fn, num_proc=(2, 8), spark=sc)
    assert out == [(rank, 4, 4.0) for rank in range(4)]
