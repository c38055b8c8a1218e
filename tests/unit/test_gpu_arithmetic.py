"""GPU arithmetic of a rank (no Spark, no torch), and the session narrowing ``CUDA_VISIBLE_DEVICES``."""

from __future__ import annotations

import doctest
import os
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from sparkhydrogen.coordinator.server import CoordinatorServer
from sparkhydrogen.errors import LaunchError
from sparkhydrogen.task import gpus, lifecycle
from sparkhydrogen.task.gpus import (
    GpuPlacementError,
    RankGpus,
    check_gpu_addresses,
    gpus_per_task,
    physical_gpus,
    place,
    process_ordinals,
    split_gpus,
    task_gpu_addresses,
    tasks_per_gpu,
    visible_devices,
    visible_entries,
)
from sparkhydrogen.task.lifecycle import RankSession, rank_gpus
from sparkhydrogen.task.spec import TaskSpec

pytestmark = pytest.mark.timeout(60)

VISIBLE = "CUDA_VISIBLE_DEVICES"


def test_doctests() -> None:
    result = doctest.testmod(gpus, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_errors_are_launch_and_value_errors() -> None:
    assert issubclass(GpuPlacementError, LaunchError) and issubclass(GpuPlacementError, ValueError)
    from sparkhydrogen.torch import GpuAssignmentError

    assert issubclass(GpuAssignmentError, GpuPlacementError)


# addresses ---------------------------------------------------------------------------


def test_task_addresses_come_from_the_gpu_resource_only() -> None:
    resources = {"gpu": SimpleNamespace(name="gpu", addresses=["1", "3"]), "fpga": SimpleNamespace(addresses=["0"])}
    assert task_gpu_addresses(resources) == ["1", "3"]
    assert task_gpu_addresses({"fpga": SimpleNamespace(addresses=["0"])}) == []


@pytest.mark.parametrize("bad", [["01"], ["-1"], ["GPU-1f3a"], [""], ["0", "x"]])
def test_addresses_must_be_indices(bad: list[str]) -> None:
    with pytest.raises(ValueError, match=r"each must be a device index \(0, 1, \.\.\.\) without zero padding"):
        check_gpu_addresses(bad)


# composing with the executor's CUDA_VISIBLE_DEVICES ----------------------------------


def test_visible_entries_parse_indices_uuids_and_blanks() -> None:
    assert visible_entries("4, 5 ,") == ["4", "5"]
    assert visible_entries("GPU-1f3a-aa,MIG-GPU-77b0/1/0") == ["GPU-1f3a-aa", "MIG-GPU-77b0/1/0"]
    assert visible_entries("") == [] and visible_entries(None) is None


def test_addresses_index_into_the_visible_list() -> None:
    assert physical_gpus(["1", "0"], None) == ["1", "0"]
    assert physical_gpus(["0", "3"], "2,4,6,7") == ["2", "7"]
    assert physical_gpus(["1"], "GPU-aaaa,GPU-bbbb") == ["GPU-bbbb"]


def test_an_address_beyond_the_visible_list_names_both() -> None:
    with pytest.raises(GpuPlacementError, match=r"GPU address 2, but CUDA_VISIBLE_DEVICES='4,5' lists only 2 "
                                                r"device\(s\)"):
        physical_gpus(["2"], "4,5")
    with pytest.raises(GpuPlacementError, match=r"address 0, but CUDA_VISIBLE_DEVICES='' lists only 0"):
        physical_gpus(["0"], "")


def test_a_rank_sees_its_ids_and_a_cpu_task_is_left_alone() -> None:
    assert visible_devices(["4", "6"]) == "4,6"
    assert visible_devices(["GPU-aaaa"]) == "GPU-aaaa"
    assert visible_devices([]) is None
    assert place([], "4,5") is None
    placed = place(["1", "0"], "4,5")
    assert placed is not None and placed.visible == "5,4" and placed.addresses == ("1", "0")


# several processes per task ----------------------------------------------------------


def test_processes_of_one_task_get_distinct_slices() -> None:
    four = ["0", "1", "2", "3"]
    assert [split_gpus(four, 4, j) for j in range(4)] == [["0"], ["1"], ["2"], ["3"]]
    assert [split_gpus(four, 2, j) for j in range(2)] == [["0", "1"], ["2", "3"]]
    assert [split_gpus(["0", "1", "2", "3", "4"], 3, j) for j in range(3)] == [["0", "1"], ["2", "3"], ["4"]]
    assert split_gpus(four, 1, 0) == four


def test_more_processes_than_gpus_is_an_error() -> None:
    with pytest.raises(GpuPlacementError, match=r"3 processes cannot each have their own GPU: the task has 2 "
                                                r"\(\['0', '1'\]\); start at most 2"):
        split_gpus(["0", "1"], 3, 0)
    with pytest.raises(ValueError, match=r"local_index 2 is outside 0\.\.1"):
        split_gpus(["0", "1"], 2, 2)
    with pytest.raises(ValueError, match=r"processes must be a positive integer, got 0"):
        split_gpus(["0"], 0, 0)


# fractional amounts --------------------------------------------------------------------


@pytest.mark.parametrize(("amount", "per_task", "sharing"),
                         [(1, 1, 1), (2, 2, 1), (2.0, 2, 1), (0.5, 1, 2), (0.25, 1, 4), (0.1, 1, 10), (0.3, 1, 3)])
def test_amounts(amount: float, per_task: int, sharing: int) -> None:
    assert gpus_per_task(amount) == per_task
    assert tasks_per_gpu(amount) == sharing


@pytest.mark.parametrize(("amount", "message"), [
    (0, "must be a positive number, got 0"),
    (-1, "must be a positive number"),
    (float("nan"), "must be a positive number"),
    (True, "must be a positive number"),
    (1.5, r"1\.5: an amount of 1 or more must be a whole number"),
    (0.75, r"0\.75: a fractional amount must be at most 0\.5"),
])
def test_bad_amounts(amount: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tasks_per_gpu(amount)


# ordinals in this process ---------------------------------------------------------------


def test_ordinals_follow_what_cuda_saw() -> None:
    assert RankGpus(("1", "0"), ("5", "4"), "4,5").ordinals() == [0, 1]
    started = RankGpus(("1",), ("5",), "4,5", cuda_started_before=True, cuda_saw="4,5")
    assert started.ordinals() == [1]
    assert process_ordinals(["2"], None) == [2]
    assert process_ordinals(["GPU-b"], "GPU-a,GPU-b") == [1]
    with pytest.raises(GpuPlacementError, match=r"CUDA_VISIBLE_DEVICES=None, which does not show this rank's GPU "
                                                r"GPU-b"):
        process_ordinals(["GPU-b"], None)


# the session ----------------------------------------------------------------------------


class _Native:
    """The one thing RankSession reads of pyspark's TaskContext for GPUs: ``resources()``."""

    def __init__(self, addresses: list[str]) -> None:
        self._resources = {"gpu": SimpleNamespace(name="gpu", addresses=addresses)} if addresses else {}

    def resources(self) -> dict[str, Any]:
        return self._resources


@pytest.fixture
def spec(server: CoordinatorServer) -> Iterator[Any]:
    def make() -> TaskSpec:
        handle = server.add_gang(1)
        return TaskSpec(gang_id=handle.gang_id, secret=handle.secret, host=handle.host, port=handle.port,
                        world_size=1, heartbeat_interval=None)

    yield make


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv(VISIBLE, raising=False)
    monkeypatch.setattr(lifecycle._CudaStart, "known", False)
    monkeypatch.setattr(lifecycle._CudaStart, "saw", None)
    yield monkeypatch


def test_session_narrows_and_restores(spec: Any, clean_env: pytest.MonkeyPatch) -> None:
    with RankSession(spec(), 0, native=_Native(["1"])):
        assert os.environ[VISIBLE] == "1"
        placed = rank_gpus()
        assert placed is not None and placed.physical == ("1",) and placed.ordinals() == [0]
    assert VISIBLE not in os.environ and rank_gpus() is None

    clean_env.setenv(VISIBLE, "4,5")
    with RankSession(spec(), 0, native=_Native(["1"])):
        assert os.environ[VISIBLE] == "5"
    assert os.environ[VISIBLE] == "4,5"


def test_session_restores_after_a_failing_body(spec: Any, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(VISIBLE, "GPU-a,GPU-b")
    with pytest.raises(ZeroDivisionError), RankSession(spec(), 0, native=_Native(["1"])):
        assert os.environ[VISIBLE] == "GPU-b"
        1 / 0  # noqa: B018
    assert os.environ[VISIBLE] == "GPU-a,GPU-b"


def test_session_without_gpus_or_task_leaves_the_env_alone(spec: Any, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(VISIBLE, "4,5")
    with RankSession(spec(), 0, native=_Native([])):
        assert os.environ[VISIBLE] == "4,5" and rank_gpus() is None
    with RankSession(spec(), 0):  # a rank a launcher started outside Spark (torch local mode)
        assert os.environ[VISIBLE] == "4,5" and rank_gpus() is None


def test_an_unmappable_address_fails_the_rank_clearly(spec: Any, server: CoordinatorServer,
                                                      clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(VISIBLE, "4")
    with pytest.raises(GpuPlacementError, match=r"address 1, but CUDA_VISIBLE_DEVICES='4' lists only 1"):
        with RankSession(spec(), 0, native=_Native(["1"])):
            pass  # never runs
    assert os.environ[VISIBLE] == "4"


def test_cuda_started_earlier_keeps_its_numbering(spec: Any, clean_env: pytest.MonkeyPatch) -> None:
    started = {"now": False}
    fake_torch = SimpleNamespace(cuda=SimpleNamespace(is_initialized=lambda: started["now"]))
    clean_env.setitem(sys.modules, "torch", fake_torch)
    clean_env.setenv(VISIBLE, "4,5")
    with RankSession(spec(), 0, native=_Native(["1"])):
        started["now"] = True  # CUDA starts inside the first rank: it sees only device 5
    assert os.environ[VISIBLE] == "4,5"
    with RankSession(spec(), 0, native=_Native(["1"])):
        placed = rank_gpus()
        assert placed is not None and placed.cuda_started_before and placed.cuda_saw == "5"
        assert placed.ordinals() == [0] and os.environ[VISIBLE] == "5"  # children still see their own GPU
    with RankSession(spec(), 0, native=_Native(["0"])):  # device 4 is not visible to this process's CUDA
        placed = rank_gpus()
        assert placed is not None
        with pytest.raises(GpuPlacementError, match=r"started with CUDA_VISIBLE_DEVICES='5', which does not show "
                                                    r"this rank's GPU 4: .*spark.python.worker.reuse=false"):
            placed.ordinals()


def test_cuda_started_before_any_rank_saw_the_workers_value(spec: Any, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setitem(sys.modules, "torch", SimpleNamespace(cuda=SimpleNamespace(is_initialized=lambda: True)))
    clean_env.setenv(VISIBLE, "4,5")
    with RankSession(spec(), 0, native=_Native(["1"])):
        placed = rank_gpus()
        assert placed is not None and placed.cuda_saw == "4,5" and placed.ordinals() == [1]
