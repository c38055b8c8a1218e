"""Our BarrierTaskContext as a pyspark.BarrierTaskContext, in pyspark's singleton, and its checkpoint files.

No SparkContext: pyspark's task-context classes are plain Python, and the coordinator is a real
server on loopback with real clients (one thread per rank, joined with a timeout).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pyspark.taskcontext import BarrierTaskContext as PySparkBarrierTaskContext
from pyspark.taskcontext import BarrierTaskInfo as PySparkBarrierTaskInfo
from pyspark.taskcontext import TaskContext as PySparkTaskContext

import sparkhydrogen as h2
from sparkhydrogen.config import CoordinatorConfig
from sparkhydrogen.context import _StateFile
from sparkhydrogen.coordinator.client import CoordinatorClient
from sparkhydrogen.coordinator.server import CoordinatorServer, GangHandle
from sparkhydrogen.errors import CheckpointError, CoordinatorConnectionError

pytestmark = pytest.mark.timeout(60)

SLOT = "_taskContext"
_MISSING = object()
JOIN = 20.0


def _slots() -> tuple[Any, Any]:
    return PySparkTaskContext.__dict__.get(SLOT, _MISSING), PySparkBarrierTaskContext.__dict__.get(SLOT, _MISSING)


@pytest.fixture(autouse=True)
def pristine_pyspark() -> Iterator[None]:
    """Every test starts and ends with pyspark's classes as a fresh driver process has them."""
    saved = _slots()
    yield
    h2.BarrierTaskContext._current = None
    h2.BarrierTaskContext._displaced = None
    for owner, value in zip((PySparkTaskContext, PySparkBarrierTaskContext), saved, strict=True):
        if value is _MISSING:
            if SLOT in owner.__dict__:
                delattr(owner, SLOT)
        else:
            setattr(owner, SLOT, value)


