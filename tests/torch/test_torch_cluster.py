"""sparkhydrogen.torch.run across real executor JVMs: local-cluster[2,1,1024], with GPUs "discovered".

There is no GPU here. The workers run a real Spark resource discovery script that
hands out GPU addresses 0 and 1 (one per worker), and every executor runs with
CUDA_VISIBLE_DEVICES=3,5, so Spark address 0 means device 3 and address 1 device 5.
The tests check what each rank was given; training itself runs on the CPU.
"""

from __future__ import annotations

import json
import os
import select
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2

pytest.importorskip("torch")
import sparkhydrogen.torch as h2torch  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

DISCOVERY = """\
#!{python}
# Spark GPU discovery: each call (one per worker) gets the next address, 0 then 1.
import fcntl, json
with open({counter!r}, "a+") as fh:
    fcntl.flock(fh, fcntl.LOCK_EX)
    fh.seek(0)
    calls = len(fh.read())
    fh.write("x")
print(json.dumps({{"name": "gpu", "addresses": [str(calls % 2)]}}))
"""


@pytest.fixture(scope="module")
def sc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("gpus")
    script = folder / "discover_gpus.py"
    script.write_text(DISCOVERY.format(python=sys.executable, counter=str(folder / "calls")))
    script.chmod(0o755)
    conf = {
        "spark.executor.memory": "512m",
        "spark.worker.resource.gpu.amount": "1",
        "spark.worker.resource.gpu.discoveryScript": str(script),
        "spark.executor.resource.gpu.amount": "1",
        "spark.executor.resource.gpu.discoveryScript": str(script),
        "spark.task.resource.gpu.amount": "1",
        "spark.executorEnv.CUDA_VISIBLE_DEVICES": "3,5",
    }
    with spark_session("local-cluster[2,1,1024]", **conf) as spark:
        system = spark.sparkContext._jvm.java.lang.System
        yield spark.sparkContext
    # When this session started the JVM, spark-submit made its conf Java system properties, which
    # every later SparkContext of this process would inherit (tasks needing GPUs that local[N] lacks).
    for key in conf:
        system.clearProperty(key)


def test_all_reduce_across_two_executor_jvms_sharing_a_host(sc: Any) -> None:
    def train() -> dict[str, Any]:
        import os

        import torch
        import torch.distributed as dist

        import sparkhydrogen as h2

        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        ctx = h2.BarrierTaskContext.get()
        return {"sum": t.item(), "pid": os.getpid(), "executor": ctx.getTaskInfos()[ctx.rank()].address,
                "env": {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")}}

    out = h2torch.run(train, num_processes=2, return_all=True)
    assert [o["sum"] for o in out] == [3.0, 3.0]
    assert len({o["executor"] for o in out}) == 2 and len({o["pid"] for o in out}) == 2  # two JVMs, two workers
    # both executors are on 127.0.0.1: one host, two local ranks
    assert [o["env"] for o in out] == [
        {"RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0"},
        {"RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0"}]


def test_discovered_gpus_map_through_cuda_visible_devices(sc: Any, tmp_path: Path) -> None:
    def addresses() -> list[str]:
        import sparkhydrogen as h2

        return list(h2.BarrierTaskContext.get().resources()["gpu"].addresses)

    assert sorted(a for task in h2.run(addresses, 2) for a in task) == ["0", "1"]  # the script's GPUs, one per task

    script = tmp_path / "show_gpu.py"  # a script touches no CUDA here, so it runs on this GPU-less machine
    script.write_text(textwrap.dedent("""
        import json, os, sys
        keys = ("RANK", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES", "SPARKHYDROGEN_TORCH_DEVICE")
        with open(os.path.join(sys.argv[1], os.environ["RANK"] + ".json"), "w") as fh:
            json.dump({k: os.environ[k] for k in keys}, fh)
    """))
    h2torch.run(str(script), str(tmp_path), num_processes=2, use_gpu=True)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    visible = {s["CUDA_VISIBLE_DEVICES"] for s in seen}
    assert visible in ({"3,5"}, {"5,3"})  # the host's GPUs (addresses 0, 1 -> devices 3, 5) in local-rank order
    assert [s["SPARKHYDROGEN_TORCH_DEVICE"] for s in seen] == [f"cuda:{s['LOCAL_RANK']}" for s in seen]

    def train() -> None:
        pass

    # in the task's own worker the rank sees only its device (address N -> device 3 or 5), so it is cuda:0;
    # then the launcher refuses clearly, since this torch has no CUDA
    with pytest.raises(h2.GangFailedError, match=r"GpuAssignmentError: use_gpu=True and this rank was assigned "
                                                 r"cuda:0 \(CUDA_VISIBLE_DEVICES='[35]'\), but "
                                                 r"torch.cuda.is_available\(\) is False") as info:
        h2torch.run(train, num_processes=2, use_gpu=True, backend="gloo")
    assert info.value.failed_rank in (0, 1)


def test_an_aborted_gang_leaves_no_training_process_behind(sc: Any, tmp_path: Path) -> None:
    def train(folder: str) -> None:
        import os
        import signal
        import threading

        import torch.distributed as dist

        with open(os.path.join(folder, f"child-{dist.get_rank()}"), "w") as fh:
            fh.write(str(os.getpid()))
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the training process dies hard
        threading.Event().wait()  # rank 0 is busy with something that would never end

    with pytest.raises(h2.GangFailedError, match=r"rank 1 raised .*TorchLaunchError: rank 1's training process "
                                                 r"ended with signal SIGKILL") as info:
        h2torch.run(train, str(tmp_path), num_processes=2, use_subprocess=True)
    assert info.value.failed_rank == 1
    # rank 0's child goes too: Spark kills the cancelled task's worker, and the child dies with it
    pid = int((tmp_path / "child-0").read_text())
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone
    try:
        ready, _, _ = select.select([fd], [], [], 120)  # readable when the process has exited
        assert ready, f"rank 0's training process {pid} is still running"
    finally:
        os.close(fd)
