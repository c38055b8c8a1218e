"""``sparkhydrogen.barrier(df)``: gang-scheduled ``mapInPandas`` / ``mapInArrow`` on DataFrames.

Classic PySpark: the coordinator runs in the driver, as for RDDs. Spark Connect: the
client is not reachable from executors, so the coordinator runs inside rank 0's task and
its address reaches the other ranks once through Spark's native ``allGather``.
"""

from __future__ import annotations

import functools
import logging
import secrets
import uuid
from typing import Any, Callable, Iterable, Iterator, Optional

from .gang import declare_gang
from .task import TaskSpec, run_rank

__all__ = ["DataFrameBarrier", "is_connect"]

log = logging.getLogger("sparkhydrogen.launch")


def is_connect(obj: Any) -> bool:
    """Whether ``obj`` (a DataFrame or SparkSession) belongs to Spark Connect."""
    return type(obj).__module__.startswith("pyspark.sql.connect")


def _classic_rank(spec: TaskSpec, fn: Callable[[Iterable[Any]], Iterable[Any]], batches: Iterable[Any]) -> Iterator[Any]:
    from pyspark import TaskContext

    native = TaskContext.get()
    index = native.partitionId() if native is not None else -1
    yield from run_rank(spec, lambda _i, rows: fn(rows), index, batches)


def _connect_rank(gang_id: str, secret: bytes, world_size: int, settle_timeout: float, tls: bool,
                  fn: Callable[[Iterable[Any]], Iterable[Any]], batches: Iterable[Any]) -> Iterator[Any]:
    """Task body under Spark Connect: rank 0 hosts the coordinator for the life of the gang."""
    from pyspark import BarrierTaskContext as NativeBarrierTaskContext

    from ..config import CoordinatorConfig, TlsConfig
    from ..coordinator.server import CoordinatorServer

    native = NativeBarrierTaskContext.get()
    rank = native.partitionId()
    server: Optional[CoordinatorServer] = None
    offer = ""
    if rank == 0:
        host = native.getTaskInfos()[0].address.rsplit(":", 1)[0]
        server = CoordinatorServer(CoordinatorConfig(host=host, tls=TlsConfig(enabled=tls)))
        _, port = server.start()
        server.add_gang(world_size, "connect", gang_id=gang_id, secret=secret)
        offer = f"{host}:{port}#{server.tls_fingerprint or ''}"
    try:
        # once per gang, through Spark's own (encrypted where Spark encrypts) channel: the ~1 s native round
        address, _, pin = native.allGather(offer)[0].partition("#")
        host, port_text = address.rsplit(":", 1)
        spec = TaskSpec(gang_id=gang_id, secret=secret, host=host, port=int(port_text), world_size=world_size,
                        tls_fingerprint=pin or None)
        yield from run_rank(spec, lambda _i, rows: fn(rows), rank, batches)
    finally:
        if server is not None:
            _linger(server, gang_id, settle_timeout)
            server.stop()


def _linger(server: Any, gang_id: str, timeout: float) -> None:
    """Rank 0 keeps serving until the other ranks are done: finished, or told of an abort and gone."""
    import threading
    import time

    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not (server.gang_settled(gang_id) and server.stats()["connections"] == 0):
        if time.monotonic() > deadline:
            log.warning("rank 0 stops the embedded coordinator after %.0f s with ranks still connected", timeout)
            return
        pause.wait(0.02)


def _connect_needs_tls(df: Any) -> bool:
    """TLS for rank 0's coordinator when the session's Spark conf requires encryption (never downgrade)."""
    from .service import encryption_required_by

    conf = df.sparkSession.conf
    return encryption_required_by(lambda key: conf.get(key, None)) is not None


class DataFrameBarrier:
    """Wraps a DataFrame so that the next ``mapInPandas``/``mapInArrow`` runs as a gang.

    Each partition is one rank; it receives its partition's rows as pandas DataFrames
    (or Arrow record batches) and has the full :class:`~sparkhydrogen.BarrierTaskContext`.

    Example:
        >>> def train(batches):                                              # doctest: +SKIP
        ...     ctx = h2.BarrierTaskContext.get()
        ...     n = sum(len(b) for b in batches)
        ...     yield pd.DataFrame({"rank": [ctx.rank()], "rows": [sum(ctx.allGather(n))]})
        >>> h2.barrier(df, num_tasks=4).mapInPandas(train, "rank long, rows long").show()  # doctest: +SKIP
    """

    def __init__(self, df: Any, num_tasks: Optional[int] = None) -> None:
        self._df = df if num_tasks is None else df.repartition(num_tasks)
        self._num_tasks = num_tasks

    def mapInPandas(self, fn: Callable[[Iterable[Any]], Iterable[Any]], schema: Any) -> Any:
        """Like ``DataFrame.mapInPandas(fn, schema, barrier=True)``, served by our coordinator."""
        return self._launch("mapInPandas", fn, schema)

    def mapInArrow(self, fn: Callable[[Iterable[Any]], Iterable[Any]], schema: Any) -> Any:
        """Like ``DataFrame.mapInArrow(fn, schema, barrier=True)``, served by our coordinator."""
        return self._launch("mapInArrow", fn, schema)

    def _world_size(self) -> int:
        if self._num_tasks is not None:
            return self._num_tasks
        return int(self._df.rdd.getNumPartitions())  # plans the query; pass num_tasks to skip this

    def _launch(self, method: str, fn: Callable[[Iterable[Any]], Iterable[Any]], schema: Any) -> Any:
        if not callable(fn):
            raise TypeError(f"{method} needs a function, got {type(fn).__name__}")
        if is_connect(self._df):
            if self._num_tasks is None:
                raise ValueError(
                    "under Spark Connect the gang size cannot be read from the plan: pass "
                    "sparkhydrogen.barrier(df, num_tasks=N)"
                )
            body: Callable[..., Any] = functools.partial(
                _connect_rank, uuid.uuid4().hex, secrets.token_bytes(32), self._num_tasks, 600.0,
                _connect_needs_tls(self._df), fn)
        else:
            world = self._world_size()
            gang, attempt = declare_gang(self._df.sparkSession.sparkContext, world,
                                         getattr(fn, "__qualname__", method))
            body = functools.partial(_classic_rank, gang.spec(attempt), fn)
        return getattr(self._df, method)(body, schema, barrier=True)