class _NoClient:
    gang_id = "none"

    def collective(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no collective expected")


def _native(**fields: Any) -> PySparkBarrierTaskContext:
    """pyspark's own barrier context, made the way its worker makes it (3.5 and 4.x alike)."""
    native = PySparkBarrierTaskContext._getOrCreate()
    for name, value in fields.items():
        setattr(native, f"_{name}", value)
    PySparkTaskContext._setTaskContext(native)
    return native


def _ours(native: Any = None, **kwargs: Any) -> h2.BarrierTaskContext:
    return h2.BarrierTaskContext(_NoClient(), 1, 2, native, **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------ a pyspark context


def test_is_a_pyspark_barrier_task_context_and_not_its_singleton() -> None:
    native = _native(stageId=3)
    ours = _ours(native)
    assert isinstance(ours, PySparkBarrierTaskContext) and isinstance(ours, PySparkTaskContext)
    assert ours is not native and ours is not _ours(native)  # pyspark's __new__ would return its singleton
    assert PySparkTaskContext.get() is native  # building ours installs nothing
    assert isinstance(h2.BarrierTaskInfo("h:1"), PySparkBarrierTaskInfo)


def test_set_installs_in_pyspark_singleton_and_none_restores_exactly() -> None:
    before = _slots()
    assert before[1] is _MISSING or before[1] is None
    ours = _ours()
    h2.BarrierTaskContext._set(ours)
    assert PySparkTaskContext.get() is ours and PySparkBarrierTaskContext.get() is ours
    assert h2.BarrierTaskContext.get() is ours
    h2.BarrierTaskContext._set(None)
    assert _slots() == before  # an attribute that was absent is absent again
    assert PySparkTaskContext.get() is before[0]
    with pytest.raises(h2.NotInGangError, match="outside a spark-hydrogen barrier task"):
        h2.BarrierTaskContext.get()


def test_set_none_puts_the_native_context_back() -> None:
    native = _native(stageId=5, partitionId=1)
    ours = _ours(native)
    h2.BarrierTaskContext._set(ours)
    assert PySparkBarrierTaskContext.get() is ours and PySparkTaskContext.get() is ours
    h2.BarrierTaskContext._set(_ours(native))  # replacing ours keeps what pyspark had before the first
    h2.BarrierTaskContext._set(None)
    assert PySparkTaskContext.get() is native and PySparkBarrierTaskContext.get() is native


def test_a_context_pyspark_cleared_does_not_leak_into_the_next_task() -> None:
    h2.BarrierTaskContext._set(_ours())
    PySparkTaskContext._setTaskContext(None)  # what pyspark's worker does when a task ends
    PySparkBarrierTaskContext._setTaskContext(None)
    nxt = _native(stageId=9)  # the next task of a reused worker
    with pytest.raises(h2.NotInGangError):
        h2.BarrierTaskContext.get()
    h2.BarrierTaskContext._set(None)  # a late clean-up of the old rank
    assert PySparkTaskContext.get() is nxt


def test_pyspark_methods_answer_as_pyspark_documents() -> None:
    native = _native(stageId=4, partitionId=1, attemptNumber=0, taskAttemptId=17, cpus=2,
                     localProperties={"addresses": "h0:1, h1:2", "k": "v"}, resources={})
    ours = _ours(native)
    assert (ours.partitionId(), ours.stageId(), ours.attemptNumber(), ours.taskAttemptId(), ours.cpus()) == \
        (1, 4, 0, 17, 2)
    assert ours.getLocalProperty("k") == "v" and ours.getLocalProperty("nope") is None
    assert ours.resources() == {}
    assert [i.address for i in ours.getTaskInfos()] == ["h0:1", "h1:2"]
    assert [i.address for i in _ours(native, task_infos=["a:1", "b:2"]).getTaskInfos()] == ["a:1", "b:2"]
    # pyspark's own (unbound) methods read the fields ours copied from the native context
    assert PySparkTaskContext.stageId(ours) == 4 and PySparkTaskContext.getLocalProperty(ours, "k") == "v"
    if hasattr(PySparkTaskContext, "cpuAmount"):  # pyspark >= 4.3
        native._cpuAmount = __import__("decimal").Decimal("0.5")
        assert ours.cpuAmount() == native.cpuAmount()
    with pytest.raises(h2.NotInGangError, match="stageId"):
        _ours().stageId()


# ------------------------------------------------------------ checkpoint files


@pytest.fixture
def server() -> Iterator[CoordinatorServer]:
    srv = CoordinatorServer(CoordinatorConfig(host="127.0.0.1", port=0))
    srv.start()
    yield srv
    srv.stop()


def _client(handle: GangHandle, rank: int) -> CoordinatorClient:
    client = CoordinatorClient.connect((handle.host, handle.port), handle.gang_id, handle.secret, timeout=5.0)
    assert client.register(rank, host="unit") == handle.world_size
    return client


class _ReplyLost:
    """A real client whose checkpoint reply is lost after the coordinator committed (or the wait interrupted)."""

    def __init__(self, client: CoordinatorClient, error: BaseException) -> None:
        self._client, self._error = client, error
        self.gang_id = client.gang_id

    def collective(self, kind: str, payload: bytes = b"", root: int | None = None,
                   timeout: float | None = None) -> Any:
        self._client.collective(kind, payload, root=root, timeout=timeout)  # the round completes and commits
        raise self._error


def _two_ranks(handle: GangHandle, body: Callable[[CoordinatorClient, int], Any]) -> dict[int, Any]:
    out: dict[int, Any] = {}

    def run(rank: int) -> None:
        client = _client(handle, rank)
        try:
            out[rank] = body(client, rank)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            out[rank] = exc
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
        assert not t.is_alive()
    return out


@pytest.mark.parametrize("lost", [CoordinatorConnectionError("reply lost"), KeyboardInterrupt()],
                         ids=["lost-reply", "interrupted"])
def test_a_file_whose_commit_reached_the_coordinator_is_kept(server: CoordinatorServer, tmp_path: Any,
                                                             lost: BaseException) -> None:
    handle = server.add_gang(2, "ckpt")

    def body(client: CoordinatorClient, rank: int) -> Any:
        transport: Any = _ReplyLost(client, lost) if rank == 0 else client
        ctx = h2.BarrierTaskContext(transport, rank, 2, checkpoint_dir=str(tmp_path))
        try:
            ctx.checkpoint({"step": 1, "rank": rank})
        except BaseException as exc:  # noqa: BLE001
            return exc, client.restore()
        return None, client.restore()

    out = _two_ranks(handle, body)
    error, committed = out[0]
    assert type(error) is type(lost)
    state = __import__("pickle").loads(committed)
    assert isinstance(state, _StateFile) and os.path.exists(state.path)  # the coordinator's commit still loads
    assert state.load() == {"step": 1, "rank": 0}


def test_a_file_the_coordinator_refused_is_removed(server: CoordinatorServer, tmp_path: Any) -> None:
    handle = server.add_gang(2, "ckpt")

    def body(client: CoordinatorClient, rank: int) -> Any:
        ctx = h2.BarrierTaskContext(client, rank, 2, checkpoint_dir=str(tmp_path))
        if rank == 0:
            ctx.checkpoint({"step": 1})
        else:
            ctx.barrier()  # a mismatch: the round never completes

    out = _two_ranks(handle, body)
    assert isinstance(out[0], h2.CollectiveMismatchError)
    assert list(tmp_path.rglob("*.pkl")) == [] and list(tmp_path.rglob("*.tmp")) == []


def test_later_commit_supersedes_earlier_files(server: CoordinatorServer, tmp_path: Any) -> None:
    handle = server.add_gang(2, "ckpt")

    def body(client: CoordinatorClient, rank: int) -> Any:
        ctx = h2.BarrierTaskContext(client, rank, 2, checkpoint_dir=str(tmp_path))
        for step in range(3):
            ctx.checkpoint(step)
        return ctx.restore()

    assert _two_ranks(handle, body) == {0: 2, 1: 2}
    assert len(list(tmp_path.rglob("*.pkl"))) == 2  # one file per rank: the last commit


def test_checkpoint_io_errors_are_checkpoint_errors(tmp_path: Any) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the checkpoint directory should be")
    ctx = h2.BarrierTaskContext(_NoClient(), 0, 1, checkpoint_dir=str(blocker))  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="cannot write checkpoint state") as info:
        ctx.checkpoint({"step": 1})
    assert not isinstance(info.value, TypeError) and isinstance(info.value, OSError)
    with pytest.raises(CheckpointError, match="cannot read checkpoint file"):
        _StateFile(str(tmp_path / "gone.pkl")).load()


def test_without_pyspark_loaded_the_first_context_still_is_a_pyspark_one() -> None:
    import subprocess
    import sys

    code = (
        "import sys, sparkhydrogen as h2; assert 'pyspark' not in sys.modules; "
        "ctx = h2.BarrierTaskContext(None, 0, 1); import pyspark; "
        "assert isinstance(ctx, pyspark.BarrierTaskContext); "
        "assert issubclass(h2.BarrierTaskContext, pyspark.TaskContext); "
        "assert isinstance(h2.BarrierTaskInfo('h:1'), pyspark.BarrierTaskInfo)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr
