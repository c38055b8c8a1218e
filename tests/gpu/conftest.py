"""Real-GPU tests: collected by every run (``make test`` too), skipped unless a CUDA device is present.

``make test-gpu`` runs just this folder. Every test here is marked ``gpu``; on a machine
without CUDA each one is skipped with the reason why, never silently left out.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sparkutil import spark_session

HERE = Path(__file__).parent


@functools.lru_cache(maxsize=1)
def cuda_devices() -> tuple[int, str]:
    """How many CUDA devices torch sees here, and the reason to skip when none."""
    try:
        import torch
    except ImportError:
        return 0, "no CUDA device: torch is not installed, so torch.cuda cannot be asked (make torch)"
    if not torch.cuda.is_available():
        return 0, f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__})"
    return torch.cuda.device_count(), ""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (tests/gpu; skipped without one)")
    config.addinivalue_line("markers", "gpus(n): needs at least n CUDA devices (tests/gpu)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if HERE in item.path.parents]
    if not mine:
        return
    count, reason = cuda_devices()
    for item in mine:
        item.add_marker(pytest.mark.gpu)
        wants = item.get_closest_marker("gpus")
        need = int(wants.args[0]) if wants is not None else 1
        if count == 0:
            item.add_marker(pytest.mark.skip(reason=reason))
        elif count < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA devices, torch.cuda.device_count() is {count}"))


DISCOVERY = """\
#!{python}
print('{{"name": "gpu", "addresses": {addresses}}}')
"""


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """local-cluster[1,G,2048] (G = min(2, GPUs)): one executor with G real GPUs, one per task; the driver one too."""
    import json

    count = min(2, cuda_devices()[0])
    script = tmp_path_factory.mktemp("gpu") / "discover_gpus.py"
    script.write_text(DISCOVERY.format(python=sys.executable, addresses=json.dumps([str(i) for i in range(count)])))
    script.chmod(0o755)
    conf = {
        "spark.executor.memory": "1g",
        "spark.worker.resource.gpu.amount": str(count),
        "spark.worker.resource.gpu.discoveryScript": str(script),
        "spark.executor.resource.gpu.amount": str(count),
        "spark.executor.resource.gpu.discoveryScript": str(script),
        "spark.task.resource.gpu.amount": "1",
        "spark.driver.resource.gpu.amount": "1",
        "spark.driver.resource.gpu.discoveryScript": str(script),
    }
    with spark_session(f"local-cluster[1,{count},2048]", **conf) as spark:
        yield spark.sparkContext
