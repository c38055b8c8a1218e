"""The arithmetic of a torch launch (no Spark, no torch): layout, environment, GPU mapping, arguments;
and the ranks' child-process entry point in a Python that has pyspark but no ``cloudpickle``."""

from __future__ import annotations

import doctest
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import sparkhydrogen
import sparkhydrogen.torch as h2torch
from sparkhydrogen.task import child
from sparkhydrogen.torch import _layout, _rank
from sparkhydrogen.torch._layout import (
    DevicePlan,
    GpuAssignmentError,
    NodeLayout,
    assigned_gpus,
    check_gpu_addresses,
    default_backend,
    device_plan,
    local_mode_gpus,
    node_layout,
    physical_gpus,
    process_environments,
    process_plans,
    rank_environment,
)

pytestmark = pytest.mark.timeout(60)


def test_public_names() -> None:
    assert set(h2torch.__all__) == {"GpuAssignmentError", "TorchLaunchError", "data_loader", "device",
                                    "lightning_environment", "run"}
    assert issubclass(h2torch.TorchLaunchError, sparkhydrogen.LaunchError)
    assert issubclass(h2torch.GpuAssignmentError, ValueError)


@pytest.mark.parametrize("module", [_layout, child])
def test_doctests(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


# node layout -------------------------------------------------------------------------


def test_ranks_sharing_a_host_get_consecutive_local_ranks() -> None:
    hosts = ["10.0.0.2", "10.0.0.2", "10.0.0.3", "10.0.0.2"]
    layouts = [node_layout(hosts, r) for r in range(4)]
    assert [(lay.local_rank, lay.local_world_size, lay.group_rank) for lay in layouts] == [
        (0, 3, 0), (1, 3, 0), (0, 1, 1), (2, 3, 0)]
    assert {lay.group_world_size for lay in layouts} == {2}


def test_one_host_is_one_group() -> None:
    assert node_layout(["h"] * 4, 3) == NodeLayout(local_rank=3, local_world_size=4, group_rank=0, group_world_size=1)


def test_every_rank_on_its_own_host() -> None:
    assert [node_layout(["a", "b", "c"], r).group_rank for r in range(3)] == [0, 1, 2]
    assert {node_layout(["a", "b", "c"], r).local_rank for r in range(3)} == {0}


def test_layout_rejects_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        node_layout(["a", "b"], 2)


# environment -------------------------------------------------------------------------


def test_rank_environment_is_what_torchrun_sets() -> None:
    env = rank_environment(rank=2, world_size=4, layout=NodeLayout(0, 2, 1, 2), master_addr="10.0.0.1",
                           master_port=41000, restart_count=1, run_id="abc")
    assert env == {
        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "41000", "RANK": "2", "WORLD_SIZE": "4",
        "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "NODE_RANK": "1",
        "ROLE_NAME": "default", "ROLE_RANK": "2", "ROLE_WORLD_SIZE": "4",
        "TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_RUN_ID": "abc",
    }


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 4, "master_port": 1}, "rank 4 is outside 0..3"),
    ({"rank": 0, "master_port": 0}, "master_port must be in 1..65535"),
])
def test_rank_environment_checks_its_input(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rank_environment(world_size=4, layout=NodeLayout(0, 1, 0, 1), master_addr="h", **kwargs)


def test_default_backend() -> None:
    assert default_backend(use_gpu=False) == "gloo"
    assert default_backend(use_gpu=True) == "nccl"


# GPUs ----------------------------------------------------------------------------------


def test_gpu_addresses_must_be_plain_indices() -> None:
    assert check_gpu_addresses(["0", "10", " 2 "]) == ["0", "10", "2"]
    for bad in (["01"], ["-1"], ["GPU-5a1c"], ["1.0"]):
        with pytest.raises(ValueError, match="must be a device index"):
            check_gpu_addresses(bad)


def test_addresses_are_device_ids_without_cuda_visible_devices() -> None:
    assert physical_gpus(["3", "1"], None) == ["3", "1"]


def test_addresses_index_an_existing_cuda_visible_devices() -> None:
    assert physical_gpus(["0", "3"], "2,4,6,7") == ["2", "7"]
    assert physical_gpus(["1"], " 5 , 3 ") == ["3"]


def test_address_beyond_cuda_visible_devices_is_a_clear_error() -> None:
    with pytest.raises(GpuAssignmentError, match=r"address 2, but CUDA_VISIBLE_DEVICES='4,5' lists only 2"):
        physical_gpus(["2"], "4,5")


def test_task_gpus_win_over_driver_gpus() -> None:
    assert assigned_gpus(["1"], ["0", "1"], 0) == ["1"]
    assert assigned_gpus([], ["4", "5"], 1) == ["5"]


def test_no_gpu_for_a_rank_names_the_settings() -> None:
    with pytest.raises(GpuAssignmentError, match=r"assigned no GPU to rank 2: set spark.task.resource.gpu.amount"):
        assigned_gpus(None, ["0", "1"], 2)


def test_local_mode_needs_one_driver_gpu_per_process() -> None:
    assert local_mode_gpus(["0", "1", "2"], 3) == ["0", "1", "2"]
    with pytest.raises(GpuAssignmentError, match=r"needs 4 GPU\(s\) on the driver.*gives the driver 2"):
        local_mode_gpus(["0", "1"], 4)
    with pytest.raises(GpuAssignmentError, match="gives the driver 0"):
        local_mode_gpus(None, 1)


def test_in_process_device_is_the_address_in_this_process() -> None:
    # with CUDA_VISIBLE_DEVICES=4,5 in the executor, address 1 is physical 5 but cuda:1 here
    assert device_plan(use_gpu=True, in_process=True, own=["1"], own_physical=["5"]) == DevicePlan(1, None)


def test_children_see_their_hosts_gpus_in_local_rank_order() -> None:
    peers = [["6"], ["2"], ["4"]]  # physical GPU of local ranks 0, 1, 2
    plans = [device_plan(use_gpu=True, in_process=False, own=[p[0]], own_physical=p, host_peers=peers,
                         local_rank=lr) for lr, p in enumerate(peers)]
    assert [p.visible for p in plans] == ["6,2,4"] * 3
    assert [p.device for p in plans] == ["cuda:0", "cuda:1", "cuda:2"]  # cuda:LOCAL_RANK is the rank's own GPU


def test_children_see_only_their_own_gpus_when_ranks_hold_several() -> None:
    plan = device_plan(use_gpu=True, in_process=False, own=["0", "1"], own_physical=["2", "3"],
                       host_peers=[["2", "3"], ["4", "5"]], local_rank=0)
    assert plan == DevicePlan(0, "2,3")


def test_children_see_only_their_own_gpu_when_ranks_share_one() -> None:
    plan = device_plan(use_gpu=True, in_process=False, own=["0"], own_physical=["3"],
                       host_peers=[["3"], ["3"]], local_rank=1)
    assert plan == DevicePlan(0, "3")


def test_cpu_children_see_no_gpu() -> None:
    assert device_plan(use_gpu=False, in_process=False) == DevicePlan(None, "")
    assert device_plan(use_gpu=False, in_process=True) == DevicePlan(None, None)
    assert DevicePlan(None, "").device == "cpu"


def test_describe_exit() -> None:
    assert child.describe_exit(0) == "exit code 0"
    assert child.describe_exit(-15) == "signal SIGTERM"


def test_task_host_of_an_executor_address() -> None:
    assert _rank._host_of("10.1.2.3:4040") == "10.1.2.3"
    assert _rank._host_of("[fe80::1]:4040") == "fe80::1"
    assert _rank._host_of("worker-7") == "worker-7"


# several training processes per task ---------------------------------------------------


def test_each_process_of_a_task_takes_consecutive_global_and_local_ranks() -> None:
    hosts = ["a", "a", "b"]
    tasks = [rank_environment(rank=t, world_size=3, layout=node_layout(hosts, t), master_addr="a", master_port=7)
             for t in range(3)]
    envs = [e for task in tasks for e in process_environments(task, 2)]
    assert [e["RANK"] for e in envs] == [str(r) for r in range(6)]
    assert {e["WORLD_SIZE"] for e in envs} == {"6"}
    assert [(e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]) for e in envs] == [
        ("0", "4"), ("1", "4"), ("2", "4"), ("3", "4"), ("0", "2"), ("1", "2")]  # host a: tasks 0, 1; host b: 2
    assert [e["GROUP_RANK"] for e in envs] == ["0", "0", "0", "0", "1", "1"]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("a", "7")}
    assert process_environments(tasks[1], 1) == [tasks[1]]


