"""sparkhydrogen.torch.run on real Spark (local[4]) with real torch (gloo on CPU).

Functions shipped to ranks are defined inside the tests (workers cannot import test modules).
"""

from __future__ import annotations

import io
import os
import runpy
import socket
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2

pytest.importorskip("torch")
import sparkhydrogen.torch as h2torch  # noqa: E402

pytestmark = [pytest.mark.spark, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
            "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local[4]") as spark:
        yield spark.sparkContext


def test_function_runs_in_each_barrier_task_with_torch_distributed_initialised(sc: Any) -> None:
    def train(scale: float, offset: float = 0.0) -> dict[str, Any]:
        import os

        import torch
        import torch.distributed as dist

        import sparkhydrogen as h2
        import sparkhydrogen.torch as h2torch

        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        return {"sum": t.item() * scale + offset, "env": {k: os.environ[k] for k in ENV_KEYS}, "pid": os.getpid(),
                "task_rank": h2.BarrierTaskContext.get().rank(), "backend": dist.get_backend(),
                "device": str(h2torch.device())}

    out = h2torch.run(train, 2.0, num_processes=3, offset=1.0, return_all=True)
    assert [o["sum"] for o in out] == [13.0, 13.0, 13.0]  # (1 + 2 + 3) * 2 + 1
    assert [o["task_rank"] for o in out] == [0, 1, 2]  # in the barrier task's own Python worker
    assert len({o["pid"] for o in out} | {os.getpid()}) == 4
    assert {o["backend"] for o in out} == {"gloo"} and {o["device"] for o in out} == {"cpu"}
    envs = [o["env"] for o in out]
    assert [(e["RANK"], e["LOCAL_RANK"]) for e in envs] == [("0", "0"), ("1", "1"), ("2", "2")]  # one host
    assert {(e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["GROUP_RANK"], e["NODE_RANK"]) for e in envs} == {
        ("3", "3", "0", "0")}
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1 and envs[0]["MASTER_ADDR"] == "127.0.0.1"

    # by default: rank 0's value; and the process group and environment were cleaned up in the reused workers
    assert h2torch.run(train, 1.0, num_processes=2)["sum"] == 3.0

    def leftovers() -> tuple[bool, list[str]]:
        import os

        import torch.distributed as dist

        return dist.is_initialized(), [k for k in ENV_KEYS if k in os.environ]

    assert h2.run(leftovers, 4) == [(False, [])] * 4


def test_function_in_a_child_process(sc: Any) -> None:
    def train() -> dict[str, Any]:
        import os

        import torch
        import torch.distributed as dist

        t = torch.ones(1)
        dist.all_reduce(t)
        return {"sum": t.item(), "pid": os.getpid(), "rank": dist.get_rank(),
                "agent_store": os.environ["TORCHELASTIC_USE_AGENT_STORE"], "cuda": os.environ["CUDA_VISIBLE_DEVICES"]}

    out = h2torch.run(train, num_processes=2, use_subprocess=True, return_all=True)
    assert [(o["sum"], o["rank"]) for o in out] == [(2.0, 0), (2.0, 1)]
    assert {o["agent_store"] for o in out} == {"True"} and {o["cuda"] for o in out} == {""}  # CPU: GPUs hidden

    def worker_pids() -> int:
        import os

        return os.getpid()

    assert not {o["pid"] for o in out} & set(h2.run(worker_pids, 4))


SCRIPT = """
import argparse, json, os, sys
import torch, torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--out")
parser.add_argument("--scale", type=float)
args = parser.parse_args()
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank())])
dist.all_reduce(t)
with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as fh:
    json.dump({"sum": t.item() * args.scale, "argv": sys.argv[1:], "name": __name__,
               "env": {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}}, fh)
print(f"script rank {dist.get_rank()} done")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("local_mode", [False, True], ids=["tasks", "local_mode"])
def test_script_with_arguments(sc: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str], local_mode: bool) -> None:
    import json

    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out = tmp_path / "out"
    out.mkdir()
    assert h2torch.run(str(script), "--out", str(out), "--scale", 2, num_processes=2, local_mode=local_mode) is None
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["sum"] for r in results] == [2.0, 2.0]
    assert {tuple(r["argv"]) for r in results} == {("--out", str(out), "--scale", "2")}  # arguments as strings
    assert {r["name"] for r in results} == {"__main__"}
    assert [r["env"] for r in results] == [{"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"},
                                           {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}]
    printed = capfd.readouterr().out
    assert "[rank 0] script rank 0 done" in printed and "[rank 1] script rank 1 done" in printed


def test_a_failing_rank_aborts_the_gang_and_is_named(sc: Any) -> None:
    def train() -> None:
        import torch
        import torch.distributed as dist

        if dist.get_rank() == 1:
            raise ValueError("bad batch on rank 1")
        dist.all_reduce(torch.ones(1))  # rank 1 never joins: this must not hang

    with pytest.raises(h2.GangFailedError, match=r"torch.run\(.*train\)' failed: rank 1 raised ValueError: "
                                                r"bad batch on rank 1") as info:
        h2torch.run(train, num_processes=2)
    assert info.value.failed_rank == 1
    assert 'raise ValueError("bad batch on rank 1")' in str(info.value)  # the rank's traceback

    def ok() -> int:
        import torch.distributed as dist

        return dist.get_world_size()

    assert h2torch.run(ok, num_processes=2) == 2  # the workers and the coordinator carry on


def test_a_failing_script_is_named_with_its_exit_code(sc: Any, tmp_path: Path) -> None:
    script = tmp_path / "fails.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        import torch.distributed as dist
        if os.environ["RANK"] == "1":
            sys.exit(3)  # before joining: rank 0 would wait for it in init_process_group
        dist.init_process_group("gloo")
    """))
    with pytest.raises(h2.GangFailedError, match=r"rank 1 raised sparkhydrogen.torch.TorchLaunchError: "
                                                r"rank 1's training script .*fails.py ended with exit code 3") as info:
        h2torch.run(str(script), num_processes=2)
    assert info.value.failed_rank == 1


def test_retries_relaunch_the_whole_gang(sc: Any) -> None:
    def train() -> tuple[int, float]:
        import os

        import torch
        import torch.distributed as dist

        attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
        if attempt == 0 and dist.get_rank() == 1:
            raise RuntimeError("flaky rank")
        t = torch.ones(1)
        dist.all_reduce(t)
        return attempt, t.item()

    assert h2torch.run(train, num_processes=2, max_retries=1, retry_backoff=0.0) == (1, 2.0)

    def always() -> None:
        raise RuntimeError("always broken")

    with pytest.raises(h2.GangFailedError, match=r"(?s)failed on all 2 attempts.*attempt 1: .*rank \d raised "
                                                r"RuntimeError: always broken"):
        h2torch.run(always, num_processes=2, max_retries=1, retry_backoff=0.0)


def test_every_kind_of_output_reaches_the_driver_prefixed(sc: Any, capfd: pytest.CaptureFixture[str]) -> None:
    def train() -> None:
        import logging
        import os
        import subprocess
        import sys

        import torch.distributed as dist

        rank = dist.get_rank()
        print(f"print from {rank}")
        print(f"stderr from {rank}", file=sys.stderr)
        logging.getLogger("user.train").warning("logging from %d", rank)
        os.write(1, f"fd 1 from {rank}\n".encode())
        subprocess.run([sys.executable, "-c", f"print('child of {rank}')"], check=True)

    h2torch.run(train, num_processes=2)
    out, err = capfd.readouterr()
    for rank in (0, 1):
        for line in (f"print from {rank}", f"fd 1 from {rank}", f"child of {rank}"):
            assert f"[rank {rank}] {line}\n" in out
        for line in (f"stderr from {rank}", f"logging from {rank}"):
            assert f"[rank {rank}] {line}\n" in err


