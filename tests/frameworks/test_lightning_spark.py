"""Lightning under sparkhydrogen.torch.run on real Spark (local[2]): DDP on CPU with the launcher's ClusterEnvironment.

Functions shipped to ranks are defined inside the tests (workers cannot import test modules).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2

pytest.importorskip("lightning")
torch = pytest.importorskip("torch")
import sparkhydrogen.torch as h2torch  # noqa: E402

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

SAMPLES, PER_RANK_BATCH, LR, EPOCHS = 8, 2, 0.1, 2


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local[2]") as spark:
        yield spark.sparkContext


def data() -> tuple[Any, Any]:
    x = torch.arange(SAMPLES * 2, dtype=torch.float32).reshape(SAMPLES, 2) / 10
    return x, x @ torch.tensor([[2.0], [-1.0]]) + 0.5


def fit_function(plugin: bool, num_nodes: int = 2, devices: int = 1) -> Callable[[], list[list[float]]]:
    x, y = data()

    def fit() -> list[list[float]]:
        import lightning.pytorch as pl
        import torch

        import sparkhydrogen.torch as h2torch

        class Linear(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.layer = torch.nn.Linear(2, 1)
                with torch.no_grad():
                    self.layer.weight.fill_(0.5)
                    self.layer.bias.fill_(0.0)

            def training_step(self, batch: Any, index: int) -> Any:
                inputs, targets = batch
                return torch.nn.functional.mse_loss(self.layer(inputs), targets)

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=LR)

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=PER_RANK_BATCH)
        trainer = pl.Trainer(strategy="ddp", accelerator="cpu", num_nodes=num_nodes, devices=devices,
                             max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False,
                             plugins=[h2torch.lightning_environment()] if plugin else None)
        trainer.fit(Linear(), loader)
        return [p.detach().flatten().tolist() for p in trainer.lightning_module.parameters()]

    return fit


def single_process_reference() -> list[list[float]]:
    """Plain SGD in this process on the global batches DDP forms.

    Lightning gives each rank a ``DistributedSampler`` (shuffled for training, seed 0, epoch
    ``e``): rank ``r`` takes ``perm[r::2]`` of the epoch's permutation, so its ``k``-th batch
    and its peer's together are ``perm[4k:4k+4]``.
    """
    x, y = data()
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(0.5)
        layer.bias.fill_(0.0)
    opt = torch.optim.SGD(layer.parameters(), lr=LR)
    global_batch = PER_RANK_BATCH * 2
    for epoch in range(EPOCHS):
        perm = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(epoch)).tolist()
        for start in range(0, SAMPLES, global_batch):
            batch = perm[start:start + global_batch]
            opt.zero_grad()
            torch.nn.functional.mse_loss(layer(x[batch]), y[batch]).backward()
            opt.step()
    return [p.detach().flatten().tolist() for p in layer.parameters()]


def test_ddp_fit_on_two_ranks_equals_one_process_on_the_same_global_batches(sc: Any) -> None:
    out = h2torch.run(fit_function(plugin=True), num_processes=2, return_all=True)
    assert out[0] == out[1]  # identical parameters on both ranks
    want = single_process_reference()
    assert want != [[0.5, 0.5], [0.0]]  # it trained
    for got, ref in zip(out[0], want, strict=True):
        assert got == pytest.approx(ref, abs=1e-5)


def test_without_the_environment_lightning_fails_with_what_to_pass(sc: Any) -> None:
    with pytest.raises(h2.GangFailedError, match=r"rank 1 raised .*TorchLaunchError: Lightning took LOCAL_RANK as an "
                                                 r"index.*plugins=\[sparkhydrogen\.torch\.lightning_environment\(\)\]"):
        h2torch.run(fit_function(plugin=False), num_processes=2)


@pytest.mark.parametrize(("num_nodes", "devices"), [(3, 1), (1, 2)])
def test_a_wrong_num_nodes_or_devices_fails_at_once_saying_what_to_set(sc: Any, num_nodes: int, devices: int) -> None:
    with pytest.raises(h2.GangFailedError, match=r"Trainer\(.*\) does not fit this launch: sparkhydrogen\.torch\.run "
                                                 r"started 2 rank\(s\), one device each, so set "
                                                 r"Trainer\(devices=1, num_nodes=2\)"):
        h2torch.run(fit_function(plugin=True, num_nodes=num_nodes, devices=devices), num_processes=2)
