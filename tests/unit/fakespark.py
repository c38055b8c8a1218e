"""A fake of the one boundary to Spark (:class:`~sparkhydrogen.launch.session.SparkTarget`), for unit tests.

It answers the questions spark-hydrogen asks Spark (conf, master, slots, executors) from
plain fields and records the job control it is told to do (tags, local properties,
cancelled stages), so the placement choice, the slot preflight, the retry policy and the
failure translation are tested without a JVM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sparkhydrogen.launch.session import INTERRUPT_ON_CANCEL, SparkTarget


@dataclass(frozen=True)
class FakeTarget(SparkTarget):
    """A classic application (or, with ``is_connect``, a Connect session) that exists only in memory."""

    settings: dict[str, str] = field(default_factory=dict)
    master_url: str = "local[4]"
    slots: int = 4
    executors: int = 1
    requested: int | None = None
    running: int = 0
    is_connect: bool = False
    app: str = "fake-app"
    log: list[tuple[str, Any]] = field(default_factory=list)  # what the code told Spark to do
    properties: dict[str, str] = field(default_factory=dict)  # the thread's local properties
    tags: set[str] = field(default_factory=set)

    @property
    def connect(self) -> bool:
        return self.is_connect

    @property
    def key(self) -> str:
        return self.app

    def conf(self, key: str) -> str | None:
        return self.settings.get(key)

    @property
    def master(self) -> str:
        return self.master_url

    @property
    def default_parallelism(self) -> int:
        return self.slots

    def scheduler_slots(self, java_profile: Any = None) -> tuple[int, int]:
        return self.slots, self.executors

    def executor_load(self) -> tuple[int | None, int]:
        return self.requested, self.running

    def register_profile(self, java_profile: Any) -> None:
        self.log.append(("register_profile", java_profile))

    def parallelize(self, count: int) -> Any:
        raise AssertionError("the fake target runs no stage")

    def tag_jobs(self, tag: str) -> str | None:
        self.tags.add(tag)
        previous = self.properties.get(INTERRUPT_ON_CANCEL)
        self.properties[INTERRUPT_ON_CANCEL] = "true"
        self.log.append(("tag", tag))
        return previous

    def untag_jobs(self, tag: str, previous: str | None) -> None:
        self.tags.discard(tag)
        if previous is None:
            self.properties.pop(INTERRUPT_ON_CANCEL, None)
        else:
            self.properties[INTERRUPT_ON_CANCEL] = previous
        self.log.append(("untag", tag))

    def cancel_tagged(self, tag: str) -> None:
        self.log.append(("cancel_tag", tag))

    def cancel_stage(self, stage_id: int, reason: str) -> bool:
        self.log.append(("cancel_stage", stage_id))
        return True

    @property
    def stopped(self) -> bool:
        return False
