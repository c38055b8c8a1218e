"""Task side: a rank's metrics on their way to the driver, never blocking the training thread.

* :class:`MetricSender`: one per rank process; :meth:`~MetricSender.put` queues points
  (bounded: when full the oldest are dropped and counted, so a rank that logs faster
  than the network takes never blocks) and a thread ships them in batches of at most
  :data:`~.points.MAX_POINTS_PER_FRAME` through ``send(points, dropped)`` (the rank's
  ``CoordinatorClient.metrics``, or the relay socket in a child process).
* :class:`Relay`: a rank whose training runs in child processes (the torch launcher's
  scripts, ``use_subprocess``, ``processes_per_task``; TensorFlow) listens on a Unix
  socket in a private folder (mode 0700); :func:`relay_environment` tells its children
  where, and a child's :func:`log_points` sends there (one JSON list per line), the
  rank forwarding to its own sender. Children need no coordinator connection.
* :class:`SystemSampler`: CPU %, resident memory (the rank's process and its children,
  with ``psutil``) and GPU utilisation and memory (``pynvml``, where importable), every
  ``interval`` seconds, under ``system/rank_<r>/...``.

The rank's lifecycle (:class:`~sparkhydrogen.task.RankSession`) installs the state with
:func:`install` and takes it down with :func:`uninstall`, which ships every point
before the rank reports its outcome (so the driver has them when the gang is done).
"""

from __future__ import annotations

import atexit
import collections
import importlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .points import MAX_POINTS_PER_FRAME, MetricPoint, decode_points, encode_points, points_from_mapping, system_key

__all__ = ["SOCKET_ENV", "RANK_ENV", "MetricSender", "Relay", "SystemSampler", "RankMetrics", "install",
           "uninstall", "current", "relay_environment", "log_points", "NotInRankError", "DEFAULT_MAX_POINTS",
           "CLOSE_TIMEOUT"]

log = logging.getLogger("sparkhydrogen.mlflow")

#: Where a rank's child process finds its rank's relay socket.
SOCKET_ENV = "SPARKHYDROGEN_METRICS_SOCKET"
#: The rank a child logs as when the launcher set no ``RANK`` (e.g. TensorFlow's workers).
RANK_ENV = "SPARKHYDROGEN_METRICS_RANK"
#: Points a process may queue before the oldest are dropped (and counted).
DEFAULT_MAX_POINTS = 10_000
#: How long taking a rank's metrics down waits for the last points to leave.
CLOSE_TIMEOUT = 10.0
#: Longest line a child may send to the relay.
MAX_RELAY_LINE = 4 * 1024 * 1024

Send = Callable[[list[MetricPoint], int], None]


class NotInRankError(RuntimeError):
    """Metrics logged in a process that is no gang rank nor a rank's child (the public API turns it into
    :class:`~sparkhydrogen.errors.NotInGangError`)."""


class MetricSender:
    """A bounded queue of points and the thread that ships them in batches; :meth:`put` never blocks.

    >>> sent = []
    >>> sender = MetricSender(lambda points, dropped: sent.append((len(points), dropped)), max_points=2)
    >>> sender.put([MetricPoint(f"m{n}", 1.0, 0, 0) for n in range(5)])
    >>> sender.close(timeout=5); sent
    [(2, 3)]
    """

    def __init__(self, send: Send, max_points: int = DEFAULT_MAX_POINTS) -> None:
        self._send = send
        self.max_points = max_points
        self._points: collections.deque[MetricPoint] = collections.deque()
        self._dropped = 0
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.lost = 0  # dropped here or unsent because ``send`` failed
        self.send_error: BaseException | None = None

    def put(self, points: list[MetricPoint]) -> None:
        with self._cond:
            if self._closed or self.send_error is not None:
                self.lost += len(points)
                return
            for point in points:
                if len(self._points) >= self.max_points:
                    self._points.popleft()
                    self._dropped += 1
                    self.lost += 1
                self._points.append(point)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sparkhydrogen-metric-sender", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._points and not self._closed:
                    self._cond.wait()
                if not self._points:
                    return
                batch = [self._points.popleft() for _ in range(min(len(self._points), MAX_POINTS_PER_FRAME))]
                dropped, self._dropped = self._dropped, 0
                self._busy = True
            try:
                self._send(batch, dropped)
            except BaseException as exc:  # the connection is gone: stop, count what is lost
                with self._cond:
                    self.send_error = exc
                    self.lost += len(batch) + len(self._points)
                    self._points.clear()
                    self._busy = False
                    self._cond.notify_all()
                log.debug("metrics: sending failed (%s); later points are dropped", exc)
                return
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def flush(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Wait (at most ``timeout`` s) until every queued point has been handed to ``send``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._points or self._busy) and self.send_error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Ship what is queued (bounded by ``timeout``), then stop the thread; later points are dropped."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(max(0.0, min(timeout, 1.0)))


