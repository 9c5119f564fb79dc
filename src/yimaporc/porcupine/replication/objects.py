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
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from zope.interface import implementer

from ..._files import private_sqlite
from ..fragments import FragmentStore, MailboxManager
from ..interfaces import IMailboxManager
from ..usermap import bucket_of
from ..values import Digest, NewMessage, NoSuchMailbox
from ._values import Timestamp, Update
from .interfaces import IObjectStore
from .shell import ReplicationService

MSG = "msg/"
PROFILE = "profile/"
_RID = re.compile(r"^[0-9a-f]{32}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    object_id TEXT PRIMARY KEY, wallclock INTEGER NOT NULL, ts_node TEXT NOT NULL,
    user TEXT NOT NULL, mailbox TEXT NOT NULL, rid TEXT NOT NULL,
    targets TEXT NOT NULL, deleted INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS objects_key ON objects (user, rid);
"""


#: A batched message update: ``(update, user, rid, mailbox, object, uids here)``.
_Item = tuple[Update, str, str, str, "MessageObject", list[int]]


class MalformedObject(ValueError):
    """An object id or body that is not one of ours."""


def message_id(user: str, rid: str) -> str:
    """The object id of message ``rid`` of ``user``."""
    return f"{MSG}{user}/{rid}"


def profile_id(address: str) -> str:
    """The object id of ``address``'s profile."""
    return f"{PROFILE}{address}"


def parse_message_id(object_id: str) -> tuple[str, str]:
    """``(user, rid)``; raises :class:`MalformedObject`."""
    rest = object_id[len(MSG) :]
    user, _, rid = rest.rpartition("/")
    if not object_id.startswith(MSG) or not _RID.match(rid) or not user or "/" in user:
        raise MalformedObject(f"not a message object id: {object_id!r}")
    if user.startswith(".") or "\0" in user:
        raise MalformedObject(f"bad user in {object_id!r}")
    return user, rid


def key_of(rid: str) -> str:
    """The fragment-store key (body file name) of message ``rid`` on every replica."""
    return rid + ".m"


@attrs.frozen
class MessageObject:
    """The replicated body of one message: where it lives, its flags, its octets."""

    mailbox: str
    data: bytes
    flags: tuple[str, ...] = ()
    internal_date: float = 0.0
    uid: int = 0
    targets: tuple[str, ...] = ()

    def to_body(self) -> bytes:
        """A JSON line, then the message octets."""
        meta = {
            "v": 1,
            "mailbox": self.mailbox,
            "flags": list(self.flags),
            "date": self.internal_date,
            "uid": self.uid,
            "targets": list(self.targets),
        }
        return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + self.data

    @classmethod
    def from_body(cls, body: bytes) -> MessageObject:
        """Parse; raises :class:`MalformedObject`."""
        head, sep, data = body.partition(b"\n")
        try:
            meta = json.loads(head)
            if not sep or meta.get("v") != 1:
                raise ValueError("no version-1 header")
            flags = tuple(str(f) for f in meta["flags"])
            targets = tuple(str(t) for t in meta["targets"])
            mailbox = str(meta["mailbox"])
            return cls(mailbox, data, flags, float(meta["date"]), int(meta["uid"]), targets)
        except (ValueError, KeyError, TypeError) as e:
            raise MalformedObject(f"bad message object: {e}") from e


@attrs.frozen
class ObjectRecord:
    """What a node knows of one replicated message: version, place, replica set."""

    object_id: str
    timestamp: Timestamp
    user: str
    mailbox: str
    rid: str
    targets: tuple[str, ...]
    deleted: bool


@implementer(IObjectStore)
class ReplicaObjectStore:
    """Applies replicated updates to the fragment store and the profile DB (blocking)."""

    log = Logger()

    def __init__(self, path: Path, fragments: FragmentStore, profiles: Any | None = None) -> None:
        private_sqlite(path)
        self.fragments = fragments
        #: ``profiledb._Profiles`` (the blocking half; it has ``merge(records)``).
        self.profiles = profiles
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self.lock = threading.RLock()
        self.applied = 0
        self.discarded = 0

    def close(self) -> None:
        """Close the version database."""
        with self.lock:
            self.db.close()

    # --- IObjectStore -------------------------------------------------------------

    def version(self, object_id: str) -> Timestamp | None:
        """The object's version (tombstones too)."""
        with self.lock:
            row = self.db.execute(
                "SELECT wallclock, ts_node FROM objects WHERE object_id=?", (object_id,)
            ).fetchone()
        return None if row is None else Timestamp(int(row[0]), str(row[1]))

    def apply(self, update: Update) -> bool:
        """Newest wins; a message lands in (or leaves) the fragment store durably."""
        with self.lock:
            current = self.version(update.object_id)
            if current is not None and current >= update.timestamp:
                self.discarded += 1
                return False
            if update.object_id.startswith(PROFILE):
                self._apply_profile(update)
            else:
                self._apply_message(update)
            self.applied += 1
            return True

    def apply_many(self, updates: Sequence[Update]) -> list[bool]:
        """:meth:`apply` for a batch, in order, with group commit: the bodies of new
        messages are fsynced, then committed per bucket in one transaction each (flag
        changes of messages already here too), and the versions of the whole batch
        in one transaction."""
        out: list[bool] = []
        fresh: list[_Item] = []
        flagged: list[_Item] = []
        seen: dict[str, Timestamp] = {}
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for update in updates:
                    oid, ts = update.object_id, update.timestamp
                    current = seen.get(oid) or self.version(oid)
                    if current is not None and current >= ts:
                        self.discarded += 1
                        out.append(False)
                        continue
                    kind = self._classify(update) if oid not in seen else None
                    if kind is not None:
                        (fresh if kind[0] == "new" else flagged).append(kind[1])
                    else:
                        self._flush(fresh, flagged)
                        if oid.startswith(PROFILE):
                            self._apply_profile(update)
                        else:
                            self._apply_message(update)
                    seen[oid] = ts
                    self.applied += 1
                    out.append(True)
                self._flush(fresh, flagged)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return out

    def _classify(self, update: Update) -> tuple[str, _Item] | None:
        """``("new", item)`` for a message not here yet, ``("flags", item)`` for a new
        version of one that is (its flags change), None for anything else."""
        if update.body is None or not update.object_id.startswith(MSG):
            return None
        user, rid = parse_message_id(update.object_id)
        obj = MessageObject.from_body(update.body)
        mailbox = _mailbox(obj.mailbox)
        uids = self._rows(user, rid, mailbox)
        return ("flags" if uids else "new"), (update, user, rid, mailbox, obj, uids)

    def _flush(self, fresh: list[_Item], flagged: list[_Item]) -> None:
        """Store the batched new messages (bodies, then one commit per bucket) and the
        batched flag changes (one commit per bucket); then their versions."""
        fs = self.fragments
        by_bucket: dict[int, list[_Item]] = {}
        for item in fresh:
            _write_file(fs.tmp / key_of(item[2]), item[4].data)
            by_bucket.setdefault(bucket_of(item[1]), []).append(item)
        for bucket, items in by_bucket.items():
            got = fs.commit_bucket(
                bucket,
                [
                    (NewMessage(u, m, o.data, o.flags, o.internal_date, o.uid), key_of(r))
                    for _, u, r, m, o, _ in items
                ],
            )
            for (_, user, rid, mailbox, obj, _), result in zip(items, got, strict=True):
                if isinstance(result, NoSuchMailbox):
                    self._store(user, rid, mailbox, obj)  # creates the mailbox
        flags_by_bucket: dict[int, list[_Item]] = {}
        for item in flagged:
            flags_by_bucket.setdefault(bucket_of(item[1]), []).append(item)
        for bucket, items in flags_by_bucket.items():
            with fs._lock_for(bucket):
                db = fs._db(bucket)
                db.execute("BEGIN IMMEDIATE")
                try:
                    for _, user, _, mailbox, obj, uids in items:
                        flags = " ".join(dict.fromkeys(obj.flags))
                        db.executemany(
                            "UPDATE messages SET flags=? WHERE user=? AND mailbox=? AND uid=?",
                            [(flags, user, mailbox, uid) for uid in uids],
                        )
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        for update, user, rid, mailbox, obj, _ in (*fresh, *flagged):
            self._put(update, user, mailbox, rid, obj.targets)
        fresh.clear()
        flagged.clear()

    def purge_tombstones(self, before: int) -> int:
        """Forget message tombstones older than ``before`` (µs)."""
        with self.lock:
            cur = self.db.execute(
                "DELETE FROM objects WHERE deleted=1 AND wallclock < ?", (before,)
            )
            return int(cur.rowcount)

    # --- queries --------------------------------------------------------------------

    def record(self, object_id: str) -> ObjectRecord | None:
        """What is known of ``object_id``."""
        with self.lock:
            row = self.db.execute(
                "SELECT object_id, wallclock, ts_node, user, mailbox, rid, targets, deleted "
                "FROM objects WHERE object_id=?",
                (object_id,),
            ).fetchone()
        return None if row is None else _record(row)

    def records_for(self, user: str, mailbox: str, uids: Sequence[int]) -> dict[int, ObjectRecord]:
        """The live replicated objects among ``uids`` of a mailbox, by UID."""
        keys = self.fragments._keys(user, mailbox, uids)
        out: dict[int, ObjectRecord] = {}
        for uid, key in keys.items():
            rid = key[: -len(".m")]
            rec = self.record(message_id(user, rid)) if _RID.match(rid) else None
            if rec is not None and not rec.deleted:
                out[uid] = rec
        return out

    def snapshot(self, user: str, mailbox: str, rid: str) -> tuple[bytes, float]:
        """The octets and internal date of message ``rid`` here."""
        digest = self.digest(user, mailbox, rid)
        data = (self.fragments.user_path(user) / key_of(rid)).read_bytes()
        return data, digest.internal_date if digest is not None else 0.0

    def digest(self, user: str, mailbox: str, rid: str) -> Digest | None:
        """This node's digest of message ``rid`` (None if not here)."""
        bucket = bucket_of(user)
        with self.fragments._lock_for(bucket):
            db = self.fragments._db(bucket)
            row = db.execute(
                "SELECT uid, key, size, flags, internal_date FROM messages "
                "WHERE user=? AND mailbox=? AND key=?",
                (user, _mailbox(mailbox), key_of(rid)),
            ).fetchone()
        if row is None:
            return None
        uid, key, size, flags, date = row
        return Digest(uid, key, size, tuple(flags.split()), date, self.fragments.node_id)

    def __len__(self) -> int:
        with self.lock:
            (n,) = self.db.execute("SELECT COUNT(*) FROM objects WHERE deleted=0").fetchone()
        return int(n)

    # --- applying -------------------------------------------------------------------

    def _put(
        self, update: Update, user: str, mailbox: str, rid: str, targets: Sequence[str]
    ) -> None:
        ts = update.timestamp
        self.db.execute(
            "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                update.object_id,
                ts.wallclock,
                ts.node_id,
                user,
                mailbox,
                rid,
                "\n".join(targets),
                int(update.body is None),
            ),
        )

    def _rows(self, user: str, rid: str, mailbox: str) -> list[int]:
        bucket = bucket_of(user)
        with self.fragments._lock_for(bucket):
            db = self.fragments._db(bucket)
            return [
                int(uid)
                for (uid,) in db.execute(
                    "SELECT uid FROM messages WHERE user=? AND key=? AND mailbox=?",
                    (user, key_of(rid), mailbox),
                )
            ]

    def _apply_message(self, update: Update) -> None:
        user, rid = parse_message_id(update.object_id)
        fs = self.fragments
        if update.body is None:
            old = self.record(update.object_id)
            mailbox = old.mailbox if old is not None else ""
            targets = old.targets if old is not None else ()
            if mailbox:
                uids = self._rows(user, rid, mailbox)
                if uids:
                    fs.delete(user, mailbox, uids)
            self._put(update, user, mailbox, rid, targets)
            return
        obj = MessageObject.from_body(update.body)
        mailbox = _mailbox(obj.mailbox)
        uids = self._rows(user, rid, mailbox)
        if uids:
            fs.set_flags(user, mailbox, uids, obj.flags, 0)
        else:
            self._store(user, rid, mailbox, obj)
        self._put(update, user, mailbox, rid, obj.targets)

    def _store(self, user: str, rid: str, mailbox: str, obj: MessageObject) -> None:
        fs = self.fragments
        key = key_of(rid)
        msg = NewMessage(user, mailbox, obj.data, obj.flags, obj.internal_date, obj.uid)
        for attempt in range(2):
            _write_file(fs.tmp / key, obj.data)
            got = fs.commit_bucket(bucket_of(user), [(msg, key)])[0]
            if not isinstance(got, NoSuchMailbox):
                return
            if attempt == 0:
                # a replica may not have the mailbox (created elsewhere): create it
                try:
                    fs.create_mailbox(user, mailbox)
                except Exception:
                    self.log.failure("replication: cannot create {m} for {u}", m=mailbox, u=user)
                    raise got from None
        raise NoSuchMailbox(f"no mailbox {mailbox}")

    def _apply_profile(self, update: Update) -> None:
        if self.profiles is None:
            raise MalformedObject("this store holds no profiles")
        address = update.object_id[len(PROFILE) :]
        if update.body is not None:
            rec = json.loads(update.body)
            if not isinstance(rec, list) or len(rec) != 6 or rec[0] != address:
                raise MalformedObject(f"bad profile record for {address}")
            record = (str(rec[0]), str(rec[1]), int(rec[2]), float(rec[3]), float(rec[4]), bool(rec[5]))  # fmt: skip
            self.profiles.merge([record])
        self._put(update, address, "", "", ())


