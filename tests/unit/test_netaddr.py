"""``host:port`` text: one split and one join for IPv4, IPv6 (bracketed or bare) and host names."""

from __future__ import annotations

import pytest

from sparkhydrogen import frameworks
from sparkhydrogen.netaddr import is_wildcard, join_host_port, split_host_port

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        # IPv4
        ("10.0.0.7:41233", ("10.0.0.7", 41233)),
        ("127.0.0.1", ("127.0.0.1", None)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        # IPv6: bracketed with or without a port, bare (never a port: its last group would be ambiguous)
        ("[::1]:7077", ("::1", 7077)),
        ("[2001:db8::5]:65535", ("2001:db8::5", 65535)),
        ("[fe80::1%eth0]:4040", ("fe80::1%eth0", 4040)),
        ("[::1]", ("::1", None)),
        ("::1", ("::1", None)),
        ("2001:db8::5", ("2001:db8::5", None)),
        ("::", ("::", None)),
        # host names
        ("worker-3", ("worker-3", None)),
        ("worker-3.cluster.local:7077", ("worker-3.cluster.local", 7077)),
        ("  spaced:80 ", ("spaced", 80)),
    ],
)
def test_split_host_port(address: str, expected: tuple[str, int | None]) -> None:
    assert split_host_port(address) == expected


@pytest.mark.parametrize(
    ("address", "match"),
    [
        ("worker-3:http", r"address 'worker-3:http' has port 'http', which is not an integer in 0\.\.65535"),
        ("10.0.0.7:70000", r"address '10\.0\.0\.7:70000' has port '70000', which is not an integer in 0\.\.65535"),
        ("10.0.0.7:", r"address '10\.0\.0\.7:' has port '', which is not an integer"),
        ("10.0.0.7:-1", r"has port '-1', which is not an integer"),
        ("[::1]:", r"address '\[::1\]:' has port ''"),
        ("[::1", r"address '\[::1' is malformed; write an IPv6 address as \[::1\] or \[::1\]:7077"),
        ("[]:80", r"address '\[\]:80' is malformed"),
        ("[::1]7077", r"address '\[::1\]7077' is malformed"),
        (":7077", r"address ':7077' has no host; write it as host:port"),
        ("", r"address '' has no host"),
    ],
)
def test_split_host_port_rejects_malformed_addresses_naming_them(address: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_host_port(address)


def test_split_host_port_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="address must be a string, got tuple"):
        split_host_port(("::1", 7077))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [("10.0.0.5", 7100, "10.0.0.5:7100"), ("::1", 7100, "[::1]:7100"), ("[::1]", 7100, "[::1]:7100"),
     ("fe80::1%eth0", 1, "[fe80::1%eth0]:1"), ("worker-3", 80, "worker-3:80")],
)
def test_join_host_port(host: str, port: int, expected: str) -> None:
    assert join_host_port(host, port) == expected


@pytest.mark.parametrize("host", ["10.0.0.5", "::1", "2001:db8::5", "fe80::1%eth0", "worker-3", "a.b.c"])
def test_join_then_split_gives_the_host_and_port_back(host: str) -> None:
    assert split_host_port(join_host_port(host, 7077)) == (host, 7077)


@pytest.mark.parametrize(
    ("host", "expected"),
    [("0.0.0.0", True), ("::", True), ("[::]", True), ("0:0:0:0:0:0:0:0", True), ("127.0.0.1", False),
     ("::1", False), ("localhost", False), ("0.0.0.0.example", False)],
)
def test_is_wildcard(host: str, expected: bool) -> None:
    assert is_wildcard(host) is expected


def test_frameworks_use_the_same_rule() -> None:
    assert [frameworks.host_of(a) for a in ("10.0.0.7:1", "[::1]:2", "::1", "worker-3")] == [
        "10.0.0.7", "::1", "::1", "worker-3"]
    layout = frameworks.GangLayout(rank=0, hosts=("::1", "h"), ports=((7000,), (7001,)))
    assert layout.addresses() == ["[::1]:7000", "h:7001"]
