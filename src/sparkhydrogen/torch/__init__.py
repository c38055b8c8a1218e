"""PyTorch on Spark: ``sparkhydrogen.torch.run(train, *args, num_processes=N)``.

A faster, clearer replacement for ``pyspark.ml.torch.distributor.TorchDistributor``::

    import sparkhydrogen.torch as h2torch

    def train(lr):
        import torch.distributed as dist          # already initialised here
        ...
        return model.state_dict()

    state = h2torch.run(train, 1e-3, num_processes=4)              # rank 0's return value
    h2torch.run("train.py", "--lr", "1e-3", num_processes=4)       # a torchrun-style script

Importing this package does not import torch (the driver may not have it); the
ranks need ``torch`` installed (``pip install 'spark-hydrogen[torch]'``).
"""

from __future__ import annotations

import os
from typing import Any

from ._launch import run
from ._layout import DEVICE_ENV, GpuAssignmentError, TorchLaunchError

__all__ = ["GpuAssignmentError", "TorchLaunchError", "data_loader", "device", "lightning_environment", "run"]


def data_loader(batch_size: int, columns: Any = None, **options: Any) -> Any:
    """A ``torch.utils.data.DataLoader`` over this rank's share of ``data=`` (see ``docs/data.md``).

    Batches of ``batch_size`` rows of ``columns`` as tensors; ``shuffle``, ``drop_last``,
    ``equal_steps`` (default on: every rank yields as many batches, so DDP never waits on
    a rank that ran out), ``seed``, ``shuffle_buffer`` and ``cache`` are
    :func:`sparkhydrogen.data.numpy_batches`'s. Call it inside the training function.

    Example:
        >>> def train():                                                  # doctest: +SKIP
        ...     for batch in sparkhydrogen.torch.data_loader(64, columns=["x", "y"], shuffle=True):
        ...         ...
        >>> sparkhydrogen.torch.run(train, num_processes=2, data=df)      # doctest: +SKIP
    """
    from ..data.torch_feed import data_loader as make

    return make(batch_size, columns, **options)


def lightning_environment() -> Any:
    """A Lightning ``ClusterEnvironment`` for this rank: pass it as ``Trainer(plugins=[...])``.

    Every rank owns one device, so Lightning sees ``num_nodes=num_processes, devices=1``;
    a Trainer set otherwise fails at ``fit`` with a message saying what to set. See
    ``docs/frameworks.md``.

    Example:
        >>> def train():                                                # doctest: +SKIP
        ...     trainer = lightning.Trainer(strategy="ddp", accelerator="cpu", devices=1, num_nodes=2,
        ...                                 plugins=[sparkhydrogen.torch.lightning_environment()])
        ...     trainer.fit(model, loader)
        >>> sparkhydrogen.torch.run(train, num_processes=2)            # doctest: +SKIP
    """
    from ._lightning import lightning_environment as make

    return make()


def device() -> Any:
    """The ``torch.device`` this rank trains on: its GPU with ``use_gpu=True``, else the CPU.

    Use it instead of ``cuda:LOCAL_RANK``: it is right whether the rank runs in
    the task's Python worker or in a child process, and however Spark numbered the GPUs.

    Example:
        >>> def train():                                            # doctest: +SKIP
        ...     model = Net().to(sparkhydrogen.torch.device())
    """
    import torch

    name = os.environ.get(DEVICE_ENV)
    if name is None:
        raise RuntimeError(
            "sparkhydrogen.torch.device() was called outside a rank: call it inside a function or script "
            "launched by sparkhydrogen.torch.run(...)"
        )
    return torch.device(name)
