"""Elastic gangs without Spark: the pure size choice, the size history's bounds, the runner's resizes, the coordinator.

The runner is driven with a fake target (``fakespark.FakeTarget``) and snapshots handed
in by the test; the coordinator is a real one on loopback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from fakespark import FakeTarget
from kit import start_ranks

import sparkhydrogen as h2
from sparkhydrogen.coordinator.server import CoordinatorServer
from sparkhydrogen.errors import ErrorInfo, GangFailedError, InsufficientSlotsError
from sparkhydrogen.launch.elastic import (
    RESIZE_TYPE,
    SizeHistory,
    SizeRange,
    SizeStep,
    SlotSnapshot,
    choose_size,
    growth,
    size_range,
)
from sparkhydrogen.launch.resize import AttemptSizer
from sparkhydrogen.launch.runner import attempts, gang_failed, launching

pytestmark = pytest.mark.timeout(60)


# -- the pure size choice -------------------------------------------------------------------


@pytest.mark.parametrize(("slots", "busy", "size"), [(2, 0, 2), (3, 0, 3), (4, 0, 4), (9, 0, 4), (5, 2, 3),
                                                     (1, 0, 0), (3, 2, 0), (0, 0, 0)])
def test_an_attempt_takes_the_free_slots_between_min_and_max(slots: int, busy: int, size: int) -> None:
    choice = choose_size(SizeRange(2, 4), SlotSnapshot(slots=slots, busy=busy, executors=slots))
    assert choice.size == size and choice.fits == (size > 0)
    assert f"{slots} slots" in choice.arithmetic and f"{busy} busy" in choice.arithmetic  # the arithmetic is logged
    assert ("wait for slots" in choice.arithmetic) == (size == 0)


def test_a_fixed_size_and_bad_ranges() -> None:
    assert size_range(3) == SizeRange(3, 3) and not SizeRange(3, 3).elastic
    assert size_range([2, 4]) == SizeRange(2, 4) and size_range(SizeRange(1, 2, "checkpoint")).grow == "checkpoint"
    with pytest.raises(ValueError, match=r"num_processes=\(4, 2\): min must not exceed max"):
        size_range((4, 2), "num_processes")
    with pytest.raises(ValueError, match="min must be >= 1"):
        size_range((0, 2))
    with pytest.raises(TypeError, match=r"an int or a \(min, max\) pair"):
        size_range((1, 2, 3))
    with pytest.raises(ValueError, match="grow='checkpoint' needs an elastic gang"):
        size_range(4, grow="checkpoint")
    with pytest.raises(ValueError, match="grow must be one of"):
        size_range((1, 2), grow="always")


def test_growth_at_a_checkpoint_only_when_asked_and_below_max() -> None:
    ranged = SizeRange(2, 4, "checkpoint")
    assert growth(ranged, 2, SlotSnapshot(slots=4, busy=2)) == 4
    assert growth(ranged, 2, SlotSnapshot(slots=3, busy=2)) == 3
    assert growth(ranged, 2, SlotSnapshot(slots=2, busy=2)) is None  # no free slot
    assert growth(ranged, 4, SlotSnapshot(slots=8, busy=4)) is None  # at max
    assert growth(SizeRange(2, 4), 2, SlotSnapshot(slots=8, busy=2)) is None  # grow="attempt": boundaries only


def test_the_history_says_every_size_and_cause_and_bounds_shrinking() -> None:
    history = SizeHistory(SizeRange(1, 4))
    for attempt, (size, cause) in enumerate([(4, "start"), (3, "rank 1 lost"), (2, "rank 0 lost"),
                                             (4, "grew")]):
        history.record(SizeStep(attempt, size, cause))
    assert history.sizes == [4, 3, 2, 4] and history.shrinks == 2 and history.resizes == 3
    assert history.describe().startswith("sizes 4 -> 3 -> 2 -> 4 (attempt 0: 4 ranks, start; attempt 1: 3 ranks")
    assert history.too_many_shrinks(2) is None
    problem = history.too_many_shrinks(1)
    assert problem is not None and "shrank 2 times, more than max_retries=1" in problem and "rank 0 lost" in problem


# -- the runner: each attempt's size is an attempt parameter -------------------------------------------


def _snapshots(*slots: int) -> Callable[[], SlotSnapshot]:
    """The cluster's slots at each successive read (the last repeats)."""
    seen = iter(slots)
    last = [slots[0]]

    def read() -> SlotSnapshot:
        last[0] = next(seen, last[0])
        return SlotSnapshot(slots=last[0], executors=last[0])

    return read


def _sized_action(sizer: AttemptSizer, outcomes: list[Exception | None]) -> Callable[[], int]:
    """An action that 'launches' a gang of the attempt's size and then fails or returns that size, in turn."""
    queue: Iterator[Exception | None] = iter(outcomes)

    def action() -> int:
        launching()
        outcome = next(queue, None)
        if outcome is not None:
            raise outcome
        return sizer.current

    return action


