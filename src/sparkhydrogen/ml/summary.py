"""The training summary: per-epoch metrics of every rank, as rank 0's and the mean over ranks (pure).

Ranks gather their epoch metrics with one ``allGather`` per epoch; rank 0 keeps the table
and returns it with the model. :class:`TrainingSummary` is what ``model.summary`` gives.

Example:
    >>> s = TrainingSummary.from_ranks([[{"train_loss": 1.0}, {"train_loss": 3.0}],
    ...                                 [{"train_loss": 0.5}, {"train_loss": 0.7}]])
    >>> s.metric("train_loss"), s.metric("train_loss", mean=True)
    ([1.0, 0.5], [2.0, 0.6])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainingSummary"]


@dataclass(frozen=True)
class TrainingSummary:
    """Per-epoch metrics (step = epoch, from 0): ``rank0[e]`` and ``mean[e]`` map a metric name to a float.

    ``resumed_from_epoch`` is the epoch the last gang attempt started at (0 unless a retry
    resumed from a checkpoint); ``attempts`` the number of gang attempts the fit took.
    """

    rank0: tuple[Mapping[str, float], ...] = ()
    mean: tuple[Mapping[str, float], ...] = ()
    num_workers: int = 1
    resumed_from_epoch: int = 0
    attempts: int = 1
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_ranks(cls, epochs: Sequence[Sequence[Mapping[str, float]]], *, resumed_from_epoch: int = 0,
                   attempts: int = 1) -> TrainingSummary:
        """From ``epochs[e][r]``: rank ``r``'s metrics of epoch ``e`` (every rank names the same metrics)."""
        rank0 = tuple(dict(per_rank[0]) for per_rank in epochs)
        mean = tuple({name: sum(float(m[name]) for m in per_rank) / len(per_rank) for name in per_rank[0]}
                     for per_rank in epochs)
        workers = len(epochs[0]) if epochs else 1
        return cls(rank0=rank0, mean=mean, num_workers=workers, resumed_from_epoch=resumed_from_epoch,
                   attempts=attempts)

    @property
    def epochs(self) -> int:
        """How many epochs the summary covers."""
        return len(self.rank0)

    @property
    def names(self) -> list[str]:
        """The metric names, in the order the first epoch recorded them."""
        return list(self.rank0[0]) if self.rank0 else []

    def metric(self, name: str, *, mean: bool = False) -> list[float]:
        """One metric by epoch: rank 0's, or the mean over ranks with ``mean=True``."""
        table = self.mean if mean else self.rank0
        if table and name not in table[0]:
            raise KeyError(f"no metric {name!r} in the training summary; it has {self.names}")
        return [float(epoch[name]) for epoch in table]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (saved in the model's metadata)."""
        return {"rank0": [dict(e) for e in self.rank0], "mean": [dict(e) for e in self.mean],
                "num_workers": self.num_workers, "resumed_from_epoch": self.resumed_from_epoch,
                "attempts": self.attempts, "extra": dict(self.extra)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainingSummary:
        """The inverse of :meth:`to_json`."""
        return cls(rank0=tuple(data.get("rank0", ())), mean=tuple(data.get("mean", ())),
                   num_workers=int(data.get("num_workers", 1)),
                   resumed_from_epoch=int(data.get("resumed_from_epoch", 0)), attempts=int(data.get("attempts", 1)),
                   extra=dict(data.get("extra", {})))
