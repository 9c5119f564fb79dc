"""Log stores: the same contract for the in-memory and the SQLite log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from yimaporc.porcupine.replication import (
    ILogStore,
    IObjectStore,
    LogEntry,
    MemoryLog,
    MemoryObjectStore,
    Timestamp,
    Update,
)
from yimaporc.porcupine.replication._values import DropLog, MarkAlive, PersistLog
from yimaporc.porcupine.replication.sqlite_log import SqliteLog


def entry(oid: str, wall: int, body: bytes | None = b"x", node: str = "a") -> LogEntry:
    """A log entry for tests."""
    return LogEntry(
        Update(oid, Timestamp(wall, node), body), node, frozenset("abc"), frozenset("bc")
    )


@pytest.fixture(params=["memory", "sqlite"])
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ILogStore]:
    """Each log store implementation on a fresh state."""
    if request.param == "memory":
        yield MemoryLog()
    else:
        store = SqliteLog(tmp_path / "log.sqlite")
        yield store
        store.close()


def test_provides_interface(log: ILogStore) -> None:
    """Both stores provide ILogStore."""
    assert verifyObject(ILogStore, log)


def test_put_replaces_per_object(log: ILogStore) -> None:
    """At most one entry per object: a put replaces the object's older entry."""
    log.put(entry("m1", 1))
    log.put(entry("m2", 2, None))
    log.put(entry("m1", 3, b"new"))
    got = {e.object_id: e for e in log.load()}
    assert got == {"m1": entry("m1", 3, b"new"), "m2": entry("m2", 2, None)}


def test_drop_only_matching_timestamp(log: ILogStore) -> None:
    """Dropping with a stale timestamp leaves the newer entry in place."""
    log.put(entry("m1", 5))
    log.drop("m1", Timestamp(4, "a"))
    log.drop("m1", Timestamp(5, "b"))
    assert len(log.load()) == 1
    log.drop("m1", Timestamp(5, "a"))
    assert log.load() == []


def test_alive_mark_and_wipe(log: ILogStore) -> None:
    """The alive mark is kept until a wipe, which also empties the log."""
    assert log.last_alive() is None
    log.mark_alive(10)
    log.mark_alive(20)
    assert log.last_alive() == 20
    log.put(entry("m1", 1))
    log.wipe()
    assert log.load() == []
    assert log.last_alive() is None


def test_write_many_is_each_op_in_order(log: ILogStore) -> None:
    """write_many performs puts, drops and alive marks in order, as one call each would."""
    log.write_many(
        [
            PersistLog(entry("m1", 1)),
            PersistLog(entry("m2", 2)),
            DropLog("m1", Timestamp(1, "a")),
            PersistLog(entry("m1", 3)),
            MarkAlive(44),
        ]
    )
    got = sorted((e.object_id, e.timestamp.wallclock) for e in log.load())
    assert got == [("m1", 3), ("m2", 2)] and log.last_alive() == 44


def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    """Entries, bodies, tombstones and the alive mark survive closing and reopening."""
    path = tmp_path / "log.sqlite"
    first = SqliteLog(path)
    entries = [entry(f"m{i}", i, None if i % 3 == 0 else bytes([i]) * i) for i in range(50)]
    for e in entries:
        first.put(e)
    first.drop("m7", Timestamp(7, "a"))
    first.mark_alive(123_456)
    first.close()
    second = SqliteLog(path)
    try:
        got = sorted(second.load(), key=lambda e: e.timestamp)
        assert got == [e for e in entries if e.object_id != "m7"]
        assert second.last_alive() == 123_456
        assert len(second) == 49
    finally:
        second.close()


def test_sqlite_is_wal_and_full_sync(tmp_path: Path) -> None:
    """The SQLite log runs in WAL mode with synchronous=FULL."""
    log = SqliteLog(tmp_path / "log.sqlite")
    try:
        assert log._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert log._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        log.close()


def test_memory_object_store_newest_wins() -> None:
    """The in-memory store applies only newer updates and purges old tombstones."""
    store = MemoryObjectStore()
    assert verifyObject(IObjectStore, store)
    assert store.apply(Update("o", Timestamp(2, "a"), b"v2"))
    assert not store.apply(Update("o", Timestamp(1, "z"), b"v1"))
    assert not store.apply(Update("o", Timestamp(2, "a"), b"v2"))
    assert store.apply(Update("o", Timestamp(3, "a"), None))
    assert store.version("o") == Timestamp(3, "a")
    assert store.get("o") is None
    assert store.purge_tombstones(3) == 0
    assert store.purge_tombstones(4) == 1
    assert store.version("o") is None


def test_memory_object_store_apply_many_is_apply_in_order() -> None:
    """apply_many answers as apply would, one by one in order (newest wins within it)."""
    store = MemoryObjectStore()
    ups = [
        Update("o", Timestamp(2, "a"), b"v2"),
        Update("o", Timestamp(1, "z"), b"v1"),
        Update("p", Timestamp(1, "a"), b"p"),
        Update("o", Timestamp(3, "a"), b"v3"),
    ]
    assert store.apply_many(ups) == [True, False, True, True]
    assert (store.get("o"), store.applied, store.discarded) == (b"v3", 3, 1)


def test_core_recovers_from_reopened_sqlite_log(tmp_path: Path) -> None:
    """A coordinator's entry written through SQLite is pushed again after a restart."""
    import random

    from yimaporc.porcupine.replication import (
        PersistLog,
        ReplicationConfig,
        ReplicationManager,
        SendMessage,
    )

    path = tmp_path / "log.sqlite"
    log = SqliteLog(path)
    core = ReplicationManager("a", random.Random(1), ReplicationConfig())
    _, actions = core.submit("msg/alice/1", b"body", ["a", "b"], 1_700_000_000.0)
    for action in actions:
        if isinstance(action, PersistLog):
            log.put(action.entry)
    log.mark_alive(1_700_000_000_000_000)
    log.close()  # the process dies before hearing any ack

    log = SqliteLog(path)
    try:
        core, actions = ReplicationManager.recover(
            "a", log.load(), log.last_alive(), 1_700_000_060.0, random.Random(2)
        )
        pushes = [a for a in actions if isinstance(a, SendMessage)]
        assert [p.to for p in pushes] == ["b"]
        assert pushes[0].message.update.body == b"body"  # type: ignore[union-attr]
    finally:
        log.close()
