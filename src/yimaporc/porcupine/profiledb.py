"""The user profile database (hard state): SQLite in WAL mode, scrypt hashes.

``DATA_DIR/mail/profiles.sqlite`` holds one row per user with its user-map
bucket, so soft-state reconstruction can read the profiles of one fresh
bucket.  Passwords are stored as ``scrypt$n$r$p$salt$hash`` (hashlib.scrypt,
16-byte random salt).  Hashing runs on the thread pool.  A verified password is
remembered in an :class:`~.authcache.AuthCache` (as Dovecot's auth cache does:
a keyed hash tied to the stored hash, bounded in time and size), with the
profile it was checked against, so a client logging in again costs neither
scrypt nor a pool round trip; every write or merge of a profile forgets both.

For the cluster every row also carries ``updated`` (time of the last write)
and ``deleted`` (a tombstone): :meth:`ProfileDB.records_in_bucket` and
:meth:`ProfileDB.merge` let nodes exchange :data:`Record` tuples,
newest ``updated`` winning, so every node converges on the same profiles.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .._files import private_sqlite
from .._reactor import IClockThreads
from ._sqlite import rollback
from .authcache import DEFAULT_SIZE, DEFAULT_TTL, AuthCache
from .interfaces import IProfileDB
from .usermap import BadAddress, bucket_of, normalise
from .values import BadCredentials, NoSuchUser, Profile, UserExists

T = TypeVar("T")

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    address TEXT PRIMARY KEY, bucket INTEGER NOT NULL, password_hash TEXT NOT NULL,
    replicas INTEGER NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS profiles_bucket ON profiles (bucket);
"""

#: ``(address, password_hash, replicas, created, updated, deleted)``: one row as
#: nodes exchange it (``deleted`` rows are tombstones).
Record = tuple[str, str, int, float, float, bool]


def newer(a: Record, b: Record) -> bool:
    """True if ``a`` supersedes ``b`` (later write; ties: tombstone, then hash order)."""
    return (a[4], a[5], a[1]) > (b[4], b[5], b[1])


def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$n$r$p$salt$hash`` with a fresh random salt (blocking: ~50 ms)."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    """True if ``password`` matches a :func:`hash_password` string (blocking)."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode("utf-8"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(want),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


class _Profiles:
    """The blocking half (thread-safe)."""

    def __init__(self, path: Path, now: Callable[[], float]) -> None:
        private_sqlite(path)  # password hashes: 0600, and so its -wal/-shm
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(profiles)")}
        if "updated" not in cols:  # databases from before the cluster
            self.db.execute("ALTER TABLE profiles ADD COLUMN updated REAL NOT NULL DEFAULT 0")
            self.db.execute("UPDATE profiles SET updated=created")
        if "deleted" not in cols:
            self.db.execute("ALTER TABLE profiles ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0")
        self.now = now
        self.lock = threading.Lock()

    def count(self) -> int:
        with self.lock:
            return int(
                self.db.execute("SELECT COUNT(*) FROM profiles WHERE deleted=0").fetchone()[0]
            )

    def add(self, address: str, password_hash: str, replicas: int) -> Profile:
        now = self.now()
        with self.lock:
            row = self.db.execute(
                "SELECT deleted, updated FROM profiles WHERE address=?", (address,)
            ).fetchone()
            if row is not None and not row[0]:
                raise UserExists(f"user {address} already exists")
            # After a tombstone: strictly newer, so the re-created user wins everywhere.
            now = max(now, row[1] + 1e-6) if row else now
            self.db.execute(
                "INSERT OR REPLACE INTO profiles(address, bucket, password_hash, replicas, "
                "created, updated, deleted) VALUES (?, ?, ?, ?, ?, ?, 0)",
                (address, bucket_of(address), password_hash, replicas, now, now),
            )
        return Profile(address, password_hash, replicas, now)

    def get(self, address: str) -> Profile | None:
        with self.lock:
            row = self.db.execute(
                "SELECT address, password_hash, replicas, created FROM profiles "
                "WHERE address=? AND deleted=0",
                (address,),
            ).fetchone()
        return Profile(*row) if row else None

    def set_hash(self, address: str, password_hash: str) -> None:
        with self.lock:
            cur = self.db.execute(
                "UPDATE profiles SET password_hash=?, updated=MAX(?, updated + 1e-6) "
                "WHERE address=? AND deleted=0",
                (password_hash, self.now(), address),
            )
        if cur.rowcount == 0:
            raise NoSuchUser(f"no user {address}")

    def remove(self, address: str) -> None:
        with self.lock:
            cur = self.db.execute(
                "UPDATE profiles SET deleted=1, password_hash='', updated=MAX(?, updated + 1e-6) "
                "WHERE address=? AND deleted=0",
                (self.now(), address),
            )
        if cur.rowcount == 0:
            raise NoSuchUser(f"no user {address}")

    def select(self, where: str = "", args: tuple[Any, ...] = ()) -> list[Profile]:
        with self.lock:
            rows = self.db.execute(
                "SELECT address, password_hash, replicas, created FROM profiles "
                f"WHERE deleted=0 {where} ORDER BY address",
                args,
            ).fetchall()
        return [Profile(*r) for r in rows]

    def records(self, where: str = "", args: tuple[Any, ...] = ()) -> list[Record]:
        with self.lock:
            rows = self.db.execute(
                "SELECT address, password_hash, replicas, created, updated, deleted "
                f"FROM profiles {where} ORDER BY address",
                args,
            ).fetchall()
        return [(a, h, int(r), float(c), float(u), bool(d)) for a, h, r, c, u, d in rows]

    def merge(self, records: list[Record]) -> tuple[list[str], int]:
        """Apply the records newer than ours; the addresses changed and the new count."""
        changed = []
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for rec in records:
                    row = self.db.execute(
                        "SELECT address, password_hash, replicas, created, updated, deleted "
                        "FROM profiles WHERE address=?",
                        (rec[0],),
                    ).fetchone()
                    if row is not None and not newer(rec, tuple(row)):  # type: ignore[arg-type]
                        continue
                    self.db.execute(
                        "INSERT OR REPLACE INTO profiles(address, bucket, password_hash, "
                        "replicas, created, updated, deleted) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (rec[0], bucket_of(rec[0]), rec[1], rec[2], rec[3], rec[4], int(rec[5])),
                    )
                    changed.append(rec[0])
                self.db.execute("COMMIT")
            except BaseException:
                rollback(self.db)
                raise
        return changed, self.count()

    def close(self) -> None:
        with self.lock:
            self.db.close()


