"""The error tree, ErrorInfo on the wire, and rebuilding exceptions from it."""

from __future__ import annotations

import json
import pickle

import pytest

from sparkhydrogen import errors
from sparkhydrogen.errors import (
    AuthenticationError,
    CollectiveError,
    CollectiveMismatchError,
    CollectiveTimeoutError,
    CoordinatorConnectionError,
    ErrorInfo,
    GangAbortedError,
    GangFailedError,
    HydrogenError,
    InsufficientSlotsError,
    LaunchError,
    NotInGangError,
    PartitionClosedError,
    PayloadError,
    ProtocolError,
    RankLostError,
    RegistrationError,
    from_info,
)

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (NotInGangError, (HydrogenError, RuntimeError)),
        (CollectiveError, (HydrogenError,)),
        (CollectiveTimeoutError, (CollectiveError, TimeoutError)),
        (CollectiveMismatchError, (CollectiveError,)),
        (GangAbortedError, (CollectiveError,)),
        (RankLostError, (CollectiveError,)),
        (PartitionClosedError, (CollectiveError,)),
        (RegistrationError, (HydrogenError,)),
        (PayloadError, (HydrogenError, TypeError)),
        (CoordinatorConnectionError, (HydrogenError, ConnectionError)),
        (AuthenticationError, (CoordinatorConnectionError,)),
        (ProtocolError, (CoordinatorConnectionError,)),
        (LaunchError, (HydrogenError,)),
        (InsufficientSlotsError, (LaunchError,)),
        (GangFailedError, (LaunchError,)),
    ],
)
def test_error_tree(cls: type[Exception], bases: tuple[type[Exception], ...]) -> None:
    assert issubclass(cls, HydrogenError)
    for base in bases:
        assert issubclass(cls, base)


def test_errors_all_resolves() -> None:
    assert len(errors.__all__) == len(set(errors.__all__))
    for name in errors.__all__:
        assert getattr(errors, name) is not None


WIRE = [
    HydrogenError, CollectiveError, CollectiveTimeoutError, CollectiveMismatchError, RegistrationError,
    PayloadError, CoordinatorConnectionError, AuthenticationError, ProtocolError, RankLostError,
    PartitionClosedError,
]


@pytest.mark.parametrize("cls", WIRE, ids=lambda c: c.__name__)
def test_from_info_rebuilds_the_exact_class(cls: type[HydrogenError]) -> None:
    exc = from_info(ErrorInfo(type=cls.__name__, message=f"the {cls.__name__} message"))
    assert type(exc) is cls
    with pytest.raises(cls, match=f"^the {cls.__name__} message$"):
        raise exc


@pytest.mark.parametrize("name", ["ValueError", "ConnectionLost", "LaunchError", "", "builtins.object"])
def test_from_info_of_unknown_types_is_a_plain_hydrogen_error(name: str) -> None:
    exc = from_info(ErrorInfo(type=name, message="m"))
    assert type(exc) is HydrogenError and str(exc) == "m"


def test_gang_aborted_round_trip_keeps_failed_rank_and_cause() -> None:
    cause = ErrorInfo(type="ValueError", message="bad shard", rank=3, traceback="Traceback ...\nValueError: bad shard",
                      extra={"where": "loader"})
    wire = ErrorInfo(type="GangAbortedError", message="gang aborted: rank 3 raised ValueError: bad shard", rank=3,
                     extra={"failed_rank": 3, "cause": cause.to_json()})
    decoded = ErrorInfo.from_json(json.loads(json.dumps(wire.to_json())))
    exc = from_info(decoded)
    assert isinstance(exc, GangAbortedError)
    assert str(exc) == "gang aborted: rank 3 raised ValueError: bad shard"
    assert exc.failed_rank == 3
    assert exc.cause == cause


@pytest.mark.parametrize("extra", [{}, {"failed_rank": "3", "cause": "text"}, {"failed_rank": None}])
def test_gang_aborted_without_usable_details(extra: dict[str, object]) -> None:
    exc = from_info(ErrorInfo(type="GangAbortedError", message="aborted", extra=extra))
    assert isinstance(exc, GangAbortedError)
    assert exc.failed_rank is None and exc.cause is None


