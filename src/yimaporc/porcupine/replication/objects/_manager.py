"""Replicated messages through the log on the reactor side
(:class:`ReplicatedMailboxManager`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from ..._passthrough import PassThroughMailboxes
from ...fragments import MailboxManager
from ...values import PENDING, Digest, NewMessage
from .._values import Update
from ..shell import ReplicationService
from ._ids import (
    _RID,
    MSG,
    MalformedObject,
    MessageObject,
    ObjectRecord,
    _mailbox,
    message_id,
    parse_message_id,
)
from ._store import ReplicaObjectStore


class ReplicatedMailboxManager(PassThroughMailboxes):
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
        super().__init__(inner)
        self.inner: MailboxManager = inner
        self.objects = objects
        self.replication = replication
        self.run = run
        #: Replicated deliveries with a fenced UID, and those the fence check stored
        #: unnumbered at the coordinator (stale fence, lapsed lease, late UID).
        self.fenced_stores = 0
        self.fenced_refused = 0

    # --- the wrapped manager's own hooks ---------------------------------------------

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
