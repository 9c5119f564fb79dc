"""The mail store off the reactor thread: :class:`MailboxManager` runs a
:class:`~.FragmentStore` on a thread pool and forms its group commits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ..bodycache import BodyCache
from ..interfaces import ILocalMailboxes
from ..mailindex import MailIndex, UserIndex
from ..values import Digest, MailboxInfo, NewMessage, NoSuchMailbox
from ._buckets import mailbox_name
from ._store import FragmentStore

T = TypeVar("T")
_R = TypeVar("_R")


@implementer(ILocalMailboxes)
class MailboxManager:
    """:class:`FragmentStore` off the reactor thread, with group commit for stores.

    Group commit "leader/followers" (PostgreSQL with ``commit_delay=0``): a
    ``store()`` with no group in flight starts one at once (a lone message never
    waits for company); calls arriving while a group is being written queue and
    go out together as the next group, so the group size follows the load.  A
    group is one worker-thread call, :meth:`FragmentStore.store_group`: bodies
    written, two durability barriers (two ``syncfs``, whatever the group's size
    and its number of users and buckets) around one transaction per bucket.
    Each caller's Deferred fires only after the second barrier (its messages are
    durable), or with the first failure among its messages.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        store: FragmentStore,
        max_batch: int = 256,
        index: MailIndex | None = None,
        bodies: BodyCache | None = None,
    ) -> None:
        self.reactor = reactor
        self.pool = threadpool
        self.fragments = store
        #: The in-memory mailbox index (:mod:`..mailindex`); None or a bound of 0: off.
        self.index = index if index is not None and index.enabled else None
        store.index = self.index
        #: Recently read or stored bodies (:mod:`..bodycache`); None or a bound of 0: off.
        #: Used with the index only (the keys of a fetch come from it).
        on = bodies is not None and bodies.enabled and self.index is not None
        self.bodies = bodies if on else None
        self.node_id = store.node_id
        self.max_batch = max_batch
        self._pending: list[tuple[list[NewMessage], Deferred[list[Digest]]]] = []
        self._writing = False
        self._checkpointing = False
        self._listeners: list[Callable[[str, str], None]] = []

    def _run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.pool, f, *args)

    def on_change(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(user, mailbox)`` after messages arrive in a mailbox."""
        self._listeners.append(listener)

    def _changed(self, user: str, mailbox: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(user, mailbox)
            except Exception:
                self.log.failure("mailbox change listener failed")

    # --- group commit ------------------------------------------------------

    def store(self, messages: Sequence[NewMessage]) -> Deferred[list[Digest]]:
        """Queue for the next batch; fires once the batch is durable."""
        d: Deferred[list[Digest]] = Deferred()
        self._pending.append((list(messages), d))
        if not self._writing:
            self._write_batch()
        return d

    def _write_batch(self) -> None:
        """Start the next group: everything queued (up to ``max_batch`` messages),
        one worker-thread call (:meth:`FragmentStore.store_group`)."""
        batch: list[tuple[list[NewMessage], Deferred[list[Digest]]]] = []
        n = 0
        while self._pending and (not batch or n + len(self._pending[0][0]) <= self.max_batch):
            item = self._pending.pop(0)
            batch.append(item)
            n += len(item[0])
        self._writing = True
        flat = [(c, m) for c, (msgs, _) in enumerate(batch) for m in msgs]
        d = self._run(self.fragments.store_group, [m for _, m in flat])
        d.addCallback(self._stored, batch, flat)
        d.addErrback(self._broken, batch)

    def _broken(
        self, f: Failure, batch: list[tuple[list[NewMessage], Deferred[list[Digest]]]]
    ) -> None:
        """The group failed as a whole (a rename or the bodies' barrier, or a bug):
        fail its callers (451) rather than hang them all; the next group goes on."""
        self.log.failure("group commit failed", f)
        for _, d in batch:
            if not d.called:
                d.errback(f)
        self._writing = False
        if self._pending:
            self._write_batch()

    def _stored(
        self,
        results: list[Digest | Exception],
        batch: list[tuple[list[NewMessage], Deferred[list[Digest]]]],
        flat: list[tuple[int, NewMessage]],
    ) -> None:
        digests: dict[int, Digest] = {}
        failed: dict[int, Failure | Exception] = {}
        for pos, got in enumerate(results):
            if isinstance(got, Digest):
                digests[pos] = got
            else:
                failed.setdefault(flat[pos][0], got)
        self._finish(batch, flat, digests, failed)

    def _finish(
        self,
        batch: list[tuple[list[NewMessage], Deferred[list[Digest]]]],
        flat: list[tuple[int, NewMessage]],
        digests: dict[int, Digest],
        failed: dict[int, Failure | Exception],
    ) -> None:
        # ``_writing`` stays set while the callers hear: a store they make meanwhile
        # (the next message of a session) joins the next group instead of starting
        # a group of its own beside it; exactly one group is in flight at a time.
        mine: dict[int, list[Digest]] = {}
        for pos, (c, _) in enumerate(flat):
            if pos in digests:
                mine.setdefault(c, []).append(digests[pos])
        changed = dict.fromkeys(
            (flat[pos][1].user, mailbox_name(flat[pos][1].mailbox)) for pos in digests
        )
        if self.bodies is not None:
            # what was just written is what the next read of these keys returns
            for pos, dig in digests.items():
                m = flat[pos][1]
                if dig.node == self.node_id:
                    self.bodies.put(m.user, dig.key, m.body)
        for c, (_, d) in enumerate(batch):
            if c in failed:
                d.errback(Failure(failed[c]) if isinstance(failed[c], Exception) else failed[c])
            else:
                d.callback(mine.get(c, []))
        for user, box in changed:
            self._changed(user, box)
        self._writing = False
        if self._pending:
            self._write_batch()
        self.maybe_checkpoint()

    def maybe_checkpoint(self) -> Deferred[int] | None:
        """Start a journal checkpoint on the pool if one is due and none runs (after
        each group, and periodically from the service for replica-only writes)."""
        if self._checkpointing or not self.fragments.checkpoint_due():
            return None
        self._checkpointing = True

        def done(result: int | Failure) -> int | Failure:
            self._checkpointing = False
            if isinstance(result, Failure):
                self.log.failure("journal checkpoint failed (retried later)", result)
                return 0
            return result

        return self._run(self.fragments.checkpoint).addBoth(done)

    # --- the rest, straight through the pool --------------------------------

    def _user(self, user: str) -> Deferred[UserIndex] | UserIndex:
        """``user``'s index entry: at once when warm, else filled on the pool."""
        assert self.index is not None
        entry = self.index.lookup(user)
        if entry is not None:
            return entry
        return self._run(self.fragments.load_user, user).addCallback(lambda got: got[0])

    def _bounded(self, user: str) -> Deferred[tuple[UserIndex, int]]:
        """``user``'s index entry with a mod-sequence bound taken with it (under the
        clock's lock, which a write holds while it drops the entry): every change not
        in the entry gets a MODSEQ above the bound.  A cold entry is filled first,
        then looked up again the same way (filled anew if a write spoiled it)."""
        assert self.index is not None
        clock = self.fragments.modseqs
        with clock.lock:
            entry = self.index.lookup(user)
            if entry is not None:
                return succeed((entry, clock.bound_locked()))
        return self._run(self.fragments.load_user, user)

    def _tree(self, entry: UserIndex, bound: int) -> list[MailboxInfo]:
        return [attrs.evolve(i, modseq_bound=max(i.highestmodseq, bound)) for i in entry.tree]

    def mailboxes(self, user: str) -> Deferred[list[MailboxInfo]]:
        """See :class:`IMailboxManager` (from the index when it is on)."""
        if self.index is None:
            return self._run(self.fragments.mailboxes, user, True)
        return self._bounded(user).addCallback(lambda got: self._tree(*got))

    def create_mailbox(self, user: str, name: str) -> Deferred[MailboxInfo]:
        """See :class:`IMailboxManager`."""
        return self._run(self.fragments.create_mailbox, user, name)

    def delete_mailbox(self, user: str, name: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self._run(self.fragments.delete_mailbox, user, name)

    def rename_mailbox(self, user: str, old: str, new: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self._run(self.fragments.rename_mailbox, user, old, new)

    def subscribe(self, user: str, name: str, subscribed: bool) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self._run(self.fragments.subscribe, user, name, subscribed)

    def digests(self, user: str, mailbox: str) -> Deferred[list[Digest]]:
        """See :class:`IMailboxManager` (from the index when it is on)."""
        if self.index is None:
            return self._run(self.fragments.digests, user, mailbox)
        try:
            name = mailbox_name(mailbox)
        except NoSuchMailbox:
            return fail()
        got = self._user(user)
        if isinstance(got, UserIndex):
            return maybeDeferred(_digests_of, got, name)
        return got.addCallback(_digests_of, name)

    def view(
        self, user: str, mailbox: str
    ) -> Deferred[tuple[list[MailboxInfo], list[Digest] | None]]:
        """The user's mailbox tree here and ``mailbox``'s messages (None: no such mailbox
        here) in one call: what a SELECT, STATUS or POP3 login asks each fragment node
        (one RPC per remote node instead of two).  From memory when the index is warm."""
        try:
            name = mailbox_name(mailbox)
        except NoSuchMailbox:
            return fail()
        if self.index is None:
            return self._run(self._view_blocking, user, name)

        def view(got: tuple[UserIndex, int]) -> tuple[list[MailboxInfo], list[Digest] | None]:
            entry, bound = got
            return self._tree(entry, bound), _view_of(entry, name)[1]

        return self._bounded(user).addCallback(view)

    def _view_blocking(self, user: str, name: str) -> tuple[list[MailboxInfo], list[Digest] | None]:
        # the tree (and its bound) before the digests: a change between the two reads
        # is listed with a MODSEQ above the bound, never hidden below it
        tree = self.fragments.mailboxes(user, True)
        try:
            return tree, self.fragments.digests(user, name)
        except NoSuchMailbox:
            return tree, None

    def fetch(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[dict[int, bytes]]:
        """See :class:`IMailboxManager`.  With the user's index warm, the body keys
        come from memory, bodies in the body cache (:mod:`..bodycache`) are answered
        at once, and the pool reads the other files, all in one job (then cached)."""
        entry = self.index.lookup(user) if self.index is not None else None
        if entry is None:
            return self._run(self.fragments.fetch, user, mailbox, list(uids))
        try:
            name = mailbox_name(mailbox)
        except NoSuchMailbox:
            return fail()
        box = entry.boxes.get(name, ())
        wanted = set(uids)
        keys = {d.uid: d.key for d in box if d.uid in wanted}
        if not keys:
            return succeed({})
        cache = self.bodies
        if cache is None:
            return self._run(self.fragments.read_bodies, user, keys)
        found, missing = cache.split(user, keys)
        if not missing:
            return succeed(found)
        generation = cache.generation(user)

        def keep(read: dict[int, bytes]) -> dict[int, bytes]:
            for uid, body in read.items():
                cache.put(user, missing[uid], body, generation)
            found.update(read)
            return found

        return self._run(self.fragments.read_bodies, user, missing).addCallback(keep)

    def set_flags(
        self,
        user: str,
        mailbox: str,
        uids: Sequence[int],
        flags: Sequence[str],
        mode: int,
        unchanged_since: int | None = None,
    ) -> Deferred[dict[int, tuple[str, ...]]]:
        """See :class:`IMailboxManager`."""
        return self._run(
            self.fragments.set_flags, user, mailbox, list(uids), list(flags), mode, unchanged_since
        )

    def tombstones(self, user: str, mailbox: str) -> Deferred[dict[int, int]]:
        """See :class:`IMailboxManager`."""
        return self._run(self.fragments.tombstones, user, mailbox)

    def copy(
        self, user: str, mailbox: str, uids: Sequence[int], dest: str
    ) -> Deferred[list[Digest]]:
        """See :class:`IMailboxManager`."""
        d = self._run(self.fragments.copy, user, mailbox, list(uids), dest)

        def notify(digests: list[Digest]) -> list[Digest]:
            if digests:
                self._changed(user, mailbox_name(dest))
            return digests

        return d.addCallback(notify)

    def delete(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[list[int]]:
        """See :class:`IMailboxManager` (the user's cached bodies are dropped)."""
        self._forget_bodies(user)
        d = self._run(self.fragments.delete, user, mailbox, list(uids))
        return d.addBoth(self._forget_bodies_then, user)

    def remove_user(self, user: str) -> Deferred[None]:
        """See :class:`IMailboxManager` (the user's cached bodies are dropped)."""
        self._forget_bodies(user)
        d = self._run(self.fragments.remove_user, user)
        return d.addBoth(self._forget_bodies_then, user)

    def _forget_bodies(self, user: str) -> None:
        if self.bodies is not None:
            self.bodies.forget_user(user)

    def _forget_bodies_then(self, result: _R, user: str) -> _R:
        """Drop them again once the files are gone: a read that began in between
        is not kept (:meth:`BodyCache.put`'s generation)."""
        self._forget_bodies(user)
        return result

    def users_in_bucket(self, bucket: int) -> Deferred[list[str]]:
        """See :class:`IMailboxManager`."""
        return self._run(self.fragments.users_in_bucket, bucket)

    def number_pending(
        self, user: str, fence: str, first: int, count: int
    ) -> Deferred[tuple[int, int, int]]:
        """:meth:`FragmentStore.number_pending` off the reactor; IMAP sessions are told.
        Fires with (messages numbered, still pending, highest UIDNEXT here)."""
        d = self._run(self.fragments.number_pending, user, fence, first, count)

        def notify(r: tuple[int, list[str], int, int]) -> tuple[int, int, int]:
            done, changed, left, top = r
            for box in changed:
                self._changed(user, box)
            return done, left, top

        return d.addCallback(notify)

    def demote(self, user: str, mailbox: str, uid: int, key: str) -> Deferred[bool]:
        """See :meth:`FragmentStore.demote`."""
        return self._run(self.fragments.demote, user, mailbox, uid, key)

    def shown(self, user: str, marks: dict[str, tuple[int, int]]) -> Deferred[dict[str, int]]:
        """See :meth:`FragmentStore.shown`.  When every mark is already durable here (same
        UIDVALIDITY, UIDNEXT recorded at least as high), the answer comes from memory:
        no pool trip, no write, no fsync."""
        if self.index is not None:
            known = self.index.shown_of(user)
            if known is not None:
                out = {}
                for name, (validity, uidnext) in marks.items():
                    have = known.get(name)
                    if have is None or have[0] != validity or have[1] < uidnext:
                        break
                    out[name] = have[1]
                else:
                    self.index.shown_skipped += 1
                    return succeed(out)
        return self._run(self.fragments.shown, user, dict(marks))


def _digests_of(entry: UserIndex, name: str) -> list[Digest]:
    """``name``'s messages from ``entry`` (``NoSuchMailbox`` if it has no such mailbox)."""
    box = entry.boxes.get(name)
    if box is None:
        raise NoSuchMailbox(f"no mailbox {name}")
    return list(box)


def _view_of(entry: UserIndex, name: str) -> tuple[list[MailboxInfo], list[Digest] | None]:
    box = entry.boxes.get(name)
    return list(entry.tree), None if box is None else list(box)
