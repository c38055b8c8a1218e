"""The framework-environment API, pure: layouts, every built-in framework's variables and init arguments,
reserved ports, set-up and undo, and a framework we do not ship (LightGBM's ``machines`` list) as a worked example.

No Spark here: layouts are built by hand, and :func:`activated` runs outside a gang
(``final_barrier=False``), where reporting a failure is a no-op.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from sparkhydrogen import frameworks
from sparkhydrogen.frameworks import (
    Framework,
    FrameworkError,
    GangLayout,
    JaxDistributed,
    PortHold,
    PortSource,
    TensorFlowMultiWorker,
    TorchDistributed,
    activated,
    reserve_ports,
)
from sparkhydrogen.frameworks.horovod_topology import layout as horovod_layout
from sparkhydrogen.horovod import HorovodGloo
from sparkhydrogen.torch._layout import node_layout, rank_environment

pytestmark = pytest.mark.timeout(60)

HOSTS = ("10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2", "10.0.0.1")


def layouts(hosts: Sequence[str] = HOSTS, ports: Sequence[Sequence[int]] | None = None,
            **kw: Any) -> list[GangLayout]:
    ports = ports if ports is not None else [(7000 + r,) for r in range(len(hosts))]
    return [GangLayout(rank=r, hosts=tuple(hosts), ports=tuple(tuple(p) for p in ports), **kw)
            for r in range(len(hosts))]


# the layout ---------------------------------------------------------------------


def test_layout_counts_local_ranks_per_host_and_nodes_in_first_appearance_order() -> None:
    got = [(g.local_rank, g.local_world_size, g.node_rank, g.num_nodes) for g in layouts()]
    assert got == [(0, 3, 0, 2), (0, 2, 1, 2), (1, 3, 0, 2), (1, 2, 1, 2), (2, 3, 0, 2)]
    for g in layouts():  # the same rule as the torch launcher's (and torchrun's) node layout
        n = node_layout(list(HOSTS), g.rank)
        assert (n.local_rank, n.local_world_size, n.group_rank, n.group_world_size) == (
            g.local_rank, g.local_world_size, g.node_rank, g.num_nodes)


def test_layout_addresses_and_defaults() -> None:
    g = GangLayout(rank=0, hosts=("a", "::1"), ports=((1,), (2, 3)))
    assert g.addresses() == ["a:1", "[::1]:2"] and g.address(1, 1) == "[::1]:3"
    assert g.gpus == ((), ()) and g.offers == (None, None) and g.own_ports == (1,)
    with pytest.raises(FrameworkError, match=r"rank 0 reserved 1 port\(s\), so it has no port number 1"):
        g.address(0, 1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rank": 2, "hosts": ("a", "b")}, r"rank 2 is outside 0\.\.1"),
    ({"rank": 0, "hosts": ()}, r"at least one host"),
    ({"rank": 0, "hosts": ("a", "")}, r"non-empty string"),
    ({"rank": 0, "hosts": ("a", "b"), "ports": ((1,),)}, r"ports lists 1 ranks but the gang has 2 hosts"),
    ({"rank": 0, "hosts": ("a",), "ports": ((70000,),)}, r"ports must be in 1\.\.65535, got \[70000\]"),
    ({"rank": True, "hosts": ("a", "b")}, r"rank True is outside"),
])
def test_layout_checks_its_input(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GangLayout(**kwargs)


def test_host_of_task_addresses() -> None:
    assert [frameworks.host_of(a) for a in ("h:1", "[fe80::1]:2", "h")] == ["h", "fe80::1", "h"]


# built-in frameworks ------------------------------------------------------------


def test_torch_variables_are_the_torch_launchers_and_torchruns() -> None:
    for g in layouts(attempt=2, run_id="abc"):
        n = node_layout(list(HOSTS), g.rank)
        want = rank_environment(rank=g.rank, world_size=5, layout=n, master_addr="10.0.0.1", master_port=7000,
                                restart_count=2, run_id="abc")
        assert TorchDistributed().environment(g) == want
    fw = TorchDistributed()
    assert [fw.ports(r, 3) for r in range(3)] == [1, 0, 0] and fw.port_handover == PortSource.KEEP


def test_horovod_variables_are_its_topology_and_rendezvous() -> None:
    offers = (("10.0.0.1:5000/token", 5000),) + (None,) * 4
    for g in layouts(offers=offers):
        env = HorovodGloo({"HOROVOD_GLOO_TIMEOUT_SECONDS": "7"}).environment(g)
        assert {k: v for k, v in env.items() if k in horovod_layout(list(HOSTS), g.rank).env()} == \
            horovod_layout(list(HOSTS), g.rank).env()
        assert env["HOROVOD_GLOO_RENDEZVOUS_ADDR"] == "10.0.0.1:5000/token"
        assert env["HOROVOD_GLOO_RENDEZVOUS_PORT"] == "5000" and env["HOROVOD_CONTROLLER"] == "gloo"
        assert env["HOROVOD_GLOO_TIMEOUT_SECONDS"] == "7"


def test_jax_initialize_arguments() -> None:
    fw = JaxDistributed(initialization_timeout=30)
    args = [fw.initialize_arguments(g) for g in layouts(ports=[(4000,), (), (), (), ()])]
    assert {a["coordinator_address"] for a in args} == {"10.0.0.1:4000"}
    assert [a["process_id"] for a in args] == [0, 1, 2, 3, 4] and {a["num_processes"] for a in args} == {5}
    assert {a["cluster_detection_method"] for a in args} == {"deactivate"}  # never probes cloud metadata
    assert {a["initialization_timeout"] for a in args} == {30} and args[0]["local_device_ids"] is None
    gpu = GangLayout(rank=1, hosts=("a", "a"), ports=((1,), ()), gpus=(("0",), ("1",)))
    # the rank's process sees only its own GPU (CUDA_VISIBLE_DEVICES=1), so JAX's device is 0 of that view
    assert fw.initialize_arguments(gpu)["local_device_ids"] == [0]
    two = GangLayout(rank=0, hosts=("a",), ports=((1,),), gpus=(("2", "3"),))
    assert fw.initialize_arguments(two)["local_device_ids"] == [0, 1]
    assert fw.environment(gpu) == {"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    with pytest.raises(ValueError, match=r"initialization_timeout must be a positive number of seconds, got 0"):
        JaxDistributed(initialization_timeout=0)


def test_tensorflow_tf_config_lists_every_worker_on_its_own_reserved_port() -> None:
    fw = TensorFlowMultiWorker()
    assert [fw.ports(r, 3) for r in range(3)] == [1, 1, 1] and fw.port_handover == PortSource.RELEASE
    envs = [fw.environment(g) for g in layouts()]
    configs = [json.loads(e["TF_CONFIG"]) for e in envs]
    workers = ["10.0.0.1:7000", "10.0.0.2:7001", "10.0.0.1:7002", "10.0.0.2:7003", "10.0.0.1:7004"]
    assert configs == [{"cluster": {"worker": workers}, "task": {"type": "worker", "index": r}} for r in range(5)]
    # Keras 3's own multi-process distribution reads these
    assert {e["KERAS_DISTRIBUTION_JOB_ADDRESSES"] for e in envs} == {",".join(workers)}
    assert [e["KERAS_DISTRIBUTION_PROCESS_ID"] for e in envs] == ["0", "1", "2", "3", "4"]
    assert {e["KERAS_DISTRIBUTION_NUM_PROCESSES"] for e in envs} == {"5"}


# a framework we do not ship: LightGBM (the worked example of docs/frameworks.md) -


@dataclass(frozen=True)
class LightGBM(Framework):
    """LightGBM's socket-based distributed training: every worker listens on a port of its own."""

    name = "lightgbm"

    def ports(self, rank: int, world_size: int) -> int:
        return 1

    def parameters(self, layout: GangLayout) -> dict[str, Any]:
        return {"machines": ",".join(layout.addresses()), "num_machines": layout.world_size,
                "local_listen_port": layout.own_ports[0], "tree_learner": "data"}