def test_output_streams_while_the_rank_is_still_running(sc: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = threading.Event()

    class Watch(io.StringIO):
        def write(self, text: str) -> int:
            if "[rank 0] waiting for the driver" in text:
                seen.set()
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", Watch())
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(120)

        def train(port: int) -> str:
            import socket

            print("waiting for the driver", flush=True)
            with socket.create_connection(("127.0.0.1", port)) as conn:
                return conn.recv(16).decode()  # blocks until the driver has seen the line above

        result: list[Any] = []
        runner = threading.Thread(target=lambda: result.append(h2torch.run(train, listener.getsockname()[1],
                                                                             num_processes=1)))
        runner.start()
        conn, _ = listener.accept()
        with conn:
            assert seen.wait(60), "the rank's line did not reach the driver while the rank was running"
            conn.sendall(b"go")
        runner.join(120)
    assert result == ["go"]


def test_several_training_processes_per_task(sc: Any) -> None:
    def train(scale: float) -> dict[str, Any]:
        import os

        import torch
        import torch.distributed as dist

        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        return {"sum": t.item() * scale, "env": {k: os.environ[k] for k in ENV_KEYS}, "parent": os.getppid(),
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    out = h2torch.run(train, 2.0, num_processes=4, processes_per_task=2, return_all=True)
    assert [o["sum"] for o in out] == [20.0] * 4  # (1 + 2 + 3 + 4) * 2 over one process group of 4
    assert [o["env"]["RANK"] for o in out] == ["0", "1", "2", "3"]
    assert {o["env"]["WORLD_SIZE"] for o in out} == {"4"}
    assert [o["env"]["LOCAL_RANK"] for o in out] == ["0", "1", "2", "3"]  # one host: local ranks follow the tasks
    assert {o["env"]["LOCAL_WORLD_SIZE"] for o in out} == {"4"}
    parents = [o["parent"] for o in out]  # two processes of each of the two tasks' Python workers
    assert parents[0] == parents[1] != parents[2] == parents[3]
    assert {o["visible"] for o in out} == {""}  # use_gpu=False: no GPU shown to a training process
    assert h2torch.run(train, 1.0, num_processes=4, processes_per_task=2)["sum"] == 10.0  # rank 0's alone

    def fails() -> None:
        import torch
        import torch.distributed as dist

        if dist.get_rank() == 3:
            raise KeyError("missing_feature")
        dist.all_reduce(torch.ones(1))  # rank 3 never joins: its peers are stopped, not left waiting

    with pytest.raises(h2.GangFailedError) as info:
        h2torch.run(fails, num_processes=4, processes_per_task=2)
    text = str(info.value)
    # rank 3's crash breaks every task's process group: task 1 (holding the cause) may report second, and the
    # gang's error then names it among the others; either way the failing process's own error is there
    assert "rank 1 raised KeyError: 'missing_feature'" in text, text
    assert info.value.failed_rank in (0, 1)  # the gang's ranks are the Spark tasks
    if info.value.failed_rank == 1:
        assert "in training process 2 of 2 of this task (torch RANK=3)" in text


def test_use_gpu_without_gpus_is_refused_before_launch(sc: Any) -> None:
    with pytest.raises(h2torch.GpuAssignmentError, match=r"use_gpu=True but Spark assigns no GPU to tasks "
                                                          r"\(spark.task.resource.gpu.amount is not set"):
        h2torch.run(lambda: None, num_processes=2, use_gpu=True)
    with pytest.raises(h2torch.GpuAssignmentError, match=r"local_mode=True needs 2 GPU\(s\) on the driver"):
        h2torch.run(lambda: None, num_processes=2, use_gpu=True, local_mode=True)


def test_local_mode_runs_the_ranks_on_the_driver(sc: Any, capfd: pytest.CaptureFixture[str]) -> None:
    def train(tag: str) -> dict[str, Any]:
        import os

        import torch
        import torch.distributed as dist

        import sparkhydrogen as h2

        t = torch.ones(1)
        dist.all_reduce(t)
        print(f"{tag} rank {dist.get_rank()}")
        return {"sum": t.item(), "ppid": os.getppid(), "rank": h2.BarrierTaskContext.get().rank(),
                "env": {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR")}}

    out = h2torch.run(train, "local", num_processes=3, local_mode=True, return_all=True)
    assert [o["sum"] for o in out] == [3.0] * 3
    assert {o["ppid"] for o in out} == {os.getpid()}  # children of the driver, not of Spark workers
    assert [o["rank"] for o in out] == [0, 1, 2]  # joined the gang through the coordinator
    assert [o["env"] for o in out] == [{"RANK": str(r), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1"}
                                       for r in range(3)]
    printed = capfd.readouterr().out
    assert all(f"[rank {r}] local rank {r}\n" in printed for r in range(3))


def test_local_mode_failure_stops_every_process_and_retries(sc: Any, tmp_path: Path) -> None:
    def train(folder: str) -> int:
        import os

        import torch
        import torch.distributed as dist

        attempt, rank = os.environ["TORCHELASTIC_RESTART_COUNT"], dist.get_rank()
        final = os.path.join(folder, f"pid-{attempt}-{rank}")
        with open(final + ".tmp", "w") as fh:  # atomic: a rank may be stopped at any moment
            fh.write(str(os.getpid()))
        os.replace(final + ".tmp", final)
        if attempt == "0" and rank == 2:
            raise KeyError("missing shard")
        dist.all_reduce(torch.ones(1))
        return int(attempt)

    assert h2torch.run(train, str(tmp_path), num_processes=3, local_mode=True, max_retries=1,
                       retry_backoff=0.0) == 1
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(h2.GangFailedError, match=r"rank 2 raised KeyError: 'missing shard'") as info:
        h2torch.run(train, str(again), num_processes=3, local_mode=True)
    assert info.value.failed_rank == 2
    for pid_file in (p for p in tmp_path.rglob("pid-*") if not p.name.endswith(".tmp")):
        with pytest.raises(ProcessLookupError):  # every rank process is gone (stopped and reaped)
            os.kill(int(pid_file.read_text()), 0)


def test_ddp_example_averages_gradients_like_one_process(sc: Any) -> None:
    pytest.importorskip("sklearn")
    import torch

    example = runpy.run_path(str(REPO / "examples" / "torch_ddp.py"), run_name="torch_ddp_example")
    steps = 20
    states = h2torch.run(example["train_ddp"], steps, num_processes=4, return_all=True)
    single = example["train_single"](steps)
    for state in states:
        assert state.keys() == single.keys()
        for name in single:
            assert torch.allclose(state[name], single[name], rtol=1e-4, atol=1e-6), name
    alone = example["train_single"](steps, shard=(0, 4))  # what rank 0 would reach without averaging
    assert example["max_difference"](states[0], alone) > 1e-3


def test_generic_run_streams_logs_too(sc: Any, capfd: pytest.CaptureFixture[str]) -> None:
    def fn() -> int:
        import sys

        rank = h2.BarrierTaskContext.get().rank()
        print(f"generic {rank}")
        print(f"generic err {rank}", file=sys.stderr)
        return rank

    assert h2.run(fn, 2, stream_logs=True) == [0, 1]
    out, err = capfd.readouterr()
    assert "[rank 0] generic 0\n" in out and "[rank 1] generic 1\n" in out
    assert "[rank 1] generic err 1\n" in err
    assert h2.run(fn, 2) == [0, 1]
    assert "[rank" not in capfd.readouterr().out  # off by default
