"""PyTorch: ``sparkhydrogen.torch.data_loader``, a ``DataLoader`` over this rank's share of ``data=``.

This module imports torch; ``sparkhydrogen.data`` itself does not import it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy.typing as npt
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import LaunchError
from ._convert import Chunk
from ._feed import DEFAULT_SHUFFLE_BUFFER, Batches, FeedOptions, from_context
from ._replay import Form

__all__ = ["RankDataLoader", "RankDataset", "data_loader"]

#: DataLoader arguments the loader sets itself: batching, order and collation happen in the rank's feed.
_OWN_ARGUMENTS = ("batch_size", "shuffle", "sampler", "batch_sampler", "collate_fn", "drop_last", "dataset")


def _tensor(name: str, array: npt.NDArray[Any]) -> torch.Tensor:
    """The batch's column as a tensor sharing its memory (the batch owns it: no copy)."""
    try:
        return torch.from_numpy(array)
    except TypeError:  # object, string, datetime ...: checked only when torch refuses, off the per-batch path
        raise TypeError(
            f"column {name!r} holds {array.dtype} values, which a torch tensor cannot: leave it out with "
            "columns=[...] or convert it in Spark first"
        ) from None


class _Tensors:
    """The torch form of a batch: a dict of tensors sharing the numpy arrays' memory.

    Later epochs of a share held in memory (``shuffle=False``) hand out the same tensors
    every epoch; torch has no read-only tensors, so an in-place change (``x.sub_(m)``,
    ``x[0] = 1``: anything that bumps a tensor's version counter) is noticed before the next
    epoch, which then makes its batches afresh from the cache.
    """

    share_views = False  # a tensor cannot be read-only: later epochs need a copy of their own

    def batch(self, chunk: Chunk) -> dict[str, torch.Tensor]:
        return {name: _tensor(name, array) for name, array in chunk.items()}

    def columns(self, share: Chunk) -> dict[str, Any]:
        return self.batch(share)

    def version(self, column: Any) -> int:
        return int(column._version)


#: The torch form of the batches (see :class:`sparkhydrogen.data._replay.Form`).
TENSORS: Form = _Tensors()


def _as_is(batch: Any) -> Any:
    """The loader's collate step: the batch is already a dict of tensors (torch's default walks it per batch)."""
    return batch


class RankDataset(IterableDataset[dict[str, torch.Tensor]]):
    """This rank's batches as dicts of column name -> tensor (each a whole batch: use ``batch_size=None``)."""

    def __init__(self, batches: Batches) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if get_worker_info() is not None:
            raise LaunchError(
                "the rank's data stream lives in the rank's own process and cannot be read from a DataLoader "
                "worker: use num_workers=0"
            )
        yield from self.batches.iterate(TENSORS)


class RankDataLoader(DataLoader[dict[str, torch.Tensor]]):
    """A ``DataLoader`` over a :class:`RankDataset` that can say where it stands and resume there.

    ``state_dict()`` / ``load_state_dict(sd)`` follow torchdata's ``StatefulDataLoader``:
    save the state with the model in ``ctx.checkpoint(...)``; in the retried attempt, load
    it into the new loader before iterating and the loader continues with the very next
    batch of the same epoch, in the order an uninterrupted run has (see
    :meth:`sparkhydrogen.data.Batches.state_dict`).
    """

    def __init__(self, dataset: RankDataset, **kwargs: Any) -> None:
        self.batches = dataset.batches
        super().__init__(dataset, **kwargs)

    def __iter__(self) -> Any:
        """The dataset's batches as they come (the feed has batched, ordered and collated them already).

        ``DataLoader``'s own iterator would add a record_function, a fetcher and a collate call
        per batch (about 15 us, more than a cached epoch's batch costs): it is used only with
        ``pin_memory=True``, which needs it.
        """
        if self.pin_memory:
            return super().__iter__()
        return iter(self.dataset)

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands: epoch, batches handed out in it, seed, share fingerprint (plain values)."""
        return self.batches.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (this loader's :meth:`state_dict` in an earlier attempt); call before iterating."""
        self.batches.load_state_dict(state)


def data_loader(batch_size: int, columns: Sequence[str] | None = None, *, shuffle: bool = False,
                drop_last: bool = False, equal_steps: bool = True, seed: int = 0,
                shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, cache: bool = False, num_workers: int = 0,
                cache_memory: int | None = None, global_shuffle: bool = False,
                **loader_kwargs: Any) -> RankDataLoader:
    """A ``DataLoader`` over this rank's share of ``data=``: each batch a ``dict`` column name -> tensor.

    Call it inside the ``train`` function of ``sparkhydrogen.torch.run(train, num_processes=N,
    data=df)``. Batches have ``batch_size`` rows of ``columns`` (all by default); fixed-length
    list columns become 2-D tensors. With ``equal_steps`` (the default) every rank gets the
    same number of batches, so DDP never waits on a rank that ran out (the rows left over
    are logged on ``sparkhydrogen.data``). ``shuffle`` mixes rows through a buffer of
    ``shuffle_buffer`` rows, seeded by ``(seed, rank, epoch)``. The rank's data is streamed
    once: iterate the loader again (epochs) with ``cache=True``, which keeps the rank's rows
    (in memory up to ``cache_memory`` bytes, default ``spark.hydrogen.data.cacheMemoryBudget``,
    the rest spilled to local disk); unshuffled later epochs of a share held in memory hand out
    the same tensors every epoch, and an in-place change to one sends the loader back to making
    them afresh (one WARNING; change a copy instead). ``global_shuffle=True`` (with ``cache=True``) also
    redistributes the cached rows across the ranks each epoch from the second on (peer to
    peer, seeded by ``(seed, epoch)``; see :func:`sparkhydrogen.data.numpy_batches`).
    The loader has ``state_dict()``/``load_state_dict()`` to resume mid-epoch after a gang
    retry (see :class:`RankDataLoader`). ``num_workers`` must be 0 (the stream lives in this process); other keyword
    arguments (``pin_memory``, ...) go to ``DataLoader``.

    Example:
        >>> def train():                                                       # doctest: +SKIP
        ...     loader = sparkhydrogen.torch.data_loader(64, columns=["x", "y"], shuffle=True, cache=True)
        ...     for epoch in range(3):
        ...         for batch in loader:
        ...             loss = loss_fn(model(batch["x"]), batch["y"])
        >>> sparkhydrogen.torch.run(train, num_processes=2, data=df)           # doctest: +SKIP
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int):
        raise TypeError(f"num_workers must be an int, got {type(num_workers).__name__}")
    if num_workers != 0:
        raise ValueError(
            f"num_workers must be 0, got {num_workers}: the rank's data stream lives in this process, so "
            "DataLoader workers cannot read it (batches are already assembled in the rank)"
        )
    taken = [name for name in _OWN_ARGUMENTS if name in loader_kwargs]
    if taken:
        raise TypeError(
            f"data_loader() sets {', '.join(taken)} itself; use its batch_size, shuffle and drop_last arguments"
        )
    options = FeedOptions(batch_size=batch_size, columns=columns, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                          drop_last=drop_last, equal_steps=equal_steps, seed=seed, cache=cache,
                          cache_memory=cache_memory, global_shuffle=global_shuffle)
    return RankDataLoader(RankDataset(from_context(options)), batch_size=None, num_workers=0, collate_fn=_as_is,
                          **loader_kwargs)
