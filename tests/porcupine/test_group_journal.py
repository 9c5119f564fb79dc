"""Group commit through the journal (the default): one fdatasync per group, nothing
acknowledged or readable before it, and recovery redoes what a power loss took."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from groupcommit_helpers import QueuedPool, reader_blocked
from mailtest_helpers import ImmediateReactor, result_of

from yimaporc.porcupine._durable import FsyncBarrier
from yimaporc.porcupine._journal import Entry, Record, decode_all, encode, read_records
from yimaporc.porcupine.fragments import FragmentStore, MailboxManager
from yimaporc.porcupine.replication import Timestamp, Update
from yimaporc.porcupine.replication.objects import MessageObject, ReplicaObjectStore, message_id
from yimaporc.porcupine.usermap import bucket_of
from yimaporc.porcupine.values import INBOX, PENDING, Digest, NewMessage

T0 = 1_700_000_000.0
USERS = [f"u{i:02d}@example.org" for i in range(12)]


def msg(user: str, body: bytes, box: str = INBOX, uid: int = 0) -> NewMessage:
    """A new message."""
    return NewMessage(user, box, body, ("\\Seen",), T0, uid)


def make(path: Path) -> FragmentStore:
    """A store with the journal and an fsync barrier (counted) for checkpoints."""
    return FragmentStore(path, "n1", lambda: T0, barrier=FsyncBarrier())


def listing(store: FragmentStore, user: str) -> list[tuple[int, str, bytes]]:
    """(uid, key, body) of every message of ``user``'s INBOX."""
    ds = store.digests(user, INBOX)
    bodies = store.fetch(user, INBOX, [d.uid for d in ds])
    return [(d.uid, d.key, bodies[d.uid]) for d in ds]


class Syncs:
    """Counts os.fsync / os.fdatasync calls made from Python."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fsync = 0
        self.fdatasync = 0
        real_fsync, real_fdatasync = os.fsync, os.fdatasync

        def fsync(fd: int) -> None:
            self.fsync += 1
            real_fsync(fd)

        def fdatasync(fd: int) -> None:
            self.fdatasync += 1
            real_fdatasync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "fdatasync", fdatasync)


def test_record_round_trip_and_torn_tail() -> None:
    """A record decodes to itself; a torn or corrupt tail ends the journal there."""
    e = Entry(3, "u@x", INBOX, 17, "k.m", 5, "\\Seen", T0, b"body\x00\xff")
    r1, r2 = Record(1, (e,)), Record(2, (e, Entry(4, "v@x", "A/B", 9, "j.m", 0, "", T0, b"")))
    data = encode(r1) + encode(r2)
    assert list(decode_all(data)) == [r1, r2]
    for cut in range(len(encode(r1)), len(data)):
        assert list(decode_all(data[:cut])) == [r1]
    flipped = bytearray(data)
    flipped[-1] ^= 1
    assert list(decode_all(bytes(flipped))) == [r1]


def test_group_is_one_fdatasync_whatever_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 messages for 12 users in several buckets: one fdatasync (the journal), no
    fsync of bodies or directories; a lone message: one more; SQLite back at FULL."""
    store = make(tmp_path)
    syncs = Syncs(monkeypatch)
    assert len({bucket_of(u) for u in USERS}) > 1
    got = store.store_group([msg(u, f"m{i}".encode()) for i in range(2) for u in USERS])
    assert all(isinstance(d, Digest) for d in got)
    assert syncs.fdatasync == 1 and syncs.fsync == 1  # + the new journal file's directory
    store.store_group([msg(USERS[0], b"lone")])
    assert syncs.fdatasync == 2 and syncs.fsync == 1
    assert store.journal is not None and store.journal.appends == 2
    assert all(db.execute("PRAGMA synchronous").fetchone()[0] == 2 for db in store._dbs.values())


