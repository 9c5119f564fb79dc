"""ProfileDB for the cluster: tombstones, newest-wins merge, old databases upgraded."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mailtest_helpers import ImmediateReactor, SyncPool, fast_hash, result_of

from yimaporc.porcupine.profiledb import ProfileDB, newer


def open_db(path: Path, clock: ImmediateReactor) -> ProfileDB:
    return ProfileDB(clock, SyncPool(), path, clock.seconds, hasher=fast_hash)  # type: ignore[arg-type]


def test_merge_newest_wins_and_tombstones_do_not_resurrect(tmp_path: Path) -> None:
    """Records from another node apply only if newer; a deletion is a newer record."""
    clock = ImmediateReactor()
    a, b = open_db(tmp_path / "a.sqlite", clock), open_db(tmp_path / "b.sqlite", clock)
    clock.advance(10)
    result_of(a.add("x@example.org", "one"))
    rec = result_of(a.record("x@example.org"))
    assert result_of(b.merge([rec])) == ["x@example.org"] and b.count() == 1
    assert result_of(b.merge([rec])) == [], "the same record again changes nothing"
    clock.advance(1)
    result_of(b.set_password("x@example.org", "two"))
    assert result_of(a.merge([result_of(b.record("x@example.org"))])) == ["x@example.org"]
    assert result_of(a.verify("x@example.org", "two")).address == "x@example.org"
    assert result_of(b.merge([rec])) == [], "an older record loses"
    clock.advance(1)
    result_of(a.remove("x@example.org"))
    tomb = result_of(a.record("x@example.org"))
    assert tomb[5] and newer(tomb, rec)
    result_of(b.merge([tomb]))
    assert b.count() == 0 and result_of(b.get("x@example.org")) is None
    assert result_of(b.merge([rec])) == [], "a stale copy does not bring it back"
    clock.advance(1)
    result_of(b.add("x@example.org", "three"))  # re-created after the tombstone
    assert result_of(a.merge([result_of(b.record("x@example.org"))])) == ["x@example.org"]
    assert a.count() == 1 and result_of(a.users_in_bucket(0)) is not None
    junk = [
        ("not an address", "", 1, 0.0, 99.0, False),
        ("x",),
        5,
        ("y@example.org", "h", "z", 0, 0, 0),
    ]
    assert result_of(b.merge(junk)) == []  # type: ignore[arg-type]


def test_database_from_before_the_cluster_is_upgraded(tmp_path: Path) -> None:
    """A profiles.sqlite without updated/deleted columns opens, keeps its users."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE profiles (address TEXT PRIMARY KEY, bucket INTEGER NOT NULL, "
        "password_hash TEXT NOT NULL, replicas INTEGER NOT NULL, created REAL NOT NULL);"
    )
    db.execute(
        "INSERT INTO profiles VALUES (?, 0, ?, 1, 5.0)", ("old@example.org", fast_hash("pw"))
    )
    db.commit()
    db.close()
    clock = ImmediateReactor()
    p = open_db(path, clock)
    assert p.count() == 1
    assert result_of(p.verify("old@example.org", "pw")).created == 5.0
    assert result_of(p.record("old@example.org")) == (
        "old@example.org", result_of(p.get("old@example.org")).password_hash, 1, 5.0, 5.0, False,
    )  # fmt: skip
