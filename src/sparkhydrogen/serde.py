"""Payload (de)serialisation for collectives: pickle first, cloudpickle for what pickle cannot do.

``cloudpickle`` here is the package's one cloudpickle: the installed one, else the
copy bundled with pyspark (a ``--py-files`` zip on a cluster that only has pyspark).
Modules that pickle by value import it from here: ``from ..serde import cloudpickle``.
"""

from __future__ import annotations

import pickle
from typing import Any

try:
    import cloudpickle as cloudpickle  # re-exported (the "as" says so to type checkers)
except ImportError:  # shipped with --py-files to a cluster that only has pyspark
    from pyspark import cloudpickle as cloudpickle

from .errors import PayloadError

__all__ = ["cloudpickle", "dumps", "loads"]


def dumps(obj: Any, what: str = "payload") -> bytes:
    """Serialise ``obj``; raises :class:`PayloadError` naming its type when it cannot be pickled."""
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # lambdas, local classes ...: let cloudpickle try
        pass
    try:
        data: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise PayloadError(
            f"{what} of type {type(obj).__module__}.{type(obj).__qualname__} cannot be pickled ({exc}); "
            "send plain data (numbers, strings, lists, dicts, numpy arrays) or an object pickle supports"
        ) from exc
    return data


def loads(data: bytes | bytearray | memoryview, what: str = "payload") -> Any:
    """Deserialise a peer's payload (task side only: the coordinator never unpickles)."""
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise PayloadError(f"could not unpickle a peer's {what}: {type(exc).__name__}: {exc}") from exc