def _lost(rank: int) -> GangFailedError:
    return gang_failed("train", ErrorInfo("RankLostError", f"rank {rank}'s executor was lost", rank=rank))


def test_after_a_lost_rank_the_next_attempt_runs_at_the_size_the_cluster_still_holds() -> None:
    sizer = AttemptSizer(None, SizeRange(2, 4), "train", wait=5, snapshot=_snapshots(4, 3), poll=0.01)
    assert attempts(_sized_action(sizer, [_lost(2)]), max_retries=2, retry_backoff=0, target=FakeTarget(),
                    sizer=sizer) == 3
    assert sizer.history.sizes == [4, 3]
    assert sizer.history.steps[1].cause.startswith("attempt 0 failed: gang 'train' failed: rank 2")


def test_a_gang_that_keeps_failing_names_its_sizes_and_causes() -> None:
    sizer = AttemptSizer(None, SizeRange(2, 4), "train", wait=5, snapshot=_snapshots(4, 3, 2), poll=0.01)
    with pytest.raises(GangFailedError, match=r"(?s)failed on all 3 attempts.*sizes 4 -> 3 -> 2 \(attempt 0") as info:
        attempts(_sized_action(sizer, [_lost(3), _lost(2), _lost(1)]), max_retries=2, retry_backoff=0,
                 target=FakeTarget(), sizer=sizer)
    assert [step.size for step in info.value.size_history] == [4, 3, 2]  # type: ignore[attr-defined]


def test_below_min_the_next_attempt_waits_bounded_then_fails_with_the_history() -> None:
    sizer = AttemptSizer(None, SizeRange(2, 4), "train", wait=0.2, snapshot=_snapshots(4, 1), poll=0.01)
    with pytest.raises(GangFailedError, match=r"(?s)free slots 1 = 1 slots.*< min 2.*sizes 4 \(attempt 0"):
        attempts(_sized_action(sizer, [_lost(0)]), max_retries=3, retry_backoff=0, target=FakeTarget(), sizer=sizer)


def test_below_min_at_the_start_is_insufficient_slots() -> None:
    sizer = AttemptSizer(None, SizeRange(3, 4), "train", wait=0.1, snapshot=_snapshots(2), poll=0.01)
    with pytest.raises(InsufficientSlotsError, match=r"did not start: free slots 2 .* < min 3"):
        attempts(_sized_action(sizer, []), max_retries=3, retry_backoff=0, target=FakeTarget(), sizer=sizer)


def _short_at_launch(sizer: AttemptSizer, refusals: int) -> Callable[[], int]:
    """An action whose preflight finds fewer slots than the sizer saw ``refusals`` times, then launches."""
    left = [refusals]

    def action() -> int:
        if left[0] > 0:
            left[0] -= 1
            raise InsufficientSlotsError(f"barrier job needs {sizer.current} slots but the cluster has 2")
        launching()
        return sizer.current

    return action


def test_an_attempt_whose_slots_shrink_before_its_launch_is_sized_again() -> None:
    sizer = AttemptSizer(None, SizeRange(2, 4), "train", wait=5, snapshot=_snapshots(3, 2), poll=0.01)
    assert attempts(_short_at_launch(sizer, 1), max_retries=0, retry_backoff=0, target=FakeTarget(),
                    sizer=sizer) == 2
    assert sizer.history.sizes == [2]  # one attempt, one size: sized again, not a shrink
    assert sizer.history.steps[0].cause.startswith("the slots changed before the launch: barrier job needs 3")


def test_a_launch_that_keeps_finding_fewer_slots_fails_at_the_start_bound() -> None:
    sizer = AttemptSizer(None, SizeRange(2, 4), "train", wait=0.2, snapshot=_snapshots(3), poll=0.01)
    with pytest.raises(InsufficientSlotsError, match=r"(?s)needs 3 slots but the cluster has 2.*sizes 3"):
        attempts(_short_at_launch(sizer, 10**6), max_retries=3, retry_backoff=0, target=FakeTarget(), sizer=sizer)


def test_growing_at_a_checkpoint_relaunches_at_once_without_using_a_retry() -> None:
    grew = gang_failed("train", ErrorInfo(RESIZE_TYPE, "grows from 2 to 4 ranks at this checkpoint", rank=0))
    sizer = AttemptSizer(None, SizeRange(2, 4, "checkpoint"), "train", wait=5, snapshot=_snapshots(2, 4), poll=0.01)
    assert attempts(_sized_action(sizer, [grew]), max_retries=0, retry_backoff=0, target=FakeTarget(),
                    sizer=sizer) == 4
    assert sizer.history.sizes == [2, 4] and "grows at a checkpoint" in sizer.history.steps[1].cause


