"""The key-value rendezvous Horovod's gloo controller speaks, served with a per-attempt token.

Horovod's C++ HTTP store sends ``GET``/``PUT``/``DELETE`` to
``http://<HOROVOD_GLOO_RENDEZVOUS_ADDR>:<HOROVOD_GLOO_RENDEZVOUS_PORT>/<scope>/<key>`` and
takes everything up to the first ``/`` of that URL as ``host:port``. So we hand tasks
``HOROVOD_GLOO_RENDEZVOUS_ADDR = "<host>:<port>/<token>"``: their requests then arrive as
``/<token>:<port>/<scope>/<key>``, and a request without the current token gets
``403`` and changes nothing. Horovod's own server (``horovod.runner.http``) answers anyone.

The token is random per gang attempt (128 bits), derived from nothing else, and it travels
to tasks inside the task closure. It does cross the wire in the clear (HTTP), like any
bearer token without TLS: someone who can sniff the cluster network during the attempt could
replay it against this attempt's rendezvous only, never against the coordinator.

Example:
    >>> server = RendezvousServer("127.0.0.1")
    >>> addr, port = server.start(), server.port
    >>> server.stop()
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["RendezvousServer", "MAX_VALUE_BYTES", "MAX_KEYS"]

log = logging.getLogger("sparkhydrogen.horovod")

#: Largest value one PUT may store (gloo's addresses are a few hundred bytes).
MAX_VALUE_BYTES = 1 << 20
#: Most keys the store holds at once (a few per rank and scope).
MAX_KEYS = 1 << 16


class _Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.token = ""
        self.data: dict[tuple[str, str], bytes] = {}


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.0"
    timeout = 10

    def log_message(self, format: str, *args: object) -> None:  # quiet: we log what matters
        return

    def _route(self) -> tuple[str, str] | None:
        store = self.server.store
        parts = self.path.split("/")
        # "/<token>:<port>/<scope>/<key>" -> ["", "<token>:<port>", scope, key]
        if len(parts) != 4 or not store.token:
            self._reply(400)
            return None
        token = parts[1].split(":", 1)[0]
        if not hmac.compare_digest(token.encode(), store.token.encode()):
            log.warning("horovod rendezvous: refused %s from %s (wrong or stale token)", self.command,
                        self.client_address[0])
            self._reply(403)
            return None
        return parts[2], parts[3]

    def _reply(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        route = self._route()
        if route is None:
            return
        with self.server.store.lock:
            value = self.server.store.data.get(route)
        self._reply(404) if value is None else self._reply(200, value)

    def do_PUT(self) -> None:
        route = self._route()
        if route is None:
            return
        try:
            length = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_VALUE_BYTES:
            self._reply(413)
            return
        value = self.rfile.read(length)
        store = self.server.store
        with store.lock:
            if route not in store.data and len(store.data) >= MAX_KEYS:
                self._reply(507)
                return
            store.data[route] = value
        self._reply(200)

    def do_DELETE(self) -> None:
        route = self._route()
        if route is None:
            return
        with self.server.store.lock:
            self.server.store.data.pop(route, None)
        self._reply(200)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    store: _Store


class RendezvousServer:
    """A token-guarded HTTP key-value store for Horovod's gloo rendezvous, on a daemon thread."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the rendezvous server is not running")
        return int(self._server.server_address[1])

    def start(self) -> str:
        """Bind and serve; returns the host."""
        server = _HTTPServer((self.host, self._requested_port), _Handler)
        server.store = _Store()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="sparkhydrogen-horovod-rendezvous", daemon=True)
        self._thread.start()
        return self.host

    def new_attempt(self) -> str:
        """Forget every key and issue a fresh token: stragglers of an older attempt are refused."""
        if self._server is None:
            raise RuntimeError("the rendezvous server is not running")
        store = self._server.store
        with store.lock:
            store.data.clear()
            store.token = secrets.token_hex(16)
            return store.token

    def address_for_tasks(self, token: str) -> tuple[str, int]:
        """``(HOROVOD_GLOO_RENDEZVOUS_ADDR, HOROVOD_GLOO_RENDEZVOUS_PORT)`` carrying ``token``."""
        return f"{self.host}:{self.port}/{token}", self.port

    def keys(self) -> list[tuple[str, str]]:
        if self._server is None:
            return []
        with self._server.store.lock:
            return sorted(self._server.store.data)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
