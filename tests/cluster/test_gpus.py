"""Every rank sees exactly its task's GPUs: real executor JVMs (local-cluster) with "discovered" GPUs.

There is no GPU here. Each worker runs a real Spark resource discovery script that
reports GPUs 0 and 1, as pyspark's own tests do; the ranks check what
``CUDA_VISIBLE_DEVICES`` they (and their child processes) see, and that the reused
Python workers get their environment back. Three clusters, one after the other:
``spark.task.resource.gpu.amount`` 1, then 0.5, then 1 with executors restricted to
``CUDA_VISIBLE_DEVICES=4,5``.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

DISCOVERY = """\
#!{python}
print('{{"name": "gpu", "addresses": ["0", "1"]}}')
"""


class Clusters:
    """One local-cluster at a time: asking for another configuration stops the running one first."""

    def __init__(self, script: Path) -> None:
        self.script = script
        self.name: str | None = None
        self.sc: Any = None
        self._stack = ExitStack()

    def get(self, name: str) -> Any:
        if name != self.name:
            self.close()
            master, conf = self._config(name)
            self.sc = self._stack.enter_context(spark_session(master, **conf)).sparkContext
            self.name = name
        return self.sc

    def _config(self, name: str) -> tuple[str, dict[str, str]]:
        conf = {
            "spark.executor.memory": "512m",
            "spark.worker.resource.gpu.amount": "2",
            "spark.worker.resource.gpu.discoveryScript": str(self.script),
            "spark.executor.resource.gpu.amount": "2",
            "spark.executor.resource.gpu.discoveryScript": str(self.script),
            "spark.task.resource.gpu.amount": "1",
        }
        if name == "shared":  # 0.5: two tasks per GPU, 4 per executor (so 4 cores each)
            return "local-cluster[2,4,1024]", {**conf, "spark.task.resource.gpu.amount": "0.5"}
        if name == "restricted":
            return "local-cluster[2,2,1024]", {**conf, "spark.executorEnv.CUDA_VISIBLE_DEVICES": "4,5"}
        return "local-cluster[2,2,1024]", conf

    def close(self) -> None:
        self._stack.close()
        self._stack = ExitStack()
        self.name = self.sc = None


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clusters]:
    script = tmp_path_factory.mktemp("gpus") / "discover_gpus.py"
    script.write_text(DISCOVERY.format(python=sys.executable))
    script.chmod(0o755)
    made = Clusters(script)
    try:
        yield made
    finally:
        made.close()


def _rank_view() -> Callable[[], dict[str, Any]]:
    """A rank body reporting what the rank sees (nested, so it travels to executors by value)."""
    def fn() -> dict[str, Any]:
        import os
        import subprocess
        import sys

        import sparkhydrogen as h2

        ctx = h2.BarrierTaskContext.get()
        code = "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))"
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        return {"rank": ctx.rank(), "executor": ctx.getTaskInfos()[ctx.rank()].address,
                "addresses": list(ctx.resources()["gpu"].addresses),
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "child": child.strip(), "pid": os.getpid()}

    return fn


def _plain_view(sc: Any, n: int) -> list[tuple[int, str | None]]:
    """(pid, CUDA_VISIBLE_DEVICES) of ``n`` ordinary (non-gang) tasks."""
    def view(_: Any) -> tuple[int, str | None]:
        import os

        return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")

    out: list[tuple[int, str | None]] = sc.parallelize(range(n), n).map(view).collect()
    return out


# spark.task.resource.gpu.amount=1 ----------------------------------------------------


def test_each_rank_sees_only_its_own_gpu(clusters: Clusters) -> None:
    sc = clusters.get("one")

    out = h2.run(_rank_view(), 4)
    assert [o["rank"] for o in out] == [0, 1, 2, 3]
    assert all(len(o["addresses"]) == 1 for o in out)
    pairs = {(o["executor"], o["addresses"][0]) for o in out}
    assert len(pairs) == 4 and len({o["executor"] for o in out}) == 2  # 2 executors x GPUs 0 and 1
    assert [o["visible"] for o in out] == [o["addresses"][0] for o in out]
    assert [o["child"] for o in out] == [o["visible"] for o in out]  # a process the rank starts inherits it

    # the reused Python workers got their environment back: ordinary tasks see no CUDA_VISIBLE_DEVICES
    plain = _plain_view(sc, 4)
    assert {v for _, v in plain} == {None}
    assert {p for p, _ in plain} & {o["pid"] for o in out}, "expected the gang's Python workers to be reused"


def test_barrier_rdd_ranks_see_their_gpu(clusters: Clusters) -> None:
    sc = clusters.get("one")

    def body(rows: Any) -> Iterator[tuple[str, str | None]]:
        import os

        import sparkhydrogen as h2

        ctx = h2.BarrierTaskContext.get()
        yield ctx.resources()["gpu"].addresses[0], os.environ.get("CUDA_VISIBLE_DEVICES")

    out = h2.barrier(sc.parallelize(range(4), 4)).mapPartitions(body).collect()
    assert sorted(out) == [("0", "0"), ("0", "0"), ("1", "1"), ("1", "1")]


def test_torch_ranks_see_their_gpu_and_train_on_cpu(clusters: Clusters) -> None:
    pytest.importorskip("torch")
    import sparkhydrogen.torch as h2torch

    clusters.get("one")

    def train() -> dict[str, Any]:
        import os

        import torch
        import torch.distributed as dist

        import sparkhydrogen as h2
        import sparkhydrogen.torch as h2torch

        t = torch.tensor([1.0])
        dist.all_reduce(t)
        ctx = h2.BarrierTaskContext.get()
        return {"sum": t.item(), "device": str(h2torch.device()), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "address": ctx.resources()["gpu"].addresses[0]}

    out = h2torch.run(train, num_processes=2, use_gpu=False, return_all=True)
    assert [o["sum"] for o in out] == [2.0, 2.0] and {o["device"] for o in out} == {"cpu"}
    assert [o["visible"] for o in out] == [o["address"] for o in out]  # use_gpu=False: still only its GPU

    def child() -> str | None:
        import os

        return os.environ.get("CUDA_VISIBLE_DEVICES")

    # a training process with use_gpu=False is shown no GPU at all (as before)
    assert h2torch.run(child, num_processes=2, use_subprocess=True, return_all=True) == ["", ""]

    def nothing() -> None:
        pass

    # use_gpu=True in the task's worker: its own GPU is cuda:0 of its narrowed view; this torch has no CUDA
    with pytest.raises(h2.GangFailedError, match=r"GpuAssignmentError: use_gpu=True and this rank was assigned "
                                                 r"cuda:0 \(CUDA_VISIBLE_DEVICES='[01]'\), but "
                                                 r"torch.cuda.is_available\(\) is False"):
        h2torch.run(nothing, num_processes=2, use_gpu=True, backend="gloo")


TWO_PROCESS_SCRIPT = """\
import json, os, sys

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
with open(os.path.join(sys.argv[1], f"{dist.get_rank()}.json"), "w") as fh:
    json.dump({"sum": t.item(), "parent": os.getppid(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
               "device": os.environ["SPARKHYDROGEN_TORCH_DEVICE"], "local_rank": os.environ["LOCAL_RANK"]}, fh)
dist.destroy_process_group()
"""


def test_two_training_processes_per_task_each_get_one_of_its_gpus(clusters: Clusters, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import json

    import sparkhydrogen.torch as h2torch

    clusters.get("one")  # executors of 2 GPUs; the gang's stage asks for both per task
    script = tmp_path / "train.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    h2torch.run(str(script), str(tmp_path), num_processes=4, processes_per_task=2, use_gpu=True, backend="gloo",
                resources={"gpu": 2})
    views = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(4)]
    assert {v["sum"] for v in views} == {10.0}  # one process group of 4 across 2 tasks
    by_task: dict[int, list[dict[str, Any]]] = {}
    for view in views:
        by_task.setdefault(view["parent"], []).append(view)
    assert len(by_task) == 2  # two tasks (one per executor), two processes each
    for task_views in by_task.values():
        assert sorted(v["visible"] for v in task_views) == ["0", "1"]  # a distinct GPU of the task's two each
        assert {v["device"] for v in task_views} == {"cuda:0"}  # each trains on the one GPU it sees


# spark.task.resource.gpu.amount=0.5 --------------------------------------------------


def test_half_a_gpu_each_two_ranks_share_a_device(clusters: Clusters) -> None:
    sc = clusters.get("shared")

    out = h2.run(_rank_view(), 8)  # 2 executors x 2 GPUs x 2 tasks per GPU
    shares = Counter((o["executor"], o["addresses"][0]) for o in out)
    assert len(shares) == 4 and set(shares.values()) == {2}
    assert all(o["visible"] == o["child"] == o["addresses"][0] for o in out)
    assert {v for _, v in _plain_view(sc, 8)} == {None}


# executors restricted to CUDA_VISIBLE_DEVICES=4,5 ------------------------------------


def test_addresses_index_into_the_executors_visible_devices(clusters: Clusters) -> None:
    sc = clusters.get("restricted")

    out = h2.run(_rank_view(), 4)
    devices = {"0": "4", "1": "5"}
    assert [o["visible"] for o in out] == [devices[o["addresses"][0]] for o in out]
    assert [o["child"] for o in out] == [o["visible"] for o in out]
    assert len({(o["executor"], o["visible"]) for o in out}) == 4
    assert {v for _, v in _plain_view(sc, 4)} == {"4,5"}  # the executor's own value, put back


# transform() with inference_resources: a scoring stage with its own task resources -------------


def _recording_linear(marker_dir: str) -> Any:
    """A tiny ``nn.Linear`` whose forward notes its task's GPUs, CPUs and weight device in ``marker_dir``.

    Built in a function so cloudpickle ships the class by value to the executors.
    """
    import torch

    class Recording(torch.nn.Linear):
        def forward(self, x: Any) -> Any:
            import json
            import os

            from pyspark import TaskContext

            ctx = TaskContext.get()
            gpu = ctx.resources().get("gpu")
            note = {"partition": ctx.partitionId(), "gpus": list(gpu.addresses) if gpu else [], "cpus": ctx.cpus(),
                    "device": str(self.weight.device), "pid": os.getpid()}
            Path(marker_dir, f"{ctx.partitionId()}-{ctx.taskAttemptId()}.json").write_text(json.dumps(note))
            return super().forward(x)

    torch.manual_seed(0)
    return Recording(3, 2)


def test_model_transform_with_inference_resources_scores_on_each_tasks_gpu(clusters: Clusters,
                                                                            tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import json

    import torch
    from pyspark.ml.linalg import Vectors
    from pyspark.sql import SparkSession

    from sparkhydrogen.ml import TorchModel

    sc = clusters.get("one")
    spark = SparkSession(sc)
    rows = [(i, float(i), float(i % 3), float(-i), Vectors.dense([i, 1.0])) for i in range(40)]
    df = spark.createDataFrame(rows, ["id", "a", "b", "c", "v"]).repartition(2)  # one task per executor
    markers = tmp_path / "markers"
    markers.mkdir()
    recording = _recording_linear(str(markers))
    plain = torch.nn.Linear(3, 2)
    plain.load_state_dict(recording.state_dict())
    with torch.no_grad():  # the same module on the driver's CPU
        out = plain(torch.tensor([r[1:4] for r in rows], dtype=torch.float32)).double().numpy()
    expected = {r[0]: list(out[i]) for i, r in enumerate(rows)}

    model = TorchModel(recording, input_width=3, output_width=2).setFeaturesCol(["a", "b", "c"]) \
        .setInferenceBatchSize(4).setInferenceResources({"gpu": 1, "cpus": 2})
    scored = model.transform(df)
    assert scored.columns == ["id", "a", "b", "c", "v", "prediction"]
    got = scored.collect()

    assert sorted(r["id"] for r in got) == list(range(40))
    for r in got:
        assert r["prediction"] == pytest.approx(expected[r["id"]], rel=1e-6)
        assert r["v"] == Vectors.dense([r["id"], 1.0])  # other columns (a vector UDT too) pass through
    notes = [json.loads(p.read_text()) for p in markers.iterdir()]
    assert {n["partition"] for n in notes} == {0, 1}
    assert all(len(n["gpus"]) == 1 and n["gpus"][0] in {"0", "1"} for n in notes)
    assert {n["cpus"] for n in notes} == {2}  # the stage ran with its own profile (the application's is 1 CPU)
    assert {n["device"] for n in notes} == {"cpu"}  # CPU-only torch: a warning, then the CPU
