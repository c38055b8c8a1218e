"""The launch layer above the Spark boundary, on a fake target: no JVM.

Placement choice, slot preflight, job tags around the user's own local properties, the
retry policy and the translation of failed Spark jobs into our errors.
"""

from __future__ import annotations

from typing import Any

import pytest
from fakespark import FakeTarget

from sparkhydrogen.errors import ErrorInfo, GangFailedError, GangSetupError, InsufficientSlotsError, LaunchError
from sparkhydrogen.launch import choice
from sparkhydrogen.launch.jobs import AttemptTag, stage_canceller
from sparkhydrogen.launch.preflight import ensure_slots
from sparkhydrogen.launch.runner import attempts, failure_error, gang_failed, launching
from sparkhydrogen.launch.session import INTERRUPT_ON_CANCEL

MODULE_MISSING = """An error occurred while calling o123.collectAndServe.
: org.apache.spark.SparkException: Job aborted due to stage failure: Task 0 in stage 3.0 failed 1 times
org.apache.spark.api.python.PythonException: Traceback (most recent call last):
  File "/usr/lib/python3/pyspark/worker.py", line 1880, in main
    func, profiler, deserializer, serializer = read_command(pickleSer, infile)
  File "/usr/lib/python3/pyspark/serializers.py", line 471, in loads
    return cloudpickle.loads(obj, encoding=encoding)
ModuleNotFoundError: No module named 'sparkhydrogen'
\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.handlePythonException(PythonRunner.scala:624)
"""


def test_placement_is_chosen_from_a_snapshot_without_starting_anything() -> None:
    assert choice.choose(choice.settings_of(FakeTarget())) == "barrier"
    dynamic = FakeTarget(master_url="spark://m:7077", settings={"spark.dynamicAllocation.enabled": "true"})
    assert choice.choose(choice.settings_of(dynamic)) == "coordinated"
    assert "SPARK-24942" in choice.reason(choice.settings_of(dynamic))
    forced = FakeTarget(settings={choice.PLACEMENT_KEY: "Coordinated"})
    assert choice.choose(choice.settings_of(forced)) == "coordinated"
    assert choice.choose(choice.settings_of(FakeTarget(), data=True)) == "coordinated"
    assert choice.choose(choice.settings_of(FakeTarget(is_connect=True))) == "embedded"
    with pytest.raises(ValueError, match="spark.hydrogen.launch.placement must be one of auto, barrier, coordinated"):
        choice.settings_of(FakeTarget(settings={choice.PLACEMENT_KEY: "everywhere"}))


def test_preflight_names_the_numbers() -> None:
    target = FakeTarget(master_url="local[4]", slots=4)
    assert ensure_slots(target, 4).slots == 4
    with pytest.raises(InsufficientSlotsError, match=r"needs 5 slots but the cluster has 4 \(master local\[4\]"):
        ensure_slots(target, 5)
    refused = FakeTarget(master_url="yarn", settings={"spark.dynamicAllocation.enabled": "true"})
    with pytest.raises(LaunchError, match="SPARK-24942"):
        ensure_slots(refused, 2)


def test_a_local_cluster_with_every_executor_up_is_short_for_good() -> None:
    # a gang asking 2 GPUs a task on local-cluster[2,2,1024]: 1 slot per executor, both executors up (the
    # driver is listed too): the shortfall is the gang's resources, not executors starting, so no startup wait
    target = FakeTarget(master_url="local-cluster[2,2,1024]", slots=2, executors=3)
    with pytest.raises(InsufficientSlotsError, match=r"needs 4 slots but the cluster has 2 \(2 executor") as err:
        ensure_slots(target, 4)
    assert "waited" not in str(err.value)


def test_job_tags_sit_beside_the_users_local_properties() -> None:
    target = FakeTarget(properties={INTERRUPT_ON_CANCEL: "false"})
    with AttemptTag(target, "sparkhydrogen-x-0") as tag:
        assert target.tags == {"sparkhydrogen-x-0"} and target.properties[INTERRUPT_ON_CANCEL] == "true"
        tag.cancel("test")
    assert target.tags == set() and target.properties == {INTERRUPT_ON_CANCEL: "false"}  # the user's value is back
    assert ("cancel_tag", "sparkhydrogen-x-0") in target.log


def test_an_aborted_gated_attempt_cancels_its_stage() -> None:
    target = FakeTarget()
    stage_canceller(target)((0, 17, 0), ErrorInfo("ZeroDivisionError", "boom", 1))
    stage_canceller(target)((0, -1, 0), ErrorInfo("GangStartTimeoutError", "never started"))  # no stage yet
    assert [entry for entry in target.log if entry[0] == "cancel_stage"] == [("cancel_stage", 17)]


def _failing(errors: list[BaseException]) -> Any:
    def action() -> str:
        launching()
        if errors:
            raise errors.pop(0)
        return "done"

    return action


def _gang_failure(rank: int) -> GangFailedError:
    return gang_failed("g", ErrorInfo("ZeroDivisionError", f"rank {rank} divided by zero", rank))


def test_a_failed_gang_is_retried_with_a_new_job_tag_per_attempt() -> None:
    target = FakeTarget()
    assert attempts(_failing([_gang_failure(0), _gang_failure(1)]), max_retries=2, retry_backoff=0,
                    target=target) == "done"
    tags = [tag for kind, tag in target.log if kind == "tag"]
    assert len(tags) == 3 and len(set(tags)) == 3 and tags[0].endswith("-0") and tags[2].endswith("-2")
    assert target.tags == set()  # every tag was removed again


def test_retries_exhausted_name_every_attempt() -> None:
    expected = r"(?s)failed on all 2 attempts.*attempt 0: .*rank 0.*attempt 1: .*rank 1"
    with pytest.raises(GangFailedError, match=expected):
        attempts(_failing([_gang_failure(0), _gang_failure(1)]), max_retries=1, retry_backoff=0, target=FakeTarget())


def test_what_cannot_succeed_is_not_retried_and_a_bug_is_not_translated() -> None:
    target = FakeTarget()
    lost = failure_error("g", None, RuntimeError("Job aborted due to stage failure: executor 1 lost"))
    assert type(lost) is LaunchError and "executor 1 lost" in str(lost)  # no Python exception: Spark's word
    error = _setup_error()
    assert isinstance(error, GangSetupError)
    with pytest.raises(GangSetupError):
        attempts(_failing([error, _gang_failure(0)]), max_retries=3, retry_backoff=0, target=target)
    assert len([t for k, t in target.log if k == "tag"]) == 1  # one attempt only
    with pytest.raises(KeyError):  # a bug in the action itself propagates as it is
        attempts(_failing([KeyError("oops")]), max_retries=3, retry_backoff=0, target=target)


def _setup_error() -> LaunchError:
    class SparkText(Exception):
        def __str__(self) -> str:
            return MODULE_MISSING

    error = failure_error("train", None, SparkText())
    assert "No module named 'sparkhydrogen'" in str(error) and "not retried" in str(error)
    return error