def test_lightgbm_machines_list_gives_workers_on_one_host_different_ports() -> None:
    params = [LightGBM().parameters(g) for g in layouts(hosts=("h1", "h1", "h2"), ports=[(12400,), (12401,), (12400,)])]
    assert {p["machines"] for p in params} == {"h1:12400,h1:12401,h2:12400"}
    assert [p["local_listen_port"] for p in params] == [12400, 12401, 12400]
    assert {p["num_machines"] for p in params} == {3}


# reserved ports and set-up / undo ---------------------------------------------------


def test_reserved_ports_are_held_until_released_or_taken() -> None:
    holds = reserve_ports("127.0.0.1", 2)
    try:
        assert len({h.port for h in holds}) == 2 and all(h.held for h in holds)
        with pytest.raises(OSError):  # held: nobody else can bind it
            socket.create_server(("127.0.0.1", holds[0].port), reuse_port=False).close()
        holds[0].release()
        socket.create_server(("127.0.0.1", holds[0].port)).close()  # released: the framework can bind it
        fd = holds[1].take()
        sock = socket.socket(fileno=fd)  # the taker owns the listening socket now
        assert sock.getsockname()[1] == holds[1].port
        sock.close()
        with pytest.raises(FrameworkError, match="already taken or released"):
            holds[1].take()
    finally:
        for h in holds:
            h.release()


