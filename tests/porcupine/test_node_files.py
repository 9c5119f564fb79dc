"""Private files and --user: SQLite files 0600, option checks, readability for the run-as user."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.python import usage

from yimaporc._files import private_dir, private_sqlite
from yimaporc.tap.porcupine import Options
from yimaporc.tap.privileges import Account, lookup_account, unreadable_for


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_private_sqlite_makes_database_and_wal_0600(tmp_path: Path) -> None:
    """A database prepared by private_sqlite, and the -wal/-shm SQLite adds, are 0600."""
    old = os.umask(0o022)
    try:
        db = private_sqlite(tmp_path / "sub" / "x.sqlite")
        conn = sqlite3.connect(db)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
        files = sorted(tmp_path.joinpath("sub").iterdir())
        assert {f.name for f in files} >= {"x.sqlite", "x.sqlite-wal", "x.sqlite-shm"}
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
        assert mode(tmp_path / "sub") == 0o700
        conn.close()
    finally:
        os.umask(old)


def test_private_sqlite_and_dir_tighten_existing_files(tmp_path: Path) -> None:
    """Files and directories an older version left 0644/0755 are tightened on open."""
    d = tmp_path / "d"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    for name in ("p.sqlite", "p.sqlite-wal"):
        (d / name).write_bytes(b"")
        (d / name).chmod(0o644)
    private_sqlite(d / "p.sqlite")
    assert mode(d) == 0o700 and mode(d / "p.sqlite") == mode(d / "p.sqlite-wal") == 0o600
    private_dir(d)
    assert mode(d) == 0o700


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory under /tmp whose ancestors everyone may enter (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="yimaporc-modes-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_unreadable_for_follows_owner_group_and_other_bits(open_tmp: Path) -> None:
    """A directory closed to others, or below one, is unreadable for another uid, not its owner."""
    tmp_path = open_tmp
    me = os.geteuid()
    stranger = Account("stranger", me + 12345, os.getegid() + 12345, "g")
    owner = Account("owner", me, os.getegid(), "g")
    closed, opened = tmp_path / "closed", tmp_path / "closed" / "opened"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    opened.mkdir(mode=0o755)
    opened.chmod(0o755)
    assert unreadable_for(owner, [closed, opened]) == []
    assert unreadable_for(stranger, [closed, opened]) == [str(closed), str(opened)]
    closed.chmod(0o711)  # enter, not list
    assert unreadable_for(stranger, [closed, opened]) == [str(closed)]
    assert unreadable_for(owner, [closed / "missing"]) == [str(closed / "missing")]


BASE = ["--node-id", "n", "--cluster", "tcp:7946:interface=127.0.105.9", "--domain", "example.org"]


def parse(tmp_path: Path, *extra: str) -> Options:
    o = Options()
    o.parseOptions([*BASE, "--data-dir", str(tmp_path), *extra])
    return o


def test_user_and_group_options_fail_fast(tmp_path: Path) -> None:
    """--group without --user, unknown users and groups, bad --auth-throttle: UsageError."""
    for extra in (
        ["--group", "nogroup"],
        ["--user", "no-such-user-here"],
        ["--user", "root", "--group", "no-such-group-here"],
        ["--auth-throttle", "delay=-1"],
        ["--auth-throttle", "bogus=1"],
    ):
        with pytest.raises(usage.UsageError):
            parse(tmp_path, *extra)


def test_auth_throttle_option_reaches_the_policy(tmp_path: Path) -> None:
    """--auth-throttle values land in the parsed policy; unset keys keep their defaults."""
    o = parse(tmp_path, "--auth-throttle", "delay=0.1,pair-failures=3")
    assert o.auth_throttle.delay == 0.1 and o.auth_throttle.pair_failures == 3
    assert o.auth_throttle.lockout == 300


def test_lookup_account_by_name_and_number() -> None:
    """Users and groups are found by name or number; the default group is the user's."""
    root = lookup_account("root")
    assert root.uid == 0 and root.gid == 0 and root.group is None
    assert lookup_account("0", "0") == Account("root", 0, 0, "0")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_chown_tree_hands_over_everything_once(tmp_path: Path) -> None:
    """chown_tree gives every entry to the user (links not followed) and then has nothing to do."""
    from yimaporc.tap.privileges import chown_tree

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"x")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.write_bytes(b"y")
    (tmp_path / "a" / "link").symlink_to(outside)
    try:
        nobody = lookup_account("nobody")
        assert chown_tree(tmp_path, nobody.uid, nobody.gid) == 5
        owners = {p.lstat().st_uid for p in [tmp_path, *tmp_path.rglob("*")]}
        assert owners == {nobody.uid} and outside.stat().st_uid == 0
        assert chown_tree(tmp_path, nobody.uid, nobody.gid) == 0
    finally:
        outside.unlink()
