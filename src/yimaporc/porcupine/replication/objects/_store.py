"""The replicated-object store a node's replication shell applies updates to
(:class:`ReplicaObjectStore`, the top floor): the dispatch per object kind, the
batch path, profiles and mailbox objects, and the export a repair sends
(blocking)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from zope.interface import implementer

from ..._sqlite import rollback
from ...usermap import bucket_of
from ...values import MailboxExists, MailboxHasChildren, NoSuchMailbox
from .._values import Timestamp, Update
from ..interfaces import IObjectStore
from ._ids import (
    _RID,
    BOX,
    PROFILE,
    BoxObject,
    MalformedObject,
    MessageObject,
    _mailbox,
    key_of,
    message_id,
    parse_box_id,
    parse_message_id,
)
from ._messages import MessageObjects, _Item


@implementer(IObjectStore)
class ReplicaObjectStore(MessageObjects):
    """Applies replicated updates to the fragment store and the profile DB (blocking)."""

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
                rollback(self.db)
                raise
        return out

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
        except (NoSuchMailbox, MailboxExists, MailboxHasChildren) as e:
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
