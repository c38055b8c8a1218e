"""The one driver-side gang runner: declare -> preflight -> attempt -> translate the failure -> retry -> release.

Every entry point (``run()``, ``barrier(rdd|df)``, ``retry()``, the torch and Horovod
launchers, transparent mode) goes through these functions:

* :func:`attempts` runs an action as attempts of a :class:`GangScope`: every gang the
  action declares keeps its identity (and checkpoints) across attempts, each attempt
  gets a new number and one Spark job tag, and a failed attempt is translated into
  our error and retried while that can help;
* :func:`declare` makes the gang a launch needs (the n-th gang of an attempt is the
  n-th gang of the first attempt again), after the slot preflight;
* :func:`translate` turns a failed Spark action into :class:`GangFailedError` naming
  the rank that failed first, :class:`GangCancelledError`, or :class:`LaunchError`;
* outside any scope (a bare ``barrier(rdd)`` job, transparent mode) nothing is
  declared: :func:`stage_spec` hands the lazily built stage a *stage credential*, and
  the coordinator forms the gang when the first task of each Spark stage attempt
  joins and forgets it when the stage is done. The gang's life follows Spark's
  execution of the plan (however it is composed, cached, viewed through SQL or run
  again), not the Python object it was built from.

*Where* the ranks run is a placement (:mod:`.placement`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from ..coordinator.handles import GangHandle, LogRecord
from ..coordinator.state import AttemptKey
from ..errors import (
    ErrorInfo,
    GangCancelledError,
    GangFailedError,
    GangSetupError,
    InsufficientSlotsError,
    LaunchError,
)
from ..task.embedded import parse_failure_marker
from ..task.spec import TaskSpec
from ..tracking.sink import MlflowSink, sink_for_launch
from .elastic import RESIZE_TYPE
from .jobs import AttemptTag, is_cancellation
from .preflight import STARTUP_WAIT, ensure_gang_fits, ensure_slots
from .resize import AttemptSizer
from .resources import java_profile
from .service import DriverService, service_for
from .session import SparkTarget
from .spark_errors import cannot_succeed, python_exception

__all__ = ["GangScope", "DeclaredGang", "current_scope", "launching", "declare", "attempts", "translate",
           "stage_spec",
           "backoff_delay", "check_retries", "failure_error", "gang_failed"]

log = logging.getLogger("sparkhydrogen.launch")
R = TypeVar("R")

_local = threading.local()


@dataclass
class GangScope:
    """The attempts of one retried action on one driver thread (owned by this module)."""

    scope_id: str
    target: SparkTarget | None = None
    attempt: int = 0
    gangs: list[DeclaredGang] = field(default_factory=list)  # in declaration order
    next_index: int = 0
    launched: bool = False  # some placement started ranks (embedded gangs are not declared on the driver)
    tag: AttemptTag | None = None
    elastic: bool = False  # the gang's size may change between attempts (its identity and checkpoints stay)

    @property
    def job_tag(self) -> str:
        return f"sparkhydrogen-{self.scope_id}-{self.attempt}"


def current_scope() -> GangScope | None:
    return getattr(_local, "scope", None)


def launching() -> int:
    """Note that a placement starts ranks now; returns the gang attempt number they must use (0 outside a scope)."""
    scope = current_scope()
    if scope is None:
        return 0
    scope.launched = True
    return scope.attempt


@dataclass(frozen=True)
class DeclaredGang:
    """A gang registered with the driver's coordinator, and what its tasks need to join it."""

    service: DriverService
    handle: GangHandle
    name: str
    stream_logs: bool = False
    gated: bool = False  # coordinated placement: the coordinator's start gate, not a barrier stage
    #: where the ranks' metrics go (the MLflow run of the launching thread, chosen at declaration); None: dropped
    metrics: MlflowSink | None = None

    def spec(self, gang_attempt: int = 0) -> TaskSpec:
        handle = self.handle
        return TaskSpec.build(self.service.config.launch, gang_id=handle.gang_id, secret=handle.secret,
                              host=handle.host, port=handle.port, world_size=handle.world_size,
                              gang_attempt=gang_attempt, tls_fingerprint=handle.tls_fingerprint,
                              stream_logs=self.stream_logs, gated=self.gated, name=self.name,
                              track_metrics=self.metrics is not None)

    def last_failure(self, gang_attempt: int | None = None) -> ErrorInfo | None:
        return self.service.server.last_failure(self.handle.gang_id, gang_attempt)

    def settle(self, timeout: float = 5.0) -> None:
        """Return once every rank's outcome has reached the coordinator (bounded by ``timeout``).

        A rank streams its output before it reports on the same connection, so by
        then the log hook has been handed every line.
        """
        import time

        server = self.service.server
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while server.running and not server.gang_settled(self.handle.gang_id) and time.monotonic() < deadline:
            pause.wait(0.005)

    def release(self, wait: bool = False) -> None:
        """Forget the gang (after its last reports arrived) and its checkpoint folder.

        ``wait=True`` does it now, on this thread (the end of a scope: when ``run()``
        returns its gang is gone); otherwise on the service's releaser thread (safe from
        a garbage-collector finalizer).
        """
        sink = self.metrics
        if wait:
            self.settle()
            self.service.release_now(self.handle.gang_id, self.service.config.launch.checkpoint_dir)
            if sink is not None:  # every rank's points arrived before its outcome: log them before returning
                sink.close()
        else:
            self.service.release(self.handle.gang_id, self.service.config.launch.checkpoint_dir)
            if sink is not None:
                threading.Thread(target=sink.close, name="sparkhydrogen-mlflow-close", daemon=True).start()


