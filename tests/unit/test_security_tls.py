"""TLS on the coordinator channel: certificates, pinning, Spark's encryption settings, no downgrade."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kit import connect, gather_body, run_gang, start_ranks

from sparkhydrogen.config import CoordinatorConfig, HydrogenConfig, LaunchConfig, TlsConfig
from sparkhydrogen.coordinator import tls as tls_mod
from sparkhydrogen.coordinator.client import CoordinatorClient
from sparkhydrogen.coordinator.peer import READ_PAUSE_BYTES, Peer
from sparkhydrogen.coordinator.protocol import (
    NONCE_BYTES,
    Frame,
    FrameDecoder,
    Kind,
    Limits,
    client_proof,
    encode_frame,
)
from sparkhydrogen.coordinator.server import CoordinatorServer, GangHandle
from sparkhydrogen.coordinator.tls import fingerprint, generate_certificate, server_tls
from sparkhydrogen.errors import AuthenticationError, CoordinatorConnectionError, HydrogenError, ProtocolError
from sparkhydrogen.launch.runner import DeclaredGang
from sparkhydrogen.launch.service import DriverService, encryption_required_by, read_config

pytestmark = pytest.mark.timeout(60)

LOOPBACK = "127.0.0.1"


def generator_problem(name: str) -> str | None:
    if name == "cryptography":
        try:
            import cryptography  # noqa: F401
        except ImportError:
            return "the 'cryptography' package is not installed (pip install 'spark-hydrogen[tls]')"
    elif shutil.which("openssl") is None:
        return "no 'openssl' command on PATH"
    return None


GENERATORS = [pytest.param(name, marks=pytest.mark.skipif(generator_problem(name) is not None,
                                                          reason=str(generator_problem(name))))
              for name in ("cryptography", "openssl")]


def peer_fingerprint(address: tuple[str, int]) -> str:
    """The certificate a plain TLS client sees at ``address``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(address, timeout=5) as raw, ctx.wrap_socket(raw) as sock:
        return hashlib.sha256(sock.getpeercert(binary_form=True) or b"").hexdigest()


