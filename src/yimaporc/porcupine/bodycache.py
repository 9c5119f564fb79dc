"""Message bodies in memory, bounded in bytes (issue 20: reads from memory where they can be).

A POP3 RETR or an IMAP ``FETCH BODY[]`` of a warm user (:mod:`.mailindex`)
already knows the body's key without SQLite; what is left is reading the file,
one thread-pool round trip per call (a reactor -> worker -> reactor hand-off,
~1/3 of a POP3 session's latency on a loaded machine, py-spy in
docs/benchmarks.md).  :class:`BodyCache` keeps the bodies this node read or
stored recently, so such a fetch is answered on the reactor thread.

Exactness: a body file never changes once committed: its key is a fresh
``uuid4`` per write (:meth:`~.fragments.FragmentStore.write_body`), so the
bytes under ``(user, key)`` are the file's bytes for as long as the file
exists, and a key is never reused for other bytes.  Which keys a mailbox holds
comes from the index (invalidated by SQLite triggers), never from this cache.
A deletion or a user's removal through :class:`~.fragments.MailboxManager`
drops the user's entries (:meth:`forget_user`) and bumps the user's generation,
so a read that started before it does not put the body back; an entry left by a
deletion made elsewhere (replication applying a tombstone) is unreachable
through the index and ages out.

Bound: the sum of the bodies' lengths stays at or below ``max_bytes``, least
recently used first out; a body larger than ``max_bytes // 16`` is never kept
(one big message does not flush everyone else).  Reactor thread only.
"""

from __future__ import annotations

from collections import OrderedDict

#: Default bound (``--mail-body-cache-bytes``): 64 MiB of bodies.
DEFAULT_MAX_BYTES = 64 << 20
#: Largest bound the option accepts (16 GiB).
MAX_MAX_BYTES = 16 << 30


class BodyCache:
    """Bodies by ``(user, key)``, LRU within ``max_bytes`` (0: off)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if not 0 <= max_bytes <= MAX_MAX_BYTES:
            raise ValueError(f"body cache bound must be 0 to {MAX_MAX_BYTES} bytes")
        self.max_bytes = int(max_bytes)
        #: Bodies above this size are not kept.
        self.max_body = self.max_bytes // 16
        self._entries: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._by_user: dict[str, set[str]] = {}
        self._generation: dict[str, int] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        """False with a bound of 0."""
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def generation(self, user: str) -> int:
        """Changes whenever ``user``'s entries are dropped (see :meth:`put`)."""
        return self._generation.get(user, 0)

    def get(self, user: str, key: str) -> bytes | None:
        """The body stored under ``key`` for ``user``, or None (counted)."""
        body = self._entries.get((user, key))
        if body is None:
            self.misses += 1
            return None
        self._entries.move_to_end((user, key))
        self.hits += 1
        return body

    def split(self, user: str, keys: dict[int, str]) -> tuple[dict[int, bytes], dict[int, str]]:
        """``keys`` (UID -> key) as the bodies held here (UID -> body) and the keys
        still to read (UID -> key), each look-up counted as :meth:`get` counts it."""
        found: dict[int, bytes] = {}
        missing: dict[int, str] = {}
        for uid, key in keys.items():
            body = self.get(user, key)
            if body is None:
                missing[uid] = key
            else:
                found[uid] = body
        return found, missing

    def put(self, user: str, key: str, body: bytes, generation: int | None = None) -> None:
        """Keep ``body`` (the file ``key`` of ``user``).  With ``generation`` (from
        :meth:`generation` when the read began), nothing is kept if ``user``'s entries
        were dropped since: the read may have raced a deletion."""
        if not self.enabled or len(body) > self.max_body:
            return
        if generation is not None and generation != self.generation(user):
            return
        if not isinstance(body, bytes):
            body = bytes(body)
        old = self._entries.pop((user, key), None)
        if old is not None:
            self.bytes -= len(old)
        self._entries[(user, key)] = body
        self._by_user.setdefault(user, set()).add(key)
        self.bytes += len(body)
        while self.bytes > self.max_bytes:
            (u, k), dropped = self._entries.popitem(last=False)
            self.bytes -= len(dropped)
            self.evictions += 1
            keys = self._by_user.get(u)
            if keys is not None:
                keys.discard(k)
                if not keys:
                    del self._by_user[u]

    def forget_user(self, user: str) -> None:
        """Drop every body of ``user`` (a deletion or removal) and bump its generation."""
        self._generation[user] = self._generation.get(user, 0) + 1
        for key in self._by_user.pop(user, ()):
            body = self._entries.pop((user, key), None)
            if body is not None:
                self.bytes -= len(body)

    def status(self) -> dict[str, int]:
        """Counters and size, for ``mail_body_cache`` in the status and ``/metrics``."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "bytes": self.bytes,
            "entries": len(self._entries),
            "max_bytes": self.max_bytes,
        }
