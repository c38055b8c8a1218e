"""What crosses the coordinator's wire, and what a peer can do with it.

* the gang's secret never crosses the wire (every byte in both directions is recorded
  by a proxy between the ranks and the coordinator, in plaintext and under TLS);
* a recorded handshake, replayed, gets nothing;
* a member of gang A can neither join nor affect gang B;
* the coordinator never loads a pickle: no pickle module is imported by its code, and a
  coordinator process that relays hostile pickles is watched by an audit hook.
"""

from __future__ import annotations

import ast
import base64
import json
import selectors
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kit import Body, connect, gather_body, in_thread, pending_ranks, run_gang, wait_until

import sparkhydrogen.coordinator as coordinator_pkg
from sparkhydrogen.config import TlsConfig
from sparkhydrogen.coordinator.protocol import FrameDecoder, Kind, Limits, client_proof
from sparkhydrogen.coordinator.server import CoordinatorServer, GangHandle
from sparkhydrogen.errors import AuthenticationError, ErrorInfo, GangAbortedError, ProtocolError

pytestmark = pytest.mark.timeout(60)

LOOPBACK = "127.0.0.1"


class RecordingProxy:
    """A loopback TCP proxy that records every byte each way, per connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server((LOOPBACK, 0))
        self.address = self.listener.getsockname()[:2]
        self.to_server: list[bytearray] = []
        self.to_client: list[bytearray] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            up, down = bytearray(), bytearray()
            self.to_server.append(up)
            self.to_client.append(down)
            thread = threading.Thread(target=self._pump, args=(client, upstream, up, down), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, client: socket.socket, upstream: socket.socket, up: bytearray, down: bytearray) -> None:
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, (upstream, up))
        sel.register(upstream, selectors.EVENT_READ, (client, down))
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.1):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    dst, record = key.data
                    data = src.recv(65536)
                    if not data:
                        return
                    record += data
                    dst.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            client.close()
            upstream.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._accept.join(5)
        for thread in self._threads:
            thread.join(5)


def rounds_of(rounds: int) -> Body:
    """``rounds`` allGathers of ``rank R round I``."""
    return gather_body(lambda r, i: f"rank {r} round {i}".encode(), rounds=rounds)


def secret_forms(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret),
            base64.urlsafe_b64encode(secret), base64.b64encode(secret).rstrip(b"=")]


# ------------------------------------------------------------------ the secret


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_the_secret_never_crosses_the_wire(make_server: Callable[..., CoordinatorServer], tls: bool) -> None:
    server = make_server(tls=TlsConfig(enabled=tls))
    handle = server.add_gang(world_size=3)
    proxy = RecordingProxy(server.address)
    try:
        results = run_gang(handle, rounds_of(3), address=proxy.address)
    finally:
        proxy.close()
    assert results == {rank: [f"rank {r} round 2".encode() for r in range(3)] for rank in range(3)}
    assert len(proxy.to_server) == 3
    wire = b"".join(bytes(b) for b in proxy.to_server + proxy.to_client)
    for form in secret_forms(handle.secret):
        assert form not in wire
    if tls:  # nothing of the protocol is readable either
        for plain in (b'"op"', b"register", b"rank 1 round", handle.gang_id.encode()):
            assert plain not in wire
        # Every frame starts with the 3-byte magic, so plaintext shows it once per frame (dozens of
        # times here); random ciphertext holds those 3 bytes by chance about once in 16 M bytes, so
        # one chance match is allowed (it happened once in CI), never a frame's worth.
        assert wire.count(b"H2\x01") <= 1
    else:  # the proofs are fresh per connection: no two connections send the same bytes
        assert wire.count(b"H2\x01") >= 12  # the frames are readable: the TLS bound above has teeth
        auths = [frame.header for data in proxy.to_server
                 for frame in FrameDecoder(Limits(1 << 20, 1 << 20)).feed(bytes(data)) if frame.kind is Kind.AUTH]
        assert len(auths) == 3 and len({a["proof"] for a in auths}) == 3 and len({a["nonce"] for a in auths}) == 3


def test_a_recorded_handshake_replayed_gets_nothing(make_server: Callable[..., CoordinatorServer]) -> None:
    server = make_server()
    handle = server.add_gang(world_size=2)
    proxy = RecordingProxy(server.address)
    try:
        assert run_gang(handle, rounds_of(1), address=proxy.address) == {
            rank: [b"rank 0 round 0", b"rank 1 round 0"] for rank in range(2)}
    finally:
        proxy.close()
    def registry_now() -> dict[str, Any]:  # copies: comparing the live lists with themselves could never fail
        return server._on_loop(lambda: {gid: (sorted(g.attempts), list(g.failures), g.checkpoint)
                                        for gid, g in server.registry.gangs.items()})

    registry_before = registry_now()
    for recorded in proxy.to_server:
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.settimeout(5)
            sock.sendall(bytes(recorded))  # AUTH (for another server nonce), register, calls, finish
            received = b""
            while chunk := _recv(sock):
                received += chunk
        kinds = [f.kind for f in FrameDecoder(Limits(1 << 20, 1 << 20)).feed(received)]
        assert kinds == [Kind.HELLO], f"a replayed handshake got {kinds}"
    assert registry_now() == registry_before
    assert server.stats()["connections"] == 0 or _settles(server)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def _settles(server: CoordinatorServer) -> bool:
    deadline = time.monotonic() + 5
    while server.stats()["connections"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ------------------------------------------------------------------ gang isolation


def test_a_member_of_one_gang_cannot_join_or_touch_another(make_server: Callable[..., CoordinatorServer]) -> None:
    server = make_server()
    gang_a = server.add_gang(world_size=2, name="a")
    gang_b = server.add_gang(world_size=2, name="b")
    assert gang_a.secret != gang_b.secret and gang_a.gang_id != gang_b.gang_id

    # 1. A's secret does not open B, and a proof for A is no proof for B even on the same nonce
    with pytest.raises(AuthenticationError, match="refused this task's credentials"):
        connect(gang_b, secret=gang_a.secret, timeout=5)
    nonce_s, nonce_c = b"s" * 32, b"c" * 32
    assert client_proof(gang_a.secret, gang_a.gang_id, nonce_s, nonce_c) != client_proof(
        gang_a.secret, gang_b.gang_id, nonce_s, nonce_c)

    # 2. B runs while A's members do everything A's members can: register rank 0 (taken in B), fail, abort
    b_ready = threading.Barrier(3, timeout=10)
    b_go = threading.Event()
    b_out: dict[int, Any] = {}

    def b_rank(r: int) -> None:  # its result (or nothing, if it failed) is checked in b_out below
        client = connect(gang_b, timeout=5)
        client.register(r)
        client.collective("barrier")
        b_ready.wait()
        assert b_go.wait(10)
        b_out[r] = [bytes(p) for p in client.collective("allGather", f"b{r}".encode())]
        client.finish()
        client.close()

    b_threads = [threading.Thread(target=b_rank, args=(r,), daemon=True) for r in range(2)]
    for thread in b_threads:
        thread.start()
    b_ready.wait()

    a0 = connect(gang_a, timeout=5)
    a1 = connect(gang_a, timeout=5)
    assert a0.register(0) == 2 and a1.register(1) == 2  # rank 0 is taken in B, not in A
    a0_waits = in_thread(lambda: a0.collective("barrier", timeout=10))
    wait_until(lambda: 0 in pending_ranks(server, gang_a.gang_id), "A's rank 0 waits in a barrier")
    a1.fail(ErrorInfo("RuntimeError", "A's rank 1 fails on purpose", 1))
    with pytest.raises(GangAbortedError, match="A's rank 1 fails on purpose"):
        a0_waits.get()  # raised in the test, not on a thread where a failed assertion is lost
    # 3. a second AUTH on an authenticated connection (to switch to B) is a protocol error
    from sparkhydrogen.coordinator.protocol import encode_frame

    a1._send(encode_frame(Kind.AUTH, {"gang": gang_b.gang_id, "nonce": "00" * 32, "proof": "0" * 64}))
    with pytest.raises(ProtocolError, match="expected a REQUEST frame, got AUTH"):
        a1.restore()
    a0.close()
    a1.close()

    b_go.set()
    for thread in b_threads:
        thread.join(10)
    assert b_out == {0: [b"b0", b"b1"], 1: [b"b0", b"b1"]}
    deadline = time.monotonic() + 10
    while not server.gang_settled(gang_b.gang_id):  # the ranks' finish notices are on their way
        assert time.monotonic() < deadline
        time.sleep(0.01)
    b_state = server.registry.get(gang_b.gang_id)
    assert b_state is not None and [a.state.value for a in b_state.attempts.values()] == ["finished"]
    failure = server.last_failure(gang_a.gang_id)
    assert failure is not None and "A's rank 1 fails on purpose" in failure.message
    assert server.last_failure(gang_b.gang_id) is None


# ------------------------------------------------------------------ no pickle


FORBIDDEN_MODULES = {"pickle", "cloudpickle", "dill", "marshal", "shelve", "copyreg", "_pickle", "joblib"}


def test_the_coordinator_code_imports_no_deserialiser_but_json() -> None:
    folder = Path(coordinator_pkg.__file__).parent
    files = sorted(folder.glob("*.py"))
    assert {f.name for f in files} >= {"protocol.py", "server.py", "state.py", "client.py", "tls.py"}
    for path in files + [folder.parent / "config.py", folder.parent / "errors.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec", "__import__"), f"{path.name}:{node.lineno}"
                continue
            else:
                continue
            assert not names & FORBIDDEN_MODULES, f"{path.name}:{node.lineno} imports {names & FORBIDDEN_MODULES}"


_WATCHED_COORDINATOR = textwrap.dedent("""
    import json, pickle, sys
    events = []
    sys.addaudithook(lambda event, args: events.append([event, repr(args)[:200]])
                     if event.startswith("pickle.") else None)
    def watched(name, original):
        return lambda *a, **k: events.append(["called pickle." + name, ""]) or original(*a, **k)
    for name in ("loads", "load", "Unpickler"):
        setattr(pickle, name, watched(name, getattr(pickle, name)))
    from sparkhydrogen.config import CoordinatorConfig
    from sparkhydrogen.coordinator import CoordinatorServer
    server = CoordinatorServer(CoordinatorConfig(host="127.0.0.1"))
    host, port = server.start()
    gang = server.add_gang(2)
    print(json.dumps({"host": host, "port": port, "gang_id": gang.gang_id, "secret": gang.secret.hex()}), flush=True)
    sys.stdin.readline()
    print(json.dumps({"events": events, "errors": server.internal_errors}), flush=True)
    server.stop()
    sys.stdin.readline()  # control: the watch does see an unpickling
    pickle.loads(b"ccollections\\nOrderedDict\\n)R.")
    print(json.dumps({"events": [e[0] for e in events]}), flush=True)
