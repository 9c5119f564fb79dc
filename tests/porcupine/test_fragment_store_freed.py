"""A FragmentStore nobody closes is still freed: its SQLite functions hold it weakly."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from yimaporc.porcupine.fragments import FragmentStore


def test_an_unclosed_store_with_open_databases_is_collected(tmp_path: Path) -> None:
    """Dropping the last reference to a store with open bucket databases frees it."""
    store = FragmentStore(tmp_path, "n1", lambda: 1000.0)
    store.create_mailbox("u@example.org", "Archive")  # opens a bucket database
    ref = weakref.ref(store)
    del store
    gc.collect()
    assert ref() is None
