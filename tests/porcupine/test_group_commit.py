"""Group commit of deliveries without the journal (``journal=False``): two barriers per
group, nothing acknowledged before it is durable, no reader sees a row before it is
durable, a lone message goes at once.  The journal way: test_group_journal.py."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from groupcommit_helpers import QueuedPool, reader_blocked
from mailtest_helpers import ImmediateReactor, result_of

from yimaporc.porcupine._durable import FsyncBarrier, SyncfsBarrier, syncfs_available
from yimaporc.porcupine.fragments import FragmentStore, MailboxManager
from yimaporc.porcupine.replication import Timestamp, Update
from yimaporc.porcupine.replication.objects import MessageObject, ReplicaObjectStore, message_id
from yimaporc.porcupine.usermap import bucket_of
from yimaporc.porcupine.values import INBOX, Digest, NewMessage, NoSuchMailbox

T0 = 1_700_000_000.0
USERS = [f"u{i:02d}@example.org" for i in range(12)]


def msg(user: str, body: bytes, box: str = INBOX) -> NewMessage:
    """A new message."""
    return NewMessage(user, box, body, (), T0)


class RecordingBarrier:
    """A barrier that records what was on disk and who could read at each call, and
    can be told to fail; durability itself comes from the wrapped real barrier."""

    def __init__(self, store: Callable[[], FragmentStore], real: Any, covers_rows: bool) -> None:
        self.store = store
        self.real = real
        self.covers_rows = covers_rows
        self.events: list[tuple[str, Any]] = []
        self.fail_files: OSError | None = None
        self.fail_rows: OSError | None = None
        self.on_rows: Callable[[], None] = lambda: None
        self.files_calls = 0
        self.rows_calls = 0
        self.syscalls = 0

    def _committed_rows(self) -> int:
        """Rows a separate connection sees in every bucket database (ignores locks)."""
        n = 0
        for db in (self.store().root / "buckets").glob("*/index.sqlite"):
            with sqlite3.connect(db) as c:
                n += c.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        return n

    def files(self, files: Sequence[Path], dirs: Sequence[Path]) -> None:
        """Record the bodies in place and the rows committed so far."""
        self.files_calls += 1
        self.events.append(("files", (len(files), all(f.exists() for f in files))))
        self.events.append(("rows-before-files-barrier", self._committed_rows()))
        if self.fail_files is not None:
            raise self.fail_files
        self.real.files(files, dirs)
        self.syscalls = self.real.syscalls

    def rows(self) -> None:
        """Record the rows committed and whether another thread could read a bucket."""
        self.rows_calls += 1
        self.events.append(("rows", self._committed_rows()))
        self.on_rows()
        if self.fail_rows is not None:
            raise self.fail_rows
        self.real.rows()
        self.syscalls = self.real.syscalls


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[FragmentStore, RecordingBarrier]:
    """A fragment store whose (real) barrier is recorded."""
    holder: list[FragmentStore] = []
    real = SyncfsBarrier(tmp_path / "mail") if syncfs_available() else FsyncBarrier()
    (tmp_path / "mail").mkdir()
    barrier = RecordingBarrier(lambda: holder[0], real, real.covers_rows)
    holder.append(FragmentStore(tmp_path, "n1", lambda: T0, barrier=barrier, journal=False))
    return holder[0], barrier


@pytest.mark.skipif(not syncfs_available(), reason="syncfs(2) is Linux-only")
def test_syncfs_group_is_two_syscalls_and_no_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group of 24 messages for 12 users in 12 buckets costs two syncfs and not
    one fsync from Python (bodies, directories), whatever its size."""
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    store = FragmentStore(tmp_path, "n1", lambda: T0, journal=False)
    assert isinstance(store.barrier, SyncfsBarrier)
    assert len({bucket_of(u) for u in USERS}) > 1
    got = store.store_group([msg(u, f"m{i}".encode()) for i in range(2) for u in USERS])
    assert all(isinstance(d, Digest) for d in got)
    assert store.barrier.syscalls == 2 and fsyncs == []
    got = store.store_group([msg(USERS[0], b"lone")])
    assert store.barrier.syscalls == 4 and fsyncs == []
    assert store.groups == 2 and store.grouped_messages == 25
    with sqlite3.connect(store.bucket_path(bucket_of(USERS[0])) / "index.sqlite") as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # every connection is back to FULL for the other (non-grouped) writes
    assert all(db.execute("PRAGMA synchronous").fetchone()[0] == 2 for db in store._dbs.values())


def test_fsync_fallback_counts_one_per_body_and_directory(tmp_path: Path) -> None:
    """Without syncfs, a group fsyncs each body and each directory it touched once."""
    barrier = FsyncBarrier()
    store = FragmentStore(tmp_path, "n1", lambda: T0, barrier=barrier, journal=False)
    store.store_group([msg(USERS[0], b"a")])  # creates the user and bucket dirs
    before = barrier.syscalls
    store.store_group([msg(USERS[0], b"b"), msg(USERS[0], b"c")])
    assert barrier.syscalls - before == 2 + 1  # two bodies, one directory
    assert [d.uid for d in store.digests(USERS[0], INBOX)] == [1, 2, 3]


