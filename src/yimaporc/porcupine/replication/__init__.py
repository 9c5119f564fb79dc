"""Porcupine's replication manager and persistent update log (seed §4), sans-IO.

See ``docs/replication.md`` for the protocol, the log record, the durability
ordering the shell must keep, coordinator takeover and the retention rule.
"""

from ._manager import WEEK, ReplicationConfig, ReplicationManager, ReplicationStatus
from ._values import (
    Acknowledge,
    Action,
    Apply,
    DropLog,
    LogEntry,
    MarkAlive,
    NodeId,
    PersistLog,
    PurgeTombstones,
    SendMessage,
    Timestamp,
    Update,
    WipeRequired,
)
from ._wire import Ack, MalformedMessage, Message, Push, Retire, from_bytes, to_bytes
from .interfaces import ILogStore, IObjectStore
from .memory import MemoryLog, MemoryObjectStore

__all__ = [
    "WEEK",
    "Ack",
    "Acknowledge",
    "Action",
    "Apply",
    "DropLog",
    "ILogStore",
    "IObjectStore",
    "LogEntry",
    "MalformedMessage",
    "MarkAlive",
    "MemoryLog",
    "MemoryObjectStore",
    "Message",
    "NodeId",
    "PersistLog",
    "PurgeTombstones",
    "Push",
    "ReplicationConfig",
    "ReplicationManager",
    "ReplicationStatus",
    "Retire",
    "SendMessage",
    "Timestamp",
    "Update",
    "WipeRequired",
    "from_bytes",
    "to_bytes",
]
