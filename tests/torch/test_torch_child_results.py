"""Fresh-process ranks (``use_subprocess=True``) whose return value cannot be pickled: a clear PayloadError.

Real Spark (local[2]) and real torch (gloo on CPU). Functions shipped to ranks are defined inside
the tests (workers cannot import test modules).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2

pytest.importorskip("torch")
import sparkhydrogen.torch as h2torch  # noqa: E402

pytestmark = [pytest.mark.spark, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local[2]") as spark:
        yield spark.sparkContext


@pytest.mark.parametrize("mode", [{"use_subprocess": True}, {"local_mode": True}], ids=["use_subprocess", "local"])
def test_an_unpicklable_return_value_of_a_child_process_is_a_payload_error_naming_rank_and_type(
        sc: Any, mode: dict[str, bool]) -> None:
    def train() -> Any:
        import threading

        import torch.distributed as dist

        return threading.Lock() if dist.get_rank() == 1 else "fine"

    with pytest.raises(h2.GangFailedError) as caught:
        h2torch.run(train, num_processes=2, stream_logs=False, return_all=True, **mode)
    error = caught.value
    assert error.failed_rank == 1
    assert error.cause is not None and error.cause.type == "sparkhydrogen.errors.PayloadError", error
    assert "before it reported an error" not in str(error)
    assert "rank 1 raised sparkhydrogen.errors.PayloadError: return value of rank 1 of type _thread.lock cannot " \
           "be pickled" in str(error)


def test_a_value_only_rank_0_returns_is_the_only_one_pickled(sc: Any) -> None:
    def train() -> Any:
        import threading

        import torch.distributed as dist

        return "rank 0's" if dist.get_rank() == 0 else threading.Lock()  # dropped, as in-process: never pickled

    assert h2torch.run(train, num_processes=2, use_subprocess=True, stream_logs=False) == "rank 0's"
