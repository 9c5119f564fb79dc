"""The verified-credential cache: logins at Dovecot's cost, storage as strong as before.

A POP3/IMAP client logs in again and again with the same password; checking it
against the stored scrypt hash costs ~50 ms of CPU each time.  Like Dovecot's
auth cache (``auth_cache_ttl``, ``auth_cache_size``), :class:`AuthCache`
remembers credentials that *succeeded*, for a bounded time and in a bounded
number of entries, so that the next login with them skips scrypt.

What an entry holds: the keyed BLAKE2b-256 of ``(address, stored hash,
password)`` under a random 32-byte key made per process (never written
anywhere), and its expiry.  Neither the password nor anything from which it
could be tested offline without the key is kept; a memory dump of one process
is no better than its stored hashes once the process has ended (the key dies
with it).  Because the stored hash is part of the digest, an entry can only
match the hash it was verified against: after ``passwd`` (a new salt, so a new
hash, even for the same password) or ``deluser`` no old entry can match,
whether or not it was flushed.  Failures are never cached: a wrong password
misses, goes through scrypt and through the throttle like before.

Flushing: :meth:`forget` drops every entry of one address at once; the profile
DB calls it on every profile write or merge (local ``passwd``/``deluser``,
records arriving from other nodes).  A node that does not hear of a change keeps
accepting what its own profile store accepts anyway, and its entries die within
``ttl`` seconds of being made.  ``ttl`` 0 (or ``max_entries`` 0) disables the cache.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable

#: Seconds a verified credential is trusted without scrypt (``--auth-cache-ttl``).
DEFAULT_TTL = 300.0
#: Entries kept at most, least recently used dropped first (``--auth-cache-size``).
DEFAULT_SIZE = 10_000
#: Bounds the options accept.
MAX_TTL = 86_400.0
MAX_SIZE = 10_000_000


class AuthCache:
    """Successful (address, stored hash, password) checks, by keyed hash, LRU and TTL bound.

    ``now`` is the clock (``reactor.seconds``); ``key`` is random per instance
    unless given (tests).  Not thread-safe: use it from the reactor thread.
    """

    def __init__(
        self,
        now: Callable[[], float],
        ttl: float = DEFAULT_TTL,
        max_entries: int = DEFAULT_SIZE,
        key: bytes | None = None,
    ) -> None:
        if not 0 <= ttl <= MAX_TTL:
            raise ValueError(f"auth cache TTL must be 0 to {MAX_TTL:g} seconds")
        if not 0 <= max_entries <= MAX_SIZE:
            raise ValueError(f"auth cache size must be 0 to {MAX_SIZE} entries")
        self.now = now
        self.ttl = float(ttl)
        self.max_entries = int(max_entries)
        self._key = key if key is not None else os.urandom(32)
        #: digest -> (address, expiry), least recently used first.
        self._entries: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        #: address -> its digests (several after a passwd on another node not heard of).
        self._by_address: dict[str, set[bytes]] = {}
        self.hits = 0
        self.misses = 0
        #: Logins that waited for an identical check already running (no scrypt of their own).
        self.shared = 0

    @property
    def enabled(self) -> bool:
        """False when the TTL or the size is 0."""
        return self.ttl > 0 and self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def _digest(self, address: str, stored_hash: str, password: str) -> bytes:
        h = hashlib.blake2b(key=self._key, digest_size=32)
        for part in (address, stored_hash, password):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(4, "big"))  # unambiguous framing
            h.update(data)
        return h.digest()

    def key_of(self, password: str) -> bytes:
        """A keyed digest of ``password`` alone (what identical checks in flight are
        matched on; like the entries, useless without this process's key)."""
        h = hashlib.blake2b(key=self._key, digest_size=32, person=b"in-flight")
        h.update(password.encode("utf-8", "surrogatepass"))
        return h.digest()

    def check(self, address: str, stored_hash: str, password: str, count_miss: bool = True) -> bool:
        """True if this password was verified against this very hash less than ``ttl`` ago
        (``count_miss`` False: a miss is not counted, the caller will ask again)."""
        if not self.enabled or not stored_hash:
            return False
        digest = self._digest(address, stored_hash, password)
        entry = self._entries.get(digest)
        if entry is None or entry[0] != address:
            self.misses += count_miss
            return False
        if entry[1] <= self.now():
            self._drop(digest)
            self.misses += count_miss
            return False
        self._entries.move_to_end(digest)
        self.hits += 1
        return True

    def miss(self) -> None:
        """Count a login the cache could not answer before it was asked (no hash known)."""
        if self.enabled:
            self.misses += 1

    def remember(self, address: str, stored_hash: str, password: str) -> None:
        """Record a successful scrypt check of ``password`` against ``stored_hash``."""
        if not self.enabled or not stored_hash:
            return
        digest = self._digest(address, stored_hash, password)
        self._drop(digest)
        self._entries[digest] = (address, self.now() + self.ttl)
        self._by_address.setdefault(address, set()).add(digest)
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))

    def forget(self, address: str) -> None:
        """Drop every entry of ``address`` (its profile changed or went away)."""
        for digest in self._by_address.pop(address, ()):
            self._entries.pop(digest, None)

    def clear(self) -> None:
        """Drop everything."""
        self._entries.clear()
        self._by_address.clear()

    def _drop(self, digest: bytes) -> None:
        entry = self._entries.pop(digest, None)
        if entry is None:
            return
        digests = self._by_address.get(entry[0])
        if digests is not None:
            digests.discard(digest)
            if not digests:
                del self._by_address[entry[0]]

    def status(self) -> dict[str, int | float]:
        """Counters and size, for ``auth`` in the node's status and ``/metrics``."""
        return {
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "cache_shared": self.shared,
            "cache_entries": len(self._entries),
            "cache_ttl": self.ttl,
        }
