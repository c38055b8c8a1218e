"""JAX: ``sparkhydrogen.jax.batches``, this rank's share of ``data=`` as numpy batches (no jax import here)."""

from __future__ import annotations

from collections.abc import Sequence

from ._feed import DEFAULT_SHUFFLE_BUFFER, Batches, numpy_batches

__all__ = ["batches"]


def batches(batch_size: int, columns: Sequence[str] | None = None, *, shuffle: bool = False,
            drop_last: bool = False, equal_steps: bool = True, seed: int = 0,
            shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, cache: bool = False,
            cache_memory: int | None = None, global_shuffle: bool = False) -> Batches:
    """This rank's batches as ``dict`` column name -> ``numpy.ndarray`` (``jax.numpy`` takes them as they are).

    The same feed as :func:`sparkhydrogen.data.numpy_batches`. ``jax.jit`` compiles once per
    shape, so ``drop_last=True`` keeps every batch the same size. The result has
    ``state_dict()`` / ``load_state_dict()`` to resume mid-epoch after a gang retry.

    Example:
        >>> def train():                                                         # doctest: +SKIP
        ...     for batch in sparkhydrogen.jax.batches(128, columns=["x", "y"], drop_last=True):
        ...         params = update(params, jnp.asarray(batch["x"]), jnp.asarray(batch["y"]))
        >>> sparkhydrogen.jax.run(train, num_processes=2, data=df)               # doctest: +SKIP
    """
    return numpy_batches(batch_size, columns=columns, shuffle=shuffle, drop_last=drop_last,
                         equal_steps=equal_steps, seed=seed, shuffle_buffer=shuffle_buffer, cache=cache,
                         cache_memory=cache_memory, global_shuffle=global_shuffle)
