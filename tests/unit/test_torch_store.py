"""Rank 0's ``TCPStore`` on the port it reserved: the listening socket is handed over, never leaked.

Real torch and real loopback sockets, no Spark. ``_store`` takes over the descriptor
``PortHold.take()`` gave it: torch serves on a duplicate, and when building the store
raises, the socket is closed anyway (Spark reuses the Python worker it would leak in).
"""

from __future__ import annotations

import datetime
import os
import socket
import stat
from typing import Any

import pytest

dist = pytest.importorskip("torch.distributed")  # not plain "torch": tests/torch is a namespace package here

from sparkhydrogen.frameworks import reserve_ports  # noqa: E402
from sparkhydrogen.torch import _rank  # noqa: E402

HOST = "127.0.0.1"


def _taken_socket() -> tuple[int, int, int]:
    """A reserved port's listening socket, taken as rank 0 takes it: (descriptor, port, socket inode)."""
    [hold] = reserve_ports(HOST, 1)
    fd = hold.take()
    return fd, hold.port, os.fstat(fd).st_ino


def _descriptors_of(inode: int) -> list[int]:
    """This process's descriptors open on the socket ``inode``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == f"socket:[{inode}]":
                found.append(int(name))
        except OSError:  # the listing's own descriptor, gone by now
            pass
    return found


def _refused(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_store_that_fails_to_start_closes_the_taken_socket() -> None:
    fd, port, inode = _taken_socket()
    wrong = 1 if port != 1 else 2  # torch checks that the socket is bound to the port it is told
    with pytest.raises(dist.DistError, match=f"expected to be bound to port {wrong}"):
        _rank._store(HOST, wrong, 5.0, listen_fd=fd)
    assert _descriptors_of(inode) == []  # neither our descriptor nor the one torch was given
    assert _refused(port)  # nobody listens there any more


def test_a_store_that_raises_before_using_the_socket_closes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("TCPStore(): incompatible function arguments")

    monkeypatch.setattr(dist, "TCPStore", refuse)
    fd, port, inode = _taken_socket()
    with pytest.raises(TypeError, match="incompatible function arguments"):
        _rank._store(HOST, port, 5.0, listen_fd=fd)
    assert _descriptors_of(inode) == []
    assert _refused(port)


def test_a_descriptor_torch_closed_and_another_thread_reused_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    reused: list[int] = []

    def close_then_fail(*args: Any, master_listen_fd: int, **kwargs: Any) -> Any:
        os.close(master_listen_fd)  # as torch's socket backend does when it fails
        read_end, write_end = os.pipe()
        os.dup2(read_end, master_listen_fd)  # meanwhile another thread was given the number
        reused.extend(dict.fromkeys((master_listen_fd, read_end, write_end)))  # the pipe may have got it already
        raise RuntimeError("listen fd is bound to another port")

    monkeypatch.setattr(dist, "TCPStore", close_then_fail)
    fd, port, inode = _taken_socket()
    try:
        with pytest.raises(RuntimeError, match="bound to another port"):
            _rank._store(HOST, port, 5.0, listen_fd=fd)
        assert stat.S_ISFIFO(os.fstat(reused[0]).st_mode)  # still the other thread's pipe: not closed for us
        assert _descriptors_of(inode) == []
    finally:
        for number in reused:
            os.close(number)


def test_a_started_store_serves_on_the_reserved_port_and_closes_it_when_it_goes() -> None:
    fd, port, inode = _taken_socket()
    store = _rank._store(HOST, port, 5.0, listen_fd=fd)
    assert len(_descriptors_of(inode)) == 1  # torch's duplicate alone: ours is closed
    client = dist.TCPStore(HOST, port, None, False, datetime.timedelta(seconds=5))
    client.set("key", "value")
    assert store.get("key") == b"value"
    del client, store
    assert _descriptors_of(inode) == []
    assert _refused(port)
