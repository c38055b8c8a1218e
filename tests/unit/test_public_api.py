"""The public surface: ``sparkhydrogen.__all__`` lists exactly the public names, and they resolve."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import types

import pytest

import sparkhydrogen

pytestmark = pytest.mark.timeout(60)

PUBLIC = {
    # errors
    "HydrogenError",
    "NotInGangError",
    "CollectiveError",
    "CollectiveTimeoutError",
    "CollectiveMismatchError",
    "GangAbortedError",
    "RegistrationError",
    "GangNotFoundError",
    "PayloadError",
    "CoordinatorConnectionError",
    "AuthenticationError",
    "ProtocolError",
    "LaunchError",
    "InsufficientSlotsError",
    "GangFailedError",
    "GangCancelledError",
    "GangSetupError",
    "GangResizing",
    "Restored",
    "SizeRange",
    "CheckpointError",
    "GpuPlacementError",
    "RankLostError",
    "PartitionClosedError",
    "ErrorInfo",
    # settings
    "CoordinatorConfig",
    "LaunchConfig",
    "HydrogenConfig",
    # task side
    "BarrierTaskContext",
    "BarrierTaskInfo",
    # driver side
    "RDDBarrier",
    "barrier",
    "retry",
    "run",
    "stacks",
    # diagnosis
    "status",
    "report",
    "GangStatus",
    "RankStatus",
    "RankState",
    "GangReport",
    # transparent mode
    "install",
    "uninstall",
    "installed",
    "is_installed",
}


def test_all_lists_exactly_the_public_names() -> None:
    assert len(sparkhydrogen.__all__) == len(set(sparkhydrogen.__all__)), "duplicates in __all__"
    assert set(sparkhydrogen.__all__) == PUBLIC


def test_every_public_name_resolves() -> None:
    for name in sparkhydrogen.__all__:
        assert getattr(sparkhydrogen, name) is not None, name


def test_no_other_public_names_leak_into_the_package() -> None:
    exported = {
        name for name, value in vars(sparkhydrogen).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert exported == PUBLIC


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from sparkhydrogen import *", namespace)
    assert set(namespace) - {"__builtins__"} == PUBLIC


def test_public_names_are_the_defining_modules_objects() -> None:
    from sparkhydrogen import config, context, diagnosis, errors, launch, transparent

    for name in PUBLIC:
        homes = [m for m in (errors, config, context, launch, transparent, diagnosis)
                 if name in getattr(m, "__all__", ())]
        assert len(homes) == 1, f"{name} is defined in {homes}"
        assert getattr(sparkhydrogen, name) is getattr(homes[0], name)


@pytest.mark.parametrize(
    "module",
    ["sparkhydrogen.errors", "sparkhydrogen.config", "sparkhydrogen.context", "sparkhydrogen.serde",
     "sparkhydrogen.coordinator", "sparkhydrogen.coordinator.protocol", "sparkhydrogen.coordinator.state",
     "sparkhydrogen.coordinator.server", "sparkhydrogen.coordinator.client", "sparkhydrogen.coordinator.peer",
     "sparkhydrogen.coordinator.handles", "sparkhydrogen.task", "sparkhydrogen.task.lifecycle",
     "sparkhydrogen.task.embedded", "sparkhydrogen.launch.runner", "sparkhydrogen.launch.placement",
     "sparkhydrogen.launch.session", "sparkhydrogen.launch.jobs", "sparkhydrogen.transparent"],
)
def test_module_all_resolves(module: str) -> None:
    mod = importlib.import_module(module)
    assert len(mod.__all__) == len(set(mod.__all__))
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ lists missing {name}"


def test_version_matches_the_installed_distribution() -> None:
    assert sparkhydrogen.__version__ == importlib.metadata.version("spark-hydrogen")


def test_importing_the_package_and_coordinator_does_not_import_pyspark() -> None:
    code = (
        "import sys, sparkhydrogen, sparkhydrogen.coordinator; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pyspark', 'py4j')); "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr
