"""A node's hard state: user profiles, mailbox indexes and message bodies.

Bodies are files (written to ``tmp``, fsynced, renamed into the user's bucket
directory, directory fsynced) grouped by user-map bucket
(``mail/buckets/NNN/<user>/``), so soft-state reconstruction reads one
directory per fresh bucket.  Profiles and indexes live in SQLite (WAL,
``synchronous=FULL``); a message row is committed only after its body is
durable, so nothing half-stored is ever visible.  Passwords are scrypt hashes.

Every method here blocks: :class:`AsyncMailStore` runs them on a one-thread
pool, off the reactor thread, in order.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from .softstate import bucket_of

N_BUCKETS = 256
INBOX = "INBOX"
T = TypeVar("T")


class StoreError(Exception):
    """A request the store refuses (message is user-facing)."""


class NoSuchUser(StoreError):
    """The address has no profile on this cluster."""


class UserExists(StoreError):
    """The address already has a profile."""


class NoSuchMailbox(StoreError):
    """The mailbox does not exist."""


@attrs.frozen
class MessageRow:
    """One message of a mailbox as the index knows it."""

    uid: int
    path: str
    size: int
    flags: tuple[str, ...]
    internal_date: float


@attrs.frozen
class MailboxInfo:
    """A mailbox's identity and counters."""

    name: str
    uidvalidity: int
    uidnext: int
    subscribed: bool


def normalise(address: str) -> str:
    """Addresses compare case-insensitively."""
    return address.strip().lower()