def _mailbox(name: str) -> str:
    return "INBOX" if name.upper() == "INBOX" else name


def _record(row: Any) -> ObjectRecord:
    oid, wall, node, user, mailbox, rid, targets, deleted = row
    return ObjectRecord(
        oid,
        Timestamp(int(wall), str(node)),
        user,
        mailbox,
        rid,
        tuple(t for t in targets.split("\n") if t),
        bool(deleted),
    )


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


@implementer(IMailboxManager)
class ReplicatedMailboxManager:
    """A node's :class:`MailboxManager` whose replicated messages go through the log.

    ``store_replicated`` is the delivery path for users with replicas; flag
    changes and deletions of replicated messages are submitted as updates of
    their objects (to the object's replica set, this node coordinating), so a
    replica that is down now gets them when it returns.  Other calls pass
    through to the wrapped manager.
    """

    log = Logger()

    def __init__(
        self,
        inner: MailboxManager,
        objects: ReplicaObjectStore,
        replication: ReplicationService,
        run: Callable[..., Deferred[Any]],
    ) -> None:
        self.inner = inner
        self.objects = objects
        self.replication = replication
        self.run = run
        self.node_id = inner.node_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    # --- the replicated paths -------------------------------------------------------

    def store_replicated(
        self, rid: str, message: NewMessage, targets: Sequence[str]
    ) -> Deferred[list[Digest]]:
        """Submit ``message`` as object ``msg/<user>/<rid>`` to ``targets`` (this node
        coordinating); fires with one digest per target once acknowledged."""
        if not _RID.match(rid):
            raise MalformedObject(f"bad message id {rid!r}")
        replicas = tuple(dict.fromkeys([self.node_id, *targets]))
        obj = MessageObject(
            _mailbox(message.mailbox),
            message.body,
            tuple(message.flags),
            message.internal_date,
            message.uid,
            replicas,
        )
        oid = message_id(message.user, rid)
        submitted = self.replication.submit(oid, obj.to_body(), replicas)
        d: Deferred[Digest | None] = submitted.addCallback(
            lambda _: self.run(self.objects.digest, message.user, obj.mailbox, rid)
        )

        def digests(mine: Digest | None) -> list[Digest]:
            if mine is None:  # superseded at once by a newer update (deleted already?)
                return []
            return [attrs.evolve(mine, node=n) for n in replicas]

        return d.addCallback(digests)

    def set_flags(
        self, user: str, mailbox: str, uids: Sequence[int], flags: Sequence[str], mode: int
    ) -> Deferred[dict[int, tuple[str, ...]]]:
        """Flags changed here, then replicated as new versions of the messages."""
        d = self.inner.set_flags(user, mailbox, uids, flags, mode)

        def replicate(new: dict[int, tuple[str, ...]]) -> Deferred[Any]:
            if not new:
                return succeed(new)
            found = self.run(self.objects.records_for, user, mailbox, list(new))
            return found.addCallback(self._submit_flags, user, new).addCallback(lambda _: new)

        return d.addCallback(replicate)

    def _submit_flags(
        self, records: dict[int, ObjectRecord], user: str, new: dict[int, tuple[str, ...]]
    ) -> Deferred[Any]:
        ds = []
        for uid, rec in records.items():

            def submit(
                snap: tuple[bytes, float], rec: ObjectRecord = rec, uid: int = uid
            ) -> Deferred[Any]:
                obj = MessageObject(rec.mailbox, snap[0], new[uid], snap[1], uid, rec.targets)
                targets = tuple(dict.fromkeys([self.node_id, *rec.targets]))
                # durable here is enough: a replica that is down gets it later
                return self.replication.submit(
                    rec.object_id, obj.to_body(), targets, current=rec.timestamp, acks=1
                )

            snap = self.run(self.objects.snapshot, user, rec.mailbox, rec.rid)
            ds.append(snap.addCallback(submit))
        return gatherResults(ds, consumeErrors=True)

    def delete(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[list[int]]:
        """Replicated messages become tombstones on every replica; others go locally."""
        found = self.run(self.objects.records_for, user, mailbox, list(uids))

        def go(records: dict[int, ObjectRecord]) -> Deferred[list[int]]:
            plain = [u for u in uids if u not in records]
            ds: list[Deferred[Any]] = [
                self.replication.submit(
                    rec.object_id,
                    None,
                    tuple(dict.fromkeys([self.node_id, *rec.targets])),
                    current=rec.timestamp,
                    acks=1,
                )
                for rec in records.values()
            ]
            ds.append(self.inner.delete(user, mailbox, plain) if plain else succeed([]))

            def done(results: list[Any]) -> list[int]:
                return sorted({*records, *results[-1]})

            return gatherResults(ds, consumeErrors=True).addCallback(done)

        return found.addCallback(go)

    def applied(self, update: Update) -> None:
        """The shell's ``on_applied``: wake IMAP IDLE for a message that arrived."""
        if update.object_id.startswith(MSG) and update.body is not None:
            user, _ = parse_message_id(update.object_id)
            try:
                mailbox = MessageObject.from_body(update.body).mailbox
            except MalformedObject:
                return
            self.inner._changed(user, _mailbox(mailbox))
