"""The user profile database (hard state): SQLite in WAL mode, scrypt hashes.

``DATA_DIR/mail/profiles.sqlite`` holds one row per user with its user-map
bucket, so soft-state reconstruction can read the profiles of one fresh
bucket.  Passwords are stored as ``scrypt$n$r$p$salt$hash`` (hashlib.scrypt,
16-byte random salt).  Hashing runs on the thread pool; a verified password is
remembered for a while as an HMAC under a per-process random key (an auth
cache, as Dovecot keeps), so that a client logging in again does not cost
another scrypt; ``set_password`` and ``remove`` drop the entry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .interfaces import IProfileDB
from .usermap import bucket_of, normalise
from .values import BadCredentials, NoSuchUser, Profile, UserExists

T = TypeVar("T")

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    address TEXT PRIMARY KEY, bucket INTEGER NOT NULL, password_hash TEXT NOT NULL,
    replicas INTEGER NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS profiles_bucket ON profiles (bucket);
"""


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
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self.now = now
        self.lock = threading.Lock()

    def count(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT COUNT(*) FROM profiles").fetchone()[0])

    def add(self, address: str, password_hash: str, replicas: int) -> Profile:
        profile = Profile(address, password_hash, replicas, self.now())
        with self.lock:
            try:
                self.db.execute(
                    "INSERT INTO profiles(address, bucket, password_hash, replicas, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (address, bucket_of(address), password_hash, replicas, profile.created),
                )
            except sqlite3.IntegrityError:
                raise UserExists(f"user {address} already exists") from None
        return profile

    def get(self, address: str) -> Profile | None:
        with self.lock:
            row = self.db.execute(
                "SELECT address, password_hash, replicas, created FROM profiles WHERE address=?",
                (address,),
            ).fetchone()
        return Profile(*row) if row else None

    def set_hash(self, address: str, password_hash: str) -> None:
        with self.lock:
            cur = self.db.execute(
                "UPDATE profiles SET password_hash=? WHERE address=?", (password_hash, address)
            )
        if cur.rowcount == 0:
            raise NoSuchUser(f"no user {address}")

    def remove(self, address: str) -> None:
        with self.lock:
            cur = self.db.execute("DELETE FROM profiles WHERE address=?", (address,))
        if cur.rowcount == 0:
            raise NoSuchUser(f"no user {address}")

    def select(self, where: str = "", args: tuple[Any, ...] = ()) -> list[Profile]:
        with self.lock:
            rows = self.db.execute(
                "SELECT address, password_hash, replicas, created FROM profiles "
                f"{where} ORDER BY address",
                args,
            ).fetchall()
        return [Profile(*r) for r in rows]

    def close(self) -> None:
        with self.lock:
            self.db.close()


@implementer(IProfileDB)
class ProfileDB:
    """:class:`IProfileDB` over ``profiles.sqlite``, off the reactor thread."""

    def __init__(
        self,
        reactor: Any,
        threadpool: ThreadPool,
        path: Path,
        now: Callable[[], float],
        hasher: Callable[[str], str] = hash_password,
        cache_seconds: float = 600.0,
    ) -> None:
        self.reactor = reactor
        self.pool = threadpool
        self._db = _Profiles(path, now)
        self._count = self._db.count()
        self._hash = hasher
        self._cache_key = os.urandom(32)
        self._cache: dict[str, tuple[bytes, float]] = {}
        self._cache_seconds = cache_seconds

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
            self._count += 1
            return p

        return self._run(work).addCallback(added)

    def get(self, address: str) -> Deferred[Profile | None]:
        """One profile or None."""
        return self._run(self._db.get, address.lower())

    def set_password(self, address: str, password: str) -> Deferred[None]:
        """New hash; ``NoSuchUser`` if absent."""
        address = address.lower()
        self._cache.pop(address, None)

        def work() -> None:
            self._db.set_hash(address, self._hash(password))

        def done(_: None) -> None:
            self._cache.pop(address, None)

        return self._run(work).addCallback(done)

    def remove(self, address: str) -> Deferred[None]:
        """Delete; ``NoSuchUser`` if absent."""
        address = address.lower()
        self._cache.pop(address, None)

        def removed(_: None) -> None:
            self._count -= 1

        return self._run(self._db.remove, address).addCallback(removed)

    def _mac(self, password: str) -> bytes:
        return hmac.new(self._cache_key, password.encode("utf-8"), hashlib.sha256).digest()

    def verify(self, address: str, password: str) -> Deferred[Profile]:
        """The profile if the password matches, else ``BadCredentials``."""
        address = address.lower()
        cached = self._cache.get(address)
        now = self.reactor.seconds()
        if (
            cached is not None
            and cached[1] > now
            and hmac.compare_digest(cached[0], self._mac(password))
        ):
            return self.get(address).addCallback(self._still_there)

        def work() -> Profile:
            profile = self._db.get(address)
            # Hash even for unknown users, so timing does not tell who exists.
            stored = profile.password_hash if profile else _DUMMY_HASH
            if not check_password(password, stored) or profile is None:
                raise BadCredentials("bad user name or password")
            return profile

        def remember(profile: Profile) -> Profile:
            self._cache[address] = (self._mac(password), now + self._cache_seconds)
            return profile

        return self._run(work).addCallback(remember)

    @staticmethod
    def _still_there(profile: Profile | None) -> Profile:
        if profile is None:
            raise BadCredentials("bad user name or password")
        return profile

    def users(self) -> Deferred[list[Profile]]:
        """Every profile."""
        return self._run(self._db.select)

    def users_in_bucket(self, bucket: int) -> Deferred[list[Profile]]:
        """Profiles of one bucket."""
        return self._run(self._db.select, "WHERE bucket=?", (bucket,))


_DUMMY_HASH = (
    "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
)
