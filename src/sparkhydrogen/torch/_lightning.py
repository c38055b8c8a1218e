"""Lightning under ``sparkhydrogen.torch.run``: a ``ClusterEnvironment`` for ranks that own one device each.

Every rank of a torch launch is one Spark task with one device, so to Lightning each rank
is a *node* with ``devices=1``: ``Trainer(strategy="ddp", num_nodes=N, devices=1)``. Left to
itself Lightning detects torchrun's variables (``TorchElasticEnvironment``) and takes
``LOCAL_RANK`` (a rank's position among the ranks of its host) as an index into its one
device: ``IndexError`` in ``DDPStrategy.root_device`` on every rank but the first of a host.
:class:`SparkHydrogenEnvironment` says ``local_rank() == 0`` and ``node_rank() == RANK``, and
checks ``num_nodes``/``devices`` against the gang before anything distributed happens.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

from ._layout import DEVICE_ENV, TorchLaunchError

__all__ = ["lightning_environment", "explain_lightning_failure", "LIGHTNING_HINT"]

LIGHTNING_HINT = (
    "Lightning took LOCAL_RANK as an index into its devices, but every sparkhydrogen.torch.run rank owns one "
    "device: pass Trainer(strategy='ddp', num_nodes=num_processes, devices=1, "
    "plugins=[sparkhydrogen.torch.lightning_environment()])"
)


def _base() -> Any:
    import importlib

    for package in ("lightning.fabric", "lightning_fabric"):  # lightning, or the pytorch_lightning package's
        try:
            return importlib.import_module(f"{package}.plugins.environments").ClusterEnvironment
        except ImportError:
            continue
    raise ImportError("lightning_environment() needs Lightning: pip install 'spark-hydrogen[lightning]'")


def _variable(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise TorchLaunchError(f"{name} is not set: lightning_environment() works inside a function launched by "
                               "sparkhydrogen.torch.run(...)")
    return value


def _make_class(base: Any) -> type:
    class SparkHydrogenEnvironment(base):  # type: ignore[misc]
        """Lightning's view of a ``sparkhydrogen.torch.run`` rank: its own node, one device, launched externally."""

        @property
        def creates_processes_externally(self) -> bool:
            return True

        @property
        def main_address(self) -> str:
            return _variable("MASTER_ADDR")

        @property
        def main_port(self) -> int:
            return int(_variable("MASTER_PORT"))

        @staticmethod
        def detect() -> bool:
            return DEVICE_ENV in os.environ and "RANK" in os.environ

        def world_size(self) -> int:
            return int(_variable("WORLD_SIZE"))

        def set_world_size(self, size: int) -> None:
            if size != self.world_size():  # Trainer.__init__: num_nodes * devices
                raise _misfit(f"num_nodes * devices = {size}", self.world_size())

        def global_rank(self) -> int:
            return int(_variable("RANK"))

        def set_global_rank(self, rank: int) -> None:
            if rank != self.global_rank():  # Trainer.__init__: node_rank * devices + local_rank
                raise _misfit(f"devices > 1 (rank {self.global_rank()} would be global rank {rank})", self.world_size())

        def local_rank(self) -> int:
            return 0  # the rank's one device

        def node_rank(self) -> int:
            return self.global_rank()

        def validate_settings(self, num_devices: int, num_nodes: int) -> None:
            if num_devices != 1 or num_nodes != self.world_size():  # fit(), before anything distributed
                raise _misfit(f"devices={num_devices}, num_nodes={num_nodes}", self.world_size())

    SparkHydrogenEnvironment.__module__ = "sparkhydrogen.torch"
    return SparkHydrogenEnvironment


def _misfit(what: str, world: int) -> TorchLaunchError:
    return TorchLaunchError(f"Trainer({what}) does not fit this launch: sparkhydrogen.torch.run started {world} "
                            f"rank(s), one device each, so set Trainer(devices=1, num_nodes={world})")


_CLASS: Any = None


def lightning_environment() -> Any:
    """A Lightning ``ClusterEnvironment`` for the current ``sparkhydrogen.torch.run`` rank.

    Public as :func:`sparkhydrogen.torch.lightning_environment` (which has the example); the
    class is built on first use, so importing the launcher does not import Lightning.
    """
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class(_base())
    return _CLASS()


def explain_lightning_failure(exc: BaseException) -> BaseException | None:
    """The launcher's clearer error for Lightning's ``IndexError`` in ``root_device`` without our environment."""
    if not isinstance(exc, IndexError):
        return None
    frames = traceback.extract_tb(exc.__traceback__)
    if any(f.name == "root_device" and "lightning" in f.filename for f in frames):
        return TorchLaunchError(LIGHTNING_HINT)
    return None
