"""Replicated objects on a mail node: messages in the fragment store, and profiles.

Object ids (``docs/replication.md``, "Replicated objects"):

- ``msg/<user>/<rid>``: one message of ``user``; ``rid`` is 32 hex digits chosen
  by the delivery proxy, so a retried delivery updates the same object.  The
  body is a :class:`MessageObject`: a JSON line (mailbox, flags, internal date,
  UID, replica set) then the message octets.  A flag change is a new total
  object with the new flags; a deletion is a tombstone (body None).  On every
  replica the message file is named ``<rid>.m``, so the copies of one message
  share their key.
- ``profile/<address>``: one profile record (``profiledb.Record`` as JSON),
  merged newest ``updated`` first.

:class:`ReplicaObjectStore` is the blocking :class:`IObjectStore` the shell's
worker thread applies updates to; it keeps each object's version (and the
tombstones) in ``DATA_DIR/mail/replicas.sqlite``.  Applying is idempotent (an
existing ``<rid>.m`` row is updated in place, never stored twice), because
recovery re-applies every logged update.

:class:`ReplicatedMailboxManager` wraps a node's :class:`MailboxManager`:
``store_replicated`` submits a message to the replication service; flag changes
and deletions of replicated messages become updates of their objects; anything
else passes through.

The package: ``_ids`` (ids and bodies per object kind), ``_versions`` (the version
table), ``_messages`` (message objects in the fragment store), ``_store``
(:class:`ReplicaObjectStore`: dispatch, batches, profiles, mailbox objects,
export), ``_manager`` (:class:`ReplicatedMailboxManager`).
"""

from ._ids import (
    BOX,
    MSG,
    PROFILE,
    BoxObject,
    MalformedObject,
    MessageObject,
    ObjectRecord,
    box_id,
    key_of,
    message_id,
    parse_box_id,
    parse_message_id,
    profile_id,
)
from ._manager import ReplicatedMailboxManager
from ._store import ReplicaObjectStore

__all__ = [
    "BOX",
    "MSG",
    "PROFILE",
    "BoxObject",
    "MalformedObject",
    "MessageObject",
    "ObjectRecord",
    "ReplicaObjectStore",
    "ReplicatedMailboxManager",
    "box_id",
    "key_of",
    "message_id",
    "parse_box_id",
    "parse_message_id",
    "profile_id",
]
