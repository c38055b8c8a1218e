"""install()/uninstall()/installed(): idempotent, thread-safe, and pyspark restored exactly (no SparkContext)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

import sparkhydrogen.transparent as transparent

pytestmark = pytest.mark.timeout(60)


def _classes() -> list[type]:
    from pyspark import RDDBarrier

    classes: list[type] = [RDDBarrier, transparent._classic_dataframe()]
    connect = transparent._connect_dataframe()
    if connect is not None:
        classes.append(connect)
    return classes


def _snapshot() -> dict[tuple[str, str], Any]:
    names = ("mapPartitions", "mapPartitionsWithIndex", "mapInPandas", "mapInArrow", "rdd")
    return {(f"{c.__module__}.{c.__qualname__}", n): vars(c).get(n, "<absent>") for c in _classes() for n in names}


@pytest.fixture(autouse=True)
def off() -> Iterator[None]:
    transparent.uninstall()
    yield
    transparent.uninstall()


def test_install_is_idempotent_and_uninstall_restores_exactly() -> None:
    before = _snapshot()
    transparent.install()
    patched = _snapshot()
    transparent.install()
    assert _snapshot() == patched and transparent.is_installed()
    changed = {key for key in before if before[key] is not patched[key]}
    assert {n for _, n in changed} == {"mapPartitions", "mapPartitionsWithIndex", "mapInPandas", "mapInArrow", "rdd"}
    transparent.uninstall()
    transparent.uninstall()
    after = _snapshot()
    assert all(after[key] is before[key] for key in before) and not transparent.is_installed()


def test_patched_methods_keep_pyspark_signatures_and_docs() -> None:
    import inspect

    from pyspark import RDDBarrier

    original = {n: inspect.signature(getattr(RDDBarrier, n)) for n in ("mapPartitions", "mapPartitionsWithIndex")}
    frame = transparent._classic_dataframe()
    doc = frame.mapInPandas.__doc__
    with transparent.installed():
        for name, signature in original.items():
            assert inspect.signature(getattr(RDDBarrier, name)) == signature
        assert frame.mapInPandas.__doc__ == doc


def test_installed_blocks_nest_and_overlap_with_install() -> None:
    before = _snapshot()
    with transparent.installed():
        with transparent.installed():
            assert transparent.is_installed()
        assert transparent.is_installed()  # the outer block still holds it
    assert not transparent.is_installed() and _snapshot() == before
    transparent.install()
    with transparent.installed():
        pass
    assert transparent.is_installed()  # an explicit install() outlives the block
    with transparent.installed():
        transparent.uninstall()  # uninstall() inside a block wins
        assert not transparent.is_installed()
    assert not transparent.is_installed()


def test_concurrent_install_and_uninstall_leave_a_consistent_state() -> None:
    before = _snapshot()
    start = threading.Barrier(8)

    def churn(i: int) -> None:
        start.wait(10)
        for _ in range(50):
            if i % 2:
                transparent.install()
            else:
                with transparent.installed():
                    pass
            transparent.uninstall()

    threads = [threading.Thread(target=churn, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    transparent.install()
    assert len(transparent._state.patches) == len({(p.owner, p.name) for p in transparent._state.patches})
    transparent.uninstall()
    assert all(_snapshot()[key] is before[key] for key in before)


def test_marked_bodies_are_recognised() -> None:
    def body(index: int, rows: Any) -> Any:
        return rows

    assert not transparent._is_gang_body(body)
    body._sparkhydrogen_gang_body = True  # type: ignore[attr-defined]
    assert transparent._is_gang_body(body)