def declare(target: SparkTarget, world_size: int, name: str, *, on_log: Callable[[LogRecord], None] | None = None,
            on_abort: Callable[[AttemptKey, ErrorInfo], None] | None = None,
            preflight: bool = True, gated: bool = False, profile: Any = None,
            resources: str = "") -> tuple[DeclaredGang, int]:
    """Check slots, make sure the coordinator runs, and register a gang of ``world_size`` ranks.

    Inside a scope (:func:`attempts`), the n-th gang an attempt declares is the n-th
    gang of the first attempt again (same id and checkpoints), so tasks learn which
    attempt they are in and stale tasks are refused. Returns the gang and the attempt
    number its tasks must use. Outside a scope the gang is ephemeral: the caller
    releases it (bare stages use :func:`stage_spec` instead). ``on_abort(key, cause)`` is
    called (on a short-lived thread) when an attempt aborts, after the attempt's Spark
    jobs have been cancelled. ``gated``: the gang runs as an ordinary stage whose ranks
    wait at the coordinator's start gate (the coordinated placement); its preflight is
    :func:`~.preflight.ensure_gang_fits`. ``profile``: the gang stage's own pyspark
    ``ResourceProfile`` (stage-level resources, described by ``resources``); the slot
    preflight counts slots for it.
    """
    scope = current_scope()
    service = service_for(target)
    wait = service.config.launch.slot_wait_timeout
    if scope is not None and scope.attempt > 0:
        wait = max(wait, STARTUP_WAIT)  # lost executors are usually being replaced
    launching()
    if scope is not None and scope.next_index < len(scope.gangs):
        gang = scope.gangs[scope.next_index]
        if scope.elastic and gang.gated == gated and gang.handle.world_size != world_size:
            gang = _resized(scope, gang, world_size)
        if gang.handle.world_size == world_size and gang.gated == gated:
            scope.next_index += 1
            if preflight:
                _preflight(target, world_size, wait, gated, profile, resources)
            return gang, scope.attempt
    report = _preflight(target, world_size, wait, gated, profile, resources) if preflight else None
    hook = _canceller(scope, on_abort) if scope is not None else on_abort
    sink = sink_for_launch(name)  # in the launching thread: its MLflow run (MLflow keeps active runs per thread)
    handle = service.server.add_gang(world_size, name, on_abort=hook, on_log=on_log, on_metrics=sink,
                                     ephemeral=scope is None, gated=gated,
                                     start_timeout=service.config.launch.start_timeout)
    log.info("gang %s (%s): %d ranks, %s, coordinator %s:%d", handle.gang_id[:8], name, world_size,
             f"{report.slots} slots free" if report is not None else
             ("gated start, executors on demand" if gated else "no slot preflight"), handle.host, handle.port)
    gang = DeclaredGang(service, handle, name, stream_logs=on_log is not None, gated=gated, metrics=sink)
    if scope is not None:
        scope.gangs.append(gang)
        scope.next_index = len(scope.gangs)
    return gang, scope.attempt if scope is not None else 0


def _resized(scope: GangScope, gang: DeclaredGang, world_size: int) -> DeclaredGang:
    """The scope's gang at a new size for this attempt: same id, secret and checkpoints (elastic gangs)."""
    gang.service.server.resize_gang(gang.handle.gang_id, world_size)
    log.warning("gang %s (%s): attempt %d runs at %d ranks (was %d)", gang.handle.gang_id[:8], gang.name,
                scope.attempt, world_size, gang.handle.world_size)
    resized = replace(gang, handle=replace(gang.handle, world_size=world_size))
    scope.gangs[scope.next_index] = resized
    return resized


def _preflight(target: SparkTarget, world_size: int, wait: float, gated: bool, profile: Any = None,
               resources: str = "") -> Any:
    jprofile = java_profile(target, profile) if profile is not None else None
    if gated:
        return ensure_gang_fits(target, world_size, wait, profile=jprofile, resources=resources, stage_profile=profile)
    return ensure_slots(target, world_size, wait, profile=jprofile, resources=resources)


def stage_spec(target: SparkTarget, world_size: int, name: str, *, gated: bool = False,
               on_abort: Callable[[AttemptKey, ErrorInfo], None] | None = None, preflight: bool = True) -> TaskSpec:
    """What the tasks of a lazily built gang stage carry in their closure.

    Inside a scope (``run()``, ``retry()``, a launcher) the scope's gang is declared
    (:func:`declare`): retries, checkpoints and job tags follow the scope. Outside one,
    nothing is declared or held: the spec carries a stage credential and the gang is
    formed by the first task of every Spark stage attempt that runs the plan.
    ``world_size`` 0 means the stage's task count (native barrier stages only; a gated
    stage must know it). The slot preflight runs when the size is known.
    """
    if current_scope() is not None:
        gang, attempt = declare(target, world_size, name, gated=gated, on_abort=on_abort,
                                preflight=preflight and world_size > 0)
        return gang.spec(attempt)
    if gated and world_size < 1:
        raise ValueError("a gated gang stage needs its size (world_size >= 1)")
    service = service_for(target)
    if preflight and world_size > 0:
        _preflight(target, world_size, service.config.launch.slot_wait_timeout, gated)
    handle = service.server.stage_credential()
    log.info("gang %s (%s): a stage gang of %s, formed by each stage attempt that runs it; coordinator %s:%d",
             handle.gang_id[:14], name, f"{world_size} ranks" if world_size else "as many ranks as the stage has tasks",
             handle.host, handle.port)
    return TaskSpec.build(service.config.launch, gang_id=handle.gang_id, secret=handle.secret, host=handle.host,
                          port=handle.port, world_size=world_size, tls_fingerprint=handle.tls_fingerprint,
                          gated=gated, stage_gang=True, name=name)


def _canceller(scope: GangScope, then: Callable[[AttemptKey, ErrorInfo], None] | None
               ) -> Callable[[AttemptKey, ErrorInfo], None]:
    """Cancel the Spark jobs of an aborted attempt so ranks busy outside collectives stop too."""

    def cancel(key: AttemptKey, cause: ErrorInfo) -> None:
        tag = scope.tag
        if tag is not None and scope.attempt == key[0]:
            tag.cancel(cause.describe())
        if then is not None:
            then(key, cause)

    return cancel


def backoff_delay(attempt: int, base: float, cap: float = 30.0) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): ``base * 2**(attempt-1)``, capped.

    >>> [backoff_delay(a, 0.5) for a in (1, 2, 3)]
    [0.5, 1.0, 2.0]
    """
    if attempt <= 0 or base <= 0:
        return 0.0
    return float(min(base * (2 ** (attempt - 1)), cap))


def check_retries(max_retries: Any, backoff: Any) -> None:
    if isinstance(max_retries, bool) or not isinstance(max_retries, int):
        raise TypeError(f"max_retries must be an int, got {type(max_retries).__name__}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or backoff < 0:
        raise ValueError(f"retry_backoff must be a number of seconds >= 0, got {backoff!r}")


def _spark_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed Spark action (Py4J or a pyspark/Connect error), as opposed to a bug in the action."""
    from py4j.protocol import Py4JJavaError  # both ship with pyspark
    from pyspark.errors import PySparkException

    return isinstance(exc, (Py4JJavaError, PySparkException))


def _retryable(exc: BaseException) -> bool:
    """Retry decides on explicit classes: a gang that failed, or a Spark job that failed, is retried."""
    if isinstance(exc, (GangCancelledError, InsufficientSlotsError, GangSetupError)):
        return False
    return isinstance(exc, (GangFailedError, LaunchError))


def attempts(action: Callable[[], R], *, max_retries: int, retry_backoff: float,
             target: SparkTarget | None = None, sizer: AttemptSizer | None = None) -> R:
    """Run ``action()`` as attempt 0, 1, ... of one scope until it succeeds or ``max_retries`` are used.

    ``sizer`` (:class:`~.resize.AttemptSizer`) sizes every attempt before ``action()`` runs
    (``action`` reads ``sizer.current``); an elastic one lets the scope's gangs change size
    between attempts. An attempt that ended because its gang grows at a checkpoint
    (``grow="checkpoint"``) is relaunched at once and uses no retry. The error of an
    elastic run carries the sizes its attempts ran at, and why.
    """
    check_retries(max_retries, retry_backoff)
    if current_scope() is not None:
        return action()  # nested: the outer scope retries
    scope = GangScope(scope_id=uuid.uuid4().hex[:12], target=target, elastic=sizer is not None and sizer.elastic)
    _local.scope = scope
    errors: list[LaunchError] = []
    pause = threading.Event()  # never set: a bounded wait between attempts
    failed, cause, attempt = 0, "start", 0
    sized_at, resizes = time.monotonic(), 0  # this attempt: when first sized; how often sized again before launch
    try:
        while True:
            scope.attempt, scope.next_index = attempt, 0
            if attempt and cause != GREW and not resizes:  # a re-size before launch waits its poll, not a backoff
                delay = backoff_delay(failed, retry_backoff)
                log.warning("gang attempt %d of %d starts in %.1f s (attempt %d failed: %s)", attempt,
                            max_retries, delay, attempt - 1, str(errors[-1]).splitlines()[0])
                pause.wait(delay)
            if sizer is not None:
                try:
                    sizer.next(attempt, cause, growing=cause == GREW)
                except InsufficientSlotsError as exc:  # below min until the start bound
                    errors.append(exc)
                    break
                problem = sizer.history.too_many_shrinks(max_retries)
                if problem is not None:
                    errors.append(GangFailedError(problem))
                    break
            try:
                with sizer.watching(lambda: _offer(scope)) if sizer is not None else nullcontext():
                    return _tagged(scope, action)
            except Exception as exc:
                if not scope.launched and _slots_changed(exc, sizer, sized_at):
                    assert sizer is not None
                    cause = f"the slots changed before the launch: {str(exc).splitlines()[0][:200]}"
                    resizes += 1  # said at once, then every 20th time (a re-size is tried every poll interval)
                    log.log(logging.WARNING if resizes % 20 == 1 else logging.DEBUG,
                            "elastic gang %s: attempt %d is sized again (%d time(s) so far; %s)", sizer.name,
                            attempt, resizes, cause)
                    pause.wait(sizer.poll)  # the scheduler's view settles (an executor being removed)
                    continue
                if not scope.launched:  # nothing was launched: retrying would not help
                    if sizer is not None and sizer.elastic and isinstance(exc, LaunchError):
                        raise _with_sizes(exc, sizer) from exc.__cause__
                    raise
                error = exc if isinstance(exc, LaunchError) else (
                    _translate_scope(scope, exc) if _spark_failure(exc) else None)
                if error is None:
                    raise  # a bug in the action, not a failed gang
                sized_at, resizes = time.monotonic(), 0
                if sizer is not None and sizer.elastic and _growing(error):
                    cause, attempt = GREW, attempt + 1
                    continue
                errors.append(error)
                if not _retryable(error) or failed == max_retries:
                    break
                failed, attempt = failed + 1, attempt + 1
                cause = f"attempt {attempt - 1} failed: {str(error).splitlines()[0][:200]}"
        final = errors[0] if len(errors) == 1 else _exhausted(errors)
        if sizer is not None and sizer.elastic:
            raise _with_sizes(final, sizer)
        raise final
    finally:
        _local.scope = None
        for gang in scope.gangs:
            gang.release(wait=True)


def _slots_changed(exc: BaseException, sizer: AttemptSizer | None, sized_at: float) -> bool:
    """Whether an elastic attempt that found fewer slots at launch than when it was sized should be sized again.

    The size comes from one snapshot of the scheduler and the launch's preflight reads it again: an
    executor that is being removed (or a slot taken meanwhile) can sit between the two. Sized
    again until the start bound (``spark.hydrogen.launch.startTimeout``) since the attempt was first sized.
    """
    return (isinstance(exc, InsufficientSlotsError) and sizer is not None and sizer.elastic
            and time.monotonic() - sized_at < sizer.bound())


#: The cause of an attempt that starts because its gang grows at a checkpoint.
GREW = "the gang grows at a checkpoint (grow='checkpoint')"


