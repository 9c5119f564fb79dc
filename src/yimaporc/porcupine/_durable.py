"""Durability barriers for the mail store's group commit.

With the journal (the default, :mod:`._journal`) a group is made durable by
one fdatasync of its journal record; a :class:`Barrier` then serves the
*checkpoint*, which makes the files the journal covers durable in place before
dropping it (:meth:`Barrier.files`).  Without the journal (``journal=False``) a
group needs two points where "everything written so far is on disk": after its
bodies are written and renamed into place (before their index rows are
committed), and after the rows are committed (before any caller is told: 250).

- :class:`SyncfsBarrier` (Linux): one ``syncfs(2)`` of the mail tree's
  filesystem per point, whatever the group's size: it writes back every dirty
  page and inode of that filesystem and commits its journal (with a cache flush),
  so it covers the bodies, the renames, the directories and SQLite's WAL.  Since
  Linux 5.8 it reports write-back errors.  It also waits for *other* writers'
  dirty data on that filesystem, which is why it is not on the callers' path by
  default.
- :class:`FsyncBarrier` (anywhere): an fsync per body and per directory, and
  SQLite's own fsync per commit (``synchronous=FULL``).

Both expose counters (``files_calls``, ``rows_calls``, ``syscalls``) that tests
and ``/metrics`` read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol


class Barrier(Protocol):
    """What :class:`~.fragments.FragmentStore` asks of its disk."""

    #: True when :meth:`rows` makes SQLite commits durable (commits then run
    #: ``synchronous=NORMAL``); False when each commit fsyncs itself (FULL).
    covers_rows: bool
    files_calls: int
    rows_calls: int
    syscalls: int

    def files(self, files: Sequence[Path], dirs: Sequence[Path]) -> None:
        """Make ``files`` (contents) and ``dirs`` (their entries) durable."""

    def rows(self) -> None:
        """Make the SQLite commits made since the last call durable."""


def _fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsyncBarrier:
    """fsync each file and directory; SQLite fsyncs its own commits."""

    covers_rows = False

    def __init__(self) -> None:
        self.files_calls = 0
        self.rows_calls = 0
        self.syscalls = 0

    def files(self, files: Sequence[Path], dirs: Sequence[Path]) -> None:
        """See :class:`Barrier`."""
        self.files_calls += 1
        for f in files:
            _fsync_path(f, os.O_RDONLY)
            self.syscalls += 1
        for d in dirs:
            _fsync_path(d, os.O_RDONLY | os.O_DIRECTORY)
            self.syscalls += 1

    def rows(self) -> None:
        """See :class:`Barrier` (nothing: each commit was FULL)."""
        self.rows_calls += 1


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNCFS = _load_syncfs()


def syncfs_available() -> bool:
    """This platform has ``syncfs(2)``."""
    return _SYNCFS is not None


class SyncfsBarrier:
    """One ``syncfs(2)`` of the filesystem holding ``root`` per barrier.

    ``root`` and everything the store writes must be on that one filesystem
    (:func:`one_filesystem` checks it at start)."""

    covers_rows = True

    def __init__(self, root: Path) -> None:
        if _SYNCFS is None:
            raise OSError("syncfs(2) is not available here")
        self.root = root
        self.files_calls = 0
        self.rows_calls = 0
        self.syscalls = 0

    def _sync(self) -> None:
        assert _SYNCFS is not None
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            # ctypes releases the GIL for the call: other threads run meanwhile
            if _SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs({self.root}): {os.strerror(err)}")
        finally:
            os.close(fd)
        self.syscalls += 1

    def files(self, files: Sequence[Path], dirs: Sequence[Path]) -> None:
        """See :class:`Barrier`."""
        self.files_calls += 1
        self._sync()

    def rows(self) -> None:
        """See :class:`Barrier`."""
        self.rows_calls += 1
        self._sync()


def one_filesystem(*paths: Path) -> bool:
    """All ``paths`` (existing directories) are on one filesystem."""
    return len({os.stat(p).st_dev for p in paths}) == 1


def default_barrier(root: Path, *paths: Path) -> Barrier:
    """syncfs when available and the mail tree is one filesystem, else fsync."""
    if syncfs_available() and one_filesystem(root, *paths):
        return SyncfsBarrier(root)
    return FsyncBarrier()
