"""The global shuffle's all-to-all exchange: each rank's cached rows to their epoch's rank, peer to peer.

Per epoch each rank opens a listening socket (on the address it reaches the coordinator
from, loopback for a local gang), and one ``allGather`` through the coordinator carries every
rank's address, a fresh random token and how many rows it sends each rank. Then every rank
connects straight to each peer it has rows for, proves it holds that peer's token (an HMAC
of the connection's source, destination and epoch), and streams the rows as an Arrow IPC
stream of record batches; the driver carries none of the rows. What a rank receives goes
into one :class:`~sparkhydrogen.data._store.ShareStore` per source rank (each with a share of
the loader's memory budget, the rest spilled to local disk); which rows go where is
:mod:`sparkhydrogen.data._assign` (pure).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np

from ..errors import LaunchError
from ._assign import destinations, epoch_steps, pieces
from ._convert import Chunk, to_batch, to_chunk
from ._store import ShareStore

__all__ = ["DEFAULT_EXCHANGE_TIMEOUT", "Exchange", "Received", "exchange_host", "gang_exchange"]

log = logging.getLogger("sparkhydrogen.data")

#: Seconds a rank waits for its peers' connections and rows in one epoch's exchange.
DEFAULT_EXCHANGE_TIMEOUT = 300.0

_MAGIC = b"H2X1"
_HEAD = struct.Struct(">4siiq")  # magic, source rank, destination rank, epoch
_MAC = 32


def _mac(token: bytes, head: bytes) -> bytes:
    return hmac.new(token, b"sparkhydrogen data exchange\x00" + head, hashlib.sha256).digest()


def exchange_host(coordinator_host: str | None) -> str:
    """The address a rank listens on: loopback for a coordinator on loopback, else the one that reaches it.

    >>> exchange_host("127.0.0.1"), exchange_host(None)
    ('127.0.0.1', '127.0.0.1')
    """
    if not coordinator_host or coordinator_host == "localhost":
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(coordinator_host).is_loopback:
            return "127.0.0.1"
    except ValueError:
        pass  # a host name
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a route lookup: nothing is sent
        probe.connect((coordinator_host, 9))
        return str(probe.getsockname()[0])


class Received:
    """One epoch's rows of a rank after the exchange (complete): a store per source rank, read in source order.

    ``counts[s][d]`` is the rows rank ``s`` sent rank ``d`` this epoch (every rank's, as announced);
    ``steps(batch_size, drop_last)`` the batches every rank can take.

    >>> received = Received([ShareStore(0), ShareStore(0)], [[3, 2], [4, 1]])
    >>> len(received), received.rows, received.steps(2, drop_last=False)
    (0, 0, 2)
    """

    def __init__(self, stores: list[ShareStore], counts: list[list[int]]) -> None:
        self.stores = stores
        self.counts = counts
        self._index = [(s, i) for s, store in enumerate(stores) for i in range(len(store))]

    def __len__(self) -> int:
        return len(self._index)

    def chunk(self, index: int) -> Chunk:
        source, at = self._index[index]
        return self.stores[source].chunk(at)

    def steps(self, batch_size: int, drop_last: bool) -> int:
        return epoch_steps(self.counts, batch_size, drop_last)[1]

    @property
    def rows(self) -> int:
        return sum(store.rows for store in self.stores)

    def close(self) -> None:
        for store in self.stores:
            store.close()


#: ``exchange(epoch, store) -> Received``: one epoch's exchange of a rank's cached share (see :func:`gang_exchange`).
Exchange = Callable[[int, ShareStore], Received]


@dataclass(frozen=True)
class _Offer:
    host: str
    port: int
    token: str
    epoch: int
    counts: tuple[int, ...]


class _Failures:
    """Errors of the exchange's threads; the first one is raised by the rank's own thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.errors: list[BaseException] = []

    def add(self, error: BaseException) -> None:
        with self.lock:
            self.errors.append(error)


def gang_exchange(all_gather: Callable[[Any], Sequence[Any]], *, rank: int, world_size: int, seed: int,
                  host: str, memory_budget: int, spill_dir: str | None = None,
                  timeout: float = DEFAULT_EXCHANGE_TIMEOUT) -> Exchange:
    """The exchange of one rank of a gang; ``all_gather`` is the gang's (``ctx.allGather``).

    Example (in a rank; the loaders do this with ``global_shuffle=True``):
        >>> run = gang_exchange(ctx.allGather, rank=ctx.rank(), world_size=ctx.worldSize(), seed=0,
        ...                     host="127.0.0.1", memory_budget=1 << 30)              # doctest: +SKIP
        >>> received = run(1, store)                                                  # doctest: +SKIP
    """

    def run(epoch: int, store: ShareStore) -> Received:
        return _exchange(all_gather, store, epoch, rank=rank, world_size=world_size, seed=seed, host=host,
                         budget=memory_budget, spill_dir=spill_dir, timeout=timeout)

    return run


def _exchange(all_gather: Callable[[Any], Sequence[Any]], store: ShareStore, epoch: int, *, rank: int,
              world_size: int, seed: int, host: str, budget: int, spill_dir: str | None,
              timeout: float) -> Received:
    started = time.monotonic()
    dest = destinations(store.rows, world_size, seed, epoch, rank)
    mine = np.bincount(dest, minlength=world_size).tolist()
    token = secrets.token_bytes(32)
    listener = socket.create_server((host, 0), backlog=max(world_size, 8))
    try:
        offer = _Offer(host, int(listener.getsockname()[1]), token.hex(), epoch, tuple(int(c) for c in mine))
        offers = [_Offer(*o) for o in all_gather(astuple(offer))]
        for peer, other in enumerate(offers):
            if other.epoch != epoch:
                raise LaunchError(
                    f"global shuffle: rank {peer} exchanges rows for epoch {other.epoch}, rank {rank} for epoch "
                    f"{epoch}: every rank's loader must iterate the same epochs (restore every rank's loader "
                    "state from the same checkpoint)"
                )
        counts = [list(o.counts) for o in offers]
        stores = [ShareStore(budget // world_size, spill_dir) for _ in range(world_size)]
        try:
            _move(listener, store, dest, offers, counts, stores, rank=rank, epoch=epoch, token=token,
                  timeout=timeout)
        except BaseException:
            for each in stores:
                each.close()
            raise
        received = Received(stores, counts)
    finally:
        listener.close()
    log.info("rank %d: global shuffle of epoch %d: sent %d of its %d rows to other ranks, holds %d rows (%.2f s)",
             rank, epoch, store.rows - mine[rank], store.rows, received.rows, time.monotonic() - started)
    return received


def _move(listener: socket.socket, store: ShareStore, dest: Any, offers: list[_Offer], counts: list[list[int]],
          stores: list[ShareStore], *, rank: int, epoch: int, token: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    failures = _Failures()
    expected = {s for s in range(len(offers)) if s != rank and counts[s][rank] > 0}
    threads = [threading.Thread(target=_guard, args=(failures, _accept, failures, listener, expected, stores, counts,
                                                     rank, epoch, token, deadline),
                                name="h2-exchange-accept", daemon=True)]
    for peer, offer in enumerate(offers):
        if peer != rank and counts[rank][peer] > 0:
            threads.append(threading.Thread(
                target=_guard, args=(failures, _send, store, dest, offer, rank, peer, epoch, deadline),
                name=f"h2-exchange-send-{peer}", daemon=True))
    for thread in threads:
        thread.start()
    try:
        for piece in pieces(store.iter_chunks(), dest, rank):  # this rank's own rows stay here
            stores[rank].append(None, piece)
        stores[rank].finish()
    except BaseException as exc:
        failures.add(exc)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 5.0)
    stuck = [t.name for t in threads if t.is_alive()]
    if failures.errors:
        error = failures.errors[0]
        if isinstance(error, LaunchError):
            raise error
        raise LaunchError(f"global shuffle of epoch {epoch} failed on rank {rank}: {error}") from error
    if stuck:
        raise LaunchError(f"global shuffle of epoch {epoch}: rank {rank}'s {', '.join(stuck)} did not finish "
                          f"within {timeout:.0f} s")


def _guard(failures: _Failures, target: Callable[..., None], *args: Any) -> None:
    try:
        target(*args)
    except BaseException as exc:
        failures.add(exc)


def _left(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise LaunchError(f"global shuffle: timed out {what}")
    return left


def _send(store: ShareStore, dest: Any, offer: _Offer, rank: int, peer: int, epoch: int, deadline: float) -> None:
    import pyarrow as pa

    where = f"{offer.host}:{offer.port}"
    try:
        sock = socket.create_connection((offer.host, offer.port), timeout=_left(deadline, f"connecting to rank "
                                                                                         f"{peer} at {where}"))
    except OSError as exc:
        raise LaunchError(f"global shuffle of epoch {epoch}: rank {rank} cannot connect to rank {peer} at {where}: "
                          f"{exc}") from exc
    try:
        head = _HEAD.pack(_MAGIC, rank, peer, epoch)
        sock.sendall(head + _mac(bytes.fromhex(offer.token), head))
        with sock.makefile("wb") as out:
            writer: Any = None
            for piece in pieces(store.iter_chunks(), dest, peer):
                sock.settimeout(_left(deadline, f"sending rows to rank {peer} at {where}"))
                batch = to_batch(piece)
                if writer is None:
                    writer = pa.ipc.new_stream(out, batch.schema)
                writer.write_batch(batch)
            if writer is not None:
                writer.close()
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        raise LaunchError(f"global shuffle of epoch {epoch}: rank {rank} lost its connection to rank {peer} at "
                          f"{where} while sending rows: {exc}") from exc
    finally:
        sock.close()


def _accept(failures: _Failures, listener: socket.socket, expected: set[int], stores: list[ShareStore],
            counts: list[list[int]], rank: int, epoch: int, token: bytes, deadline: float) -> None:
    """Take the expected peers' connections; each one's rows are read by a thread of its own (joined here)."""
    waiting = set(expected)
    readers: list[threading.Thread] = []
    try:
        _take(failures, listener, waiting, readers, stores, counts, rank, epoch, token, deadline)
    finally:
        for reader in readers:
            reader.join(max(0.0, deadline - time.monotonic()) + 1.0)
    stuck = [r.name for r in readers if r.is_alive()]
    if stuck:
        raise LaunchError(f"global shuffle of epoch {epoch}: rank {rank} timed out reading rows ({', '.join(stuck)})")


def _take(failures: _Failures, listener: socket.socket, waiting: set[int], readers: list[threading.Thread],
          stores: list[ShareStore], counts: list[list[int]], rank: int, epoch: int, token: bytes,
          deadline: float) -> None:
    while waiting and not failures.errors:
        listener.settimeout(min(1.0, _left(deadline, f"rank {rank} waiting for rows from rank(s) "
                                                       f"{', '.join(map(str, sorted(waiting)))}")))
        try:
            sock, address = listener.accept()
        except TimeoutError:
            continue
        try:
            sock.settimeout(_left(deadline, "reading a peer's greeting"))
            greeting = _read_exact(sock, _HEAD.size + _MAC)
            head, mac = greeting[:_HEAD.size], greeting[_HEAD.size:]
            magic, source, to, their_epoch = _HEAD.unpack(head)
            if magic != _MAGIC or not hmac.compare_digest(mac, _mac(token, head)):
                log.warning("rank %d: refused a global-shuffle connection from %s: bad greeting", rank, address)
                sock.close()
                continue
            if to != rank or their_epoch != epoch or source not in waiting:
                sock.close()
                raise LaunchError(f"global shuffle: rank {rank} (epoch {epoch}) got a connection from rank "
                                  f"{source} for rank {to}, epoch {their_epoch}: the ranks disagree")
        except OSError as exc:
            sock.close()
            raise LaunchError(f"global shuffle: rank {rank} could not read a greeting from {address}: {exc}") from exc
        waiting.discard(source)
        reader = threading.Thread(target=_guard, args=(failures, _receive, sock, stores[source],
                                                       counts[source][rank], source, rank, epoch, deadline),
                                  name=f"h2-exchange-receive-{source}", daemon=True)
        reader.start()
        readers.append(reader)


def _read_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        part = sock.recv(size - len(data))
        if not part:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        data += part
    return bytes(data)


def _receive(sock: socket.socket, store: ShareStore, rows: int, source: int, rank: int, epoch: int,
             deadline: float) -> None:
    import pyarrow as pa

    try:
        sock.settimeout(_left(deadline, f"rank {rank} reading rows from rank {source}"))
        with sock.makefile("rb") as stream:
            reader = pa.ipc.open_stream(stream)
            for batch in _batches(reader):
                store.append(batch, to_chunk(batch, None))
    except (OSError, pa.ArrowInvalid) as exc:
        raise LaunchError(f"global shuffle of epoch {epoch}: rank {rank} lost rank {source}'s rows mid-stream "
                          f"({store.rows} of {rows} received): {exc}") from exc
    finally:
        sock.close()
    store.finish()
    if store.rows != rows:
        raise LaunchError(f"global shuffle of epoch {epoch}: rank {rank} received {store.rows} rows from rank "
                          f"{source}, which announced {rows}")


def _batches(reader: Any) -> Iterator[Any]:
    while True:
        try:
            yield reader.read_next_batch()
        except StopIteration:
            return