def test_each_process_of_a_task_gets_its_own_slice_of_the_tasks_gpus() -> None:
    plans = process_plans(use_gpu=True, own_physical=["4", "5", "6", "7"], processes=2)
    assert plans == [DevicePlan(ordinal=0, visible="4,5"), DevicePlan(ordinal=0, visible="6,7")]
    assert {p.device for p in plans} == {"cuda:0"}
    with pytest.raises(GpuAssignmentError, match=r"2 processes cannot each have their own GPU: the task has 1"):
        process_plans(use_gpu=True, own_physical=["4"], processes=2)
    with pytest.raises(GpuAssignmentError, match=r"this rank's task has no GPU assigned"):
        process_plans(use_gpu=True, own_physical=[], processes=2)


# arguments (checked before any Spark is needed) ---------------------------------------


def _train() -> None:
    pass


@pytest.mark.parametrize("call, error, message", [
    (lambda: h2torch.run(42, num_processes=2), TypeError, "train must be a function or the path"),
    (lambda: h2torch.run(_train, num_processes="2"), TypeError, "num_processes must be an int"),
    (lambda: h2torch.run(_train, num_processes=True), TypeError, "num_processes must be an int"),
    (lambda: h2torch.run(_train, num_processes=0), ValueError, "num_processes must be >= 1, got 0"),
    (lambda: h2torch.run(_train, num_processes=2, use_gpu="yes"), TypeError, "use_gpu must be True or False"),
    (lambda: h2torch.run(_train, num_processes=2, local_mode=1), TypeError, "local_mode must be True or False"),
    (lambda: h2torch.run(_train, num_processes=2, backend=""), ValueError, "backend must be a torch.distributed"),
    (lambda: h2torch.run("train.py", num_processes=2, lr=0.1), TypeError,
     r"keyword arguments \['lr'\] cannot be passed to a script"),
    (lambda: h2torch.run(_train, num_processes=4, processes_per_task=2.0), TypeError,
     "processes_per_task must be an int, got float"),
    (lambda: h2torch.run(_train, num_processes=4, processes_per_task=0), ValueError,
     "processes_per_task must be >= 1, got 0"),
    (lambda: h2torch.run(_train, num_processes=3, processes_per_task=2), ValueError,
     "num_processes=3 is not a multiple of processes_per_task=2"),
    (lambda: h2torch.run(_train, num_processes=4, processes_per_task=2, local_mode=True), ValueError,
     "processes_per_task does not apply with local_mode=True"),
    (lambda: h2torch.run(_train, num_processes=4, processes_per_task=2, data=object()), ValueError,
     r"data= streams each rank's share into its Spark task's Python worker.*got processes_per_task=2"),
])
def test_bad_arguments_are_refused_clearly(call: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()  # type: ignore[operator]


def test_device_outside_a_rank_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    monkeypatch.delenv(_layout.DEVICE_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"device\(\) was called outside a rank"):
        h2torch.device()


# the child-process entry without cloudpickle (a --py-files cluster that only has pyspark) -------------

# Runs ``python -m sparkhydrogen.torch._proc script PATH OUT`` with ``import cloudpickle`` failing.
WITHOUT_CLOUDPICKLE = """
import runpy, sys


class NoCloudpickle:
    def find_spec(self, name, path=None, target=None):
        if name == "cloudpickle" or name.startswith("cloudpickle."):
            raise ModuleNotFoundError("No module named 'cloudpickle' (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, NoCloudpickle())
sys.argv = ["sparkhydrogen.torch._proc", *sys.argv[1:]]
runpy.run_module("sparkhydrogen.torch._proc", run_name="__main__", alter_sys=True)
"""

# The training script the child runs: what it writes back goes through the child's pickler.
CHILD_SCRIPT = """
import json, os, sys
from sparkhydrogen import serde
from sparkhydrogen.task import child

out = sys.argv[1]
child.write_result(out, lambda n: n * 2)  # by value: plain pickle cannot do a lambda
child.write_error(out, ValueError("from the child"), "")
with open(os.path.join(out, "child.json"), "w") as fh:
    json.dump({"cloudpickle": serde.cloudpickle.__name__, "argv": sys.argv,
               "imported": "cloudpickle" in sys.modules}, fh)
"""


def test_the_child_entry_falls_back_to_pysparks_cloudpickle(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(CHILD_SCRIPT)
    done = subprocess.run([sys.executable, "-c", WITHOUT_CLOUDPICKLE, "script", str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "child.json").read_text())
    assert report == {"cloudpickle": "pyspark.cloudpickle", "argv": [str(script), str(tmp_path)], "imported": False}
    with open(tmp_path / "result.pkl", "rb") as fh:
        assert pickle.load(fh)(21) == 42
    error = child.read_error(str(tmp_path))
    assert error is not None and isinstance(error[0], ValueError) and str(error[0]) == "from the child"
