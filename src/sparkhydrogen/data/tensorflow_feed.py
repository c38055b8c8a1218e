"""TensorFlow: ``sparkhydrogen.tensorflow.dataset``, a ``tf.data.Dataset`` over this rank's share of ``data=``."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import LaunchError
from ._feed import DEFAULT_SHUFFLE_BUFFER, FeedOptions, from_context

__all__ = ["dataset"]


def _dtype(tf: Any, name: str, dtype: np.dtype[Any]) -> Any:
    if dtype.kind in "OUS":
        return tf.string
    try:
        return tf.as_dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"column {name!r} holds {dtype} values, which TensorFlow has no type for: leave it out "
                        "with columns=[...] or convert it in Spark first") from exc


def dataset(batch_size: int, columns: Sequence[str] | None = None, *, shuffle: bool = False,
            drop_last: bool = False, equal_steps: bool = True, seed: int = 0,
            shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, cache: bool = False, cache_memory: int | None = None,
            global_shuffle: bool = False) -> Any:
    """A ``tf.data.Dataset`` of this rank's batches: each element a ``dict`` column name -> tensor.

    The element spec comes from the rank's first rows (so every rank needs some): the batch
    axis is ``batch_size`` with ``drop_last=True``, else ``None``; fixed-length list columns
    add an axis. Batching, ``shuffle`` (a bounded buffer), ``equal_steps``, ``cache``,
    ``cache_memory`` and ``global_shuffle`` work as in :func:`sparkhydrogen.data.numpy_batches`;
    do not ``.batch()`` the dataset again.
    Each iteration is one epoch: more than one needs ``cache=True``.

    The dataset has ``state_dict()`` and ``load_state_dict(sd)`` (those of
    :class:`sparkhydrogen.data.Batches`): save the state with ``ctx.checkpoint(...)`` and
    load it into the dataset of a retried attempt before iterating it to continue with the
    next batch. They belong to this dataset object (not to one made from it by ``map``);
    the state counts the batches the generator made, so a ``.prefetch(k)`` after it lets
    the state run up to ``k`` batches ahead of your loop (tf.data's own injected prefetch is
    turned off here for that reason).

    Example:
        >>> def train():                                                        # doctest: +SKIP
        ...     ds = sparkhydrogen.tensorflow.dataset(64, columns=["x", "y"], drop_last=True, cache=True)
        ...     model.fit(ds.map(lambda b: (b["x"], b["y"])), epochs=3)
        >>> sparkhydrogen.tensorflow.run(train, num_processes=2, data=df)       # doctest: +SKIP
    """
    tf: Any = importlib.import_module("tensorflow")  # untyped: no stubs

    options = FeedOptions(batch_size=batch_size, columns=columns, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                          drop_last=drop_last, equal_steps=equal_steps, seed=seed, cache=cache,
                          cache_memory=cache_memory, global_shuffle=global_shuffle)
    batches = from_context(options)
    first = batches.peek()
    if first is None:
        raise LaunchError(
            f"rank {batches.rank} received no rows of data=, so its dataset's column types are unknown: give "
            "every rank rows (a DataFrame with at least as many rows and partitions as ranks)"
        )
    signature = {
        name: tf.TensorSpec(shape=(batch_size if drop_last else None, *array.shape[1:]),
                            dtype=_dtype(tf, name, array.dtype))
        for name, array in first.items()
    }
    ds = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=signature)
    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False  # made ahead, a batch would count as handed out
    ds = ds.with_options(options)
    ds.state_dict = batches.state_dict
    ds.load_state_dict = batches.load_state_dict
    return ds
