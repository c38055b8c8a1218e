"""``torch.distributed``'s ``env://`` variables (as ``torchrun`` sets them) from a gang layout."""

from __future__ import annotations

from dataclasses import dataclass

from .api import Framework, GangLayout, PortSource

__all__ = ["TorchDistributed"]


@dataclass(frozen=True)
class TorchDistributed(Framework):
    """``MASTER_ADDR``/``MASTER_PORT`` (a port rank 0 holds), ``RANK``, ``LOCAL_RANK``, ... as under torchrun.

    Rank 0 keeps its port's listening socket and hands it to torch's ``TCPStore``
    (``master_listen_fd``), so no other process can take it in between. DeepSpeed's
    ``deepspeed.init_distributed()`` reads the same variables.

    >>> env = TorchDistributed().environment(GangLayout(rank=1, hosts=("h", "h"), ports=((29500,), ())))
    >>> env["MASTER_ADDR"], env["MASTER_PORT"], env["RANK"], env["LOCAL_RANK"], env["NODE_RANK"]
    ('h', '29500', '1', '1', '0')
    """

    name = "torch.distributed"
    port_handover = PortSource.KEEP

    def ports(self, rank: int, world_size: int) -> int:
        return 1 if rank == 0 else 0

    def environment(self, layout: GangLayout) -> dict[str, str]:
        rank, world = layout.rank, layout.world_size
        return {
            "MASTER_ADDR": layout.hosts[0],
            "MASTER_PORT": str(layout.ports[0][0]) if layout.ports[0] else _missing_port(),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(layout.local_rank),
            "LOCAL_WORLD_SIZE": str(layout.local_world_size),
            "GROUP_RANK": str(layout.node_rank),
            "GROUP_WORLD_SIZE": str(layout.num_nodes),
            "NODE_RANK": str(layout.node_rank),
            "ROLE_NAME": "default",
            "ROLE_RANK": str(rank),
            "ROLE_WORLD_SIZE": str(world),
            "TORCHELASTIC_RESTART_COUNT": str(layout.attempt),
            "TORCHELASTIC_RUN_ID": layout.run_id or "sparkhydrogen",
        }


def _missing_port() -> str:
    from .api import FrameworkError

    raise FrameworkError("torch.distributed needs a port reserved by rank 0 (ports=((port,), ...) in the layout)")
