"""A full disk in the porcupine stores: the error a caller sees is SQLite's "database or
disk is full" (which the cluster answers as STORAGE_FULL), not the "cannot rollback"
that the stores' own ROLLBACK raised after SQLite had already rolled back."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import pytest

from yimaporc.porcupine._cluster_wire import storage_full
from yimaporc.porcupine.fragments import FragmentStore
from yimaporc.porcupine.usermap import bucket_of

# a long address: its INBOX row needs a page of its own (no room left in the table's)
USER = "full" + "x" * 6000 + "@example.org"


def no_room(store: FragmentStore) -> None:
    """The user's bucket index may not grow any more and its pages are full (the next
    row is SQLITE_FULL, as on a full disk)."""
    db = store._db(bucket_of(USER))
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count={pages + 8}")
    db.execute("CREATE TABLE filler (x BLOB)")
    for size in (4096, 512, 64, 8, 1):
        try:
            while True:
                db.execute("INSERT INTO filler VALUES (zeroblob(?))", (size,))
        except sqlite3.OperationalError:
            pass


@pytest.mark.parametrize(
    "operation",
    [
        lambda s: s.load_user(USER),  # a first read creates the user's INBOX
        lambda s: s.create_mailbox(USER, "Projects"),
    ],
    ids=["first-read", "create"],
)
def test_a_write_on_a_full_disk_raises_the_full_error(
    fragment_store: FragmentStore, operation: Callable[[FragmentStore], Any]
) -> None:
    """A transaction that hits SQLITE_FULL fails with that error (storage_full), the
    store's ROLLBACK skipped when SQLite already rolled back; the store works again once
    there is room."""
    no_room(fragment_store)
    with pytest.raises(Exception) as caught:
        operation(fragment_store)
    assert storage_full(caught.value), repr(caught.value)
    fragment_store._db(bucket_of(USER)).execute("PRAGMA max_page_count=1073741823")
    operation(fragment_store)
    assert "INBOX" in {m.name for m in fragment_store.mailboxes(USER)}
