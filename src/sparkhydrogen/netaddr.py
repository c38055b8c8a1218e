"""Network addresses as text: ``host:port`` split and joined the one way, IPv6 included.

Spark writes a task's address as ``host:port`` with an IPv6 host in brackets
(``[::1]:7077``); inside spark-hydrogen hosts are kept bare (``::1``) and get their
brackets back only when joined with a port. Pure functions, no name resolution.
"""

from __future__ import annotations

import ipaddress

__all__ = ["split_host_port", "join_host_port", "is_wildcard"]


def split_host_port(address: str) -> tuple[str, int | None]:
    """``"host:port"`` -> ``(host, port)``; the host is bare (no IPv6 brackets), the port ``None`` when absent.

    An address with more than one colon and no brackets is a bare IPv6 address
    without a port (``"::1"``), as :rfc:`3986` requires brackets around an IPv6
    host that carries a port.

    >>> split_host_port("10.0.0.7:41233"), split_host_port("[::1]:7077"), split_host_port("worker-3")
    (('10.0.0.7', 41233), ('::1', 7077), ('worker-3', None))
    >>> split_host_port("fe80::1%eth0"), split_host_port("[::1]")
    (('fe80::1%eth0', None), ('::1', None))
    >>> split_host_port("worker-3:http")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: address 'worker-3:http' has port 'http', which is not an integer in 0..65535; ...
    """
    if not isinstance(address, str):
        raise TypeError(f"address must be a string, got {type(address).__name__}")
    text = address.strip()
    if text.startswith("["):
        end = text.find("]")
        host, rest = (text[1:end], text[end + 1:]) if end > 0 else ("", "")
        if not host or (rest and not rest.startswith(":")):
            raise ValueError(f"address {address!r} is malformed; write an IPv6 address as [::1] or [::1]:7077")
        return host, _port(address, rest[1:]) if rest else None
    if text.count(":") > 1:  # bare IPv6: no port can be told apart from its last group
        return text, None
    host, colon, port = text.partition(":")
    if not host:
        raise ValueError(f"address {address!r} has no host; write it as host:port (e.g. 10.0.0.7:7077)")
    return host, _port(address, port) if colon else None


def join_host_port(host: str, port: int) -> str:
    """``("10.0.0.5", 7100)`` -> ``"10.0.0.5:7100"``; an IPv6 host gets brackets: ``"[::1]:7100"``.

    The inverse of :func:`split_host_port`: ``split_host_port(join_host_port(h, p)) == (h, p)``
    for every bare host ``h``.

    >>> join_host_port("::1", 7100), join_host_port("[::1]", 7100), join_host_port("worker-3", 80)
    ('[::1]:7100', '[::1]:7100', 'worker-3:80')
    """
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def is_wildcard(host: str) -> bool:
    """Whether ``host`` binds every interface (``0.0.0.0``, ``::``): an address to listen on, never to connect to.

    >>> is_wildcard("0.0.0.0"), is_wildcard("[::]"), is_wildcard("127.0.0.1"), is_wildcard("driver-1")
    (True, True, False, False)
    """
    bare = host.strip().strip("[]").split("%")[0]
    try:
        return ipaddress.ip_address(bare).is_unspecified
    except ValueError:  # a host name
        return False


def _port(address: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise ValueError(f"address {address!r} has port {text!r}, which is not an integer in 0..65535; write it "
                         "as host:port (an IPv6 host in brackets: [::1]:7077)")
    return int(text)
