"""What a rank needs to join its gang; built on the driver, carried inside the task closure."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DEFAULT_CACHE_MEMORY, STACK_DUMP_AFTER, LaunchConfig

__all__ = ["TaskSpec"]


@dataclass(frozen=True)
class TaskSpec:
    """Everything a rank needs to join its gang; travels inside the task closure.

    The secret authenticates this gang's ranks to the coordinator; it is never
    sent on the coordinator's socket (only an HMAC of a fresh nonce is).
    """

    gang_id: str
    secret: bytes
    host: str
    port: int
    world_size: int  # 0: the stage's task count (a stage gang in a barrier stage)
    gang_attempt: int = 0
    connect_timeout: float = 30.0
    collective_timeout: float | None = None
    heartbeat_interval: float | None = 1.0
    checkpoint_dir: str | None = None
    stream_logs: bool = False
    tls_fingerprint: str | None = None  # SHA-256 of the coordinator's TLS certificate; None: plaintext
    gated: bool = False  # coordinated placement: registration waits at the coordinator's start gate
    start_timeout: float | None = None  # bound of that wait (the coordinator enforces it; this side too)
    #: A stage gang: formed by the first task of each Spark stage attempt that joins (nothing was declared
    #: on the driver), so the task states what the coordinator needs to form it; ``name`` is for messages.
    stage_gang: bool = False
    name: str = ""
    #: sparkhydrogen.stacks(): faulthandler dumps the rank once its Python cannot run this long (None: never).
    stack_dump_after: float | None = STACK_DUMP_AFTER
    #: sparkhydrogen.mlflow: the driver logs this gang's metrics into a run (False: ranks drop them locally) ...
    track_metrics: bool = False
    #: ... and every rank samples its system metrics this often (seconds; None: never).
    system_metrics_interval: float | None = None
    #: spark.hydrogen.data.cacheMemoryBudget: bytes of its share a cache=True loader keeps in memory.
    data_cache_memory: int = DEFAULT_CACHE_MEMORY

    @classmethod
    def build(cls, launch: LaunchConfig, *, gang_id: str, secret: bytes, host: str, port: int, world_size: int,
              gang_attempt: int = 0, tls_fingerprint: str | None = None, stream_logs: bool = False,
              gated: bool = False, stage_gang: bool = False, name: str = "",
              track_metrics: bool = False) -> TaskSpec:
        """The one place a task spec is made: the gang's identity and address, the rest from ``launch``.

        Example:
            >>> spec = TaskSpec.build(LaunchConfig(), gang_id="g", secret=bytes(32), host="h", port=1, world_size=2)
            >>> spec.connect_timeout, spec.start_timeout
            (30.0, None)
        """
        return cls(
            gang_id=gang_id, secret=secret, host=host, port=port, world_size=world_size, gang_attempt=gang_attempt,
            connect_timeout=launch.connect_timeout, collective_timeout=launch.collective_timeout,
            heartbeat_interval=launch.heartbeat_interval, checkpoint_dir=launch.checkpoint_dir,
            stream_logs=stream_logs, tls_fingerprint=tls_fingerprint, gated=gated,
            start_timeout=launch.start_timeout if gated else None, stage_gang=stage_gang, name=name[:200],
            stack_dump_after=launch.stack_dump_after or None, track_metrics=track_metrics,
            system_metrics_interval=(launch.system_metrics_interval or None) if track_metrics else None,
            data_cache_memory=launch.data_cache_memory)

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return (f"TaskSpec(gang_id={self.gang_id!r}, host={self.host!r}, port={self.port}, "
                f"world_size={self.world_size}, gang_attempt={self.gang_attempt}"
                + (", gated=True)" if self.gated else ")"))
