"""TLS for the coordinator channel: server certificates, contexts and the pinned client channel.

The coordinator either loads the certificate the user gives
(``spark.hydrogen.coordinator.tls.certFile``/``keyFile``) or generates a key and a
self-signed certificate per application, in memory (with the ``cryptography``
package when it is installed, ``pip install spark-hydrogen[tls]``, else with the
``openssl`` command). Tasks need no CA: the SHA-256 fingerprint of the server's
certificate reaches them inside the task closure, and the client refuses any other
certificate (:func:`check_pin`). The private key never touches a disk: it is loaded
through an anonymous in-memory file (``memfd``) where the platform has one, else
through a private temporary directory that is removed at once.

The HMAC handshake of :mod:`.protocol` runs inside TLS as before, so a task still
proves it holds its gang's secret, and the server still proves it knows it.

Example:
    >>> from sparkhydrogen.config import TlsConfig
    >>> tls = server_tls(TlsConfig(enabled=True), "127.0.0.1")   # doctest: +SKIP
    >>> len(tls.fingerprint)                                       # doctest: +SKIP
    64
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import cast

from ..config import TlsConfig
from ..errors import AuthenticationError, HydrogenError

__all__ = [
    "ServerTls",
    "TlsChannel",
    "server_tls",
    "server_context",
    "client_context",
    "generate_certificate",
    "fingerprint",
    "check_pin",
    "GENERATORS",
]

#: Ways to generate a certificate, tried in this order.
GENERATORS = ("cryptography", "openssl")

_COMMON_NAME = "sparkhydrogen-coordinator"
_VALID_DAYS = 365
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
#: Plaintext is encrypted in pieces of this size, so a large payload is not held twice.
_WRITE_PIECE = 1 << 20


@dataclass(frozen=True)
class ServerTls:
    """What the coordinator serves TLS with, and what its tasks must pin."""

    context: ssl.SSLContext
    fingerprint: str  # SHA-256 of the certificate (DER), hex
    source: str  # for logs: where the certificate came from


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, lowercase hex: what tasks pin."""
    return hashlib.sha256(der).hexdigest()


def check_pin(der: bytes | None, expected: str, where: str) -> None:
    """Raise :class:`AuthenticationError` unless the peer's certificate has the pinned fingerprint."""
    got = fingerprint(der) if der else ""
    if not hmac.compare_digest(got.encode(), expected.lower().encode()):
        raise AuthenticationError(
            f"the TLS peer at {where} presented a certificate with SHA-256 fingerprint {got or '(none)'}, "
            f"but this task expects {expected}: it is not this application's coordinator"
        )


def server_context() -> ssl.SSLContext:
    """TLS 1.2+ server context with Python's default (modern) ciphers; no client certificates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def client_context() -> ssl.SSLContext:
    """TLS 1.2+ client context that checks the server by pinned fingerprint (:func:`check_pin`), not by CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the fingerprint pin is stricter than any CA: one certificate only
    return ctx


def server_tls(config: TlsConfig, host: str, generator: str | None = None) -> ServerTls | None:
    """The coordinator's TLS set-up for ``config``, or ``None`` when TLS is off.

    Raises :class:`HydrogenError` with the fix when TLS is on but cannot be set up.
    """
    if not config.enabled:
        return None
    ctx = server_context()
    if config.cert_file is not None:
        try:
            ctx.load_cert_chain(config.cert_file, config.key_file)
            with open(config.cert_file, "rb") as fh:
                first = _PEM_CERT.search(fh.read())
        except (OSError, ssl.SSLError) as exc:
            raise HydrogenError(
                f"cannot load the coordinator's TLS certificate {config.cert_file!r}"
                + (f" with key {config.key_file!r}" if config.key_file else "")
                + f": {exc}. Give PEM files readable by the driver (spark.hydrogen.coordinator.tls.certFile/keyFile)"
            ) from exc
        if first is None:
            raise HydrogenError(f"{config.cert_file!r} holds no PEM certificate "
                                "(spark.hydrogen.coordinator.tls.certFile)")
        der = ssl.PEM_cert_to_DER_cert(first.group(0).decode("ascii"))
        return ServerTls(ctx, fingerprint(der), f"certificate file {config.cert_file}")
    cert_pem, key_pem, how = generate_certificate(host, generator)
    _load_chain_in_memory(ctx, cert_pem, key_pem)
    match = _PEM_CERT.search(cert_pem)
    assert match is not None  # both generators return one PEM certificate
    der = ssl.PEM_cert_to_DER_cert(match.group(0).decode("ascii"))
    return ServerTls(ctx, fingerprint(der), f"per-application certificate generated in memory ({how})")


def generate_certificate(host: str, generator: str | None = None) -> tuple[bytes, bytes, str]:
    """A fresh EC P-256 key and self-signed certificate: ``(cert_pem, key_pem, generator used)``.

    ``generator`` forces one of :data:`GENERATORS`; by default the first available is used.
    """
    if generator is not None and generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
    tried: list[str] = []
    for name in GENERATORS if generator is None else (generator,):
        try:
            if name == "cryptography":
                return (*_generate_with_cryptography(host), name)
            return (*_generate_with_openssl(), name)
        except _Unavailable as exc:
            tried.append(str(exc))
    raise HydrogenError(
        "TLS for the coordinator is on but no certificate can be generated ("
        + "; ".join(tried)
        + "): install the TLS extra (pip install 'spark-hydrogen[tls]'), or give a certificate with "
        "spark.hydrogen.coordinator.tls.certFile and tls.keyFile"
    )


