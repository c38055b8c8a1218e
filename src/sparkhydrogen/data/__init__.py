"""The rank's share of ``data=`` as training batches, for numpy/JAX, PyTorch and TensorFlow.

Inside a rank of ``sparkhydrogen.run(fn, n, data=df)`` (or a launcher's ``data=``)::

    batches = sparkhydrogen.data.numpy_batches(256, columns=["x", "y"], shuffle=True)
    for batch in batches:                  # dict: column name -> numpy.ndarray of 256 rows
        step(batch["x"], batch["y"])

The framework loaders build on the same core: ``sparkhydrogen.torch.data_loader``
(``sparkhydrogen.data.torch_feed``), ``sparkhydrogen.tensorflow.dataset``
(``sparkhydrogen.data.tensorflow_feed``) and ``sparkhydrogen.jax.batches``. Importing this
package imports none of the frameworks. See ``docs/data.md``.
"""

from __future__ import annotations

from ._feed import DEFAULT_SHUFFLE_BUFFER, Batches, FeedOptions, numpy_batches

__all__ = ["DEFAULT_SHUFFLE_BUFFER", "Batches", "FeedOptions", "numpy_batches"]
