"""Pure rules of ``resources=`` and ``data=``: request validation, where Spark supports it, how shares are cut."""

from __future__ import annotations

import doctest

import pytest

from sparkhydrogen.errors import LaunchError
from sparkhydrogen.launch import data as launch_data
from sparkhydrogen.launch import resources
from sparkhydrogen.launch.data import share_plan
from sparkhydrogen.launch.resources import StageResources, executor_requests, stage_resources, unsupported_reason
from sparkhydrogen.task import data as task_data

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("module", [resources, launch_data, task_data])
def test_doctests(module: object) -> None:
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert tried > 0 and failures == 0


def test_requests_are_checked_and_normalised() -> None:
    assert stage_resources(None) is None
    assert stage_resources({"fpga": 0.25, "gpu": 2, "cpu": 3}) == StageResources(
        cpus=3, amounts=(("fpga", 0.25), ("gpu", 2.0)))
    with pytest.raises(ValueError, match=r"resources\['gpu'\]=1.5: a task resource amount must be a whole number"):
        stage_resources({"gpu": 1.5})
    with pytest.raises(ValueError, match="resources is empty"):
        stage_resources({})
    with pytest.raises(ValueError, match="resource names are strings such as 'gpu'"):
        stage_resources({"g pu": 1})
    with pytest.raises(ValueError, match=r"must be a number > 0, got True"):
        stage_resources({"gpu": True})


def test_where_spark_supports_stage_level_scheduling() -> None:
    assert unsupported_reason("local") is not None and unsupported_reason("local[*]") is not None
    for master in ("spark://m:7077", "yarn", "k8s://https://api:6443", "local-cluster[2,1,1024]"):
        assert unsupported_reason(master) is None
    assert "not supported on master mesos://m:5050" in (unsupported_reason("mesos://m:5050") or "")


def test_executor_requests_under_dynamic_allocation_name_what_is_missing() -> None:
    wanted = StageResources(amounts=(("gpu", 1.0),))
    with pytest.raises(LaunchError, match=r"needs executors with gpu: set spark.executor.resource.gpu.amount"):
        executor_requests(wanted, {"spark.executor.cores": "4"})
    out = executor_requests(wanted, {"spark.executor.resource.gpu.amount": "4", "spark.executor.memory": "8g"})
    assert out == {"cores": None, "memory": "8g", "resources": [("gpu", 4, "", "")]}


def test_shares_are_cut_without_a_shuffle_where_that_is_safe() -> None:
    assert share_plan(2, 2, shuffled=False, barrier=False) == "as is"
    assert share_plan(9, 4, shuffled=False, barrier=False) == "coalesce"
    assert share_plan(9, 4, shuffled=False, barrier=True) == "repartition"  # Spark refuses coalesce in barrier
    assert share_plan(3, 4, shuffled=False, barrier=False) == "repartition"  # fewer partitions than ranks
    assert share_plan(4, 4, shuffled=True, barrier=False) == "repartition"  # AQE could merge partitions
    assert share_plan(None, 4, shuffled=False, barrier=True) == "repartition"


def test_a_share_is_read_once_and_the_rest_is_drained() -> None:
    share = task_data.RankData(iter([(1, "a"), (2, "b"), (3, "c")]), arrow=False)
    rows = share.rows()
    assert next(rows) == (1, "a")
    with pytest.raises(LaunchError, match=r"already read by rows\(\)"):
        share.batches()
    assert share.drain() == 2 and share.rows_read == 1
