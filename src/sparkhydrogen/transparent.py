"""Transparent mode: pyspark's own barrier API, served by spark-hydrogen.

While installed, on the driver, these pyspark calls launch spark-hydrogen gangs (the same
Spark barrier stage underneath, so Spark's all-or-nothing placement and its checks still
apply), so code and libraries that never heard of spark-hydrogen (xgboost.spark,
TorchDistributor, users' own ``rdd.barrier()`` jobs) get its coordinator unchanged:

* ``RDD.barrier().mapPartitions(f)`` / ``.mapPartitionsWithIndex(f)``
* ``DataFrame.mapInPandas(f, schema, barrier=True)`` / ``.mapInArrow(...)`` (classic and Spark Connect)
* the idiom ``df.mapInPandas(g, schema).rdd.barrier().mapPartitions(f)`` (xgboost.spark's): the gang
  is formed around ``g``, where the work and the collectives happen

Inside such a task ``pyspark.BarrierTaskContext.get()`` and ``pyspark.TaskContext.get()``
return spark-hydrogen's :class:`~sparkhydrogen.BarrierTaskContext` (a subclass instance).

Example:
    >>> import sparkhydrogen as h2                                     # doctest: +SKIP
    >>> h2.install()                                                   # or: with h2.installed(): ...
    >>> rdd.barrier().mapPartitions(train).collect()                   # served by the coordinator
    >>> h2.uninstall()                                                 # pyspark exactly as it was
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .task.lifecycle import is_gang_body

__all__ = ["install", "installed", "is_installed", "uninstall", "add_notes"]

log = logging.getLogger("sparkhydrogen.transparent")

_MISSING = object()
_ORIGIN = "_sparkhydrogen_origin"  # on a DataFrame made by a non-barrier mapInPandas/mapInArrow, and its .rdd
_lock = threading.RLock()


@dataclass(frozen=True)
class _Patch:
    owner: type
    name: str
    before: Any  # what owner.__dict__ held under name, or _MISSING (the attribute came from a base class)


@dataclass
class _State:
    patches: list[_Patch]
    explicit: bool = False  # install() was called (and not undone by uninstall())
    holds: int = 0  # installed() blocks currently open


_state = _State(patches=[])


# ------------------------------------------------------------------------------------------- public API


def install() -> None:
    """Serve pyspark's barrier API with spark-hydrogen (idempotent, thread-safe).

    Call it before or after the SparkSession exists; it patches pyspark's classes, so it
    holds for every session of this process until :func:`uninstall`.
    """
    with _lock:
        _state.explicit = True
        _apply()


def uninstall() -> None:
    """Restore pyspark exactly as it was (idempotent, thread-safe).

    Jobs already launched through spark-hydrogen finish as they started: their tasks carry
    everything they need, the patches only decide how new jobs are launched.
    """
    with _lock:
        _state.explicit = False
        _state.holds = 0
        _revert()


def is_installed() -> bool:
    """Whether pyspark's barrier API is currently served by spark-hydrogen."""
    with _lock:
        return bool(_state.patches)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Transparent mode for the ``with`` block; afterwards it is as before (blocks may nest and overlap).

    Example:
        >>> with sparkhydrogen.installed():                             # doctest: +SKIP
        ...     model = SparkXGBClassifier(num_workers=2).fit(df)
    """
    with _lock:
        _state.holds += 1
        _apply()
    try:
        yield
    finally:
        with _lock:
            if _state.holds > 0:  # an uninstall() inside the block already reset everything
                _state.holds -= 1
                if _state.holds == 0 and not _state.explicit:
                    _revert()


# ------------------------------------------------------------------------------------------- patching


def _apply() -> None:
    if _state.patches:
        return
    try:
        for owner, name, make in _targets():
            before = vars(owner).get(name, _MISSING)
            replacement = make(inspect.getattr_static(owner, name))
            setattr(owner, name, replacement)
            _state.patches.append(_Patch(owner, name, before))
    except BaseException:
        _revert()
        raise
    log.info("transparent mode installed: %s", ", ".join(f"{p.owner.__module__}.{p.owner.__qualname__}.{p.name}"
                                                         for p in _state.patches))


def _revert() -> None:
    while _state.patches:
        patch = _state.patches.pop()
        if patch.before is _MISSING:
            delattr(patch.owner, patch.name)
        else:
            setattr(patch.owner, patch.name, patch.before)


def _targets() -> list[tuple[type, str, Callable[[Any], Any]]]:
    """(class, attribute, factory of the replacement from the original) for the running pyspark."""
    from pyspark import RDDBarrier

    targets: list[tuple[type, str, Callable[[Any], Any]]] = [
        (RDDBarrier, "mapPartitions", functools.partial(_rdd_barrier_method, "mapPartitions")),
        (RDDBarrier, "mapPartitionsWithIndex", functools.partial(_rdd_barrier_method, "mapPartitionsWithIndex")),
    ]
    classic = _classic_dataframe()
    for name in ("mapInPandas", "mapInArrow"):
        targets.append((classic, name, functools.partial(_map_in_method, name, False)))
    targets.append((classic, "rdd", _rdd_property))
    connect = _connect_dataframe()
    if connect is not None:
        for name in ("mapInPandas", "mapInArrow"):
            targets.append((connect, name, functools.partial(_map_in_method, name, True)))
    return targets


def _classic_dataframe() -> type:
    try:  # pyspark 4.x: classic and Connect DataFrames share an abstract parent
        from pyspark.sql.classic.dataframe import DataFrame
    except ImportError:  # pyspark 3.5
        from pyspark.sql.dataframe import DataFrame  # type: ignore[assignment]
    return DataFrame


def _connect_dataframe() -> type | None:
    try:
        from pyspark.sql.connect.dataframe import DataFrame
    except ImportError:  # Spark Connect's client dependencies (grpcio, ...) are not installed
        return None
    return DataFrame


# ------------------------------------------------------------------------------------------- which bodies are ours


def _is_gang_body(f: Any) -> bool:
    """Whether ``f`` is a task body spark-hydrogen itself hands to Spark: it goes to pyspark unchanged."""
    return is_gang_body(f)




# ------------------------------------------------------------------------------------------- replacements


def _rdd_barrier_method(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def method(self: Any, f: Callable[..., Any], preservesPartitioning: bool = False) -> Any:
        if _is_gang_body(f):
            return original(self, f, preservesPartitioning)
        import sparkhydrogen

        origin = getattr(self.rdd, _ORIGIN, None)
        if origin is not None:  # df.mapInPandas(g, schema).rdd.barrier().mapPartitions(f): the gang runs g
            parent, method_name, func, schema = origin
            gang_df = getattr(sparkhydrogen.barrier(parent), method_name)(_naming_rank(func), schema)
            return getattr(gang_df.rdd, name)(f, preservesPartitioning)
        return getattr(sparkhydrogen.barrier(self.rdd), name)(_naming_rank(f), preservesPartitioning)

    return method


def _map_in_method(name: str, connect: bool, original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)
    params = [p for p in signature.parameters.values() if p.name not in ("self", "func", "schema", "barrier")]

    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        func, schema = bound.arguments["func"], bound.arguments["schema"]
        if _is_gang_body(func):
            return original(self, *args, **kwargs)
        if not bound.arguments.get("barrier", False):
            out = original(self, *args, **kwargs)
            if not connect:  # remembered for the xgboost.spark idiom (see _rdd_barrier_method)
                setattr(out, _ORIGIN, (self, name, func, schema))
            return out
        extra = [p.name for p in params if p.name in bound.arguments and bound.arguments[p.name] is not p.default]
        if extra:
            raise ValueError(
                f"{name}(..., barrier=True) with {', '.join(f'{n}=' for n in extra)} is not served by spark-hydrogen's "
                f"transparent mode (its gangs take no {', '.join(extra)}): drop the argument, or make this call with "
                "transparent mode off (sparkhydrogen.uninstall())"
            )
        import sparkhydrogen

        return getattr(sparkhydrogen.barrier(self), name)(_naming_rank(func), schema)

    return method


def _rdd_property(original: Any) -> property:
    """``DataFrame.rdd`` that carries the DataFrame's origin (a non-barrier mapInPandas/mapInArrow) to the RDD."""

    def rdd(self: Any) -> Any:
        out = original.__get__(self, type(self))
        origin = vars(self).get(_ORIGIN)
        if origin is not None and getattr(out, _ORIGIN, None) is None:
            setattr(out, _ORIGIN, origin)
        return out

    return property(rdd, doc=getattr(original, "__doc__", None))


def _naming_rank(f: Callable[..., Any]) -> Callable[..., Any]:
    """``f`` whose failures say which rank raised them, in the error Spark reports to the driver.

    The job's action (``collect()`` in xgboost.spark, TorchDistributor, ...) runs in the
    caller's code, where Spark's own error is all there is. So a failing rank reports its
    error to the coordinator at once (peers blocked in a collective fail within
    milliseconds, naming it) and adds a note naming its rank -- and, when the coordinator
    had already heard of an earlier failure of another rank, that rank and its error too.
    """

    def body(*args: Any) -> Iterator[Any]:
        try:
            yield from f(*args)
        except Exception as exc:
            _report_and_note(exc)
            raise

    body.__name__ = getattr(f, "__name__", type(f).__name__)
    body.__qualname__ = getattr(f, "__qualname__", body.__name__)
    return body


#: How long a failing rank waits for its peers' reports before its error leaves the task (seconds). A rank
#: whose own teardown (xgboost's collective, a process group) broke its peers often reports after them.
SETTLE_TIMEOUT = 2.0


def _report_and_note(exc: Exception) -> None:
    from .context import BarrierTaskContext
    from .errors import CollectiveError
    from .task.lifecycle import report_failure

    ctx = BarrierTaskContext._current
    if ctx is None or isinstance(exc, CollectiveError):  # not a rank, or already the coordinator's verdict
        return
    me = ctx.rank()
    notes = [f"spark-hydrogen: raised by rank {me} of {ctx.worldSize()} (gang attempt {ctx.gangAttempt()}): "
             f"{type(exc).__name__}: {exc}"]
    # aborts the attempt (naming this rank unless a peer's report came first), then hears the peers' reports
    failure = report_failure(exc, settle=SETTLE_TIMEOUT)
    if failure is not None:
        if failure.rank != me:
            notes.append(f"spark-hydrogen: the gang had already failed: {failure.describe()}")
        notes.extend(f"spark-hydrogen: another rank failed too: {other.describe()}"
                     for other in failure.others if other.rank != me)
    add_notes(exc, notes)


