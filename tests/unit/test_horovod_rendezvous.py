"""Horovod support without Horovod: the layout arithmetic and the token-guarded rendezvous over real HTTP."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest

from sparkhydrogen.frameworks.horovod_rendezvous import MAX_VALUE_BYTES, RendezvousServer
from sparkhydrogen.frameworks.horovod_topology import layout

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("hosts", "rank", "expected"),
    [
        (["a"], 0, (0, 1, 0, 1, 0, 1)),
        (["a", "a", "a", "a"], 3, (3, 4, 3, 4, 0, 1)),
        (["a", "b", "c", "d"], 2, (2, 4, 0, 1, 2, 4)),
        (["a", "b", "a", "b"], 3, (3, 4, 1, 2, 1, 2)),
        (["a", "a", "a", "b"], 2, (2, 4, 2, 3, 0, 1)),  # only host a has a local rank 2
        (["a", "a", "a", "b"], 3, (3, 4, 0, 1, 1, 2)),
        (["b", "a", "b"], 1, (1, 3, 0, 1, 1, 2)),      # cross ranks follow host order of first appearance
    ],
)
def test_layout(hosts: list[str], rank: int, expected: tuple[int, ...]) -> None:
    got = layout(hosts, rank)
    assert (got.rank, got.size, got.local_rank, got.local_size, got.cross_rank, got.cross_size) == expected
    assert got.hostname == hosts[rank]
    assert got.env()["HOROVOD_LOCAL_SIZE"] == str(expected[3])


def test_layout_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one host"):
        layout([], 0)
    with pytest.raises(ValueError, match=r"rank 2 is outside 0..1"):
        layout(["a", "b"], 2)


@pytest.fixture()
def server() -> Iterator[RendezvousServer]:
    srv = RendezvousServer("127.0.0.1")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _request(srv: RendezvousServer, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request(method, path, body=body if method == "PUT" else None)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _path(token: str, port: int, scope: str, key: str) -> str:
    # exactly what Horovod's HTTP store requests for ADDR="<host>:<port>/<token>"
    return f"/{token}:{port}/{scope}/{key}"


def test_horovod_style_requests_with_the_token(server: RendezvousServer) -> None:
    token = server.new_attempt()
    addr, port = server.address_for_tasks(token)
    assert addr == f"127.0.0.1:{server.port}/{token}" and port == server.port
    assert _request(server, "GET", _path(token, port, "global", "0")) == (404, b"")
    assert _request(server, "PUT", _path(token, port, "global", "0"), b"addr-of-rank-0")[0] == 200
    assert _request(server, "GET", _path(token, port, "global", "0")) == (200, b"addr-of-rank-0")
    assert _request(server, "PUT", _path(token, port, "local_host-a", "0"), b"x")[0] == 200
    assert server.keys() == [("global", "0"), ("local_host-a", "0")]
    assert _request(server, "DELETE", _path(token, port, "global", "0"))[0] == 200
    assert _request(server, "GET", _path(token, port, "global", "0"))[0] == 404


def test_requests_without_the_current_token_change_nothing(server: RendezvousServer) -> None:
    old = server.new_attempt()
    port = server.port
    assert _request(server, "PUT", _path(old, port, "global", "1"), b"stale")[0] == 200
    token = server.new_attempt()  # a retry: fresh token, empty store
    assert server.keys() == []
    for bad in (old, "0" * 32, "", token[:-1]):
        assert _request(server, "PUT", _path(bad, port, "global", "1"), b"evil")[0] == 403
        assert _request(server, "GET", _path(bad, port, "global", "1"))[0] == 403
    assert _request(server, "GET", "/global/1")[0] == 400  # Horovod's own server's path shape
    assert server.keys() == []


def test_oversized_values_are_refused_before_reading_them(server: RendezvousServer) -> None:
    token = server.new_attempt()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:  # announce a body above the limit and send none of it: the verdict comes from the header alone
        conn.putrequest("PUT", _path(token, server.port, "global", "0"))
        conn.putheader("Content-Length", str(MAX_VALUE_BYTES + 1))
        conn.endheaders()
        assert conn.getresponse().status == 413
    finally:
        conn.close()
    assert server.keys() == []