@implementer(IProfileDB)
class ProfileDB:
    """:class:`IProfileDB` over ``profiles.sqlite``, off the reactor thread."""

    def __init__(
        self,
        reactor: IClockThreads,
        threadpool: ThreadPool,
        path: Path,
        now: Callable[[], float],
        hasher: Callable[[str], str] = hash_password,
        auth_cache_ttl: float = DEFAULT_TTL,
        auth_cache_size: int = DEFAULT_SIZE,
        checker: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.reactor = reactor
        self.pool = threadpool
        self._db = _Profiles(path, now)
        self._count = self._db.count()
        self._hash = hasher
        self._check = checker or check_password
        #: Verified credentials (the auth cache); ``status()`` has its counters.
        self.auth_cache = AuthCache(reactor.seconds, auth_cache_ttl, auth_cache_size)
        #: The profiles last verified, by address, with their expiry: the stored hash
        #: the cache's entries are checked against, without a pool round trip.
        self._verified: OrderedDict[str, tuple[Profile, float]] = OrderedDict()
        #: Moves on every :meth:`forget`: a check that started before a change
        #: does not cache what it read.
        self._generation = 0
        #: Checks running now, by (address, generation, keyed digest of the password):
        #: the logins waiting for the same outcome (:meth:`verify`).
        self._flights: dict[tuple[str, int, bytes], list[Deferred[Profile]]] = {}

    def _run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.pool, f, *args)

    def close(self) -> None:
        """Close the database (after the pool has stopped)."""
        self._db.close()

    def count(self) -> int:
        """Number of profiles, from memory."""
        return self._count

    def add(self, address: str, password: str, replicas: int = 1) -> Deferred[Profile]:
        """Hash (pool) and insert; ``UserExists`` if taken."""
        address = normalise(address)

        def work() -> Profile:
            return self._db.add(address, self._hash(password), replicas)

        def added(p: Profile) -> Profile:
            self.forget(p.address)  # a user made again after a deluser
            self._count += 1
            return p

        return self._run(work).addCallback(added)

    def get(self, address: str) -> Deferred[Profile | None]:
        """One profile or None."""
        return self._run(self._db.get, address.lower())

    def set_password(self, address: str, password: str) -> Deferred[None]:
        """New hash; ``NoSuchUser`` if absent."""
        address = address.lower()
        self.forget(address)

        def work() -> None:
            self._db.set_hash(address, self._hash(password))

        def done(_: None) -> None:
            self.forget(address)

        return self._run(work).addCallback(done)

    def remove(self, address: str) -> Deferred[None]:
        """Delete; ``NoSuchUser`` if absent."""
        address = address.lower()
        self.forget(address)

        def removed(_: None) -> None:
            self.forget(address)
            self._count -= 1

        return self._run(self._db.remove, address).addCallback(removed)

    def forget(self, address: str) -> None:
        """Drop what is cached about ``address`` (its profile was written or merged)."""
        address = address.lower()
        self._generation += 1
        self._verified.pop(address, None)
        self.auth_cache.forget(address)

    def _verified_profile(self, address: str) -> Profile | None:
        hit = self._verified.get(address)
        if hit is None:
            return None
        if hit[1] <= self.reactor.seconds():
            del self._verified[address]
            return None
        return hit[0]

    def cached(self, address: str, password: str) -> Profile | None:
        """The profile if the auth cache vouches for this password now, else None
        (no pool job, no scrypt; a None is not counted as a miss: :meth:`verify` follows)."""
        address = address.lower()
        known = self._verified_profile(address)
        if known is None or not self.auth_cache.check(
            address, known.password_hash, password, count_miss=False
        ):
            return None
        return known

    def verify(self, address: str, password: str) -> Deferred[Profile]:
        """The profile if the password matches, else ``BadCredentials``.

        A password verified before against the same stored hash, less than the
        cache's TTL ago, is answered from memory (no scrypt, no pool job)."""
        address = address.lower()
        cache = self.auth_cache
        known = self._verified_profile(address)
        if known is not None and cache.check(
            address, known.password_hash, password, count_miss=False
        ):
            return succeed(known)
        generation = self._generation
        flight = None
        if cache.enabled:
            # The same password for the same address already being checked (16
            # connections of one client logging in at once): wait for that check.
            flight = (address, generation, cache.key_of(password))
            waiting = self._flights.get(flight)
            if waiting is not None:
                cache.shared += 1
                joined: Deferred[Profile] = Deferred()
                waiting.append(joined)
                return joined
            self._flights[flight] = []
        cache.miss()
        check = self._check

        def work() -> Profile:
            profile = self._db.get(address)
            # Hash even for unknown users, so timing does not tell who exists.
            stored = profile.password_hash if profile else _DUMMY_HASH
            if not check(password, stored) or profile is None:
                raise BadCredentials("bad user name or password")
            return profile

        def remember(profile: Profile) -> Profile:
            if generation == self._generation and cache.enabled:
                self._verified.pop(address, None)
                self._verified[address] = (profile, self.reactor.seconds() + cache.ttl)
                while len(self._verified) > cache.max_entries:
                    self._verified.popitem(last=False)
                cache.remember(address, profile.password_hash, password)
            return profile

        d = self._run(work).addCallback(remember)
        if flight is not None:
            d.addBoth(self._land, flight)
        return d

    def _land(self, result: Profile | Failure, flight: tuple[str, int, bytes]) -> Any:
        """Give a finished check's outcome to the logins that waited for it."""
        for joined in self._flights.pop(flight, []):
            if isinstance(result, Failure):
                joined.errback(result)
            else:
                joined.callback(result)
        return result

    def users(self) -> Deferred[list[Profile]]:
        """Every profile."""
        return self._run(self._db.select)

    def users_in_bucket(self, bucket: int) -> Deferred[list[Profile]]:
        """Profiles of one bucket."""
        return self._run(self._db.select, "AND bucket=?", (bucket,))

    def record(self, address: str) -> Deferred[Record | None]:
        """The exchange record of ``address`` (tombstones too), or None."""

        def one() -> Record | None:
            got = self._db.records("WHERE address=?", (address.lower(),))
            return got[0] if got else None

        return self._run(one)

    def records_in_bucket(self, bucket: int) -> Deferred[list[Record]]:
        """Every record of one bucket, tombstones included (reconstruction hints)."""
        return self._run(self._db.records, "WHERE bucket=?", (bucket,))

    def records_in_buckets(self, buckets: list[int]) -> Deferred[dict[int, list[Record]]]:
        """:meth:`records_in_bucket` for many buckets in one pool job."""

        def read() -> dict[int, list[Record]]:
            return {b: self._db.records("WHERE bucket=?", (b,)) for b in buckets}

        return self._run(read)

    def merge(self, records: list[Record]) -> Deferred[list[str]]:
        """Apply records newer than ours (newest ``updated`` wins); the addresses changed."""
        checked: list[Record] = []
        for rec in records:
            try:
                a, h, r, c, u, d = rec
                checked.append((normalise(a), str(h), int(r), float(c), float(u), bool(d)))
            except (BadAddress, TypeError, ValueError, AttributeError):
                continue  # a malformed record from a peer is ignored

        def done(result: tuple[list[str], int]) -> list[str]:
            changed, self._count = result
            for address in changed:
                self.forget(address)
            return changed

        return self._run(self._db.merge, checked).addCallback(done)


_DUMMY_HASH = (
    "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
)
