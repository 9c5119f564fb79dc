"""Message objects in the fragment store (:class:`MessageObjects`): applied one by
one or as a group commit, numbered where their coordinator numbers them, flags
and tombstones applied in place (blocking)."""

from __future__ import annotations

from collections.abc import Sequence

from ..._sqlite import rollback
from ...fragments import write_file
from ...usermap import bucket_of
from ...values import PENDING, Digest, MailboxExists, NewMessage, NoSuchMailbox
from .._values import Timestamp, Update
from ._ids import (
    _RID,
    MSG,
    MessageObject,
    ObjectRecord,
    _mailbox,
    key_of,
    message_id,
    parse_message_id,
)
from ._versions import ObjectVersions

#: A batched message update: ``(update, user, rid, mailbox, object, (mailbox, uid) here)``.
_Item = tuple[Update, str, str, str, "MessageObject", list[tuple[str, int]]]


class MessageObjects(ObjectVersions):
    """Applies message objects to the fragment store (thread-safe)."""

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
            write_file(fs.tmp / key, obj.data, sync=True)
            fs.hold(NewMessage(user, mailbox, obj.data, obj.flags, obj.internal_date), key)
        elif obj.uid > 0 and fs.is_held(user, key):
            if not fs.promote(user, key, obj.uid):
                self._store(user, rid, mailbox, obj)
                fs.unhold(user, key)
        else:
            self._store(user, rid, mailbox, obj)
        self._put(update, user, mailbox, rid, obj.targets)

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
                write_file(fs.tmp / key_of(item[2]), item[4].data, sync=False)
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
                    rollback(db)
                    raise
        for update, user, rid, mailbox, obj, _ in (*fresh, *flagged):
            self._put(update, user, mailbox, rid, obj.targets)
        fresh.clear()
        flagged.clear()

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
            write_file(self.fragments.tmp / key, message.body, sync=False)  # the barrier
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
            write_file(fs.tmp / key, obj.data, sync=False)  # commit_bucket's barrier
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
