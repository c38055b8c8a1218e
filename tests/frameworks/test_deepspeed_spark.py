"""DeepSpeed under sparkhydrogen.torch.run on real Spark (local[2]), on CPU: ``deepspeed.init_distributed()``
finds its environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK) from the launcher.

Runs as a torchrun-style script (a fresh process per rank, process group not yet initialised), so
DeepSpeed sets it up itself. DeepSpeed's CPU shared-memory op is built by ``make frameworks`` at install, not here.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sparkutil import spark_session

pytest.importorskip("deepspeed")
torch = pytest.importorskip("torch")
import sparkhydrogen.torch as h2torch  # noqa: E402

pytestmark = [pytest.mark.spark, pytest.mark.timeout(420)]

SCRIPT = """
import json, os, sys
import torch, deepspeed
import torch.distributed as dist

assert not dist.is_initialized()
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = torch.nn.Linear(2, 1)
config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
          "zero_optimization": {"stage": 0}}
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
x = torch.arange(8, dtype=torch.float32).reshape(4, 2)[dist.get_rank() * 2:][:2] / 10
engine.backward(engine(x).pow(2).mean())
engine.step()
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as fh:
    json.dump({"world": dist.get_world_size(), "rank": dist.get_rank(), "local_rank": os.environ["LOCAL_RANK"],
               "params": [p.detach().flatten().tolist() for p in model.parameters()]}, fh)
"""


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local[2]") as spark:
        yield spark.sparkContext


def test_deepspeed_finds_its_environment_and_averages_like_one_process(sc: Any, tmp_path: Path) -> None:
    script = tmp_path / "ds_train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    assert h2torch.run(str(script), str(tmp_path), num_processes=2) is None
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(o["world"], o["rank"], o["local_rank"]) for o in out] == [(2, 0, "0"), (2, 1, "1")]
    assert out[0]["params"] == out[1]["params"]

    torch.manual_seed(0)  # one process, the global batch of both ranks
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.arange(8, dtype=torch.float32).reshape(4, 2) / 10).pow(2).mean().backward()
    opt.step()
    for got, want in zip(out[0]["params"], [p.detach().flatten().tolist() for p in model.parameters()], strict=True):
        assert got == pytest.approx(want, abs=1e-6)