class Recorder(Framework):
    """A framework that records what the API did to it, and what it saw of the environment."""

    name = "recorder"

    def __init__(self, handover: str = PortSource.RELEASE, fail_start: bool = False) -> None:
        self.port_handover = handover
        self.fail_start = fail_start
        self.events: list[Any] = []

    def environment(self, layout: GangLayout) -> dict[str, str]:
        return {"H2_TEST_RANK": str(layout.rank), "H2_TEST_PRESET": "framework"}

    def start(self, layout: GangLayout, holds: Sequence[PortHold]) -> None:
        self.events.append(("start", os.environ.get("H2_TEST_RANK"), [h.held for h in holds]))
        if self.fail_start:
            raise RuntimeError("init failed")

    def stop(self, layout: GangLayout, failed: bool) -> None:
        self.events.append(("stop", failed, os.environ.get("H2_TEST_RANK")))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("H2_TEST_RANK", raising=False)
    monkeypatch.setenv("H2_TEST_PRESET", "user")


@pytest.mark.usefixtures("clean_env")
def test_activated_sets_variables_starts_stops_and_restores() -> None:
    fw = Recorder()
    holds = reserve_ports("127.0.0.1", 1)
    g = GangLayout(rank=0, hosts=("127.0.0.1",), ports=((holds[0].port,),))
    with activated(fw, g, holds, final_barrier=False, extra={"H2_TEST_EXTRA": "1"}):
        assert os.environ["H2_TEST_RANK"] == "0" and os.environ["H2_TEST_EXTRA"] == "1"
        assert os.environ["H2_TEST_PRESET"] == "framework"
    assert fw.events == [("start", "0", [False]), ("stop", False, "0")]  # released before start; undo inside env
    assert "H2_TEST_RANK" not in os.environ and "H2_TEST_EXTRA" not in os.environ
    assert os.environ["H2_TEST_PRESET"] == "user" and not holds[0].held


@pytest.mark.usefixtures("clean_env")
def test_activated_undoes_when_the_body_raises_and_keeps_ports_for_frameworks_that_take_them() -> None:
    fw = Recorder(handover=PortSource.KEEP)
    holds = reserve_ports("127.0.0.1", 1)
    g = GangLayout(rank=0, hosts=("127.0.0.1",), ports=((holds[0].port,),))
    with pytest.raises(ZeroDivisionError), activated(fw, g, holds, final_barrier=False):
        1 / 0  # noqa: B018
    assert fw.events == [("start", "0", [True]), ("stop", True, "0")]
    assert "H2_TEST_RANK" not in os.environ and not holds[0].held  # what it did not take is closed after


@pytest.mark.usefixtures("clean_env")
def test_a_failing_init_call_is_undone_too() -> None:
    fw = Recorder(fail_start=True)
    g = GangLayout(rank=0, hosts=("h",))
    with pytest.raises(RuntimeError, match="init failed"), activated(fw, g, final_barrier=False):
        pytest.fail("the body must not run")
    assert fw.events == [("start", "0", []), ("stop", True, "0")]
    assert "H2_TEST_RANK" not in os.environ


def test_descriptions_survive_pickling_without_their_servers() -> None:
    import pickle

    for fw in (TorchDistributed(), JaxDistributed(shutdown_timeout=5), TensorFlowMultiWorker(),
               HorovodGloo({"A": "1"})):
        again = pickle.loads(pickle.dumps(fw))
        assert type(again) is type(fw) and vars(again).keys() == vars(fw).keys()


@pytest.mark.parametrize("module", ["sparkhydrogen.frameworks.api", "sparkhydrogen.frameworks._torch",
                                    "sparkhydrogen.frameworks._jax", "sparkhydrogen.frameworks._tensorflow",
                                    "sparkhydrogen.frameworks._horovod"])
def test_examples_in_docstrings(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_frameworks_all_lists_exactly_what_resolves() -> None:
    assert len(frameworks.__all__) == len(set(frameworks.__all__))
    for name in frameworks.__all__:
        assert getattr(frameworks, name) is not None, name
    exported = {n for n, v in vars(frameworks).items() if not n.startswith("_") and not isinstance(v, type(os))}
    assert exported - {"annotations"} == set(frameworks.__all__)


def test_importing_the_frameworks_imports_no_framework() -> None:
    import subprocess
    import sys

    code = ("import sys, sparkhydrogen.frameworks, sparkhydrogen.jax, sparkhydrogen.tensorflow; "
            "bad = sorted(m for m in ('jax', 'tensorflow', 'torch', 'lightning', 'keras') if m in sys.modules); "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr
