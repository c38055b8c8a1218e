"""Arrow record batches to numpy columns: the selected columns, in order; fixed-length lists as 2-D arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Chunk", "chunk_rows", "to_batch", "to_chunk", "to_numpy"]

#: A block of rows as columns: name -> array whose first axis is the row.
Chunk = dict[str, npt.NDArray[Any]]


def chunk_rows(chunk: Chunk) -> int:
    """How many rows ``chunk`` holds (0 for a chunk without columns)."""
    for array in chunk.values():
        return int(array.shape[0])
    return 0


def to_chunk(batch: Any, columns: Sequence[str] | None) -> Chunk:
    """``columns`` of the ``pyarrow.RecordBatch`` ``batch`` (all, in schema order, for ``None``) as numpy arrays.

    >>> import pyarrow as pa
    >>> rb = pa.RecordBatch.from_pydict({"x": [1, 2], "v": pa.array([[1.0, 2.0], [3.0, 4.0]])})
    >>> {k: v.shape for k, v in to_chunk(rb, ["v", "x"]).items()}
    {'v': (2, 2), 'x': (2,)}
    """
    names: list[str] = batch.schema.names
    if columns is None:
        return {name: to_numpy(array, name) for name, array in zip(names, batch.columns, strict=True)}
    where = {name: i for i, name in enumerate(names)}
    chunk: Chunk = {}
    for name in columns:
        index = where.get(name)
        if index is None:
            raise ValueError(
                f"column {name!r} is not in the data; its columns are: {', '.join(map(repr, names)) or '(none)'}"
            )
        chunk[name] = to_numpy(batch.column(index), name)
    return chunk


def to_numpy(array: Any, name: str) -> npt.NDArray[Any]:
    """One Arrow array as numpy: lists of one length (fixed-size or not, nested too) gain an axis each.

    Numbers without nulls are views of the Arrow buffer (zero-copy, read-only), an offset
    (a sliced array) included; so is a fixed-size list of them, one reshaped buffer. A
    chunked array (several buffers) is joined first.

    >>> import pyarrow as pa
    >>> values = pa.array([1.0, 2.0, 3.0, 4.0])
    >>> to_numpy(values.slice(1, 2), "x").tolist(), to_numpy(values, "x").base is not None
    ([2.0, 3.0], True)
    """
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    if array.null_count:
        raise ValueError(
            f"column {name!r} has {array.null_count} null value(s) in this rank's data; fill or drop them before "
            "feeding the DataFrame (df.na.fill(...) or df.dropna(...))"
        )
    kind = array.type
    if pa.types.is_floating(kind) or pa.types.is_integer(kind):  # the common case first: one buffer, no copy
        return np.asarray(array.to_numpy(zero_copy_only=True))
    return _nested(array, kind, name)


def _nested(array: Any, kind: Any, name: str) -> npt.NDArray[Any]:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(kind):
        return to_numpy(array.dictionary_decode(), name)
    if pa.types.is_struct(kind):
        raise TypeError(
            f"column {name!r} is a struct ({kind}), which has no numpy form; select its fields as columns, or for "
            "a Spark ML vector use pyspark.ml.functions.vector_to_array(col)"
        )
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        rows = len(array)
        if pa.types.is_fixed_size_list(kind):
            width = int(kind.list_size)
        else:
            lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
            if rows and int(lengths.min()) != int(lengths.max()):
                raise ValueError(
                    f"column {name!r} holds lists of different lengths ({int(lengths.min())} to "
                    f"{int(lengths.max())}); only lists of one length become an array: pad or truncate them first"
                )
            width = int(lengths[0]) if rows else 0
        inner = to_numpy(array.flatten(), name)
        return inner.reshape((rows, width, *inner.shape[1:]))
    return np.asarray(array.to_numpy(zero_copy_only=False))


def to_batch(chunk: Chunk) -> Any:
    """A chunk back to a ``pyarrow.RecordBatch`` that :func:`to_chunk` turns into the same arrays.

    Arrays of more than one axis become (nested) fixed-size lists.

    >>> rb = to_batch({"x": np.arange(2), "v": np.arange(4.0).reshape(2, 2)})
    >>> {k: v.tolist() for k, v in to_chunk(rb, None).items()}
    {'x': [0, 1], 'v': [[0.0, 1.0], [2.0, 3.0]]}
    """
    import pyarrow as pa

    def column(array: npt.NDArray[Any]) -> Any:
        if array.ndim <= 1:
            return pa.array(array)
        rows, width = array.shape[0], array.shape[1]
        inner = column(np.ascontiguousarray(array).reshape(rows * width, *array.shape[2:]))
        return pa.FixedSizeListArray.from_arrays(inner, width)

    return pa.RecordBatch.from_arrays([column(a) for a in chunk.values()], names=list(chunk))
