"""sparkhydrogen.torch.run(use_gpu=True) on real GPUs: nccl collectives and a DDP step (skipped without CUDA)."""

from __future__ import annotations

from typing import Any

import pytest

import sparkhydrogen.torch as h2torch

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def test_one_gpu_nccl_all_reduce(gpu_cluster: Any) -> None:
    def train() -> dict[str, Any]:
        import os

        import torch
        import torch.distributed as dist

        import sparkhydrogen.torch as h2torch

        device = h2torch.device()
        t = torch.ones(1, device=device) * 3
        dist.all_reduce(t)
        return {"sum": t.item(), "device": str(device), "backend": dist.get_backend(),
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "count": torch.cuda.device_count()}

    out = h2torch.run(train, num_processes=1, use_gpu=True)
    # the rank sees exactly its GPU, so it is cuda:0 of its process
    assert out == {"sum": 3.0, "device": "cuda:0", "backend": "nccl", "visible": "0", "count": 1}


def test_one_gpu_ddp_step(gpu_cluster: Any) -> None:
    def train() -> list[float]:
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP

        import sparkhydrogen.torch as h2torch

        device = h2torch.device()
        torch.manual_seed(0)
        model = DDP(torch.nn.Linear(4, 1).to(device), device_ids=[device.index])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(8, 4, device=device), torch.randn(8, 1, device=device)
        losses = []
        for _ in range(2):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    first, second = h2torch.run(train, num_processes=1, use_gpu=True)
    assert second < first


def test_one_gpu_in_a_training_process(gpu_cluster: Any) -> None:
    def train() -> str:
        import torch
        import torch.distributed as dist

        import sparkhydrogen.torch as h2torch

        t = torch.ones(1, device=h2torch.device())
        dist.all_reduce(t)
        return str(t.device)

    assert h2torch.run(train, num_processes=1, use_gpu=True, use_subprocess=True) == "cuda:0"


def test_local_mode_on_the_drivers_gpu(gpu_cluster: Any) -> None:
    def train() -> str:
        import torch
        import torch.distributed as dist

        import sparkhydrogen.torch as h2torch

        t = torch.ones(1, device=h2torch.device())
        dist.all_reduce(t)
        return str(t.device)

    assert h2torch.run(train, num_processes=1, use_gpu=True, local_mode=True).startswith("cuda:")


@pytest.mark.gpus(2)
def test_two_gpus_two_ranks(gpu_cluster: Any) -> None:
    def train() -> dict[str, Any]:
        import os

        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        import sparkhydrogen.torch as h2torch

        device = h2torch.device()
        t = torch.tensor([float(dist.get_rank() + 1)], device=device)
        dist.all_reduce(t)
        torch.manual_seed(0)
        model = DDP(torch.nn.Linear(4, 1).to(device), device_ids=[device.index])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1 + dist.get_rank())  # different data per rank; DDP keeps the weights equal
        x, y = torch.randn(8, 4, device=device), torch.randn(8, 1, device=device)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        weights = torch.cat([p.detach().flatten() for p in model.parameters()]).cpu().tolist()
        return {"sum": t.item(), "device": str(device), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "weights": weights}

    out = h2torch.run(train, num_processes=2, use_gpu=True, return_all=True)
    assert [o["sum"] for o in out] == [3.0, 3.0]
    assert {o["device"] for o in out} == {"cuda:0"}  # each rank sees only its own GPU
    assert sorted(o["visible"] for o in out) == ["0", "1"]
    assert out[0]["weights"] == pytest.approx(out[1]["weights"])

    def child() -> dict[str, Any]:
        import os

        import torch
        import torch.distributed as dist

        import sparkhydrogen.torch as h2torch

        t = torch.ones(1, device=h2torch.device())
        dist.all_reduce(t)
        return {"sum": t.item(), "device": str(t.device), "visible": os.environ["CUDA_VISIBLE_DEVICES"],
                "local_rank": os.environ["LOCAL_RANK"]}

    # training processes see the host's GPUs in local-rank order: cuda:LOCAL_RANK is their own, as under torchrun
    seen = h2torch.run(child, num_processes=2, use_gpu=True, use_subprocess=True, return_all=True)
    assert [s["sum"] for s in seen] == [2.0, 2.0]
    assert [s["device"] for s in seen] == [f"cuda:{s['local_rank']}" for s in seen]
    assert len({s["visible"] for s in seen}) == 1
