"""Private files: everything a node keeps is readable by its own user only.

A node sets the umask to :data:`PRIVATE_UMASK` at start (``tap.common``), so
every file it creates is 0600 and every directory 0700 whoever creates it
(SQLite's ``-wal``/``-shm`` files, spool files, views, blocks).  The helpers
here also give the important files explicit modes, for services embedded in
another process (tests, other apps) where the umask is not ours, and tighten
files an older version left readable.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_UMASK = 0o077

_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) if needed; the directory itself ends up 0700."""
    p = Path(path)
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    if p.stat().st_mode & 0o077:
        p.chmod(0o700)
    return p


def private_sqlite(path: str | os.PathLike[str]) -> Path:
    """Prepare an SQLite database file at ``path`` as 0600 before it is opened.

    SQLite creates its ``-wal``, ``-shm`` and journal files with the database
    file's mode, so creating that file 0600 covers them; existing ones are
    tightened too.
    """
    p = Path(path)
    private_dir(p.parent)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    for f in (p, *(p.with_name(p.name + s) for s in _SQLITE_SIDE_FILES)):
        try:
            if f.stat().st_mode & 0o077:
                f.chmod(0o600)
        except FileNotFoundError:
            pass
    return p
