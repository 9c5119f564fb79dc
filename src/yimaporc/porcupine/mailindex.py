"""A bounded in-memory index of the mailboxes this node's fragments hold (issue 20).

Per user: the mailbox tree (UIDVALIDITY, UIDNEXT, subscription, counts) and every
mailbox's messages (UID, body key, size, flags, internal date), i.e. what
:meth:`~.fragments.FragmentStore.mailboxes` and
:meth:`~.fragments.FragmentStore.digests` read from SQLite.  A warm user's
LIST, STAT, SELECT, UID FETCH FLAGS and the keys of a body read are answered on
the reactor thread without a thread-pool round trip.

Exactness: the index never updates itself from what a caller meant to do; it
drops a user's entry whenever a row of that user's ``messages`` or
``mailboxes`` changes in SQLite.  :class:`~.fragments.FragmentStore` installs
temporary triggers on each bucket connection that call :meth:`MailIndex.invalidate`
for the row's user, so every writer (stores, flag changes, expunges, renames,
replication applying remote updates, numbering of pending mail, user removal)
is covered, including code that writes through the connection directly.
A fill (:meth:`~.fragments.FragmentStore.load_user`) reads under the bucket
lock and installs only if no invalidation of that user happened since it began
(:meth:`begin_fill` / :meth:`install`), so a fill that raced a write never
installs the old state.  Membership changes and reconstruction touch soft
state only (fragment lists, user maps), never this node's hard state, so they
need nothing here.

Bound: the total number of rows held (messages plus mailboxes over all users)
stays at or below ``max_rows``; the least recently used users are dropped
first, and a user bigger than the whole bound is never kept.  Thread-safe: the
reactor reads, pool threads fill and invalidate.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import attrs

from .values import Digest, MailboxInfo

#: Default bound (rows: messages plus mailboxes, all users); about 350 bytes each (measured with tracemalloc: 20,000 messages, flags split per row).
DEFAULT_MAX_ROWS = 200_000

SEEN = "\\Seen"


@attrs.frozen
class UserIndex:
    """One user's mailboxes on this node, as SQLite had them at one instant."""

    #: Every mailbox, sorted by name (counts from the messages below).
    tree: tuple[MailboxInfo, ...]
    #: Per mailbox name, its messages in UID order.
    boxes: Mapping[str, tuple[Digest, ...]]

    @property
    def rows(self) -> int:
        """What this entry costs against the bound."""
        return len(self.tree) + sum(len(v) for v in self.boxes.values())

    @classmethod
    def build(
        cls,
        mailboxes: Iterable[tuple[str, int, int, bool] | tuple[str, int, int, bool, int]],
        messages: Iterable[tuple[str, Digest]],
    ) -> UserIndex:
        """From ``(name, uidvalidity, uidnext, subscribed[, highestmodseq])`` rows and
        ``(mailbox, digest)`` rows (any order)."""
        by_box: dict[str, list[Digest]] = {}
        for box, d in messages:
            by_box.setdefault(box, []).append(d)
        tree = []
        boxes: dict[str, tuple[Digest, ...]] = {}
        for name, validity, uidnext, subscribed, *more in sorted(mailboxes):
            highest = int(more[0]) if more else 0
            digests = tuple(sorted(by_box.get(name, ()), key=lambda d: d.uid))
            boxes[name] = digests
            unseen = sum(1 for d in digests if SEEN not in d.flags)
            tree.append(
                MailboxInfo(
                    name, validity, uidnext, len(digests), unseen, bool(subscribed), highest
                )
            )
        return cls(tuple(tree), boxes)


