"""A node that cannot be built from its data directory (a full or read-only disk at
start) exits with one line saying why, not a traceback (tap/common.py
``cannot_start``), for both node kinds."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from yimaporc.tap import common

HOST = "127.0.187.1"


def _options(kind: str, data: Path) -> object:
    if kind == "porcupine":
        from yimaporc.tap.porcupine import Options
    else:
        from yimaporc.tap.yima import Options  # type: ignore[assignment]
    opts = Options()
    args = ["--node-id", "n1", "--data-dir", str(data), "--cluster", f"{HOST}:7946"]
    if kind == "porcupine":
        args += ["--domain", "example.org", "--smtp", f"tcp:0:interface={HOST}"]
    opts.parseOptions(args)
    return opts


@pytest.mark.parametrize("kind", ["porcupine", "yima"])
def test_no_space_for_the_secret_is_one_line(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing the cluster secret: SystemExit naming the node kind and the
    OS error (twistd prints it and exits 1)."""

    def full(path: object, create: bool = True) -> bytes:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(common, "load_or_create_secret", full)
    make = __import__(f"yimaporc.tap.{kind}", fromlist=["makeService"]).makeService
    umask = os.umask(0o022)
    try:
        with pytest.raises(SystemExit) as e:
            make(_options(kind, tmp_path / "d"))
    finally:
        os.umask(umask)
    assert str(e.value) == f"{kind}-node cannot start: [Errno 28] No space left on device"


def test_a_database_that_cannot_be_opened_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite refusing the node's database (disk I/O error on a full disk) exits the
    same way."""
    from yimaporc.porcupine import node as pnode
    from yimaporc.tap.porcupine import makeService

    def broken(*a: object, **k: object) -> object:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(pnode.PorcupineNode, "from_config", broken)
    umask = os.umask(0o022)
    try:
        with pytest.raises(SystemExit) as e:
            makeService(_options("porcupine", tmp_path / "d"))
    finally:
        os.umask(umask)
    assert str(e.value) == "porcupine-node cannot start: disk I/O error"