class Relay:
    """A Unix socket a rank's child processes send their points to; forwarded to the rank's sender."""

    def __init__(self, forward: Callable[[list[MetricPoint]], None]) -> None:
        self._forward = forward
        self.folder = tempfile.mkdtemp(prefix="sparkhydrogen-metrics-")  # mode 0700: this user only
        self.path = os.path.join(self.folder, "relay.sock")
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(64)
        self._readers: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="sparkhydrogen-metric-relay", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                reader = threading.Thread(target=self._read, args=(conn,), daemon=True,
                                          name="sparkhydrogen-metric-relay-reader")
                self._readers.append(reader)
                self._conns.append(conn)
            reader.start()

    def _read(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                if len(line) > MAX_RELAY_LINE:
                    log.warning("metrics relay: a child sent a line of %d bytes; its connection is closed", len(line))
                    return
                try:
                    self._forward(decode_points(line))
                except ValueError as exc:
                    log.warning("metrics relay: a child sent bad points (%s); dropped", exc)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop accepting; wait (bounded) for connected children to finish sending; remove the socket."""
        with self._lock:
            self._closed = True
            readers = list(self._readers)
        try:
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._server.close()
        deadline = time.monotonic() + timeout
        for reader in readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for conn in self._conns:  # a grandchild that still holds one: cut off
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        shutil.rmtree(self.folder, ignore_errors=True)


def _psutil() -> Any:
    try:
        return importlib.import_module("psutil")  # optional: the [mlflow] extra installs it
    except ImportError:
        return None


def _nvml() -> Any:
    try:
        pynvml = importlib.import_module("pynvml")  # optional, only where there are NVIDIA GPUs
        pynvml.nvmlInit()
    except Exception:  # not installed, or no driver / no GPU: no GPU metrics
        return None
    return pynvml


class SystemSampler:
    """Samples the rank's CPU %, memory and GPUs every ``interval`` seconds into ``put`` (a daemon thread)."""

    def __init__(self, rank: int, interval: float, put: Callable[[list[MetricPoint]], None]) -> None:
        self.rank = rank
        self.interval = interval
        self._put = put
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sparkhydrogen-system-metrics", daemon=True)
        self.samples = 0

    def start(self) -> SystemSampler:
        self._thread.start()
        return self

    def sample(self, psutil: Any, nvml: Any, process: Any, step: int) -> list[MetricPoint]:
        """One sample of every metric available here, as points at ``step``."""
        now = int(time.time() * 1000)
        values: dict[str, float] = {}
        if process is not None:
            procs = [process]
            try:
                procs += process.children(recursive=True)
            except psutil.Error:
                pass
            cpu = rss = 0.0
            for proc in procs:
                try:
                    cpu += proc.cpu_percent(None)
                    rss += proc.memory_info().rss
                except psutil.Error:
                    continue
            values["cpu_percent"] = cpu
            values["memory_rss_mb"] = rss / (1024 * 1024)
            values["system_memory_percent"] = float(psutil.virtual_memory().percent)
        if nvml is not None:
            try:
                for index in range(nvml.nvmlDeviceGetCount()):
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    values[f"gpu_{index}_utilization_percent"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                    values[f"gpu_{index}_memory_used_mb"] = nvml.nvmlDeviceGetMemoryInfo(handle).used / (1024 * 1024)
            except Exception as exc:  # a GPU gone away: stop asking
                log.debug("system metrics: GPU sampling stopped (%s)", exc)
        return [MetricPoint(system_key(self.rank, name), value, step, now) for name, value in values.items()]

    def _run(self) -> None:
        psutil, nvml = _psutil(), _nvml()
        if psutil is None and nvml is None:
            log.info("rank %d: no system metrics (install psutil for CPU and memory, pynvml for GPUs)", self.rank)
            return
        process = psutil.Process() if psutil is not None else None
        if process is not None:
            process.cpu_percent(None)  # the first call only sets the reference point
        step = 0
        while not self._stop.wait(self.interval):
            self._put(self.sample(psutil, nvml, process, step))
            self.samples += 1
            step += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


class RankMetrics:
    """A rank process's metric state: its rank, its sender (``None``: the gang logs nowhere), relay and sampler."""

    def __init__(self, rank: int, send: Send | None, system_interval: float | None = None) -> None:
        self.rank = rank
        self.sender = MetricSender(send) if send is not None else None
        self.relay: Relay | None = None
        self.sampler: SystemSampler | None = None
        if self.sender is not None:
            try:
                self.relay = Relay(self.sender.put)
            except OSError as exc:  # e.g. a temp folder path too long for a Unix socket: the rank itself still logs
                log.warning("rank %d: no metric relay for its child processes (%s): their log_metric calls are "
                            "dropped", rank, exc)
            if system_interval:
                self.sampler = SystemSampler(rank, system_interval, self.sender.put).start()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self.relay is not None:
            self.relay.close(timeout)
        if self.sender is not None:
            self.sender.close(timeout)


_current: RankMetrics | None = None
_child_sender: MetricSender | None = None
_child_lock = threading.Lock()


def install(rank: int, send: Send | None, system_interval: float | None = None) -> RankMetrics:
    """Start this rank's metrics (``send=None``: the gang logs nowhere, points are dropped here)."""
    global _current
    if _current is not None:
        _current.close(0.0)
    _current = RankMetrics(rank, send, system_interval)
    return _current


def uninstall(metrics: RankMetrics, timeout: float = CLOSE_TIMEOUT) -> None:
    """Ship every point of ``metrics`` (bounded) and take it down."""
    global _current
    if _current is metrics:
        _current = None
    metrics.close(timeout)


def current() -> RankMetrics | None:
    return _current


def relay_environment() -> dict[str, str]:
    """What a rank's child process needs in its environment to log metrics (``{}``: nothing to relay to)."""
    metrics = _current
    if metrics is None:
        return {}
    return {SOCKET_ENV: metrics.relay.path if metrics.relay is not None else "", RANK_ENV: str(metrics.rank)}


def _relay_send(path: str) -> Send:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    sock.connect(path)
    sock.settimeout(None)

    def send(points: list[MetricPoint], dropped: int) -> None:
        sock.sendall(encode_points(points) + b"\n")

    return send


def _child_rank() -> int:
    raw = os.environ.get("RANK") or os.environ.get(RANK_ENV, "")
    try:
        return int(raw)
    except ValueError:
        raise NotInRankError(f"metrics: this child process's rank is unknown (RANK={raw!r})") from None


def _child() -> tuple[int, MetricSender | None]:
    """This child process's rank and sender (``None``: its rank's gang logs nowhere)."""
    global _child_sender
    path = os.environ.get(SOCKET_ENV)
    if path is None:
        raise NotInRankError("not in a gang rank")
    if not path:
        return _child_rank(), None
    rank = _child_rank()
    with _child_lock:
        if _child_sender is None:
            try:
                sender = MetricSender(_relay_send(path))
            except OSError as exc:
                raise NotInRankError(f"metrics: this process cannot reach its rank's relay at {path}: {exc}") from exc
            atexit.register(sender.close)  # the last points leave before the child does
            _child_sender = sender
        return rank, _child_sender


def log_points(metrics: Mapping[str, Any], step: Any = None, *, all_ranks: bool = False) -> None:
    """Queue ``metrics`` of this rank (or this rank's child process) for the driver; never blocks.

    Raises :class:`NotInRankError` in a process that is neither.
    """
    state = _current
    if state is not None:
        points = points_from_mapping(metrics, step, rank=state.rank, all_ranks=all_ranks)
        if state.sender is not None and points:
            state.sender.put(points)
        return
    rank, sender = _child()
    points = points_from_mapping(metrics, step, rank=rank, all_ranks=all_ranks)
    if points and sender is not None:
        sender.put(points)