class _Unavailable(Exception):
    pass


def _generate_with_cryptography(host: str) -> tuple[bytes, bytes]:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise _Unavailable("the 'cryptography' package is not installed") from None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _COMMON_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
    )
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    try:
        builder = builder.add_extension(x509.SubjectAlternativeName([alt]), critical=False)
    except ValueError:  # a host name x509 cannot carry; the fingerprint pin does not need it
        pass
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _generate_with_openssl() -> tuple[bytes, bytes]:
    exe = shutil.which("openssl")
    if exe is None:
        raise _Unavailable("no 'openssl' command on PATH")
    # key and certificate go to the pipe (stdout), never to a file
    cmd = [exe, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-keyout", "/dev/stdout", "-out", "/dev/stdout", "-days", str(_VALID_DAYS),
           "-subj", f"/CN={_COMMON_NAME}", "-batch"]
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _Unavailable(f"'openssl req' failed: {exc}") from None
    cert = _PEM_CERT.search(done.stdout)
    key = re.search(rb"-----BEGIN PRIVATE KEY-----.+?-----END PRIVATE KEY-----", done.stdout, re.S)
    if done.returncode != 0 or cert is None or key is None:
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise _Unavailable(f"'openssl req' exited {done.returncode}: {detail[-1] if detail else 'no output'}")
    return cert.group(0) + b"\n", key.group(0) + b"\n"


def _load_chain_in_memory(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``load_cert_chain`` wants a path; give it one that no other process and no disk ever sees."""
    blob = key_pem + cert_pem
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("sparkhydrogen-tls", os.MFD_CLOEXEC)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except OSError:
            pass  # no /proc: fall back to a private directory
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="sparkhydrogen-tls-") as folder:  # mode 0700
        path = os.path.join(folder, "chain.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        ctx.load_cert_chain(path)


class TlsChannel:
    """Blocking TLS over a connected socket, for one reading thread and any number of writers.

    An ``ssl.SSLSocket`` must not be read and written from two threads at once
    (OpenSSL's connection object is not thread-safe), but a task reads replies on
    its own thread while heartbeats and log lines are written from others. So the
    TLS state (an ``SSLObject`` over memory BIOs) is touched only under a short
    lock, the socket is read and written outside it, and ciphertext leaves in the
    order it was produced (writers hold the send lock from encryption to ``sendall``).
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=False)
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        #: The first raw bytes the peer sent during the handshake (to explain a peer that does not speak TLS).
        self.handshake_bytes = bytearray()
        self._in_handshake = False

    def handshake(self) -> None:
        self._in_handshake = True
        try:
            self._handshake()
        finally:
            self._in_handshake = False

    def _handshake(self) -> None:
        while True:
            with self._tls_lock:
                try:
                    self._tls.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
            self._flush()
            if done:
                return
            if not self._fill():
                raise ssl.SSLEOFError("the peer closed the connection during the TLS handshake")

    def peer_certificate(self) -> bytes | None:
        return self._tls.getpeercert(binary_form=True)

    @property
    def version(self) -> str | None:
        return self._tls.version()

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        with self._send_lock:
            for start in range(0, max(len(view), 1), _WRITE_PIECE):
                piece = view[start : start + _WRITE_PIECE]
                with self._tls_lock:
                    while piece:
                        piece = piece[self._tls.write(piece):]
                    out = self._outgoing.read()
                self._sock.sendall(out)

    def recv_into(self, buffer: memoryview, nbytes: int) -> int:
        """Up to ``nbytes`` plaintext bytes into ``buffer``; 0 at the end of the stream."""
        while True:
            with self._tls_lock:
                try:
                    got: int | None = cast(int, self._tls.read(nbytes, buffer))  # with a buffer: a count
                except ssl.SSLWantReadError:
                    got = None
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    got = 0
                pending = self._outgoing.pending
            if pending:  # e.g. a TLS 1.3 key update answered while reading
                self._flush()
            if got is not None:
                return got
            self._fill()

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def close(self) -> None:
        try:
            with self._tls_lock:
                try:
                    self._tls.unwrap()  # queue close_notify
                except ssl.SSLError:
                    pass
            self._sock.settimeout(0.5)
            self._flush()
        except OSError:
            pass
        finally:
            self._sock.close()

    def _flush(self) -> None:
        with self._send_lock:
            with self._tls_lock:
                out = self._outgoing.read()
            if out:
                self._sock.sendall(out)

    def _fill(self) -> bool:
        data = self._sock.recv(1 << 16)
        if self._in_handshake and len(self.handshake_bytes) < 8192:
            self.handshake_bytes += data[: 8192 - len(self.handshake_bytes)]
        with self._tls_lock:
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()
        return bool(data)
