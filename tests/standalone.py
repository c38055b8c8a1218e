"""A real Spark standalone cluster (master + workers) on loopback, started and stopped by pid.

pip's pyspark has no ``start-master.sh``, but ``sbin/spark-daemon.sh`` starts the
master and worker classes. Readiness is read from the daemons' own log lines, not
guessed with sleeps.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyspark

SPARK_HOME = os.path.dirname(pyspark.__file__)
DAEMON = os.path.join(SPARK_HOME, "sbin", "spark-daemon.sh")
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"


def _runs(pid: int, main_class: str, master: str) -> bool:
    """Whether ``pid`` is (still) this cluster's daemon running ``main_class``.

    pids are reused (``pid_max`` is 32768 here, and a suite run wraps it), and an executor's command
    line names its worker (``--worker-url spark://Worker@...``): a pid from a pid file is trusted only
    while its process runs the daemon's main class with this cluster's master among its own arguments
    (a worker's master URL, the master's ``--port``), never because a stranger took the pid.
    """
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    if main_class not in args:
        return False
    if main_class == MASTER_CLASS:
        return any(a == "--port" and b == master.rsplit(":", 1)[1] for a, b in zip(args, args[1:], strict=False))
    return master in args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_log(log_dir: Path, pattern: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        found = 0
        for path in log_dir.glob("*.out"):
            found += len(regex.findall(path.read_text(errors="replace")))
        if found >= count:
            return
        time.sleep(0.2)  # polling the daemons' logs: the only readiness signal they give
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in log_dir.glob("*.out"))
    raise TimeoutError(f"standalone cluster: {pattern!r} seen fewer than {count} times in {timeout} s\n{logs}")


def _pids(pid_dir: Path) -> list[int]:
    return [int(p.read_text().strip()) for p in pid_dir.glob("*.pid") if p.read_text().strip()]


@contextmanager
def standalone_cluster(workers: int = 2, cores: int = 1, memory: str = "1g") -> Iterator[str]:
    """Start a master and ``workers`` workers on 127.0.0.1; yield the master URL; stop all by pid."""
    with elastic_cluster(workers, cores, memory) as cluster:
        yield cluster.master


class Cluster:
    """A running standalone cluster whose workers can be added and SIGKILLed (by pid) while it runs."""

    def __init__(self, root: Path, env: dict[str, str], master: str, cores: int, memory: str) -> None:
        self.root, self.env, self.master, self.cores, self.memory = root, env, master, cores, memory
        self.started = 0  # workers started so far (each daemon instance gets its own number)

    def add_worker(self, timeout: float = 90) -> int:
        """Start one more worker; return its pid once it registered with the master."""
        return self.add_workers(1, timeout)[0]

    def add_workers(self, count: int, timeout: float = 180) -> list[int]:
        """Start ``count`` more workers at once; return their pids once all registered with the master."""
        numbers = []
        for _ in range(count):
            self.started += 1
            numbers.append(self.started)
            subprocess.run([DAEMON, "start", WORKER_CLASS, str(self.started), self.master,
                            "--host", "127.0.0.1", "--cores", str(self.cores), "--memory", self.memory,
                            "--webui-port", str(_free_port()), "--work-dir", str(self.root / "work")],
                           env=self.env, check=True, capture_output=True, timeout=60)
        for number in numbers:
            out = next((self.root / "logs").glob(f"*Worker-{number}-*.out"))
            try:
                _wait_for_file(out, r"Successfully registered with master", timeout)
            except TimeoutError as exc:  # say whether the master was still there, and what it logged last
                raise TimeoutError(f"{exc}\n{self.master_state()}") from None
        return [self.worker_pid(number) for number in numbers]

    def master_state(self) -> str:
        """The master's pid, whether it is alive, and the end of its log (for a worker that did not register)."""
        pid_file = next((self.root / "pids").glob("*Master-1.pid"), None)
        pid = int(pid_file.read_text().strip()) if pid_file else None
        alive = pid is not None and _runs(pid, MASTER_CLASS, self.master)
        log = next((self.root / "logs").glob("*Master-1-*.out"), None)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log else "(no master log)"
        return f"master pid {pid} ({'alive' if alive else 'gone'}); its log ends:\n{tail}"

    def describe(self, sc: object | None = None) -> str:
        """Which workers are alive (by number and pid), the executors Spark lists, and the master's last lines."""
        lines, running = [], set(self.workers())
        for number in range(1, self.started + 1):
            pid = self.worker_pid(number)
            alive = pid in running
            log = next((self.root / "logs").glob(f"*Worker-{number}-*.out"), None)
            tail = log.read_text(errors="replace").splitlines()[-3:] if log else []
            lines.append(f"worker {number} pid {pid}: {'alive' if alive else 'gone'}; its log ends: {tail}")
        if sc is not None:
            infos = sc._jsc.sc().statusTracker().getExecutorInfos()  # type: ignore[attr-defined]
            lines.append("executors Spark lists: "
                         + ", ".join(f"{i.host()}:{i.port()} ({i.numRunningTasks()} tasks)" for i in infos))
        return "\n".join([*lines, self.master_state()])

    def worker_pid(self, number: int) -> int:
        path = next((self.root / "pids").glob(f"*Worker-{number}.pid"))
        return int(path.read_text().strip())

    def workers(self) -> list[int]:
        """Pids of the workers still alive, in the order they were started."""
        alive = []
        for number in range(1, self.started + 1):
            pid = self.worker_pid(number)
            if _runs(pid, WORKER_CLASS, self.master):
                alive.append(pid)
        return alive

    def kill_worker(self, pid: int) -> None:
        """SIGKILL a worker JVM and its executor JVM (and the executor's Python workers): gone, not replaced."""
        if not _runs(pid, WORKER_CLASS, self.master):
            raise ValueError(f"pid {pid} is not a worker of this cluster (it exited, or the pid was reused)")
        tree = _descendants(pid)
        print(f"standalone cluster: SIGKILL worker {pid} and its descendants {tree}", flush=True)
        for target in [pid, *tree]:
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while _runs(pid, WORKER_CLASS, self.master) and time.monotonic() < deadline:
            time.sleep(0.05)  # SIGKILL is delivered asynchronously: /proc is the only signal that it took


def _descendants(pid: int) -> list[int]:
    found = []
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        found += [int(child), *_descendants(int(child))]
    return found


def _wait_for_file(path: Path, pattern: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        if regex.search(path.read_text(errors="replace")):
            return
        time.sleep(0.2)  # polling the daemon's log: the only readiness signal it gives
    tail = "\n".join(path.read_text(errors="replace").splitlines()[-20:])
    raise TimeoutError(f"standalone worker: {pattern!r} not in {path} after {timeout} s; its log ends:\n{tail}")


@contextmanager
def elastic_cluster(workers: int = 2, cores: int = 1, memory: str = "1g") -> Iterator[Cluster]:
    """A master and ``workers`` workers on 127.0.0.1, whose workers the test may add or kill; all stopped by pid."""
    root = Path(tempfile.mkdtemp(prefix="sparkhydrogen-standalone-"))
    env = dict(os.environ, SPARK_HOME=SPARK_HOME, SPARK_LOG_DIR=str(root / "logs"), SPARK_PID_DIR=str(root / "pids"),
               SPARK_IDENT_STRING="sparkhydrogen-test", SPARK_LOCAL_IP="127.0.0.1",
               SPARK_WORKER_DIR=str(root / "work"))
    (root / "logs").mkdir()
    (root / "pids").mkdir()
    port = _free_port()
    master = f"spark://127.0.0.1:{port}"
    try:
        subprocess.run([DAEMON, "start", MASTER_CLASS, "1", "--host", "127.0.0.1",
                        "--port", str(port), "--webui-port", str(_free_port())], env=env, check=True,
                       capture_output=True, timeout=60)
        _wait_for_log(root / "logs", r"I have been elected leader", 1, 60)
        cluster = Cluster(root, env, master, cores, memory)
        for number in range(1, workers + 1):
            subprocess.run([DAEMON, "start", WORKER_CLASS, str(number), master,
                            "--host", "127.0.0.1", "--cores", str(cores), "--memory", memory,
                            "--webui-port", str(_free_port()), "--work-dir", str(root / "work")],
                           env=env, check=True, capture_output=True, timeout=60)
        cluster.started = workers
        _wait_for_log(root / "logs", r"Successfully registered with master", workers, 90)
        yield cluster
    finally:
        for pid in _pids(root / "pids"):
            if _runs(pid, MASTER_CLASS, master) or _runs(pid, WORKER_CLASS, master):  # not a stranger on a reused pid
                _kill_tree(pid)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _kill_tree(pid: int) -> None:
    """SIGTERM a daemon and its executor children, then SIGKILL whatever is left."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for target in [pid, *map(int, children)]:
        try:
            os.kill(target, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    for target in [pid, *map(int, children)]:
        while time.monotonic() < deadline:
            try:
                os.kill(target, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
