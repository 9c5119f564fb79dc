"""What the replication core needs from a node: a log store and an object store.

Both are plain synchronous interfaces; a Twisted shell runs them in a thread
pool (``deferToThreadPool``) and performs the core's actions strictly in
order, waiting for each durable one (``PersistLog``, ``Apply``) to finish
before starting the next.
"""

from __future__ import annotations

from collections.abc import Sequence

from zope.interface import Interface

from ._values import DropLog, LogEntry, MarkAlive, PersistLog, Timestamp, Update


class ILogStore(Interface):
    """The persistent update log of one node (seed §4.3)."""

    def load() -> list[LogEntry]:
        """Every entry on disk, in no particular order (at most one per object)."""

    def put(entry: LogEntry) -> None:
        """Durably write ``entry``, replacing any entry for the same object."""

    def drop(object_id: str, timestamp: Timestamp) -> None:
        """Remove the entry of ``object_id`` if its timestamp is ``timestamp``."""

    def last_alive() -> int | None:
        """The last wallclock (microseconds) recorded by :meth:`mark_alive`, or None."""

    def mark_alive(wallclock: int) -> None:
        """Durably record that this node was up at ``wallclock``."""

    def write_many(ops: Sequence[PersistLog | DropLog | MarkAlive]) -> None:
        """:meth:`put`, :meth:`drop` and :meth:`mark_alive` for each of ``ops`` in order,
        durable together (one transaction where the store has them)."""

    def wipe() -> None:
        """Forget every entry and the alive mark (a node rejoining after a wipe)."""


class IObjectStore(Interface):
    """The replicated objects of one node (mailbox fragments, profiles) as the core sees them.

    Newest wins: an update is applied only if its timestamp is newer than the
    object's current version; deletions leave a tombstone carrying the version.
    """

    def version(object_id: str) -> Timestamp | None:
        """The object's current version (a tombstone's too), or None if unknown."""

    def apply(update: Update) -> bool:
        """Durably apply ``update`` if newer than the current version; True if applied."""

    def apply_many(updates: Sequence[Update]) -> list[bool]:
        """:meth:`apply` for each of ``updates`` in order (group-committed where the
        store can); one answer per update."""

    def purge_tombstones(before: int) -> int:
        """Forget tombstones whose wallclock is older than ``before``; how many."""