def test_error_info_json_round_trip() -> None:
    info = ErrorInfo(type="mypkg.TrainError", message="loss is nan ✗", rank=5, traceback="tb\nline",
                     extra={"step": 17, "nested": {"a": [1, 2]}})
    data = json.loads(json.dumps(info.to_json()))
    assert data == {"type": "mypkg.TrainError", "message": "loss is nan ✗", "rank": 5, "traceback": "tb\nline",
                    "extra": {"step": 17, "nested": {"a": [1, 2]}}}
    assert ErrorInfo.from_json(data) == info


def test_error_info_from_partial_or_odd_json() -> None:
    assert ErrorInfo.from_json({}) == ErrorInfo(type="HydrogenError", message="")
    odd = ErrorInfo.from_json({"type": 7, "message": None, "rank": "2", "traceback": None, "extra": None})
    assert (odd.type, odd.message, odd.rank, odd.traceback, dict(odd.extra)) == ("7", "None", None, "None", {})


def test_error_info_from_exception_names_the_type() -> None:
    assert ErrorInfo.from_exception(ValueError("bad"), rank=2) == ErrorInfo("ValueError", "bad", 2)
    custom = ErrorInfo.from_exception(GangFailedError("g"), rank=None, traceback="tb")
    assert custom.type == "sparkhydrogen.errors.GangFailedError"
    assert (custom.message, custom.rank, custom.traceback) == ("g", None, "tb")


def test_error_info_describe() -> None:
    assert ErrorInfo("ValueError", "bad input", rank=3).describe() == "rank 3 raised ValueError: bad input"
    mismatch = ErrorInfo("CollectiveMismatchError", "call #2 differs")
    assert mismatch.describe() == "CollectiveMismatchError: call #2 differs"
    # the coordinator's timeout verdict names the ranks that never arrived: it is not something they raised
    late = ErrorInfo("CollectiveTimeoutError", "rank 1 never reached barrier (collective call #3) within 30 s", rank=1)
    assert late.describe() == "rank 1 never reached barrier (collective call #3) within 30 s"


@pytest.mark.parametrize("cls", [GangAbortedError, GangFailedError])
def test_errors_with_details_survive_pickling(cls: type[GangAbortedError] | type[GangFailedError]) -> None:
    cause = ErrorInfo("KeyError", "'w'", rank=1)
    exc = pickle.loads(pickle.dumps(cls("gang failed", 1, cause)))
    assert type(exc) is cls
    assert (str(exc), exc.failed_rank, exc.cause) == ("gang failed", 1, cause)


@pytest.mark.parametrize("cls", WIRE + [NotInGangError, LaunchError, InsufficientSlotsError], ids=lambda c: c.__name__)
def test_plain_errors_survive_pickling(cls: type[HydrogenError]) -> None:
    exc = pickle.loads(pickle.dumps(cls("message")))
    assert type(exc) is cls and str(exc) == "message"


def test_a_lost_rank_is_described_by_what_happened_not_as_raising() -> None:
    lost = ErrorInfo("RankLostError", "rank 3's process died or lost its connection to the coordinator (host h, "
                     "pid 7, last heard 2.0 s ago)", rank=3)
    assert lost.describe() == ("rank 3's process died or lost its connection to the coordinator (host h, pid 7, "
                               "last heard 2.0 s ago)")
    closed = ErrorInfo("PartitionClosedError", "gang x: rank 1's partition was closed early by its consumer", rank=1)
    assert closed.describe() == "gang x: rank 1's partition was closed early by its consumer"
    with pytest.raises(RankLostError, match=r"^rank 3's process died or lost its connection"):
        raise from_info(lost)
    aborted = from_info(ErrorInfo("GangAbortedError", f"gang g aborted: {lost.describe()}", rank=3,
                                  extra={"failed_rank": 3, "cause": lost.to_json()}))
    assert isinstance(aborted, GangAbortedError) and aborted.cause == lost
    with pytest.raises(GangAbortedError, match=r"aborted: rank 3's process died"):
        raise aborted