def test_relaunches_to_grow_that_find_no_slots_stop_the_growing() -> None:
    sizer = AttemptSizer(None, SizeRange(2, 4, "checkpoint"), "train", wait=5, snapshot=_snapshots(2), poll=0.01)
    sizer.history.record(SizeStep(0, 2, "start"))
    for attempt in (1, 2, 3):
        sizer.next(attempt, "grows", growing=True)
    assert sizer.idle_grows == 3
    with sizer.watching(lambda: None):  # no watcher is started any more
        assert not any(t.name == "sparkhydrogen-growth-watcher" for t in threading.enumerate())


def test_a_fixed_size_never_reads_the_cluster() -> None:
    def refuse() -> SlotSnapshot:
        raise AssertionError("a fixed-size gang must not read the slots")

    sizer = AttemptSizer(None, SizeRange(3, 3), "train", snapshot=refuse)
    assert attempts(_sized_action(sizer, [_lost(0)]), max_retries=1, retry_backoff=0, target=FakeTarget(),
                    sizer=sizer) == 3


def test_an_elastic_gang_needs_classic_spark() -> None:
    with pytest.raises(ValueError, match="Spark Connect cannot: pass a fixed size"):
        h2.run(lambda: 0, (2, 4), spark=_ConnectLike())


def test_tensorflow_says_it_cannot_and_torch_says_where_it_cannot() -> None:
    import sparkhydrogen.tensorflow as h2tf
    import sparkhydrogen.torch as h2torch

    with pytest.raises(ValueError, match="TensorFlow gangs have a fixed size: this launcher does not resize them"):
        h2tf.run(lambda: 0, num_workers=(2, 4))
    with pytest.raises(ValueError, match="not with local_mode=True or processes_per_task > 1"):
        h2torch.run(lambda: 0, num_processes=(2, 4), local_mode=True)
    with pytest.raises(ValueError, match=r"num_processes=\(4, 2\): min must not exceed max"):
        h2torch.run(lambda: 0, num_processes=(4, 2))


def test_jax_horovod_and_frameworks_take_a_range() -> None:
    import sparkhydrogen.horovod as h2hvd
    import sparkhydrogen.jax as h2jax
    from sparkhydrogen.frameworks import TorchDistributed
    from sparkhydrogen.frameworks import run as run_framework

    for launch in (lambda: h2jax.run(lambda: 0, num_processes=(2, 4)),
                   lambda: h2hvd.run(lambda: 0, num_proc=(2, 4)),
                   lambda: run_framework(TorchDistributed(), lambda: 0, num_tasks=h2.SizeRange(2, 4))):
        with pytest.raises(ValueError, match="no active SparkSession"):  # the range was accepted
            launch()
    with pytest.raises(ValueError, match=r"num_processes=\(3, 1\): min must not exceed max"):
        h2jax.run(lambda: 0, num_processes=(3, 1))


class _ConnectLike:
    """Stands for a Spark Connect session (the module name is what ``is_connect`` reads)."""

    session_id = "s"
    conf = type("Conf", (), {"get": staticmethod(lambda key, default=None: default)})()


_ConnectLike.__module__ = "pyspark.sql.connect.session"


# -- the coordinator: one gang, resized, with its checkpoint ------------------------------------------


def test_a_resized_gang_restores_the_checkpoint_with_the_size_it_was_written_at(server: CoordinatorServer) -> None:
    handle = server.add_gang(4, name="elastic")

    def checkpoint(client: Any, rank: int) -> None:
        client.collective("checkpoint", f"state {rank}".encode())

    start_ranks(handle, checkpoint).values()
    server.resize_gang(handle.gang_id, 3)

    def restore(client: Any, rank: int) -> Any:
        return client.restored(), client.restored(of=3), client.restored(of=7)

    values = start_ranks(replace(handle, world_size=3), restore, gang_attempt=1).values()
    assert [values[r][0] for r in range(3)] == [(f"state {r}".encode(), 4, r) for r in range(3)]
    assert values[0][1] == (b"state 3", 4, 3) and values[0][2] == (None, 4, None)
    server.resize_gang(handle.gang_id, 6)
    larger = start_ranks(replace(handle, world_size=6), lambda c, r: c.restored(), gang_attempt=2).values()
    assert larger[5] == (b"state 0", 4, 0)  # a rank the checkpoint has no state for gets rank 0's


def test_an_offered_size_reaches_the_ranks_in_the_next_committed_checkpoint(server: CoordinatorServer) -> None:
    handle = server.add_gang(2, name="grows")

    def two_checkpoints(client: Any, rank: int) -> list[int | None]:
        offers = []
        client.collective("checkpoint", b"a")
        offers.append(client.grow_offer)
        if rank == 0:
            server.offer_growth(handle.gang_id, 4)
        client.collective("barrier", b"")
        client.collective("checkpoint", b"b")
        offers.append(client.grow_offer)
        return offers

    assert start_ranks(handle, two_checkpoints).values() == {0: [None, 4], 1: [None, 4]}