def test_append_sees_rows_committed_and_readers_locked_out(tmp_path: Path) -> None:
    """When the journal record is written the rows are committed (not yet durable) and
    their buckets are still locked against every reader; after it, they are free."""
    store = make(tmp_path)
    assert store.journal is not None
    seen: list[Any] = []
    real = store.journal.append

    def append(record: Record) -> None:
        with sqlite3.connect(store.bucket_path(bucket_of(USERS[0])) / "index.sqlite") as c:
            seen.append(c.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        seen.append([reader_blocked(store, bucket_of(u)) for u in USERS[:3]])
        seen.append(sorted((e.user, e.uid, e.body) for e in record.entries))
        real(record)

    store.journal.append = append  # type: ignore[method-assign]
    store.store_group([msg(u, u.encode()) for u in USERS[:3]])
    assert seen[0] == 1 and seen[1] == [True] * 3
    assert seen[2] == sorted((u, 1, u.encode()) for u in USERS[:3])
    assert not any(reader_blocked(store, bucket_of(u)) for u in USERS[:3])


def test_no_acknowledgement_before_the_journal_is_synced(tmp_path: Path) -> None:
    """The store's Deferred (the 250) fires only after the journal append returned."""
    store = make(tmp_path)
    assert store.journal is not None
    pool = QueuedPool()
    manager = MailboxManager(ImmediateReactor(), pool, store)  # type: ignore[arg-type]
    fired: list[object] = []
    order: list[str] = []
    real = store.journal.append

    def append(record: Record) -> None:
        order.append(f"append, acknowledged {len(fired)}")
        real(record)
        order.append("synced")

    store.journal.append = append  # type: ignore[method-assign]
    d = manager.store([msg(USERS[0], b"x")])
    d.addBoth(lambda r: (fired.append(r), order.append("acknowledged"), r)[2])
    pool.run_one()
    assert order == ["append, acknowledged 0", "synced", "acknowledged"]
    assert [type(x) for x in result_of(d)] == [Digest]


def test_failed_journal_sync_acknowledges_nobody(tmp_path: Path) -> None:
    """An error writing or syncing the record fails every caller of the group (451)."""
    store = make(tmp_path)
    assert store.journal is not None

    def broken(record: Record) -> None:
        raise OSError(5, "EIO")

    store.journal.append = broken  # type: ignore[method-assign]
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


def test_lone_message_at_once_followers_one_group(tmp_path: Path) -> None:
    """No group in flight: a store goes to the pool at once (no timer); stores arriving
    meanwhile go out together next, one journal append for the five of them."""
    store = make(tmp_path)
    assert store.journal is not None
    pool = QueuedPool()
    reactor = ImmediateReactor()
    manager = MailboxManager(reactor, pool, store)  # type: ignore[arg-type]
    first = manager.store([msg(USERS[0], b"lone")])
    assert len(pool.queue) == 1 and reactor.getDelayedCalls() == []
    followers = [manager.store([msg(u, b"f")]) for u in USERS[:5]]
    assert len(pool.queue) == 1
    pool.run_one()
    assert result_of(first)[0].uid == 1 and not any(d.called for d in followers)
    pool.run_one()
    assert all(len(result_of(d)) == 1 for d in followers)
    assert store.journal.appends == 2 and store.groups == 2


def power_loss(tmp_path: Path, group: list[NewMessage]) -> tuple[Path, list[Digest | Exception]]:
    """Store ``group`` on a store whose disk is then cut back to what was durable
    before the group plus the journal (the only file the group synced)."""
    live = tmp_path / "live"
    store = make(live)
    store.store_group([msg(USERS[0], b"before")])  # durable: checkpointed below
    store.checkpoint()
    store.close()
    shutil.copytree(live, tmp_path / "disk")  # the disk as it was
    store = make(live)
    got = store.store_group(group)
    store.close()
    shutil.rmtree(tmp_path / "disk" / "mail" / "journal")
    shutil.copytree(live / "mail" / "journal", tmp_path / "disk" / "mail" / "journal")
    return tmp_path / "disk", got


def test_recovery_redoes_rows_and_bodies_lost_with_the_page_cache(tmp_path: Path) -> None:
    """After a power loss that kept only the journal, recovery gives back every
    acknowledged message: same UIDs, same keys, same bodies, pending ones pending;
    the next delivery gets the next UID; the journal is then checkpointed away."""
    group = [msg(USERS[0], b"one"), msg(USERS[1], b"two"), msg(USERS[0], b"three")]
    group.append(msg(USERS[2], b"unnumbered", uid=PENDING))
    disk, got = power_loss(tmp_path, group)
    store = make(disk)
    assert [b for _, _, b in listing(store, USERS[0])] == [b"before"]  # the group is lost
    assert listing(store, USERS[1]) == []
    store.recover()
    assert store.replayed == 4
    assert store.journal is not None and read_records(store.journal.dir) == []
    want = [(d.uid, d.key, m.body) for d, m in zip(got, group) if isinstance(d, Digest)]
    assert listing(store, USERS[0])[1:] == [w for w in want if w[2] in (b"one", b"three")]
    assert listing(store, USERS[1]) == [want[1]]
    assert store.pending(USERS[2]) == 1 and USERS[2] in store.pending_users
    assert store.store([msg(USERS[0], b"after")])[0].uid == 4


def test_recovery_rewrites_a_body_that_is_not_whole(tmp_path: Path) -> None:
    """A row that survived with its body file cut short gets the journal's body back."""
    store = make(tmp_path)
    [d] = store.store([msg(USERS[0], b"x" * 5000)])
    store.close()
    (store.user_path(USERS[0]) / d.key).write_bytes(b"x" * 100)
    store = make(tmp_path)
    store.recover()
    assert listing(store, USERS[0]) == [(1, d.key, b"x" * 5000)]


def test_recovery_does_not_bring_back_what_was_deleted_later(tmp_path: Path) -> None:
    """A message expunged after its group (a durable commit) stays expunged when the
    journal is replayed; its body is not rewritten."""
    store = make(tmp_path)
    [keep, gone] = store.store([msg(USERS[0], b"keep"), msg(USERS[0], b"gone")])
    store.delete(USERS[0], INBOX, [gone.uid])
    store.close()
    store = make(tmp_path)
    store.recover()
    assert store.replayed == 0
    assert listing(store, USERS[0]) == [(keep.uid, keep.key, b"keep")]
    assert not (store.user_path(USERS[0]) / gone.key).exists()


def test_torn_record_is_ignored_at_recovery(tmp_path: Path) -> None:
    """A half-written last record (a crash mid-append, never acknowledged) is skipped."""
    store = make(tmp_path)
    store.store([msg(USERS[0], b"whole")])
    assert store.journal is not None
    store.close()
    [(path, _)] = read_records(store.journal.dir)
    half = encode(Record(99, (Entry(bucket_of(USERS[1]), USERS[1], INBOX, 1, "t.m", 1, "", T0, b"torn"),)))  # fmt: skip
    with path.open("ab") as f:
        f.write(half[: len(half) // 2])
    store = make(tmp_path)
    store.recover()
    assert [b for _, _, b in listing(store, USERS[0])] == [b"whole"]
    assert store.digests(USERS[1], INBOX) == []


def test_checkpoint_syncs_files_then_drops_the_journal(tmp_path: Path) -> None:
    """A checkpoint fsyncs the group's bodies, directories and databases (off the
    callers' path) and deletes the journal files it covered; due by count or age."""
    now = [T0]
    store = FragmentStore(tmp_path, "n1", lambda: now[0], barrier=FsyncBarrier())
    assert store.journal is not None and not store.checkpoint_due()
    store.store_group([msg(u, b"x") for u in USERS[:3]])
    assert not store.checkpoint_due()
    now[0] += store.checkpoint_seconds
    assert store.checkpoint_due()
    before = store.barrier.syscalls
    assert store.checkpoint() == 1
    # 3 bodies, the databases (and their WAL), 3 user dirs, their bucket dirs, buckets/
    assert store.barrier.syscalls - before >= 3 + 3 + 1
    assert read_records(store.journal.dir) == [] and not store.checkpoint_due()
    store.checkpoint_records = 2
    store.store_group([msg(USERS[0], b"y")])
    store.store_group([msg(USERS[0], b"z")])
    assert store.checkpoint_due()


def test_manager_checkpoints_when_due(tmp_path: Path) -> None:
    """The manager starts a checkpoint on the pool after a group once one is due."""
    store = make(tmp_path)
    store.checkpoint_records = 2
    pool = QueuedPool()
    manager = MailboxManager(ImmediateReactor(), pool, store)  # type: ignore[arg-type]
    for body in (b"a", b"b"):
        manager.store([msg(USERS[0], body)])
        pool.run_one()
    assert len(pool.queue) == 1  # the checkpoint
    pool.run_one()
    assert store.checkpoints == 1 and not store.checkpoint_due()


def test_replica_batch_is_one_journal_append(tmp_path: Path) -> None:
    """A replica applying new messages for several users commits them as one group."""
    fs = make(tmp_path)
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
    assert fs.journal is not None and fs.journal.appends == 1 and fs.groups == 1
    assert all(len(fs.digests(u, INBOX)) == 1 for u in USERS[:6])


def test_counters_reach_status_and_metrics(tmp_path: Path) -> None:
    """The store's group-commit counters are exported as Prometheus counters."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import CollectorRegistry

    from yimaporc.admin.metrics import families

    store = make(tmp_path)
    store.store_group([msg(u, b"x") for u in USERS[:5]])
    store.store_group([msg(USERS[0], b"y")])
    store.checkpoint()
    stats = store.commit_stats()
    assert stats == {"groups": 2, "messages": 6, "journal_syncs": 3, "checkpoints": 1}
    doc = {"node_id": "p1", "kind": "porcupine", "epoch": 1, "members": [], "group_commit": stats}

    class One:
        def collect(self) -> Any:
            return families(doc)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(One())  # type: ignore[arg-type]
    got = {
        s.name: s.value
        for f in text_string_to_metric_families(generate_latest(reg).decode())
        for s in f.samples
    }
    assert got["yimaporc_mail_group_commit_groups_total"] == 2
    assert got["yimaporc_mail_group_commit_messages_total"] == 6
    assert got["yimaporc_mail_group_commit_journal_syncs_total"] == 3
    assert got["yimaporc_mail_group_commit_checkpoints_total"] == 1


def test_sequence_goes_on_across_restarts(tmp_path: Path) -> None:
    """After a restart with the journal checkpointed away, the next group's sequence
    number is above every bucket's mark (else a later replay would skip it)."""
    store = make(tmp_path)
    store.store([msg(USERS[0], b"a")])
    store.store([msg(USERS[1], b"b")])
    top = max(store._mark(bucket_of(u)) for u in USERS[:2])
    store.checkpoint()
    store.close()
    store = make(tmp_path)
    store.recover()
    store.store([msg(USERS[0], b"c")])
    assert store.journal is not None
    [(_, [record])] = read_records(store.journal.dir)
    assert record.seq > top and store._mark(bucket_of(USERS[0])) == record.seq


def test_stores_made_by_callers_join_one_next_group(tmp_path: Path) -> None:
    """Sessions that store again as soon as they hear (the next message) form one next
    group: exactly one group is in flight at a time, never one per session."""
    store = make(tmp_path)
    pool = QueuedPool()
    manager = MailboxManager(ImmediateReactor(), pool, store)  # type: ignore[arg-type]
    manager._writing = True
    ds = [manager.store([msg(u, b"1")]) for u in USERS[:4]]
    manager._writing = False
    manager._write_batch()
    for u, d in zip(USERS[:4], ds):
        d.addCallback(lambda _, u=u: manager.store([msg(u, b"2")]))
    pool.run_one()
    assert len(pool.queue) == 1
    pool.run_one()
    assert store.groups == 2 and store.grouped_messages == 8
