"""Horovod's rank layout from the hosts of the ranks: pure arithmetic, unit tested."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["HorovodLayout", "layout"]


@dataclass(frozen=True)
class HorovodLayout:
    """What one rank tells Horovod through ``HOROVOD_*`` variables."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int
    hostname: str

    def env(self) -> dict[str, str]:
        return {
            "HOROVOD_RANK": str(self.rank),
            "HOROVOD_SIZE": str(self.size),
            "HOROVOD_LOCAL_RANK": str(self.local_rank),
            "HOROVOD_LOCAL_SIZE": str(self.local_size),
            "HOROVOD_CROSS_RANK": str(self.cross_rank),
            "HOROVOD_CROSS_SIZE": str(self.cross_size),
            "HOROVOD_HOSTNAME": self.hostname,
        }


def layout(hosts: Sequence[str], rank: int) -> HorovodLayout:
    """Layout of ``rank`` when rank ``i`` runs on ``hosts[i]``.

    Local ranks number the ranks of one host in rank order; the cross group of a
    rank is every host's rank with the same local rank, numbered by host order
    of first appearance.

    >>> layout(["a", "b", "a", "b"], 2)
    HorovodLayout(rank=2, size=4, local_rank=1, local_size=2, cross_rank=0, cross_size=2, hostname='a')
    """
    if not hosts:
        raise ValueError("hosts must name at least one host")
    if not 0 <= rank < len(hosts):
        raise ValueError(f"rank {rank} is outside 0..{len(hosts) - 1}")
    host = hosts[rank]
    same_host = [r for r, h in enumerate(hosts) if h == host]
    local_rank = same_host.index(rank)
    host_order = list(dict.fromkeys(hosts))
    peers_hosts = [h for h in host_order if sum(1 for x in hosts if x == h) > local_rank]
    return HorovodLayout(
        rank=rank,
        size=len(hosts),
        local_rank=local_rank,
        local_size=len(same_host),
        cross_rank=peers_hosts.index(host),
        cross_size=len(peers_hosts),
        hostname=host,
    )
