"""Checkpoints through spark.hydrogen.checkpoint.dir: ranks write state files, the driver keeps paths."""

from __future__ import annotations

import os
from typing import Any

import pytest
from sparkutil import spark_session

import sparkhydrogen as h2

pytestmark = [pytest.mark.spark, pytest.mark.timeout(240)]


def test_checkpoint_dir_keeps_large_state_off_the_driver(tmp_path: Any) -> None:
    ckpt = str(tmp_path / "ckpt")
    with spark_session("local[2]", **{"spark.hydrogen.checkpoint.dir": ckpt,
                                       "spark.hydrogen.checkpoint.maxSize": "1k"}) as spark:
        def train() -> tuple[int, int, list[str]]:
            import pathlib

            ctx = h2.BarrierTaskContext.get()
            state = ctx.restore() or {"step": 0, "blob": b""}
            while state["step"] < 4:
                if ctx.gangAttempt() == 0 and state["step"] == 2 and ctx.rank() == 0:
                    raise RuntimeError("crash after two checkpoints")
                state = {"step": state["step"] + 1, "blob": os.urandom(100_000)}  # far above maxSize
                ctx.checkpoint(state)
            ctx.barrier()  # every rank has dropped its superseded file
            files = sorted(p.name for p in pathlib.Path(ckpt).rglob("*.pkl"))
            return state["step"], len(state["blob"]), files

        results = h2.run(train, 2, max_retries=1, retry_backoff=0.1, spark=spark)
        assert [r[:2] for r in results] == [(4, 100_000)] * 2
        files = results[0][2]
        assert len(files) == 2 and all(f.startswith(("rank0-", "rank1-")) for f in files)  # only the last commit
        assert list((tmp_path / "ckpt").glob("gang-*")) == []  # released with its gang when run() returned
