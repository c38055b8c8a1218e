"""sparkhydrogen.jax.run on real Spark (local[3]) with real JAX on CPU (gloo collectives).

Functions shipped to ranks are defined inside the tests (workers cannot import test modules).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2

pytest.importorskip("jax")
import sparkhydrogen.jax as h2jax  # noqa: E402

pytestmark = [pytest.mark.spark, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def sc() -> Iterator[Any]:
    with spark_session("local[3]") as spark:
        yield spark.sparkContext


def test_three_processes_see_each_other_and_allgather_and_psum_across_them(sc: Any) -> None:
    def step(offset: float, scale: float = 1.0) -> dict[str, Any]:
        import os

        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.experimental import multihost_utils
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        gathered = multihost_utils.process_allgather(jnp.array([jax.process_index() * scale + offset]))
        mesh = Mesh(np.array(jax.devices()), ("i",))
        local = np.array([float(jax.process_index() + 1)])
        arr = jax.make_array_from_process_local_data(NamedSharding(mesh, P("i")), local)
        total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(arr)
        return {"count": jax.process_count(), "index": jax.process_index(), "devices": jax.device_count(),
                "gathered": np.asarray(gathered).ravel().tolist(), "psum": float(total.addressable_data(0)),
                "coordinator": os.environ["JAX_COORDINATOR_ADDRESS"]}

    out = h2jax.run(step, 10.0, num_processes=3, scale=2.0, return_all=True)
    assert [o["index"] for o in out] == [0, 1, 2]
    assert {o["count"] for o in out} == {3} and {o["devices"] for o in out} == {3}
    assert [o["gathered"] for o in out] == [[10.0, 12.0, 14.0]] * 3
    assert [o["psum"] for o in out] == [6.0] * 3  # 1 + 2 + 3, reduced across the processes
    assert len({o["coordinator"] for o in out}) == 1 and out[0]["coordinator"].startswith("127.0.0.1:")

    # again, in the same (reused) Python workers: JAX was shut down and its backends cleared
    assert h2jax.run(step, 0.0, num_processes=2)["gathered"] == [0.0, 1.0]  # rank 0's result by default

    def leftovers() -> tuple[bool, list[str]]:
        import os
        import sys

        jax = sys.modules.get("jax")
        initialised = bool(jax is not None and jax.distributed.is_initialized())
        return initialised, sorted(k for k in os.environ if k.startswith("JAX_"))

    assert h2.run(leftovers, 3) == [(False, [])] * 3


def test_a_failing_rank_aborts_its_peers_at_once_and_is_named(sc: Any) -> None:
    def step() -> None:
        import jax
        import jax.numpy as jnp
        from jax.experimental import multihost_utils

        if jax.process_index() == 1:
            raise ValueError("rank one cannot go on")
        multihost_utils.process_allgather(jnp.array([1]))  # the others wait for rank 1 here

    started = time.monotonic()
    with pytest.raises(h2.GangFailedError, match=r"(?s)rank 1 raised ValueError: rank one cannot go on.*"
                                                 r"traceback of rank 1.*in step"):
        h2jax.run(step, num_processes=3)
    # far below JAX's own timeouts (heartbeats 100 s, initialisation 300 s): the gang was aborted
    assert time.monotonic() - started < 60


def test_shutdown_runs_after_fn_raises_and_retries_relaunch_the_gang(sc: Any, tmp_path: Path) -> None:
    def step(folder: str) -> int:
        import os

        import jax

        marker = os.path.join(folder, "failed-once")
        if jax.process_index() == 0 and not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("first attempt fails")
        return jax.process_count()

    assert h2jax.run(step, str(tmp_path), num_processes=2, max_retries=1, retry_backoff=0.0) == 2


def test_output_streams_to_the_driver_prefixed(sc: Any, capfd: pytest.CaptureFixture[str]) -> None:
    def step() -> None:
        import jax

        print(f"hello from process {jax.process_index()}", flush=True)

    h2jax.run(step, num_processes=2)
    out = capfd.readouterr().out
    assert "[rank 0] hello from process 0" in out and "[rank 1] hello from process 1" in out


def test_arguments_are_checked_before_launch(sc: Any) -> None:
    with pytest.raises(ValueError, match=r"num_processes must be >= 1, got 0"):
        h2jax.run(print, num_processes=0)
    with pytest.raises(ValueError, match=r"initialization_timeout must be a positive number of seconds"):
        h2jax.run(print, num_processes=1, initialization_timeout=0)
    with pytest.raises(TypeError, match=r"fn must be callable"):
        h2jax.run("step.py", num_processes=1)  # type: ignore[arg-type]


def test_an_elastic_range_starts_at_the_slots_there_are_and_jax_sees_that_size(sc: Any) -> None:
    """``num_processes=(2, 6)`` on local[3]: the attempt's size is the 3 free slots, and JAX is formed at 3."""

    def step() -> dict[str, Any]:
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.experimental import multihost_utils

        ctx = h2.BarrierTaskContext.get()
        gathered = multihost_utils.process_allgather(jnp.array([float(jax.process_index())]))
        return {"count": jax.process_count(), "world": ctx.worldSize(),
                "gathered": np.asarray(gathered).ravel().tolist()}

    out = h2jax.run(step, num_processes=(2, 6), return_all=True)
    assert [o["count"] for o in out] == [3, 3, 3] and [o["world"] for o in out] == [3, 3, 3]
    assert out[0]["gathered"] == [0.0, 1.0, 2.0]
