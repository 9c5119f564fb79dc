"""In-memory log and object stores, for tests and the simulator."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from zope.interface import implementer

from ._values import DropLog, LogEntry, MarkAlive, PersistLog, Timestamp, Update
from .interfaces import ILogStore, IObjectStore


@implementer(ILogStore)
@attrs.define
class MemoryLog:
    """An :class:`ILogStore` in a dict: "durable" as long as the object lives."""

    entries: dict[str, LogEntry] = attrs.field(factory=dict)
    alive: int | None = None
    writes: int = 0

    def load(self) -> list[LogEntry]:
        """Every entry."""
        return list(self.entries.values())

    def put(self, entry: LogEntry) -> None:
        """Write ``entry``, replacing the object's previous one."""
        self.writes += 1
        self.entries[entry.object_id] = entry

    def drop(self, object_id: str, timestamp: Timestamp) -> None:
        """Remove the entry if it carries ``timestamp``."""
        entry = self.entries.get(object_id)
        if entry is not None and entry.timestamp == timestamp:
            del self.entries[object_id]

    def last_alive(self) -> int | None:
        """The alive mark."""
        return self.alive

    def mark_alive(self, wallclock: int) -> None:
        """Record the alive mark."""
        self.alive = wallclock

    def write_many(self, ops: Sequence[PersistLog | DropLog | MarkAlive]) -> None:
        """Each op in order."""
        for op in ops:
            if isinstance(op, PersistLog):
                self.put(op.entry)
            elif isinstance(op, DropLog):
                self.drop(op.object_id, op.timestamp)
            else:
                self.mark_alive(op.wallclock)

    def wipe(self) -> None:
        """Forget everything."""
        self.entries.clear()
        self.alive = None


@implementer(IObjectStore)
@attrs.define
class MemoryObjectStore:
    """An :class:`IObjectStore` in a dict, newest wins."""

    objects: dict[str, Update] = attrs.field(factory=dict)
    applied: int = 0
    discarded: int = 0

    def version(self, object_id: str) -> Timestamp | None:
        """The current version of ``object_id``."""
        current = self.objects.get(object_id)
        return None if current is None else current.timestamp

    def get(self, object_id: str) -> bytes | None:
        """The live body of ``object_id`` (None if absent or deleted)."""
        current = self.objects.get(object_id)
        return None if current is None else current.body

    def apply(self, update: Update) -> bool:
        """Newest wins; older or equal updates are discarded."""
        current = self.objects.get(update.object_id)
        if current is not None and current.timestamp >= update.timestamp:
            self.discarded += 1
            return False
        self.objects[update.object_id] = update
        self.applied += 1
        return True

    def apply_many(self, updates: Sequence[Update]) -> list[bool]:
        """:meth:`apply` each, in order."""
        return [self.apply(u) for u in updates]

    def purge_tombstones(self, before: int) -> int:
        """Drop tombstones older than ``before``."""
        old = [
            k for k, u in self.objects.items() if u.body is None and u.timestamp.wallclock < before
        ]
        for k in old:
            del self.objects[k]
        return len(old)

    def wipe(self) -> None:
        """Forget every object (a node restored from scratch)."""
        self.objects.clear()
