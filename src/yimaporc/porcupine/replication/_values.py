"""Values of the replication core: timestamps, updates, log entries, actions.

Everything here is an immutable ``attrs`` value, so the core can hand the
same object to the shell, the wire codec and the log store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ._wire import Message

#: A node id, as the membership service names nodes.
NodeId = str


@attrs.frozen(order=True)
class Timestamp:
    """``<wallclock, nodeId>`` (seed §4.3): orders and names every update.

    ``wallclock`` is the coordinator's loosely synchronised clock in integer
    microseconds; ``node_id`` breaks ties, so two updates never share one.
    """

    wallclock: int
    node_id: NodeId


@attrs.frozen
class Update:
    """A total-object update: the object's whole new body, or None to delete it."""

    object_id: str
    timestamp: Timestamp
    body: bytes | None

    @property
    def is_delete(self) -> bool:
        """True for a deletion (the replicas keep a tombstone)."""
        return self.body is None


@attrs.frozen
class LogEntry:
    """One record of the persistent update log (seed §4.3).

    ``targets`` are every replica of the object (the coordinator included);
    ``remaining`` are the peers this node still has to hear an ack from.
    ``coordinator`` is the node that took the update from the agent.
    """

    update: Update
    coordinator: NodeId
    targets: frozenset[NodeId]
    remaining: frozenset[NodeId]

    @property
    def object_id(self) -> str:
        """The object this entry updates (a log holds at most one per object)."""
        return self.update.object_id

    @property
    def timestamp(self) -> Timestamp:
        """The update's timestamp."""
        return self.update.timestamp


# --- actions (what the shell performs, strictly in order) ---------------------


@attrs.frozen
class PersistLog:
    """Durably write ``entry``, replacing any entry for the same object.

    A barrier: the shell must not perform any later action before this write
    is on stable storage.
    """

    entry: LogEntry


@attrs.frozen
class DropLog:
    """Remove the log entry of ``object_id`` if its timestamp is ``timestamp``."""

    object_id: str
    timestamp: Timestamp


@attrs.frozen
class Apply:
    """Durably apply ``update`` to the local object store if it is newer.

    A barrier, like :class:`PersistLog`.
    """

    update: Update


@attrs.frozen
class SendMessage:
    """Send ``message`` (a :mod:`wire <._wire>` message) to peer ``to``."""

    to: NodeId
    message: Message


@attrs.frozen
class Acknowledge:
    """Tell the initiating agent its update ``token`` is durable (SMTP may say 250)."""

    token: int
    timestamp: Timestamp


@attrs.frozen
class PurgeTombstones:
    """Let the object store forget tombstones older than ``before`` (microseconds)."""

    before: int


@attrs.frozen
class MarkAlive:
    """Durably record "this node was up at ``wallclock``" (microseconds)."""

    wallclock: int


Action = PersistLog | DropLog | Apply | SendMessage | Acknowledge | PurgeTombstones | MarkAlive


class WipeRequired(Exception):
    """The node was away longer than the log retention: wipe its hard state first."""

    def __init__(self, node_id: NodeId, last_alive: int, now: int, retention: int) -> None:
        self.node_id = node_id
        self.last_alive = last_alive
        self.now = now
        self.retention = retention
        away = (now - last_alive) / 1e6
        super().__init__(
            f"node {node_id} was last up {away:.0f} s ago, longer than the update-log "
            f"retention of {retention / 1e6:.0f} s: peers have dropped updates it never "
            "got, so its replicas may be stale forever; wipe its hard state (mail store, "
            "profiles and replication log) before it rejoins"
        )