def test_bodies_durable_before_rows_and_rows_before_readers(
    recorded: tuple[FragmentStore, RecordingBarrier],
) -> None:
    """Barrier 1 sees every body in place and no row; barrier 2 comes after the rows
    are committed, while the buckets are still locked against readers."""
    store, barrier = recorded
    blocked: list[bool] = []
    users = USERS[:4]
    barrier.on_rows = lambda: blocked.extend(reader_blocked(store, bucket_of(u)) for u in users)
    store.store_group([msg(u, b"x") for u in users])
    assert barrier.events == [
        ("files", (4, True)),
        ("rows-before-files-barrier", 0),
        ("rows", 4),
    ]
    assert blocked == [True] * 4
    assert all(not reader_blocked(store, bucket_of(u)) for u in users)


def test_failed_body_barrier_stores_nothing(
    recorded: tuple[FragmentStore, RecordingBarrier],
) -> None:
    """An error making the bodies durable fails the group: no row, no body left."""
    store, barrier = recorded
    barrier.fail_files = OSError(5, "EIO")
    with pytest.raises(OSError):
        store.store_group([msg(USERS[0], b"x"), msg(USERS[1], b"y")])
    assert barrier.rows_calls == 0
    assert store.digests(USERS[0], INBOX) == []
    assert list(store.tmp.iterdir()) == []
    assert not any(p.is_file() for p in (store.root / "buckets").rglob("*.m"))


def test_missing_mailbox_fails_its_message_only(
    recorded: tuple[FragmentStore, RecordingBarrier],
) -> None:
    """In one group, a message for a missing mailbox gets its error and its body goes;
    its neighbours are stored."""
    store, _ = recorded
    got = store.store_group([msg(USERS[0], b"ok"), msg(USERS[0], b"no", box="Missing")])
    assert isinstance(got[0], Digest) and isinstance(got[1], NoSuchMailbox)
    assert [p.name for p in store.user_path(USERS[0]).iterdir()] == [got[0].key]


def test_no_acknowledgement_before_durable(
    recorded: tuple[FragmentStore, RecordingBarrier],
) -> None:
    """The store's Deferred (the 250) fires only after barrier 2 has returned."""
    store, barrier = recorded
    pool = QueuedPool()
    manager = MailboxManager(ImmediateReactor(), pool, store)  # type: ignore[arg-type]
    fired: list[object] = []
    d = manager.store([msg(USERS[0], b"x")])
    d.addBoth(lambda r: (fired.append(r), r)[1])
    barrier.on_rows = lambda: barrier.events.append(("acknowledged", len(fired)))
    pool.run_one()
    assert ("acknowledged", 0) in barrier.events
    assert [type(x) for x in result_of(d)] == [Digest]


def test_failed_row_barrier_is_no_acknowledgement(
    recorded: tuple[FragmentStore, RecordingBarrier],
) -> None:
    """An error making the rows durable fails every caller of the group (451)."""
    store, barrier = recorded
    barrier.fail_rows = OSError(5, "EIO")
    pool = QueuedPool()
    manager = MailboxManager(ImmediateReactor(), pool, store)  # type: ignore[arg-type]
    manager._writing = True
    ds = [manager.store([msg(u, b"x")]) for u in USERS[:3]]
    manager._writing = False
    manager._write_batch()
    pool.run_one()
    for d in ds:
        with pytest.raises(OSError):
            result_of(d)


def test_lone_message_goes_at_once_and_followers_form_one_group(
    recorded: tuple[FragmentStore, RecordingBarrier],
) -> None:
    """With no group in flight a store is handed to the pool at once (no timer); stores
    arriving meanwhile wait, then go out together as the next group of two barriers."""
    store, barrier = recorded
    pool = QueuedPool()
    reactor = ImmediateReactor()
    manager = MailboxManager(reactor, pool, store)  # type: ignore[arg-type]
    first = manager.store([msg(USERS[0], b"lone")])
    assert len(pool.queue) == 1 and reactor.getDelayedCalls() == []
    followers = [manager.store([msg(u, b"f")]) for u in USERS[:5]]
    assert len(pool.queue) == 1  # they wait for the leader's group
    pool.run_one()
    assert result_of(first)[0].uid == 1
    assert len(pool.queue) == 1  # the followers' group started as the leader finished
    assert not any(d.called for d in followers)
    pool.run_one()
    assert all(len(result_of(d)) == 1 for d in followers)
    assert barrier.files_calls == 2 and barrier.rows_calls == 2
    assert store.groups == 2 and store.grouped_messages == 6


def test_replica_batch_is_one_group(tmp_path: Path) -> None:
    """A replica applying a batch of new messages for several users commits them as
    one group (two barriers), not one per bucket or per message."""
    barrier = FsyncBarrier()
    fs = FragmentStore(tmp_path, "a", lambda: T0, barrier=barrier, journal=False)
    replica = ReplicaObjectStore(tmp_path / "mail" / "replicas.sqlite", fs)
    updates = [
        Update(
            message_id(u, f"{i:032x}"),
            Timestamp(10 + i, "b"),
            MessageObject(INBOX, f"Subject: {i}\r\n\r\nx\r\n".encode(), uid=1).to_body(),
        )
        for i, u in enumerate(USERS[:6])
    ]
    assert replica.apply_many(updates) == [True] * 6
    assert fs.groups == 1 and fs.grouped_messages == 6
    assert barrier.files_calls == 1 and barrier.rows_calls == 1
    assert all(len(fs.digests(u, INBOX)) == 1 for u in USERS[:6])