class MailIndex:
    """Users' :class:`UserIndex` entries, least recently used dropped first."""

    def __init__(self, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        if max_rows < 0:
            raise ValueError("max_rows must be >= 0")
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._users: OrderedDict[str, UserIndex] = OrderedDict()
        self._rows = 0
        self._fills: dict[str, set[int]] = {}
        #: Per user with an entry: the ``shown`` rows (mailbox -> (UIDVALIDITY, UIDNEXT))
        #: as durable on disk; dropped with the entry, so never more users than entries.
        self._shown: dict[str, dict[str, tuple[int, int]]] = {}
        self._tokens = itertools.count(1)
        self.hits = 0
        self.misses = 0
        self.fills = 0
        self.invalidations = 0
        self.evictions = 0
        self.too_big = 0
        #: UIDNEXT records (``shown``) answered from memory: no write, no fsync.
        self.shown_skipped = 0

    @property
    def enabled(self) -> bool:
        """A bound of 0 turns the index off (every read goes to SQLite)."""
        return self.max_rows > 0

    def lookup(self, user: str) -> UserIndex | None:
        """``user``'s entry if warm (counted as a hit, made most recent), else None."""
        with self._lock:
            entry = self._users.get(user)
            if entry is None:
                self.misses += 1
                return None
            self._users.move_to_end(user)
            self.hits += 1
            return entry

    def peek(self, user: str) -> UserIndex | None:
        """``user``'s entry if warm, uncounted and without touching the LRU order."""
        with self._lock:
            return self._users.get(user)

    def begin_fill(self, user: str) -> int:
        """Call under the user's bucket lock before reading SQLite; pass the token
        to :meth:`install`."""
        token = next(self._tokens)
        with self._lock:
            self._fills.setdefault(user, set()).add(token)
        return token

    def install(self, user: str, token: int, entry: UserIndex) -> bool:
        """Keep ``entry`` unless ``user`` was invalidated since :meth:`begin_fill`
        gave ``token`` (or it does not fit); True if kept."""
        with self._lock:
            tokens = self._fills.get(user)
            valid = tokens is not None and token in tokens
            if tokens is not None:
                tokens.discard(token)
                if not tokens:
                    del self._fills[user]
            if not valid or not self.enabled:
                return False
            cost = entry.rows
            if cost > self.max_rows:
                self.too_big += 1
                return False
            old = self._users.pop(user, None)
            if old is not None:
                self._rows -= old.rows
            while self._users and self._rows + cost > self.max_rows:
                name, gone = self._users.popitem(last=False)
                self._shown.pop(name, None)
                self._rows -= gone.rows
                self.evictions += 1
            self._users[user] = entry
            self._rows += cost
            self.fills += 1
            return True

    def abandon(self, user: str, token: int) -> None:
        """A fill that will not :meth:`install` (it failed)."""
        with self._lock:
            tokens = self._fills.get(user)
            if tokens is not None:
                tokens.discard(token)
                if not tokens:
                    del self._fills[user]

    def invalidate(self, user: str) -> None:
        """A row of ``user`` changed: drop the entry and spoil fills in progress."""
        with self._lock:
            entry = self._users.pop(user, None)
            self._shown.pop(user, None)
            if entry is not None:
                self._rows -= entry.rows
                self.invalidations += 1
            tokens = self._fills.get(user)
            if tokens:
                tokens.clear()

    def shown_of(self, user: str) -> dict[str, tuple[int, int]] | None:
        """The durable ``shown`` rows of ``user`` if known (see :meth:`set_shown`)."""
        with self._lock:
            return self._shown.get(user)

    def set_shown(self, user: str, rows: Mapping[str, tuple[int, int]]) -> None:
        """``user``'s ``shown`` rows as just committed (call under the bucket lock, after
        the commit); kept only while the user has an entry."""
        with self._lock:
            if user in self._users:
                self._shown[user] = dict(rows)

    def drop_shown(self, user: str) -> None:
        """A ``shown`` row of ``user`` changed."""
        with self._lock:
            self._shown.pop(user, None)

    def clear(self) -> None:
        """Forget everything (spoils fills in progress too)."""
        with self._lock:
            self._users.clear()
            self._shown.clear()
            self._rows = 0
            for tokens in self._fills.values():
                tokens.clear()

    def __contains__(self, user: object) -> bool:
        with self._lock:
            return user in self._users

    def status(self) -> dict[str, int]:
        """Counters and sizes for ``/api/status`` and ``/metrics``."""
        with self._lock:
            return {
                "users": len(self._users),
                "rows": self._rows,
                "max_rows": self.max_rows,
                "hits": self.hits,
                "misses": self.misses,
                "fills": self.fills,
                "invalidations": self.invalidations,
                "evictions": self.evictions,
                "too_big": self.too_big,
                "shown_skipped": self.shown_skipped,
            }
