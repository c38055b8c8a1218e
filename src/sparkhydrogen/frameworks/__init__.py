"""Framework environments: a formed gang's layout turned into what a distributed framework reads.

    from sparkhydrogen.frameworks import Framework, GangLayout, run

    @dataclass(frozen=True)
    class MyFramework(Framework):
        name = "mine"
        def ports(self, rank, world_size):          # ports each rank reserves (and holds)
            return 1
        def environment(self, layout):              # pure: layout -> variables
            return {"PEERS": ",".join(layout.addresses()), "ME": str(layout.rank)}

    run(MyFramework(), train, num_tasks=4)

Built in: :class:`TorchDistributed` (torchrun's ``env://`` variables), :class:`Horovod`
(``HOROVOD_*`` and gloo rendezvous), :class:`JaxDistributed` (``jax.distributed``),
:class:`TensorFlowMultiWorker` (``TF_CONFIG`` and Keras 3 distribution variables),
:class:`HorovodGloo` (Horovod's gloo controller: ``HOROVOD_*`` and its rendezvous).
See ``docs/frameworks.md``. Importing this package imports no framework.
"""

from __future__ import annotations

from ._horovod import HorovodGloo
from ._jax import JaxDistributed
from ._tensorflow import KERAS3_FIT_MESSAGE, TensorFlowMultiWorker
from ._torch import TorchDistributed
from .api import Framework, FrameworkError, GangLayout, PortSource, host_of
from .gang import PortHold, activated, form, reserve_ports, run_rank, task_hosts
from .launch import run

__all__ = [
    "KERAS3_FIT_MESSAGE",
    "Framework",
    "FrameworkError",
    "GangLayout",
    "HorovodGloo",
    "JaxDistributed",
    "PortHold",
    "PortSource",
    "TensorFlowMultiWorker",
    "TorchDistributed",
    "activated",
    "form",
    "host_of",
    "reserve_ports",
    "run",
    "run_rank",
    "task_hosts",
]
