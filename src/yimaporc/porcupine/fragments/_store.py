"""The group commit, its journal and recovery: :class:`FragmentStore`, the top
floor (see the package's docstring for the protocol and why it is durable)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from .._durable import Barrier, default_barrier
from .._journal import Entry, Journal, Record, decode_all, read_records
from .._sqlite import rollback
from ..usermap import bucket_of
from ..values import (
    Digest,
    NewMessage,
    NoSuchMailbox,
)
from ._buckets import BODY_SUFFIX, mailbox_name, write_file
from ._numbering import Numbering


class FragmentStore(Numbering):
    """The blocking half: call only from a worker thread (it is thread-safe)."""

    def __init__(
        self,
        data_dir: Path,
        node_id: str,
        now: Callable[[], float],
        barrier: Barrier | None = None,
        journal: bool = True,
    ) -> None:
        super().__init__(data_dir, node_id, now)
        #: How group commits make bodies and rows durable (:mod:`.._durable`):
        #: one syncfs per barrier where the platform has it, else fsyncs.
        self.barrier: Barrier = barrier or default_barrier(
            self.root, self.tmp, self.root / "buckets"
        )
        #: The group-commit journal (:mod:`.._journal`): one fdatasync per group;
        #: None: the barrier's way (an fsync per file, or syncfs).
        self.journal: Journal | None = Journal(self.root / "journal") if journal else None
        self._seq: int | None = None
        self._seq_lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._last_checkpoint = now()
        #: A checkpoint is due after this many records, bytes or seconds.
        self.checkpoint_records = 1024
        self.checkpoint_bytes = 32 << 20
        self.checkpoint_seconds = 2.0
        #: Group commits made, messages in them, checkpoints (``/metrics``, tests).
        self.groups = 0
        self.grouped_messages = 0
        self.checkpoints = 0
        #: Rows redone from the journal by the last :meth:`recover`.
        self.replayed = 0

    def close(self) -> None:
        """Close the journal, every index database and the marks database."""
        if self.journal is not None:
            self.journal.close()
        super().close()

    # --- start-up ----------------------------------------------------------

    def recover(self) -> int:
        """Redo what the journal has and a crash lost (rows, bodies), then remove
        what a crash left half-stored (tmp files, bodies with no row), then
        checkpoint the journal.  Returns the files removed."""
        removed = 0
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)
            removed += 1
        self.replayed = self._replay()
        for bucket in self._existing_buckets():
            with self._lock_for(bucket):
                self.pending_users.update(
                    u for (u,) in self._db(bucket).execute("SELECT DISTINCT user FROM pending")
                )
        for bucket in self._existing_buckets():
            with self._lock_for(bucket):
                db = self._db(bucket)
                for udir in self.bucket_path(bucket).iterdir():
                    if not udir.is_dir():
                        continue
                    keys = {
                        k
                        for (k,) in db.execute(
                            "SELECT key FROM messages WHERE user=? "
                            "UNION SELECT key FROM pending WHERE user=? "
                            # a replica's held copy (waiting for its UID) is a body too
                            "UNION SELECT key FROM held WHERE user=?",
                            (udir.name, udir.name, udir.name),
                        )
                    }
                    for body in udir.iterdir():
                        if body.name.endswith(BODY_SUFFIX) and body.name not in keys:
                            body.unlink(missing_ok=True)
                            removed += 1
        self.checkpoint()
        return removed

    # --- stores: group commits ---------------------------------------------

    def store_group(self, messages: Sequence[NewMessage]) -> list[Digest | Exception]:
        """Write every body (no fsync each) and :meth:`commit_group` them: the
        whole store of a group in one worker-thread call.  Each message gets its
        Digest or its own error in its place."""
        out: list[Digest | Exception | None] = [None] * len(messages)
        written: list[tuple[int, str]] = []
        try:
            for i, m in enumerate(messages):
                try:
                    written.append((i, self.write_body(m.body, sync=False)))
                except OSError as e:  # e.g. disk full: this message fails, not its group
                    out[i] = e
            results = self.commit_group([(messages[i], key) for i, key in written])
        except BaseException:
            self.discard(key for _, key in written)
            raise
        for (i, _), got in zip(written, results):
            out[i] = got
        return [g if g is not None else RuntimeError("not stored") for g in out]

    def store(self, messages: Sequence[NewMessage]) -> list[Digest]:
        """:meth:`store_group` in this thread; the first error is raised."""
        out: list[Digest] = []
        for got in self.store_group(messages):
            if not isinstance(got, Digest):
                raise got
            out.append(got)
        return out

    def commit_bucket(
        self, bucket: int, items: Sequence[tuple[NewMessage, str]]
    ) -> list[Digest | NoSuchMailbox]:
        """:meth:`commit_group` for messages of one bucket; an error other than a
        missing mailbox is raised (nothing of the bucket is then stored)."""
        for m, _ in items:
            if bucket_of(m.user) != bucket:
                self.discard(key for _, key in items)
                raise ValueError(f"{m.user} is not in bucket {bucket}")
        out: list[Digest | NoSuchMailbox] = []
        for got in self.commit_group(items):
            if not isinstance(got, (Digest, NoSuchMailbox)):
                raise got
            out.append(got)
        return out

    def commit_group(self, items: Sequence[tuple[NewMessage, str]]) -> list[Digest | Exception]:
        """Phase 2 of a group commit: make bodies written to ``tmp`` (fsynced or
        not) visible and durable, any number of users and buckets at once.

        1. rename every body into its user's directory (no fsync);
        2. take the buckets' locks (ascending: no deadlock between two groups),
           commit each bucket's rows in one transaction, without SQLite's fsync;
        3. append one record of the group (its rows as committed, its bodies) to
           the :attr:`journal` and fdatasync it: the group is durable;
        4. release the locks, so no reader of this node sees a row before it is
           durable, and return (the callers' 250).

        One fdatasync per group, whatever its size and its number of users and
        buckets.  Without a journal (``journal=False``) the :attr:`barrier` is
        used instead: bodies and directories made durable before the rows are
        committed, then the commits (an fsync per file and SQLite FULL, or two
        syncfs).  The result has, in each message's place, its Digest or its own
        error: a missing mailbox fails that message only, a failed bucket
        transaction that bucket's messages only; bodies of messages not
        committed are removed again.  An error before any commit is raised, with
        every body removed.
        """
        self.groups += 1
        self.grouped_messages += len(items)
        out: list[Digest | Exception | None] = [None] * len(items)
        by_bucket: dict[int, list[int]] = {}
        for i, (m, _) in enumerate(items):
            by_bucket.setdefault(bucket_of(m.user), []).append(i)
        placed: list[Path | None] = [None] * len(items)
        try:
            dirs: dict[Path, None] = {}
            for i, (m, key) in enumerate(items):
                udir = self.user_path(m.user)
                if udir not in dirs:
                    if not udir.is_dir():
                        udir.mkdir(parents=True, exist_ok=True)
                        # new entries in the bucket dir (and buckets/) to make durable
                        dirs[udir.parent] = None
                        dirs[udir.parent.parent] = None
                    dirs[udir] = None
                os.rename(self.tmp / key, udir / key)
                placed[i] = udir / key
            if self.journal is None:
                self.barrier.files([p for p in placed if p is not None], list(dirs))
        except BaseException:
            for path in placed:
                if path is not None:
                    path.unlink(missing_ok=True)
            self.discard(key for _, key in items)
            raise
        committed: list[int] = []
        entries: list[Entry] = []
        relaxed = self.journal is not None or self.barrier.covers_rows
        if self.journal is not None:
            self._ensure_seq()
        with contextlib.ExitStack() as locks:
            for bucket in sorted(by_bucket):
                locks.enter_context(self._lock_for(bucket))
            seq = self._next_seq() if self.journal is not None else 0
            for bucket in sorted(by_bucket):
                idx = by_bucket[bucket]
                got: list[Digest | Exception]
                try:
                    got = self._commit_rows(bucket, [items[i] for i in idx], relaxed, seq, entries)
                except Exception as e:  # this bucket only: the others go on
                    got = [e] * len(idx)
                for i, g in zip(idx, got):
                    out[i] = g
                    if isinstance(g, Digest):
                        committed.append(i)
            if committed:
                try:
                    if self.journal is not None:
                        self.journal.append(Record(seq, tuple(entries)))
                    else:
                        self.barrier.rows()
                except Exception as e:
                    # Committed but not known durable: no 250 for them (451, the
                    # sender retries); the rows stay, and so do their bodies.
                    for i in committed:
                        out[i] = e
        done = set(committed)
        for i, result in enumerate(out):
            path = placed[i]
            if not isinstance(result, Digest) and i not in done and path is not None:
                path.unlink(missing_ok=True)
        return [g if g is not None else RuntimeError("not committed") for g in out]

    def _commit_rows(
        self,
        bucket: int,
        items: Sequence[tuple[NewMessage, str]],
        relaxed: bool,
        seq: int,
        entries: list[Entry],
    ) -> list[Digest | Exception]:
        """One transaction of ``bucket``'s rows (the caller holds its lock); when
        ``relaxed``, without SQLite's own fsync (``synchronous=NORMAL``): the
        journal record or the barrier makes it durable.  With a journal, the
        bucket's journal mark is set to ``seq`` in the same transaction and the
        committed rows are added to ``entries``."""
        db = self._db(bucket)
        if relaxed:
            db.execute("PRAGMA synchronous=NORMAL")
        try:
            out: list[Digest | Exception] = []
            mine: list[Entry] = []
            db.execute("BEGIN IMMEDIATE")
            try:
                for m, key in items:
                    try:
                        d = self._insert_message(db, m, key)
                    except NoSuchMailbox as e:  # this one only: its neighbours go on
                        out.append(e)
                        continue
                    out.append(d)
                    if self.journal is not None:
                        name = mailbox_name(m.mailbox)
                        (validity,) = db.execute(
                            "SELECT uidvalidity FROM mailboxes WHERE user=? AND name=?",
                            (m.user, name),
                        ).fetchone()
                        mine.append(
                            Entry(bucket, m.user, name, int(validity), key, d.uid,
                                  " ".join(d.flags), d.internal_date, m.body)
                        )  # fmt: skip
                if self.journal is not None:
                    db.execute(
                        "INSERT INTO journal_mark(id, seq) VALUES (0, ?) "
                        "ON CONFLICT(id) DO UPDATE SET seq=excluded.seq",
                        (seq,),
                    )
                db.execute("COMMIT")
            except BaseException:
                rollback(db)
                raise
            entries.extend(mine)
            return out
        finally:
            if relaxed:
                db.execute("PRAGMA synchronous=FULL")

    # --- the journal: sequence, checkpoints, recovery -----------------------

    def _mark(self, bucket: int) -> int:
        """The journal sequence number of the last group committed to ``bucket``."""
        row = self._db(bucket).execute("SELECT seq FROM journal_mark WHERE id=0").fetchone()
        return int(row[0]) if row else 0

    def _ensure_seq(self) -> None:
        """Start the group sequence above every mark and every journal record (once;
        call holding no bucket lock: this takes each in turn)."""
        if self._seq is not None:
            return
        top = 0
        for bucket in self._existing_buckets():
            with self._lock_for(bucket):
                top = max(top, self._mark(bucket))
        if self.journal is not None:
            for _, records in read_records(self.journal.dir):
                top = max([top, *(r.seq for r in records)])
        with self._seq_lock:
            if self._seq is None:
                self._seq = top

    def _next_seq(self) -> int:
        """The next group sequence number (after :meth:`_ensure_seq`)."""
        with self._seq_lock:
            assert self._seq is not None
            self._seq += 1
            return self._seq

    def commit_stats(self) -> dict[str, int]:
        """Counters of the group commits (``/api/status`` ``group_commit``, ``/metrics``):
        groups, messages in them, journal syncs (fdatasync + new-file directory fsync),
        checkpoints."""
        j = self.journal
        return {
            "groups": self.groups,
            "messages": self.grouped_messages,
            "journal_syncs": j.syncs if j is not None else 0,
            "checkpoints": self.checkpoints,
        }

    def checkpoint_due(self) -> bool:
        """Has the journal grown enough (or aged) for a :meth:`checkpoint`?"""
        j = self.journal
        if j is None or j.records == 0:
            return False
        return (
            j.records >= self.checkpoint_records
            or j.size >= self.checkpoint_bytes
            or self.now() - self._last_checkpoint >= self.checkpoint_seconds
        )

    def checkpoint(self) -> int:
        """Make what the journal's closed files cover durable in place (bodies,
        directories, databases: one :attr:`barrier`), then delete those files.
        Returns the records covered.  Off any caller's path; one at a time."""
        if self.journal is None:
            return 0
        with self._checkpoint_lock:
            self._last_checkpoint = self.now()
            closed = self.journal.rotate()
            files: dict[Path, None] = {}
            dirs: dict[Path, None] = {}
            n = 0
            for _, records in [(p, list(decode_all(p.read_bytes()))) for p in closed]:
                for record in records:
                    n += 1
                    for e in record.entries:
                        udir = self.user_path(e.user)
                        if (udir / e.key).exists():
                            files[udir / e.key] = None
                        dirs[udir] = None
                        dirs[udir.parent] = None
                        for suffix in ("", "-wal"):
                            db = self.bucket_path(e.bucket) / ("index.sqlite" + suffix)
                            if db.exists():
                                files[db] = None
            dirs[self.root / "buckets"] = None
            existing = [d for d in dirs if d.is_dir()]
            if closed:
                self.barrier.files(list(files), existing)
                for p in closed:
                    p.unlink(missing_ok=True)
                self.checkpoints += 1
            return n

    def _replay(self) -> int:
        """Redo what a crash lost of the journal's groups (recovery): the rows of a
        bucket whose mark is below a record's sequence number, then every body
        a row names that is missing or not whole.  Returns the rows redone."""
        if self.journal is None:
            return 0
        redone = 0
        for _, records in read_records(self.journal.dir):
            for record in records:
                by_bucket: dict[int, list[Entry]] = {}
                for e in record.entries:
                    by_bucket.setdefault(e.bucket, []).append(e)
                for bucket, entries in by_bucket.items():
                    with self._lock_for(bucket):
                        db = self._db(bucket)
                        if self._mark(bucket) >= record.seq:
                            continue
                        db.execute("BEGIN IMMEDIATE")
                        try:
                            for e in entries:
                                redone += self._redo_row(db, e)
                            db.execute(
                                "INSERT INTO journal_mark(id, seq) VALUES (0, ?) "
                                "ON CONFLICT(id) DO UPDATE SET seq=excluded.seq",
                                (record.seq,),
                            )
                            db.execute("COMMIT")
                        except BaseException:
                            rollback(db)
                            raise
                for e in record.entries:
                    self._redo_body(e)
        return redone

    def _redo_row(self, db: sqlite3.Connection, e: Entry) -> int:
        if self._same_key(db, e.user, e.mailbox, e.key) is not None:
            return 0
        if not self._has(db, e.user, e.mailbox):
            db.execute(
                "INSERT INTO users(user, last_uidvalidity) VALUES (?, ?) ON CONFLICT(user) "
                "DO UPDATE SET last_uidvalidity=MAX(last_uidvalidity, excluded.last_uidvalidity)",
                (e.user, e.uidvalidity),
            )
            db.execute(
                "INSERT INTO mailboxes(user, name, uidvalidity, uidnext) VALUES (?, ?, ?, 1)",
                (e.user, e.mailbox, e.uidvalidity),
            )
        if e.uid == 0:
            db.execute(
                "INSERT INTO pending(user, mailbox, key, size, flags, internal_date) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (e.user, e.mailbox, e.key, len(e.body), e.flags, e.internal_date),
            )
            self.pending_users.add(e.user)
        else:
            db.execute(
                "INSERT INTO messages(user, mailbox, uid, key, size, flags, internal_date) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (e.user, e.mailbox, e.uid, e.key, len(e.body), e.flags, e.internal_date),
            )
            db.execute(
                "UPDATE mailboxes SET uidnext=MAX(uidnext, ?) WHERE user=? AND name=?",
                (e.uid + 1, e.user, e.mailbox),
            )
        return 1

    def _redo_body(self, e: Entry) -> None:
        """Rewrite ``e``'s body file if a row names it and it is missing or not whole."""
        bucket = e.bucket
        with self._lock_for(bucket):
            named = (
                self._db(bucket)
                .execute(
                    "SELECT 1 FROM messages WHERE user=? AND key=? "
                    "UNION SELECT 1 FROM pending WHERE user=? AND key=? "
                    "UNION SELECT 1 FROM held WHERE user=? AND key=?",
                    (e.user, e.key, e.user, e.key, e.user, e.key),
                )
                .fetchone()
            )
            path = self.user_path(e.user) / e.key
            if named is None:
                return
            try:
                if path.read_bytes() == e.body:
                    return
            except FileNotFoundError:
                pass
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(self.tmp / e.key, e.body, sync=False)
            os.rename(self.tmp / e.key, path)