def _growing(error: LaunchError) -> bool:
    """Whether an attempt ended because its ranks were told to relaunch larger at a checkpoint."""
    cause = getattr(error, "cause", None)
    return isinstance(error, GangFailedError) and cause is not None and (
        cause.type == RESIZE_TYPE or cause.type.endswith("." + RESIZE_TYPE.rsplit(".", 1)[1]))


def _offer(scope: GangScope) -> Callable[[int], None] | None:
    """How to offer the scope's (first) gang a larger size, once it is declared."""
    if not scope.gangs:
        return None
    gang = scope.gangs[0]
    return lambda size: gang.service.server.offer_growth(gang.handle.gang_id, size)


def _with_sizes(error: LaunchError, sizer: AttemptSizer) -> LaunchError:
    """``error`` with the sizes of the run's attempts (and their causes) in its message and ``size_history``."""
    text = f"{error}\nelastic gang {sizer.name} ({sizer.wanted.describe()}): {sizer.history.describe()}"
    error.args = (text,)
    error.size_history = tuple(sizer.history.steps)  # type: ignore[attr-defined]
    return error


def _tagged(scope: GangScope, action: Callable[[], R]) -> R:
    target = scope.target
    if target is None:
        return action()
    tag = AttemptTag(target, scope.job_tag)
    scope.tag = tag
    with tag:
        return action()


def _translate_scope(scope: GangScope, exc: BaseException) -> LaunchError:
    for gang in reversed(scope.gangs):
        if gang.last_failure(scope.attempt) is not None:
            return translate(gang, exc, scope.attempt)
    if scope.gangs:
        return translate(scope.gangs[-1], exc, scope.attempt)
    return failure_error("gang", parse_failure_marker(str(exc)), exc)  # an embedded gang (Spark Connect)


def gang_failed(name: str, failure: ErrorInfo) -> GangFailedError:
    """The error for gang ``name`` whose attempt failed with ``failure``: its rank, the others, its traceback."""
    text = f"gang {name!r} failed: {failure.describe()}{failure.others_note()}"
    if failure.traceback:
        text += f"\n--- traceback of rank {failure.rank} ---\n{failure.traceback.rstrip()}"
    return GangFailedError(text, failure.rank, failure)


def failure_error(name: str, failure: ErrorInfo | None, exc: BaseException) -> LaunchError:
    """Our error for a failed gang job: the first failing rank if known, else cancellation or Spark's word."""
    if failure is not None:
        return gang_failed(name, failure)
    first = str(exc).strip().splitlines()
    summary = first[0] if first else type(exc).__name__
    cancelled = is_cancellation(exc)
    if cancelled is not None:
        return GangCancelledError(f"gang {name!r} was cancelled from outside spark-hydrogen (its Spark job was "
                                  f"cancelled by job group, tag or interrupt): {cancelled}")
    found = python_exception(str(exc))
    if found is None:
        return LaunchError(f"gang {name!r} failed in Spark before any rank reported an error: {summary}")
    kind, message = found
    raised = f"{kind}: {message}".strip().splitlines()[0][:1000]
    reason = cannot_succeed(kind, message)
    if reason is not None:
        return GangSetupError(f"gang {name!r} could not start: its tasks raised {raised}\n{reason} "
                              "(not retried: every attempt would fail the same way)")
    return LaunchError(f"gang {name!r} failed in Spark before any rank reported an error: a task raised {raised}")


def translate(gang: DeclaredGang, exc: BaseException, gang_attempt: int | None = None) -> LaunchError:
    """Translate a failed Spark job into our error, naming the rank that failed first."""
    return failure_error(gang.name, gang.last_failure(gang_attempt), exc)


def _exhausted(errors: list[LaunchError]) -> LaunchError:
    summaries = tuple(str(err).splitlines()[0] for err in errors)
    lines = [f"gang failed on all {len(errors)} attempts:"]
    lines += [f"  attempt {number}: {summary}" for number, summary in enumerate(summaries)]
    last = errors[-1]
    if isinstance(last, GangCancelledError):
        lines[0] = f"gang was cancelled on attempt {len(errors) - 1} after {len(errors) - 1} failed attempt(s):"
    detail = str(last).split("\n", 1)
    if len(detail) > 1:
        lines.append(detail[1])
    cls = GangCancelledError if isinstance(last, GangCancelledError) else GangFailedError
    error: LaunchError
    if cls is GangFailedError:
        error = GangFailedError("\n".join(lines), getattr(last, "failed_rank", None), getattr(last, "cause", None),
                                attempts=summaries)
    else:
        error = GangCancelledError("\n".join(lines))
    error.__cause__ = last
    return error
