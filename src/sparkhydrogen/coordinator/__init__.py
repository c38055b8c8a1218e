"""The coordinator: wire protocol, pure state machine, asyncio server and blocking client.

Nothing in this package imports pyspark, so the same service can run in the
driver or, where executors cannot reach the driver, inside a task.
"""

from .client import CoordinatorClient
from .server import CoordinatorServer, GangHandle, LogRecord

__all__ = ["CoordinatorClient", "CoordinatorServer", "GangHandle", "LogRecord"]
