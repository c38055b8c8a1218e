"""A real MLflow tracking server for tests: started by pid on loopback, stopped by its process group.

``mlflow server`` with a SQLite backend store and proxied artifacts (clients upload
through the server, as executors-free drivers do), on a free loopback port; ready when
its ``/health`` endpoint answers (polled with a bound, never a fixed sleep).

Example (a fixture)::

    with tracking_server(tmp_path) as uri:
        client = MlflowClient(tracking_uri=uri)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TrackingServer", "tracking_server", "free_port", "STARTUP_TIMEOUT"]

#: How long the server may take to answer its health check (it imports a lot, then migrates the SQLite schema).
STARTUP_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class TrackingServer:
    """``mlflow server`` started now (by pid, its own process group); :meth:`wait_ready` before use, :meth:`stop` after.

    Starting and waiting are apart so that a fixture can start Spark while the server boots.
    """

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.log_path = folder / "server.log"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                 "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> str:
        """Block until ``/health`` answers (bounded); returns the server's URI."""
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while not _healthy(self.uri):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server did not answer {self.uri}/health within {timeout:g} s: "
                                   f"{self._log_tail()}")
            pause.wait(0.2)
        return self.uri

    def stop(self) -> None:
        """SIGTERM its process group, then SIGKILL if it lingers (bounded)."""
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(15)


@contextlib.contextmanager
def tracking_server(folder: Path, timeout: float = STARTUP_TIMEOUT) -> Iterator[str]:
    """Run ``mlflow server`` with its store in ``folder``; yields its URI (``http://127.0.0.1:<port>``)."""
    server = TrackingServer(folder)
    try:
        yield server.wait_ready(timeout)
    finally:
        server.stop()