""")


def test_a_coordinator_relaying_hostile_pickles_never_unpickles_one(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # os.system(...) when unpickled
    child = subprocess.Popen([sys.executable, "-c", _WATCHED_COORDINATOR], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        info = json.loads(child.stdout.readline())
        handle = GangHandle(info["gang_id"], bytes.fromhex(info["secret"]), 2, info["host"], info["port"])
        out: dict[int, Any] = {}

        def rank(r: int) -> None:
            client = connect(handle, timeout=10)
            client.register(r)
            gathered = [bytes(p) for p in client.collective("allGather", evil)]
            [cast] = client.collective("broadcast", evil, root=0)
            client.collective("checkpoint", evil)  # the driver keeps checkpoint state: as opaque bytes
            state = client.restore()
            client.log("stdout", evil.decode())
            if r == 1:
                from sparkhydrogen.errors import ErrorInfo

                client.fail(ErrorInfo("pickle", evil.decode(), r, evil.decode(), {"payload": evil.decode()}))
            else:
                client.finish()
            client.close()
            out[r] = (gathered, bytes(cast), state)

        threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert out == {r: ([evil, evil], evil, evil) for r in range(2)}
        child.stdin.write("report\n")
        child.stdin.flush()
        report = json.loads(child.stdout.readline())
        child.stdin.write("control\n")
        child.stdin.flush()
        control = json.loads(child.stdout.readline())
    finally:
        child.kill()
        child.wait(10)
    assert report == {"events": [], "errors": 0}
    assert not marker.exists()
    assert set(control["events"]) == {"pickle.find_class", "called pickle.loads"}  # the watch works