def big_gang(handle: GangHandle, rounds: int = 20, size: int = 100_000) -> dict[int, Any]:
    """``rounds`` allGathers of ``size`` bytes per rank over TLS; each rank's last result or exception."""
    return run_gang(handle, gather_body(lambda r, i: bytes([r, i % 256]) * (size // 2), rounds=rounds, timeout=30))


def expected(world: int, rounds: int = 20, size: int = 100_000) -> dict[int, Any]:
    last = (rounds - 1) % 256
    return {r: [bytes([i, last]) * (size // 2) for i in range(world)] for r in range(world)}


# ------------------------------------------------------------------ certificates


@pytest.mark.parametrize("generator", GENERATORS)
def test_a_generated_certificate_serves_a_gang_and_its_fingerprint_is_pinned(
    make_server: Callable[..., CoordinatorServer], generator: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tls_mod, "GENERATORS", (generator,))
    server = make_server(tls=TlsConfig(enabled=True))
    handle = server.add_gang(3)
    assert handle.tls_fingerprint == server.tls_fingerprint == peer_fingerprint(server.address)
    assert big_gang(handle) == expected(3)


def test_each_coordinator_generates_its_own_key(make_server: Callable[..., CoordinatorServer]) -> None:
    first, second = make_server(tls=TlsConfig(enabled=True)), make_server(tls=TlsConfig(enabled=True))
    assert first.tls_fingerprint != second.tls_fingerprint


@pytest.mark.parametrize("combined", [False, True], ids=["cert and key files", "one PEM with both"])
def test_a_user_supplied_certificate_is_served_and_pinned(
    make_server: Callable[..., CoordinatorServer], tmp_path: Path, combined: bool,
) -> None:
    cert_pem, key_pem, _ = generate_certificate(LOOPBACK)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    if combined:
        cert.write_bytes(cert_pem + key_pem)
    else:
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
    server = make_server(tls=TlsConfig(enabled=True, cert_file=str(cert), key_file=None if combined else str(key)))
    der = ssl.PEM_cert_to_DER_cert(cert_pem.decode())
    assert server.tls_fingerprint == fingerprint(der) == peer_fingerprint(server.address)
    assert big_gang(server.add_gang(2), rounds=3) == expected(2, rounds=3)


def test_an_unreadable_certificate_fails_at_start_and_nothing_listens(tmp_path: Path) -> None:
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate")
    server = CoordinatorServer(CoordinatorConfig(host=LOOPBACK, tls=TlsConfig(enabled=True, cert_file=str(bad))))
    with pytest.raises(HydrogenError, match=r"cannot load the coordinator's TLS certificate .*cert\.pem.*"
                                            r"spark\.hydrogen\.coordinator\.tls\.certFile/keyFile"):
        server.start()
    assert not server.running
    missing = CoordinatorServer(CoordinatorConfig(host=LOOPBACK, tls=TlsConfig(enabled=True,
                                                                                 cert_file=str(tmp_path / "no.pem"))))
    with pytest.raises(HydrogenError, match="cannot load the coordinator's TLS certificate"):
        missing.start()


def test_without_any_generator_tls_fails_clearly_instead_of_downgrading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import fails
    monkeypatch.setenv("PATH", "")
    server = CoordinatorServer(CoordinatorConfig(host=LOOPBACK, tls=TlsConfig(enabled=True)))
    with pytest.raises(HydrogenError, match=r"no certificate can be generated \(the 'cryptography' package is not "
                                            r"installed; no 'openssl' command on PATH\): install the TLS extra "
                                            r"\(pip install 'spark-hydrogen\[tls\]'\), or give a certificate"):
        server.start()
    assert not server.running


def test_the_private_key_never_touches_a_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(os, "memfd_create"):
        pytest.skip("os.memfd_create is not available on this platform (the private-directory fallback is used)")

    def no_files(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a temporary file was created for the key")

    monkeypatch.setattr(tls_mod.tempfile, "TemporaryDirectory", no_files)
    assert server_tls(TlsConfig(enabled=True), LOOPBACK) is not None


def test_without_memfd_the_key_lives_in_a_private_directory_removed_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setattr(tls_mod.tempfile, "tempdir", str(tmp_path))
    assert server_tls(TlsConfig(enabled=True), LOOPBACK) is not None
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ pinning and mismatches


def test_a_coordinator_with_another_certificate_is_refused(make_server: Callable[..., CoordinatorServer]) -> None:
    server = make_server(tls=TlsConfig(enabled=True))
    handle = server.add_gang(1)
    with pytest.raises(AuthenticationError, match=r"presented a certificate with SHA-256 fingerprint "
                                                  rf"{server.tls_fingerprint}, but this task expects {'ab' * 32}"):
        CoordinatorClient.connect((handle.host, handle.port), handle.gang_id, handle.secret, timeout=5,
                                  tls_fingerprint="ab" * 32)
    assert big_gang(handle, rounds=2) == expected(1, rounds=2)  # the coordinator is unaffected


def test_a_plaintext_task_cannot_talk_to_a_tls_coordinator(make_server: Callable[..., CoordinatorServer]) -> None:
    server = make_server(tls=TlsConfig(enabled=True))
    handle = server.add_gang(1)
    with pytest.raises(CoordinatorConnectionError, match="if the coordinator serves TLS, this task lacks its "
                                                         "certificate fingerprint"):
        CoordinatorClient.connect((handle.host, handle.port), handle.gang_id, handle.secret, timeout=1)


def test_a_tls_task_refuses_a_plaintext_coordinator(make_server: Callable[..., CoordinatorServer]) -> None:
    server = make_server()
    handle = server.add_gang(1)
    with pytest.raises(ProtocolError, match=r"TLS handshake with the coordinator at 127\.0\.0\.1:\d+ failed: .* "
                                            r"\(it answered in plaintext: a coordinator without TLS\?\)"):
        CoordinatorClient.connect((handle.host, handle.port), handle.gang_id, handle.secret, timeout=5,
                                  tls_fingerprint="ab" * 32)


def test_non_tls_bytes_on_a_tls_port_cost_one_connection(make_server: Callable[..., CoordinatorServer]) -> None:
    server = make_server(tls=TlsConfig(enabled=True), handshake_timeout=0.5)
    handle = server.add_gang(2)
    for junk in (b"H2\x01\x02" + b"\0" * 8, b"GET / HTTP/1.1\r\n\r\n", os.urandom(3000)):
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(junk)
            sock.settimeout(5)
            try:
                while sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass
    assert big_gang(handle, rounds=2) == expected(2, rounds=2)
    assert server.internal_errors == 0


def test_tls_channel_is_safe_with_heartbeats_and_logs_on_other_threads(
    make_server: Callable[..., CoordinatorServer],
) -> None:
    """A task reads replies on one thread while heartbeats and log lines are written from others."""
    server = make_server(tls=TlsConfig(enabled=True))
    got: list[str] = []
    handle = server.add_gang(2, on_log=lambda record: got.append(record.text))
    stop = threading.Event()

    def body(client: CoordinatorClient, r: int) -> bool:
        client.start_heartbeat(0.001)
        chatter = threading.Thread(target=lambda: [client.log("stdout", f"{r} {i}\n") for i in range(2000)
                                                   if not stop.is_set()], daemon=True)
        chatter.start()
        for i in range(300):
            parts = client.collective("allGather", f"{r}:{i}".encode() * 500, timeout=30)
            assert [bytes(p) for p in parts] == [f"{k}:{i}".encode() * 500 for k in range(2)]
        chatter.join(20)
        return not chatter.is_alive()

    try:
        assert start_ranks(handle, body).values(50) == {0: True, 1: True}
    finally:
        stop.set()
    assert len(got) == 4000 and server.internal_errors == 0


# ------------------------------------------------------------------ when TLS is on


def test_tls_follows_sparks_own_encryption_settings() -> None:
    for key in ("spark.network.crypto.enabled", "spark.ssl.enabled", "spark.ssl.rpc.enabled",
                "spark.authenticate.enableSaslEncryption"):
        cfg = read_config(_FakeContext({key: "true"})).coordinator.tls
        assert cfg == TlsConfig(enabled=True, required_by=f"{key}=true")
    assert read_config(_FakeContext({"spark.network.crypto.enabled": "false"})).coordinator.tls == TlsConfig()
    assert encryption_required_by({"spark.io.encryption.enabled": "true"}.get) is None  # disk, not network


def test_tls_is_on_when_the_user_asks_or_gives_a_certificate() -> None:
    conf = {"spark.hydrogen.coordinator.tls.enabled": "true"}
    assert HydrogenConfig.from_conf(conf.get, LOOPBACK).coordinator.tls == TlsConfig(enabled=True)
    conf = {"spark.hydrogen.coordinator.tls.certFile": "/c.pem", "spark.hydrogen.coordinator.tls.keyFile": "/k.pem"}
    assert HydrogenConfig.from_conf(conf.get, LOOPBACK).coordinator.tls == TlsConfig(True, "/c.pem", "/k.pem")
    assert HydrogenConfig.from_conf({}.get, LOOPBACK).coordinator.tls == TlsConfig()


@pytest.mark.parametrize(("conf", "required", "match"), [
    ({"spark.hydrogen.coordinator.tls.enabled": "false"}, "spark.network.crypto.enabled=true",
     r"tls\.enabled='false' but spark\.network\.crypto\.enabled=true requires encrypted traffic: the coordinator "
     r"never downgrades silently"),
    ({"spark.hydrogen.coordinator.tls.enabled": "false", "spark.hydrogen.coordinator.tls.certFile": "/c.pem"}, None,
     r"tls\.enabled='false' but spark\.hydrogen\.coordinator\.tls\.certFile is set"),
    ({"spark.hydrogen.coordinator.tls.keyFile": "/k.pem"}, None, r"tls\.keyFile is set without .*tls\.certFile"),
    ({"spark.hydrogen.coordinator.tls.enabled": "maybe"}, None, r"tls\.enabled='maybe' is not a boolean"),
])
def test_contradictory_tls_settings_are_refused(conf: dict[str, str], required: str | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HydrogenConfig.from_conf(conf.get, LOOPBACK, encryption_required_by=required)


def test_tls_config_itself_refuses_a_downgrade() -> None:
    with pytest.raises(ValueError, match="never downgrades silently"):
        TlsConfig(enabled=False, required_by="spark.ssl.enabled=true")


def test_the_fingerprint_reaches_tasks_in_their_spec(make_server: Callable[..., CoordinatorServer]) -> None:
    server = make_server(tls=TlsConfig(enabled=True))
    config = HydrogenConfig(coordinator=server.config, launch=LaunchConfig())
    gang = DeclaredGang(DriverService("app", config, server), server.add_gang(2), "job")
    spec = gang.spec(0)
    assert spec.tls_fingerprint == server.tls_fingerprint is not None
    assert "secret" not in repr(spec) and spec.secret.hex() not in repr(spec) + repr(gang.handle)


class _FakeConf:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)


class _FakeContext:
    def __init__(self, values: dict[str, str]) -> None:
        self.conf = _FakeConf(values)
        self.sc = self  # read_config() takes a target holding the SparkContext as ``sc``

    def getConf(self) -> _FakeConf:  # noqa: N802 - pyspark's name
        return self.conf


def test_connections_still_in_their_tls_handshake_count_against_the_limit(
    make_server: Callable[..., CoordinatorServer],
) -> None:
    server = make_server(tls=TlsConfig(enabled=True), max_connections=2, handshake_timeout=5)
    handle = server.add_gang(1)
    stalled = [socket.create_connection(server.address, timeout=5) for _ in range(2)]  # never say ClientHello
    try:
        with pytest.raises(CoordinatorConnectionError, match=r"already has 2 open connections, its limit "
                                                             r"\(spark\.hydrogen\.coordinator\.maxConnections=2\)"):
            connect(handle, timeout=5)
    finally:
        for sock in stalled:
            sock.close()
    deadline = time.monotonic() + 10
    while server.stats()["connections"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert big_gang(handle, rounds=2) == expected(1, rounds=2)
    assert server.internal_errors == 0


def test_a_silent_tls_peer_is_dropped_after_the_handshake_timeout(
    make_server: Callable[..., CoordinatorServer],
) -> None:
    server = make_server(tls=TlsConfig(enabled=True), handshake_timeout=0.3)
    started = time.monotonic()
    with socket.create_connection(server.address, timeout=5) as sock:
        assert sock.recv(1024) == b""
    assert time.monotonic() - started < 3
    assert server.stats()["connections"] == 0 and server.internal_errors == 0


def test_a_tls_peer_that_stops_reading_stops_being_read(
    make_server: Callable[..., CoordinatorServer], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flow control holds over TLS too: before Python 3.11 the SSL transport hands on the rest of
    what it decrypted after ``pause_reading()``, and the coordinator must not serve those requests."""
    server = make_server(tls=TlsConfig(enabled=True), liveness_timeout=None)
    served_while_paused: list[Any] = []
    serve = server.serve

    def watched(peer: Peer, request: Any) -> None:
        if peer.read_paused:
            served_while_paused.append(request)
        serve(peer, request)

    monkeypatch.setattr(server, "serve", watched)
    hoarder = server.add_gang(1, name="hoarder")
    state = b"s" * (64 * 1024)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    raw = socket.create_connection(server.address, timeout=5)
    sock = ctx.wrap_socket(raw)  # the ClientHello goes out at once, as any client's does
    try:
        decoder = FrameDecoder(Limits(1 << 20, 1 << 30))

        def next_frame() -> Frame:
            while True:
                for frame in decoder.feed(sock.recv(65536)):
                    return frame

        hello = next_frame()
        nonce = b"n" * NONCE_BYTES
        proof = client_proof(hoarder.secret, hoarder.gang_id, bytes.fromhex(hello.header["nonce"]), nonce)
        sock.sendall(encode_frame(Kind.AUTH, {"gang": hoarder.gang_id, "nonce": nonce.hex(), "proof": proof}))
        assert next_frame().kind is Kind.WELCOME
        sock.sendall(encode_frame(Kind.REQUEST, {"op": "register", "gang_attempt": 1, "stage_id": 0, "rank": 0,
                                                 "task_attempt_id": 100}))
        assert next_frame().kind is Kind.REPLY
        sock.sendall(encode_frame(Kind.REQUEST, {"op": "call", "kind": "checkpoint", "seq": 0}, state))
        assert next_frame().kind is Kind.REPLY
        requests = 2000  # 128 MiB of replies, none of them read yet
        sock.sendall(encode_frame(Kind.REQUEST, {"op": "restore"}) * requests)

        def hoarding() -> tuple[bool, int]:
            def read() -> tuple[bool, int]:
                conns = [c for c in server._connections if c.gang is not None and c.gang.gang_id == hoarder.gang_id]
                return (conns[0].read_paused, conns[0].queued) if conns else (False, 0)

            return server._on_loop(read)

        deadline = time.monotonic() + 10
        while not hoarding()[0]:
            assert time.monotonic() < deadline, "the coordinator never stopped reading the hoarder"
            time.sleep(0.01)
        paused, queued = hoarding()
        assert paused and queued <= READ_PAUSE_BYTES + len(state) + 1024  # bounded, not 128 MiB

        sock.settimeout(20)
        replies = 0
        while replies < requests:  # once it reads, every request is answered, in order
            data = sock.recv(1 << 20)
            assert data, "the coordinator closed the hoarder's connection"
            for frame in decoder.feed(data):
                assert frame.kind is Kind.REPLY
                assert frame.header == {"op": "restore", "found": True, "world_size": 1, "of": 0}
                assert frame.payload == state
                replies += 1
    finally:
        sock.close()
    assert not served_while_paused, f"{len(served_while_paused)} requests served while reading was paused"
    assert server.internal_errors == 0
