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
from ..interfaces import ILocalMailboxes
from ..usermap import bucket_of
from ..values import PENDING, Digest, MailboxExists, MailboxInfo, NewMessage, NoSuchMailbox
from ._values import Timestamp, Update
from .interfaces import IObjectStore
from .shell import ReplicationService

MSG = "msg/"
PROFILE = "profile/"
BOX = "box/"
_RID = re.compile(r"^[0-9a-f]{32}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    object_id TEXT PRIMARY KEY, wallclock INTEGER NOT NULL, ts_node TEXT NOT NULL,
    user TEXT NOT NULL, mailbox TEXT NOT NULL, rid TEXT NOT NULL,
    targets TEXT NOT NULL, deleted INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS objects_key ON objects (user, rid);
"""


#: A batched message update: ``(update, user, rid, mailbox, object, (mailbox, uid) here)``.
_Item = tuple[Update, str, str, str, "MessageObject", list[tuple[str, int]]]


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


def box_id(user: str, name: str) -> str:
    """The object id of ``user``'s mailbox ``name``."""
    return f"{BOX}{user}/{_mailbox(name)}"


def parse_box_id(object_id: str) -> tuple[str, str]:
    """``(user, mailbox)``; raises :class:`MalformedObject`."""
    user, sep, name = object_id[len(BOX) :].partition("/")
    if not object_id.startswith(BOX) or not sep or not user or not name or "\0" in object_id:
        raise MalformedObject(f"not a mailbox object id: {object_id!r}")
    if user.startswith("."):
        raise MalformedObject(f"bad user in {object_id!r}")
    return user, name


@attrs.frozen
class BoxObject:
    """The replicated state of one mailbox name: it exists (``moved_from``: made by a
    RENAME of that mailbox) or not (``moved_to``: renamed to that name)."""

    exists: bool
    moved_from: str | None = None
    moved_to: str | None = None

    def to_body(self) -> bytes:
        """JSON."""
        meta = {"v": 1, "exists": self.exists, "from": self.moved_from, "to": self.moved_to}
        return json.dumps(meta, separators=(",", ":")).encode()

    @classmethod
    def from_body(cls, body: bytes) -> BoxObject:
        """Parse; raises :class:`MalformedObject`."""
        try:
            meta = json.loads(body)
            if meta.get("v") != 1:
                raise ValueError("not version 1")
            frm, to = meta.get("from"), meta.get("to")
            return cls(
                bool(meta["exists"]),
                None if frm is None else str(frm),
                None if to is None else str(to),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MalformedObject(f"bad mailbox object: {e}") from e


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
            self._apply_one(update)
            self.applied += 1
            return True

    def _apply_one(self, update: Update) -> None:
        oid = update.object_id
        if oid.startswith(PROFILE):
            self._apply_profile(update)
        elif oid.startswith(BOX):
            self._apply_box(update)
        else:
            self._apply_message(update)

    def apply_many(self, updates: Sequence[Update]) -> list[bool]:
        """:meth:`apply` for a batch, in order, with group commit: the bodies of new
        messages are written, then committed together (:meth:`FragmentStore.commit_group`:
        two durability barriers, one transaction per bucket; flag
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
                        self._apply_one(update)
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
        rows = self._rows(user, rid)
        if not rows and self._user_deleted(user, update.timestamp):
            return None  # _apply_message records it as gone
        if obj.uid == PENDING and not self._numbers_here(obj):
            return None  # held here: _apply_message
        if any(u == 0 for _, u in rows):
            return None  # an unnumbered copy here: promoted or held by _apply_message
        if rows:
            mailbox = rows[0][0]
        elif self.fragments.is_held(user, key_of(rid)):
            return None  # the numbered version of a held copy: _apply_message
        return ("flags" if rows else "new"), (update, user, rid, mailbox, obj, rows)

    def _numbers_here(self, obj: MessageObject) -> bool:
        """Is this node's copy of ``obj`` the one to number when it has no UID yet?
        The first of its replicas (the coordinator of its version): one node numbers,
        the others hold their copy until the numbered version reaches them."""
        return not obj.targets or obj.targets[0] == self.fragments.node_id

    def _flush(self, fresh: list[_Item], flagged: list[_Item]) -> None:
        """Store the batched new messages (one group commit: bodies, a barrier, one
        transaction per bucket, a barrier) and the batched flag changes (one commit
        per bucket); then their versions."""
        fs = self.fragments
        if fresh:
            for item in fresh:
                # no fsync each: the group commit's barriers make them durable
                _write_file(fs.tmp / key_of(item[2]), item[4].data, sync=False)
            got = fs.commit_group(
                [
                    (NewMessage(u, m, o.data, o.flags, o.internal_date, o.uid), key_of(r))
                    for _, u, r, m, o, _ in fresh
                ]
            )
            for (_, user, rid, mailbox, obj, _), result in zip(fresh, got, strict=True):
                if isinstance(result, NoSuchMailbox):
                    self._store(user, rid, mailbox, obj)  # creates the mailbox
                elif not isinstance(result, Digest):
                    raise result
        flags_by_bucket: dict[int, list[_Item]] = {}
        for item in flagged:
            flags_by_bucket.setdefault(bucket_of(item[1]), []).append(item)
        for bucket, items in flags_by_bucket.items():
            with fs._lock_for(bucket):
                db = fs._db(bucket)
                db.execute("BEGIN IMMEDIATE")
                try:
                    for _, user, _, _, obj, rows in items:
                        flags = " ".join(dict.fromkeys(obj.flags))
                        db.executemany(
                            "UPDATE messages SET flags=? WHERE user=? AND mailbox=? AND uid=?",
                            [(flags, user, mb, uid) for mb, uid in rows if uid],
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
                "WHERE user=? AND key=? "
                "UNION ALL SELECT 0, key, size, flags, internal_date FROM pending "
                "WHERE user=? AND key=? "
                "UNION ALL SELECT 0, key, size, flags, internal_date FROM held "
                "WHERE user=? AND key=?",
                (user, key_of(rid)) * 3,
            ).fetchone()
        if row is None:
            return None
        uid, key, size, flags, date = row
        return Digest(uid, key, size, tuple(flags.split()), date, self.fragments.node_id)

    def inventory(self, node: str) -> list[tuple[str, Timestamp]]:
        """``(object id, version)`` of every live object here whose replica set names
        ``node`` (what ``node`` should hold: re-replication compares it with its own)."""
        with self.lock:
            rows = self.db.execute(
                "SELECT object_id, wallclock, ts_node, targets FROM objects WHERE deleted=0"
            ).fetchall()
        return [
            (str(oid), Timestamp(int(w), str(n)))
            for oid, w, n, targets in rows
            if (oid.startswith(MSG) and node in targets.split("\n")) or oid.startswith(PROFILE)
        ]

    def versions(self, object_ids: Sequence[str]) -> dict[str, Timestamp]:
        """This node's version of each of ``object_ids`` it knows (tombstones too)."""
        out: dict[str, Timestamp] = {}
        for oid in object_ids:
            v = self.version(oid)
            if v is not None:
                out[oid] = v
        return out

    def export(self, object_id: str) -> Update | None:
        """The current version of ``object_id`` here as a whole update (for a replica
        that lost it), built from this node's state: its mailbox now, its flags now;
        None if this node has no live copy to give."""
        rec = self.record(object_id)
        if rec is None or rec.deleted:
            return None
        if object_id.startswith(PROFILE):
            if self.profiles is None:
                return None
            with self.profiles.lock:
                row = self.profiles.db.execute(
                    "SELECT address, password_hash, replicas, created, updated, deleted "
                    "FROM profiles WHERE address=?",
                    (rec.user,),
                ).fetchone()
            if row is None:
                return None
            body = json.dumps([row[0], row[1], int(row[2]), float(row[3]), float(row[4]), bool(row[5])])  # fmt: skip
            return Update(object_id, rec.timestamp, body.encode())
        if object_id.startswith(BOX):
            return None  # a mailbox is made again by the messages re-created in it
        user, rid = parse_message_id(object_id)
        bucket = bucket_of(user)
        with self.fragments._lock_for(bucket):
            row = (
                self.fragments._db(bucket)
                .execute(
                    "SELECT mailbox, uid, flags, internal_date FROM messages "
                    "WHERE user=? AND key=? ORDER BY uid LIMIT 1",
                    (user, key_of(rid)),
                )
                .fetchone()
            )
        if row is None:
            return None
        try:
            data = (self.fragments.user_path(user) / key_of(rid)).read_bytes()
        except FileNotFoundError:
            return None
        obj = MessageObject(
            str(row[0]), data, tuple(str(row[2]).split()), float(row[3]), int(row[1]), rec.targets
        )
        return Update(object_id, rec.timestamp, obj.to_body())

    def under_replicated(self, live: Sequence[str]) -> int:
        """Live message objects here with a replica outside ``live`` (down, or gone):
        fewer reachable copies than their replica set, until re-replication."""
        up = set(live)
        with self.lock:
            rows = self.db.execute(
                "SELECT targets FROM objects WHERE deleted=0 AND object_id LIKE 'msg/%'"
            ).fetchall()
        return sum(1 for (t,) in rows if any(n not in up for n in t.split("\n") if n))

    def unnumbered(self, user: str) -> dict[str, ObjectRecord]:
        """Live replicated messages of ``user`` waiting here for a UID (pending), by rid."""
        bucket = bucket_of(user)
        with self.fragments._lock_for(bucket):
            keys = [
                str(k)
                for (k,) in self.fragments._db(bucket).execute(
                    "SELECT key FROM pending WHERE user=?", (user,)
                )
            ]
        out: dict[str, ObjectRecord] = {}
        for key in keys:
            rid = key[: -len(".m")]
            rec = self.record(message_id(user, rid)) if _RID.match(rid) else None
            if rec is not None and not rec.deleted and len(rec.targets) > 1:
                out[rid] = rec
        return out

    def numbered(self, user: str, rids: Sequence[str]) -> dict[str, tuple[str, int, tuple[str, ...], float, bytes]]:  # fmt: skip
        """Of ``rids``, those numbered here now: ``(mailbox, uid, flags, date, octets)``."""
        bucket = bucket_of(user)
        out = {}
        for rid in rids:
            with self.fragments._lock_for(bucket):
                row = (
                    self.fragments._db(bucket)
                    .execute(
                        "SELECT mailbox, uid, flags, internal_date FROM messages "
                        "WHERE user=? AND key=? ORDER BY uid LIMIT 1",
                        (user, key_of(rid)),
                    )
                    .fetchone()
                )
            if row is None:
                continue
            data = (self.fragments.user_path(user) / key_of(rid)).read_bytes()
            out[rid] = (str(row[0]), int(row[1]), tuple(str(row[2]).split()), float(row[3]), data)
        return out

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

    def _rows(self, user: str, rid: str) -> list[tuple[str, int]]:
        """``(mailbox, uid)`` of message ``rid`` here, whatever mailbox it is in now (a
        RENAME moves it; the object's own mailbox may be older); a copy waiting for a
        UID here counts too (as UID 0), so a message is never stored twice."""
        bucket = bucket_of(user)
        with self.fragments._lock_for(bucket):
            db = self.fragments._db(bucket)
            rows = [
                (str(mb), int(uid))
                for mb, uid in db.execute(
                    "SELECT mailbox, uid FROM messages WHERE user=? AND key=?",
                    (user, key_of(rid)),
                )
            ]
            rows += [
                (str(mb), 0)
                for (mb,) in db.execute(
                    "SELECT mailbox FROM pending WHERE user=? AND key=?", (user, key_of(rid))
                )
            ]
            return rows

    def _apply_message(self, update: Update) -> None:
        user, rid = parse_message_id(update.object_id)
        fs = self.fragments
        if update.body is None:
            old = self.record(update.object_id)
            mailbox = old.mailbox if old is not None else ""
            targets = old.targets if old is not None else ()
            self._remove_rows(user, rid)
            self._put(update, user, mailbox, rid, targets)
            return
        obj = MessageObject.from_body(update.body)
        mailbox = _mailbox(obj.mailbox)
        rows = self._rows(user, rid)
        key = key_of(rid)
        if rows and obj.uid > 0 and all(u == 0 for _, u in rows):
            # the UID its numbering copy got: this unnumbered copy takes the same one
            if fs.promote(user, key, obj.uid):
                rows = self._rows(user, rid)
        elif rows and obj.uid == PENDING and not self._numbers_here(obj):
            fs.pending_to_held(user, key)  # another replica numbers this message
            rows = self._rows(user, rid)
        if rows:
            mailbox = rows[0][0]
            for mb in dict.fromkeys(m for m, _ in rows):
                uids = [u for m, u in rows if m == mb and u]
                if uids:
                    fs.set_flags(user, mb, uids, obj.flags, 0)
        elif self._user_deleted(user, update.timestamp):
            # ``deluser`` came first (a node back from downtime gets both in any
            # order): the message of a removed user is not stored again.
            self._put(Update(update.object_id, update.timestamp, None), user, mailbox, rid, ())
            return
        elif obj.uid == PENDING and not self._numbers_here(obj):
            _write_file(fs.tmp / key, obj.data)
            fs.hold(NewMessage(user, mailbox, obj.data, obj.flags, obj.internal_date), key)
        elif obj.uid > 0 and fs.is_held(user, key):
            if not fs.promote(user, key, obj.uid):
                self._store(user, rid, mailbox, obj)
                fs.unhold(user, key)
        else:
            self._store(user, rid, mailbox, obj)
        self._put(update, user, mailbox, rid, obj.targets)

    def _remove_rows(self, user: str, rid: str) -> None:
        fs = self.fragments
        rows = self._rows(user, rid)
        for mb in dict.fromkeys(m for m, _ in rows):
            uids = [u for m, u in rows if m == mb and u]
            if uids:
                fs.delete(user, mb, uids)
        bucket = bucket_of(user)
        with fs._lock_for(bucket):
            db = fs._db(bucket)
            db.execute("DELETE FROM pending WHERE user=? AND key=?", (user, key_of(rid)))
            db.execute("DELETE FROM held WHERE user=? AND key=?", (user, key_of(rid)))
            fs._drop_unreferenced(db, user, [key_of(rid)])

    def _user_deleted(self, user: str, ts: Timestamp) -> bool:
        """``user``'s profile is a tombstone written after ``ts`` (a ``deluser``)."""
        if self.profiles is None:
            return False
        with self.profiles.lock:
            row = self.profiles.db.execute(
                "SELECT deleted, updated FROM profiles WHERE address=?", (user,)
            ).fetchone()
        return row is not None and bool(row[0]) and float(row[1]) * 1e6 >= ts.wallclock

    def commit_fenced(self, message: NewMessage, rid: str) -> Digest:
        """The coordinator's own copy of a replicated delivery whose UID is fenced
        (issue 14 bug 2), committed before the message is logged: numbered under
        ``message.uid`` only if the store's fence check admits it (inside the
        bucket's transaction, as for an R=1 store), else unnumbered.  The logged
        object then carries *that* outcome, so every copy has the coordinator's UID
        or waits (held) for the one it is numbered with; a second call for the same
        message (a re-target) finds the row and answers it."""
        key = key_of(rid)
        for attempt in range(2):
            _write_file(self.fragments.tmp / key, message.body, sync=False)  # the barrier
            got = self.fragments.commit_bucket(bucket_of(message.user), [(message, key)])[0]
            if not isinstance(got, NoSuchMailbox):
                return got
            if attempt == 0:  # APPEND/COPY to a mailbox another fragment holds
                try:
                    self.fragments.create_mailbox(message.user, message.mailbox)
                except MailboxExists:
                    pass
        raise NoSuchMailbox(f"no mailbox {message.mailbox}")

    def _store(self, user: str, rid: str, mailbox: str, obj: MessageObject) -> None:
        fs = self.fragments
        key = key_of(rid)
        msg = NewMessage(user, mailbox, obj.data, obj.flags, obj.internal_date, obj.uid)
        for attempt in range(2):
            _write_file(fs.tmp / key, obj.data, sync=False)  # commit_bucket's barrier
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
            with self.profiles.lock:
                row = self.profiles.db.execute(
                    "SELECT deleted FROM profiles WHERE address=?", (address,)
                ).fetchone()
            if row is not None and row[0]:
                # ``deluser``: the mail goes here too, also on a node that was down
                # then (the log, or re-replication, brings it the tombstone on return)
                self.forget_user(address)
        self._put(update, address, "", "", ())

    def _apply_box(self, update: Update) -> None:
        """A mailbox made, renamed or deleted elsewhere: the same here, if not yet.

        Idempotent and safe in any order: a RENAME is two objects (the new name
        ``moved_from`` the old, the old ``moved_to`` the new) and whichever arrives
        first moves the mailbox and its messages; the other finds it done.
        """
        user, name = parse_box_id(update.object_id)
        fs = self.fragments
        has = {i.name for i in fs.mailboxes(user)}
        if update.body is None:
            box = BoxObject(False)
        else:
            box = BoxObject.from_body(update.body)
        try:
            if box.exists:
                src = _mailbox(box.moved_from) if box.moved_from else None
                if src is not None and src in has and name not in has:
                    fs.rename_mailbox(user, src, name)
                elif name not in has:
                    fs.create_mailbox(user, name)
            elif box.moved_to:
                to = _mailbox(box.moved_to)
                if name in has and to not in has:
                    fs.rename_mailbox(user, name, to)
            elif name in has and name != "INBOX":
                self._forget_mailbox(user, name)
                fs.delete_mailbox(user, name)
        except (NoSuchMailbox, MailboxExists) as e:
            # e.g. a DELETE of a mailbox that has mailboxes below it here: left as is
            self.log.info("replication: {oid} not applied here: {e}", oid=update.object_id, e=e)
        self._put(update, user, name, "", ())

    def _forget_mailbox(self, user: str, name: str) -> None:
        """Mark the message objects of mailbox ``name`` here gone (it is deleted)."""
        bucket = bucket_of(user)
        with self.fragments._lock_for(bucket):
            keys = [
                str(k)
                for (k,) in self.fragments._db(bucket).execute(
                    "SELECT key FROM messages WHERE user=? AND mailbox=?", (user, name)
                )
            ]
        rids = [k[: -len(".m")] for k in keys if _RID.match(k[: -len(".m")])]
        with self.lock:
            self.db.executemany(
                "UPDATE objects SET deleted=1 WHERE object_id=?",
                [(message_id(user, r),) for r in rids],
            )

    def forget_user(self, user: str) -> None:
        """Remove ``user``'s mail here and mark their message objects gone (they are
        neither offered to nor fetched by re-replication any more)."""
        self.fragments.remove_user(user)
        with self.lock:
            self.db.execute(
                "UPDATE objects SET deleted=1 WHERE user=? AND object_id LIKE 'msg/%'", (user,)
            )


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


def _write_file(path: Path, data: bytes, sync: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


@implementer(ILocalMailboxes)
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
        #: Replicated deliveries with a fenced UID, and those the fence check stored
        #: unnumbered at the coordinator (stale fence, lapsed lease, late UID).
        self.fenced_stores = 0
        self.fenced_refused = 0

    # --- passed through unchanged ----------------------------------------------------

    def store(self, messages: Sequence[NewMessage]) -> Deferred[list[Digest]]:
        """See :class:`IMailboxManager`."""
        return self.inner.store(messages)

    def mailboxes(self, user: str) -> Deferred[list[MailboxInfo]]:
        """See :class:`IMailboxManager`."""
        return self.inner.mailboxes(user)

    def create_mailbox(self, user: str, name: str) -> Deferred[MailboxInfo]:
        """See :class:`IMailboxManager`."""
        return self.inner.create_mailbox(user, name)

    def delete_mailbox(self, user: str, name: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self.inner.delete_mailbox(user, name)

    def rename_mailbox(self, user: str, old: str, new: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self.inner.rename_mailbox(user, old, new)

    def subscribe(self, user: str, name: str, subscribed: bool) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self.inner.subscribe(user, name, subscribed)

    def digests(self, user: str, mailbox: str) -> Deferred[list[Digest]]:
        """See :class:`IMailboxManager`."""
        return self.inner.digests(user, mailbox)

    def view(
        self, user: str, mailbox: str
    ) -> Deferred[tuple[list[MailboxInfo], list[Digest] | None]]:
        """See :class:`IMailboxManager`."""
        return self.inner.view(user, mailbox)

    def remove_user(self, user: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self.inner.remove_user(user)

    def users_in_bucket(self, bucket: int) -> Deferred[list[str]]:
        """See :class:`IMailboxManager`."""
        return self.inner.users_in_bucket(bucket)

    def demote(self, user: str, mailbox: str, uid: int, key: str) -> Deferred[bool]:
        """See :class:`IMailboxManager`."""
        return self.inner.demote(user, mailbox, uid, key)

    def shown(self, user: str, marks: dict[str, tuple[int, int]]) -> Deferred[dict[str, int]]:
        """See :class:`ILocalMailboxes`."""
        return self.inner.shown(user, marks)

    def fetch(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[dict[int, bytes]]:
        """See :class:`IMailboxManager`."""
        return self.inner.fetch(user, mailbox, uids)

    def copy(
        self, user: str, mailbox: str, uids: Sequence[int], dest: str
    ) -> Deferred[list[Digest]]:
        """See :class:`IMailboxManager`."""
        return self.inner.copy(user, mailbox, uids, dest)

    def tombstones(self, user: str, mailbox: str) -> Deferred[dict[int, int]]:
        """See :class:`IMailboxManager`."""
        return self.inner.tombstones(user, mailbox)

    def on_change(self, listener: Callable[[str, str], None]) -> None:
        """See :meth:`MailboxManager.on_change`."""
        self.inner.on_change(listener)

    def maybe_checkpoint(self) -> Deferred[int] | None:
        """See :meth:`MailboxManager.maybe_checkpoint`."""
        return self.inner.maybe_checkpoint()

    # --- the replicated paths -------------------------------------------------------

    def store_replicated(
        self, rid: str, message: NewMessage, targets: Sequence[str], acks: int | None = None
    ) -> Deferred[list[Digest]]:
        """Submit ``message`` as object ``msg/<user>/<rid>`` to ``targets`` (this node
        coordinating); fires with one digest per target once acknowledged."""
        if not _RID.match(rid):
            raise MalformedObject(f"bad message id {rid!r}")
        if message.fence and message.uid > 0:
            # Fenced (issue 14 bug 2): this node's copy first, under the fence check;
            # the object carries its outcome (the UID, or PENDING: numbered later
            # here, the other copies held until then).
            first = self.run(self.objects.commit_fenced, message, rid)

            def decided(dig: Digest) -> Deferred[list[Digest]]:
                self.fenced_stores += 1
                if not dig.uid:
                    self.fenced_refused += 1
                uid = dig.uid if dig.uid > 0 else PENDING
                plain = attrs.evolve(message, uid=uid, fence="")
                d = self.store_replicated(rid, plain, targets, acks)
                if uid == PENDING:
                    d.addCallback(self._numbered_meanwhile, message.user, rid)
                return d

            return first.addCallback(decided)
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
        submitted = self.replication.submit(oid, obj.to_body(), replicas, acks=acks)
        d: Deferred[Digest | None] = submitted.addCallback(
            lambda _: self.run(self.objects.digest, message.user, obj.mailbox, rid)
        )

        def digests(mine: Digest | None) -> list[Digest]:
            if mine is None:  # superseded at once by a newer update (deleted already?)
                return []
            return [attrs.evolve(mine, node=n) for n in replicas]

        return d.addCallback(digests)

    def set_flags(
        self,
        user: str,
        mailbox: str,
        uids: Sequence[int],
        flags: Sequence[str],
        mode: int,
        unchanged_since: int | None = None,
    ) -> Deferred[dict[int, tuple[str, ...]]]:
        """Flags changed here, then replicated as new versions of the messages."""
        d = self.inner.set_flags(user, mailbox, uids, flags, mode, unchanged_since)

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

    def _numbered_meanwhile(self, digests: list[Digest], user: str, rid: str) -> Any:
        """A fenced copy refused here was logged PENDING; if a numbering took it
        before its object was recorded (so :meth:`number_pending` published no UID
        version for it), publish that version now: the held copies take its UID."""
        oid = message_id(user, rid)
        rec = self.run(self.objects.record, oid)

        def check(record: ObjectRecord | None) -> Any:
            if record is None:
                return digests
            found = self.run(self.objects.numbered, user, [rid])
            found.addCallback(self._publish_uids, user, {rid: record})
            found.addErrback(
                lambda f: self.log.failure("replication: UID version of {u}", f, u=user)
            )
            return found.addCallback(lambda _: digests)

        return rec.addCallback(check)

    def number_pending(
        self, user: str, fence: str, first: int, count: int
    ) -> Deferred[tuple[int, int, int]]:
        """The manager numbers what waits here; a replicated message numbered now gets
        a new version carrying its UID, so its other copies (held, unnumbered, on the
        other replicas) take the same UID and never one of their own."""
        before = self.run(self.objects.unnumbered, user)

        def number(waiting: dict[str, ObjectRecord]) -> Deferred[tuple[int, int, int]]:
            d: Deferred[tuple[int, int, int]] = self.inner.number_pending(user, fence, first, count)
            if not waiting:
                return d

            def publish(result: tuple[int, int, int]) -> Deferred[tuple[int, int, int]]:
                found = self.run(self.objects.numbered, user, list(waiting))
                found.addCallback(self._publish_uids, user, waiting)
                found.addErrback(
                    lambda f: self.log.failure("replication: UID versions of {u}", f, u=user)
                )
                return found.addCallback(lambda _: result)

            return d.addCallback(publish)

        return before.addCallback(number)

    def _publish_uids(
        self,
        now: dict[str, tuple[str, int, tuple[str, ...], float, bytes]],
        user: str,
        waiting: dict[str, ObjectRecord],
    ) -> Deferred[Any]:
        ds = []
        for rid, (mailbox, uid, flags, date, data) in now.items():
            rec = waiting[rid]
            obj = MessageObject(mailbox, data, flags, date, uid, rec.targets)
            targets = tuple(dict.fromkeys([self.node_id, *rec.targets]))
            ds.append(
                self.replication.submit(
                    rec.object_id, obj.to_body(), targets, current=rec.timestamp, acks=1
                )
            )
        return gatherResults(ds, consumeErrors=True)

    def applied(self, update: Update) -> None:
        """The shell's ``on_applied``: wake IMAP IDLE for a message that arrived."""
        if update.object_id.startswith(MSG) and update.body is not None:
            user, _ = parse_message_id(update.object_id)
            try:
                mailbox = MessageObject.from_body(update.body).mailbox
            except MalformedObject:
                return
            self.inner._changed(user, _mailbox(mailbox))
