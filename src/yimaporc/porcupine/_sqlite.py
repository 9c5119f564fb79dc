"""SQLite helpers shared by the porcupine stores."""

from __future__ import annotations

import sqlite3


def rollback(db: sqlite3.Connection) -> None:
    """Undo the open transaction after an error, unless SQLite already has.

    After some errors (``SQLITE_FULL`` on a full disk, I/O errors) SQLite rolls the
    whole transaction back itself; a ``ROLLBACK`` then raises "cannot rollback - no
    transaction is active", which replaced the real error in the callers'
    ``except: ROLLBACK; raise`` (a full disk was reported as that)."""
    if db.in_transaction:
        db.execute("ROLLBACK")
