"""The coordinator: wire protocol, pure state machine, asyncio server and blocking client.

Nothing in this package imports pyspark, so the same service can run in the
driver or, where executors cannot reach the driver, inside a task.
"""

from .client import CoordinatorClient
from .handles import GangHandle, LogRecord
from .server import CoordinatorServer

__all__ = ["CoordinatorClient", "CoordinatorServer", "GangHandle", "LogRecord"]