def hash_password(password: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    """scrypt(password) with a random 16-byte salt: ``(salt, hash)``."""
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return salt, digest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MailStore:
    """Synchronous hard-state store of one node."""

    def __init__(self, root: Path, n_buckets: int = N_BUCKETS) -> None:
        self.root = root
        self.n_buckets = n_buckets
        (root / "mail" / "tmp").mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(root / "mail" / "index.sqlite3", check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS users (
                address TEXT PRIMARY KEY, salt BLOB, hash BLOB, replicas INTEGER, created REAL);
            CREATE TABLE IF NOT EXISTS mailboxes (
                address TEXT, name TEXT, uidvalidity INTEGER, uidnext INTEGER,
                subscribed INTEGER, PRIMARY KEY (address, name));
            CREATE TABLE IF NOT EXISTS messages (
                address TEXT, mailbox TEXT, uid INTEGER, path TEXT, size INTEGER,
                flags TEXT, internaldate REAL, PRIMARY KEY (address, mailbox, uid));
            """
        )
        self.db.commit()
        self._clean_tmp()

    def _clean_tmp(self) -> None:
        for leftover in (self.root / "mail" / "tmp").iterdir():
            leftover.unlink(missing_ok=True)

    # --- profiles -----------------------------------------------------------

    def add_user(self, address: str, password: str, replicas: int = 1) -> None:
        """Create a profile and its INBOX."""
        address = normalise(address)
        salt, digest = hash_password(password)
        try:
            with self.db:
                self.db.execute(
                    "INSERT INTO users VALUES (?, ?, ?, ?, ?)",
                    (address, salt, digest, replicas, time.time()),
                )
                self._create_mailbox(address, INBOX)
        except sqlite3.IntegrityError as e:
            raise UserExists(f"{address} already exists") from e

    def delete_user(self, address: str) -> None:
        """Remove a profile, its mailboxes and its messages."""
        address = normalise(address)
        self._require_user(address)
        paths = [
            r[0] for r in self.db.execute("SELECT path FROM messages WHERE address=?", (address,))
        ]
        with self.db:
            self.db.execute("DELETE FROM users WHERE address=?", (address,))
            self.db.execute("DELETE FROM mailboxes WHERE address=?", (address,))
            self.db.execute("DELETE FROM messages WHERE address=?", (address,))
        for p in paths:
            Path(p).unlink(missing_ok=True)

    def set_password(self, address: str, password: str) -> None:
        """Replace a user's password."""
        address = normalise(address)
        self._require_user(address)
        salt, digest = hash_password(password)
        with self.db:
            self.db.execute(
                "UPDATE users SET salt=?, hash=? WHERE address=?", (salt, digest, address)
            )

    def check_password(self, address: str, password: str) -> bool:
        """True if ``password`` is the user's (constant-time compare)."""
        row = self.db.execute(
            "SELECT salt, hash FROM users WHERE address=?", (normalise(address),)
        ).fetchone()
        if row is None:
            hash_password(password, b"\0" * 16)  # same cost whether or not the user exists
            return False
        return hmac.compare_digest(hash_password(password, row[0])[1], row[1])

    def has_user(self, address: str) -> bool:
        """True if the address has a profile."""
        q = "SELECT 1 FROM users WHERE address=?"
        return self.db.execute(q, (normalise(address),)).fetchone() is not None

    def users(self) -> list[dict[str, Any]]:
        """All profiles (without secrets)."""
        rows = self.db.execute("SELECT address, replicas FROM users ORDER BY address")
        return [{"address": a, "replicas": r} for a, r in rows]

    def _require_user(self, address: str) -> None:
        if not self.has_user(address):
            raise NoSuchUser(f"no such user {address}")

    # --- mailboxes ----------------------------------------------------------

    def _create_mailbox(self, address: str, name: str) -> None:
        self.db.execute(
            "INSERT INTO mailboxes VALUES (?, ?, ?, 1, 1)",
            (address, name, int(time.time()) & 0x7FFFFFFF or 1),
        )

    def mailboxes(self, address: str) -> list[MailboxInfo]:
        """A user's mailboxes."""
        rows = self.db.execute(
            "SELECT name, uidvalidity, uidnext, subscribed FROM mailboxes WHERE address=? "
            "ORDER BY name",
            (normalise(address),),
        )
        return [MailboxInfo(n, v, u, bool(s)) for n, v, u, s in rows]

    def mailbox(self, address: str, name: str) -> MailboxInfo:
        """One mailbox, or :class:`NoSuchMailbox`."""
        name = INBOX if name.upper() == INBOX else name
        row = self.db.execute(
            "SELECT name, uidvalidity, uidnext, subscribed FROM mailboxes "
            "WHERE address=? AND name=?",
            (normalise(address), name),
        ).fetchone()
        if row is None:
            raise NoSuchMailbox(f"no mailbox {name}")
        return MailboxInfo(row[0], row[1], row[2], bool(row[3]))

    def create_mailbox(self, address: str, name: str) -> None:
        """Create a mailbox (error if it exists)."""
        try:
            with self.db:
                self._create_mailbox(normalise(address), name)
        except sqlite3.IntegrityError as e:
            raise StoreError(f"mailbox {name} exists") from e

    def delete_mailbox(self, address: str, name: str) -> None:
        """Delete a mailbox and its messages (not INBOX)."""
        address = normalise(address)
        info = self.mailbox(address, name)
        if info.name == INBOX:
            raise StoreError("INBOX cannot be deleted")
        paths = [
            r[0]
            for r in self.db.execute(
                "SELECT path FROM messages WHERE address=? AND mailbox=?", (address, info.name)
            )
        ]
        with self.db:
            self.db.execute(
                "DELETE FROM mailboxes WHERE address=? AND name=?", (address, info.name)
            )
            self.db.execute(
                "DELETE FROM messages WHERE address=? AND mailbox=?", (address, info.name)
            )
        for p in paths:
            Path(p).unlink(missing_ok=True)

    def rename_mailbox(self, address: str, old: str, new: str) -> None:
        """Rename a mailbox (its messages follow; UIDVALIDITY is kept)."""
        address = normalise(address)
        info = self.mailbox(address, old)
        if info.name == INBOX:
            raise StoreError("renaming INBOX is not supported")
        try:
            with self.db:
                self.db.execute(
                    "UPDATE mailboxes SET name=? WHERE address=? AND name=?",
                    (new, address, info.name),
                )
                self.db.execute(
                    "UPDATE messages SET mailbox=? WHERE address=? AND mailbox=?",
                    (new, address, info.name),
                )
        except sqlite3.IntegrityError as e:
            raise StoreError(f"mailbox {new} exists") from e

    def subscribe(self, address: str, name: str, on: bool) -> None:
        """Set a mailbox's subscription flag."""
        info = self.mailbox(address, name)
        with self.db:
            self.db.execute(
                "UPDATE mailboxes SET subscribed=? WHERE address=? AND name=?",
                (int(on), normalise(address), info.name),
            )

    # --- messages -----------------------------------------------------------

    def _body_dir(self, address: str) -> Path:
        b = bucket_of(address, self.n_buckets)
        return self.root / "mail" / "buckets" / f"{b:03d}" / address

    def _write_body(self, address: str, data: bytes) -> Path:
        tmp = self.root / "mail" / "tmp" / uuid.uuid4().hex
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        final_dir = self._body_dir(address)
        new_dir = not final_dir.exists()
        final_dir.mkdir(parents=True, exist_ok=True)
        final = final_dir / tmp.name
        os.replace(tmp, final)
        _fsync_dir(final_dir)
        if new_dir:
            _fsync_dir(final_dir.parent)
        return final

    def append(
        self,
        address: str,
        mailbox: str,
        data: bytes,
        flags: Iterable[str] = (),
        internal_date: float | None = None,
    ) -> int:
        """Store a message durably; return its UID (strictly ascending per mailbox)."""
        address = normalise(address)
        self._require_user(address)
        info = self.mailbox(address, mailbox)
        path = self._write_body(address, data)
        try:
            with self.db:
                uid = self.db.execute(
                    "SELECT uidnext FROM mailboxes WHERE address=? AND name=?", (address, info.name)
                ).fetchone()[0]
                self.db.execute(
                    "UPDATE mailboxes SET uidnext=? WHERE address=? AND name=?",
                    (uid + 1, address, info.name),
                )
                self.db.execute(
                    "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        address,
                        info.name,
                        uid,
                        str(path),
                        len(data),
                        " ".join(sorted(set(flags))),
                        internal_date if internal_date is not None else time.time(),
                    ),
                )
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return int(uid)

    def messages(self, address: str, mailbox: str) -> list[MessageRow]:
        """The mailbox's messages in UID order."""
        info = self.mailbox(address, mailbox)
        rows = self.db.execute(
            "SELECT uid, path, size, flags, internaldate FROM messages "
            "WHERE address=? AND mailbox=? ORDER BY uid",
            (normalise(address), info.name),
        )
        return [MessageRow(u, p, s, tuple(f.split()) if f else (), d) for u, p, s, f, d in rows]

    def read(self, path: str) -> bytes:
        """A message body."""
        return Path(path).read_bytes()

    def read_many(self, rows: Iterable[MessageRow]) -> dict[int, bytes]:
        """Bodies of several messages by UID (missing files are skipped)."""
        out = {}
        for r in rows:
            try:
                out[r.uid] = Path(r.path).read_bytes()
            except FileNotFoundError:
                continue
        return out

    def set_flags(self, address: str, mailbox: str, changes: dict[int, Iterable[str]]) -> None:
        """Replace the flags of several messages."""
        info = self.mailbox(address, mailbox)
        with self.db:
            for uid, flags in changes.items():
                self.db.execute(
                    "UPDATE messages SET flags=? WHERE address=? AND mailbox=? AND uid=?",
                    (" ".join(sorted(set(flags))), normalise(address), info.name, uid),
                )

    def remove(self, address: str, mailbox: str, uids: Iterable[int]) -> list[int]:
        """Delete messages (EXPUNGE, POP3 DELE+QUIT); return the UIDs removed."""
        info = self.mailbox(address, mailbox)
        address = normalise(address)
        removed, paths = [], []
        with self.db:
            for uid in uids:
                row = self.db.execute(
                    "SELECT path FROM messages WHERE address=? AND mailbox=? AND uid=?",
                    (address, info.name, uid),
                ).fetchone()
                if row is None:
                    continue
                self.db.execute(
                    "DELETE FROM messages WHERE address=? AND mailbox=? AND uid=?",
                    (address, info.name, uid),
                )
                removed.append(uid)
                paths.append(row[0])
        for p in paths:
            Path(p).unlink(missing_ok=True)
        return removed

    def users_with_mail(self, bucket: int) -> list[str]:
        """Users of ``bucket`` with mail on this node (one directory read)."""
        d = self.root / "mail" / "buckets" / f"{bucket:03d}"
        try:
            return sorted(p.name for p in d.iterdir() if any(p.iterdir()))
        except FileNotFoundError:
            return []

    def close(self) -> None:
        """Close the database."""
        self.db.close()


class AsyncMailStore:
    """The store's methods as Deferreds, run in order on one worker thread."""

    def __init__(self, reactor: Any, store: MailStore, pool: ThreadPool | None = None) -> None:
        self.reactor = reactor
        self.store = store
        self.pool = pool or ThreadPool(1, 1, name="mailstore")

    def start(self) -> None:
        """Start the worker thread."""
        self.pool.start()

    def stop(self) -> None:
        """Stop the worker thread and close the store."""
        self.pool.stop()
        self.store.close()

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """``fn(*args, **kwargs)`` on the worker thread."""
        return deferToThreadPool(self.reactor, self.pool, fn, *args, **kwargs)

    def __getattr__(self, name: str) -> Callable[..., Deferred[Any]]:
        method = getattr(self.store, name)
        return lambda *a, **kw: self.run(method, *a, **kw)