def add_notes(exc: BaseException, notes: list[str]) -> None:
    """Attach ``notes`` to ``exc`` so that its formatted traceback (what Spark reports) shows them.

    Python 3.11+: ``add_note``. Python 3.10 keeps ``__notes__`` but never prints them, so
    there the exception's own text carries them: an exception of a library's (or the
    user's) class moves to a subclass of the same name whose ``str()`` ends with its notes
    (and which pickles as the original class); a built-in one with a plain message (a
    ``ValueError("bad shard")``) gets them appended to that message. Others (a ``KeyError``,
    an ``OSError`` with an errno) keep the notes in ``__notes__`` only.
    """
    if hasattr(exc, "add_note"):  # Python >= 3.11
        for note in notes:
            exc.add_note(note)
        return
    existing = getattr(exc, "__notes__", None)
    # 3.10's BaseException declares no __notes__ (type checkers know 3.11's): set it by name
    setattr(exc, "__notes__", [*(existing if isinstance(existing, list) else []), *notes])  # noqa: B010
    if type(exc).__module__ == "builtins":
        if len(exc.args) == 1 and isinstance(exc.args[0], str) and str(exc) == exc.args[0]:
            exc.args = (exc.args[0] + "".join("\n" + note for note in notes),)
        return
    with contextlib.suppress(TypeError):  # a class whose instances cannot change class: notes stay aside
        exc.__class__ = _noted_class(type(exc))


_NOTED: dict[type[BaseException], type[BaseException]] = {}


def _noted_class(cls: type[BaseException]) -> type[BaseException]:
    noted = _NOTED.get(cls)
    if noted is None:
        if len(_NOTED) >= 64:  # a reused Python worker sees a new class per task for classes defined in closures
            _NOTED.clear()
        noted = _NOTED[cls] = _make_noted_class(cls)
    return noted


def _make_noted_class(cls: type[BaseException]) -> type[BaseException]:
    """A subclass of ``cls`` with its name, whose ``str()`` ends with the instance's ``__notes__`` (Python 3.10)."""
    base_str = cls.__str__

    def __str__(self: BaseException) -> str:  # noqa: N807 - the method, defined for the class below
        notes = getattr(self, "__notes__", None) or []
        return base_str(self) + "".join(f"\n{note}" for note in notes)

    def __reduce__(self: BaseException) -> Any:  # noqa: N807
        return cls, self.args, getattr(self, "__dict__", None)

    return type(cls.__name__, (cls,), {"__str__": __str__, "__reduce__": __reduce__, "__slots__": (),
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                       "__doc__": cls.__doc__})
