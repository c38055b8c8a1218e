"""Load tests: the coordinator in a child process, simulated ranks in others (see ``loadkit.py``)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "load: long load/soak runs of the coordinator (`make test-load`, own CI step)")
