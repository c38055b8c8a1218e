"""Stage-level resources per gang: ``run(..., resources={"gpu": 1})`` on a cluster whose tasks ask for no GPU.

Real executor JVMs (``local-cluster[2,2,1024]``) whose workers "discover" two GPUs each
with a real discovery script (there is no GPU here, as in pyspark's own tests). The
application's default task asks for no GPU, so only a gang that asks gets one.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sparkutil import spark_session, wait_for_executors

import sparkhydrogen as h2
from sparkhydrogen.launch.resources import StageResources, profile_for
from sparkhydrogen.launch.session import SparkTarget

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

DISCOVERY = """\
#!{python}
print('{{"name": "gpu", "addresses": ["0", "1"]}}')
"""


@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    script = tmp_path_factory.mktemp("gpus") / "discover_gpus.py"
    script.write_text(DISCOVERY.format(python=sys.executable))
    script.chmod(0o755)
    conf = {
        "spark.executor.memory": "512m",
        "spark.worker.resource.gpu.amount": "2",
        "spark.worker.resource.gpu.discoveryScript": str(script),
        "spark.executor.resource.gpu.amount": "2",
        "spark.executor.resource.gpu.discoveryScript": str(script),
    }  # no spark.task.resource.gpu.amount: ordinary tasks get no GPU
    with spark_session("local-cluster[2,2,1024]", **conf) as session:
        wait_for_executors(session.sparkContext, 2)
        yield session


def _view() -> Callable[[], dict[str, Any]]:
    def fn() -> dict[str, Any]:
        import os

        import sparkhydrogen as h2

        ctx = h2.BarrierTaskContext.get()
        gpu = ctx.resources().get("gpu")
        return {"executor": ctx.getTaskInfos()[ctx.rank()].address, "cpus": ctx.cpus(),
                "gpus": list(gpu.addresses) if gpu is not None else [],
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    return fn


def test_a_gang_asking_for_a_gpu_gets_one_each(spark: Any) -> None:
    plain = h2.run(_view(), 4)
    assert all(o["gpus"] == [] and o["visible"] is None for o in plain)  # the default task asks for none

    out = h2.run(_view(), 4, resources={"gpu": 1})
    assert all(len(o["gpus"]) == 1 for o in out)
    assert len({(o["executor"], o["gpus"][0]) for o in out}) == 4  # distinct (executor, GPU) pairs
    assert [o["visible"] for o in out] == [o["gpus"][0] for o in out]


def test_the_preflight_counts_slots_for_the_gangs_profile(spark: Any) -> None:
    with pytest.raises(h2.InsufficientSlotsError,
                       match=r"barrier job needs 4 slots but the cluster has 2 \(2 executor\(s\), each task asking "
                             r"resources cpus=1, gpu=2\)"):
        h2.run(_view(), 4, resources={"gpu": 2, "cpus": 1})
    out = h2.run(_view(), 2, resources={"gpu": 2})  # one rank per executor, both GPUs each
    assert sorted(len(o["gpus"]) for o in out) == [2, 2] and all(o["visible"] in ("0,1", "1,0") for o in out)
    with pytest.raises(h2.InsufficientSlotsError, match=r"needs 3 slots but the cluster has 2 .*cpus=2"):
        h2.run(_view(), 3, resources={"cpus": 2})


def test_fractional_gpus_share_a_device(spark: Any) -> None:
    out = h2.run(_view(), 4, resources={"gpu": 0.5})  # CPU-bound at 2 per executor; both take halves of GPU 0
    assert all(len(o["gpus"]) == 1 for o in out)
    shares = Counter((o["executor"], o["gpus"][0]) for o in out)
    assert sum(shares.values()) == 4 and max(shares.values()) <= 2
    assert all(o["visible"] == o["gpus"][0] for o in out)


def test_profiles_are_built_once_per_request(spark: Any) -> None:
    target = SparkTarget(sc=spark.sparkContext)
    wanted = StageResources(cpus=None, amounts=(("gpu", 1.0),))
    first = profile_for(target, wanted)
    for _ in range(3):
        h2.run(_view(), 2, resources={"gpu": 1})
    assert profile_for(target, wanted) is first  # a notebook's loop adds one profile to Spark, not one per call
    assert profile_for(target, StageResources(amounts=(("gpu", 2.0),))) is not first


def test_a_resource_profile_is_used_as_given(spark: Any) -> None:
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    profile = ResourceProfileBuilder().require(TaskResourceRequests().cpus(2).resource("gpu", 1)).build
    out = h2.run(_view(), 2, resources=profile)
    assert [o["cpus"] for o in out] == [2, 2] and all(len(o["gpus"]) == 1 for o in out)


def test_data_gangs_take_resources_too(spark: Any) -> None:
    def count() -> tuple[int, list[str]]:
        import sparkhydrogen as h2

        ctx = h2.BarrierTaskContext.get()
        return sum(b.num_rows for b in ctx.batches()), list(ctx.resources()["gpu"].addresses)

    frame = h2.run(count, 2, data=spark.range(0, 1000, 1, 4), resources={"gpu": 1})
    assert sum(n for n, _ in frame) == 1000 and all(len(g) == 1 for _, g in frame)

    def elements() -> tuple[int, list[str]]:
        import sparkhydrogen as h2

        ctx = h2.BarrierTaskContext.get()
        return sum(1 for _ in ctx.rows()), list(ctx.resources()["gpu"].addresses)

    rdd = h2.run(elements, 2, data=spark.sparkContext.parallelize(range(500), 3), resources={"gpu": 1})
    assert sum(n for n, _ in rdd) == 500 and all(len(g) == 1 for _, g in rdd)


def test_the_torch_launcher_takes_resources(spark: Any) -> None:
    pytest.importorskip("torch")
    import sparkhydrogen.torch as h2torch

    def train() -> str | None:
        import os

        import torch
        import torch.distributed as dist

        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == 2.0
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    visible = h2torch.run(train, num_processes=2, resources={"gpu": 1}, return_all=True)
    assert all(v in ("0", "1") for v in visible)


def test_bad_requests_are_refused_before_launching(spark: Any) -> None:
    with pytest.raises(ValueError, match=r"resources\['gpu'\]=0.75: a task resource amount must be a whole number"):
        h2.run(_view(), 2, resources={"gpu": 0.75})
    with pytest.raises(ValueError, match=r"resources\['gpu'\] must be a number > 0, got -1"):
        h2.run(_view(), 2, resources={"gpu": -1})
    with pytest.raises(TypeError, match="resources must be a dict"):
        h2.run(_view(), 2, resources=["gpu"])
    with pytest.raises(ValueError, match=r"whole number of CPUs >= 1, got 1.5"):
        h2.run(_view(), 2, resources={"cpus": 1.5})
