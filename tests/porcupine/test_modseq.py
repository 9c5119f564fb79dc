"""Mod-sequences in the fragment store (CONDSTORE/QRESYNC): values, tombstones,
migration of old buckets, the read bound, and their merge over fragments."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from mailtest_helpers import ImmediateReactor, SyncPool, result_of

from yimaporc.porcupine import _modseq
from yimaporc.porcupine.fragments import FragmentStore, MailboxManager
from yimaporc.porcupine.mailindex import MailIndex
from yimaporc.porcupine.retrieval import merge_trees
from yimaporc.porcupine.usermap import bucket_dir, bucket_of
from yimaporc.porcupine.values import INBOX, MailboxInfo, NewMessage

A = "alice@example.org"
T0 = 1_700_000_000.0


class Now:
    """A settable clock (seconds)."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def msg(body: bytes, box: str = INBOX) -> NewMessage:
    return NewMessage(A, box, body, (), T0)


def highest(store: FragmentStore, box: str = INBOX) -> int:
    return next(i.highestmodseq for i in store.mailboxes(A) if i.name == box)


def modseqs(store: FragmentStore, box: str = INBOX) -> dict[int, int]:
    return {d.uid: d.modseq for d in store.digests(A, box)}


@pytest.fixture
def store(tmp_path: Path) -> FragmentStore:
    return FragmentStore(tmp_path, "n1", Now(), journal=False)


def test_stores_flags_and_expunges_raise_modseqs(store: FragmentStore) -> None:
    """Each new message gets a MODSEQ above the mailbox's previous highest; a flag change
    raises that message's MODSEQ and HIGHESTMODSEQ; an expunge raises HIGHESTMODSEQ."""
    store.store([msg(b"1"), msg(b"2")])
    first = modseqs(store)
    assert 0 < first[1] < first[2] == highest(store)
    store.set_flags(A, INBOX, [1], ["\\Seen"], 1)
    after = modseqs(store)
    assert after[1] > first[2] and after[2] == first[2] and highest(store) == after[1]
    store.delete(A, INBOX, [2])
    assert highest(store) > after[1]


def test_modseqs_are_at_least_the_clock_in_microseconds(tmp_path: Path) -> None:
    """A node's MODSEQs follow its clock (µs) when it is ahead of the counter, and still
    rise when the clock stands still or steps back."""
    now = Now()
    store = FragmentStore(tmp_path, "n1", now, journal=False)
    [d] = store.store([msg(b"1")])
    assert modseqs(store)[1] >= int(T0 * 1_000_000)
    now.t = T0 - 100  # a step back
    store.set_flags(A, INBOX, [d.uid], ["\\Seen"], 1)
    stepped = modseqs(store)[1]
    assert stepped > int(T0 * 1_000_000)
    now.t = T0 + 5
    store.set_flags(A, INBOX, [d.uid], ["\\Flagged"], 1)
    assert modseqs(store)[1] >= int((T0 + 5) * 1_000_000) > stepped


def test_same_flags_keep_the_modseq(store: FragmentStore) -> None:
    """A STORE that changes nothing (the same flags, any order) leaves MODSEQs alone, as a
    replica re-applying an update does."""
    store.store([msg(b"1")])
    store.set_flags(A, INBOX, [1], ["\\Seen", "\\Flagged"], 0)
    before, top = modseqs(store), highest(store)
    assert store.set_flags(A, INBOX, [1], ["\\Flagged", "\\Seen"], 0) == {
        1: ("\\Flagged", "\\Seen")
    }
    store.set_flags(A, INBOX, [1], ["\\Seen"], 1)
    assert modseqs(store) == before and highest(store) == top


def test_unchanged_since_leaves_newer_messages_alone(store: FragmentStore) -> None:
    """With UNCHANGEDSINCE, a message whose MODSEQ is above it keeps its flags and is left
    out of the answer; the others change."""
    store.store([msg(b"1"), msg(b"2")])
    base = modseqs(store)
    store.set_flags(A, INBOX, [2], ["\\Answered"], 1)
    out = store.set_flags(A, INBOX, [1, 2], ["\\Seen"], 1, unchanged_since=base[2])
    assert out == {1: ("\\Seen",)}
    flags = {d.uid: d.flags for d in store.digests(A, INBOX)}
    assert flags == {1: ("\\Seen",), 2: ("\\Answered",)}


def test_expunge_leaves_tombstones_at_its_modseq(store: FragmentStore) -> None:
    """Expunged UIDs are remembered with the MODSEQ of their expunge (the mailbox's new
    HIGHESTMODSEQ); RENAME carries them along, DELETE of the mailbox drops them."""
    store.create_mailbox(A, "Box")
    store.store([msg(b"1", "Box"), msg(b"2", "Box"), msg(b"3", "Box")])
    before = highest(store, "Box")
    store.delete(A, "Box", [1, 3])
    tomb = store.tombstones(A, "Box")
    assert set(tomb) == {1, 3} and all(before < m <= highest(store, "Box") for m in tomb.values())
    store.rename_mailbox(A, "Box", "Other")
    assert store.tombstones(A, "Other") == tomb and store.tombstones(A, "Box") == {}
    store.delete_mailbox(A, "Other")
    store.create_mailbox(A, "Other")
    assert store.tombstones(A, "Other") == {}


def test_tombstones_are_bounded_oldest_first(
    store: FragmentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond MAX_TOMBSTONES per mailbox the oldest expunges are forgotten."""
    monkeypatch.setattr(_modseq, "MAX_TOMBSTONES", 3)
    store.store([msg(str(i).encode()) for i in range(6)])
    for uid in range(1, 7):
        store.delete(A, INBOX, [uid])
    assert sorted(store.tombstones(A, INBOX)) == [4, 5, 6]


def test_old_bucket_is_migrated(tmp_path: Path) -> None:
    """A bucket written before mod-sequences opens with MODSEQ 1 for its messages and
    HIGHESTMODSEQ 1, and later changes go above."""
    path = tmp_path / "mail" / "buckets" / bucket_dir(bucket_of(A))
    path.mkdir(parents=True)
    db = sqlite3.connect(path / "index.sqlite")
    db.executescript(
        """
        CREATE TABLE mailboxes (user TEXT NOT NULL, name TEXT NOT NULL,
            uidvalidity INTEGER NOT NULL, uidnext INTEGER NOT NULL,
            subscribed INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (user, name));
        CREATE TABLE messages (user TEXT NOT NULL, mailbox TEXT NOT NULL,
            uid INTEGER NOT NULL, key TEXT NOT NULL, size INTEGER NOT NULL,
            flags TEXT NOT NULL, internal_date REAL NOT NULL,
            PRIMARY KEY (user, mailbox, uid));
        """
    )
    db.execute("INSERT INTO mailboxes VALUES (?, 'INBOX', 7, 3, 1)", (A,))
    db.execute("INSERT INTO messages VALUES (?, 'INBOX', 1, 'k1.m', 1, '', 1.0)", (A,))
    db.execute("INSERT INTO messages VALUES (?, 'INBOX', 2, 'k2.m', 1, '\\Seen', 1.0)", (A,))
    db.commit()
    db.close()
    store = FragmentStore(tmp_path, "n1", Now(), journal=False)
    assert modseqs(store) == {1: 1, 2: 1} and highest(store) == 1
    store.set_flags(A, INBOX, [1], ["\\Seen"], 1)
    assert modseqs(store)[1] > 1 and highest(store) == modseqs(store)[1]


@pytest.mark.parametrize("index", [True, False])
def test_a_read_bound_is_below_every_later_change(tmp_path: Path, index: bool) -> None:
    """The bound a tree read reports (warm index or SQLite) is at least HIGHESTMODSEQ and
    below the MODSEQ of any change made after the read, with a clock standing still."""
    store = FragmentStore(tmp_path, "n1", Now(), journal=False)
    manager = MailboxManager(
        ImmediateReactor(),
        SyncPool(),  # type: ignore[arg-type]
        store,
        index=MailIndex() if index else None,
    )
    result_of(manager.store([msg(b"1"), msg(b"2")]))
    for _ in range(2):  # cold, then warm
        [info] = [i for i in result_of(manager.mailboxes(A)) if i.name == INBOX]
        assert info.modseq_bound >= info.highestmodseq > 0
        result_of(manager.set_flags(A, INBOX, [1], ["\\Seen"], 0))
        result_of(manager.set_flags(A, INBOX, [1], [], 0))
        assert modseqs(store)[1] > info.modseq_bound
        tree, digests = result_of(manager.view(A, INBOX))
        [info] = [i for i in tree if i.name == INBOX]
        assert max(d.modseq for d in digests or ()) <= info.modseq_bound


def test_merged_highestmodseq_is_capped_by_the_lowest_bound() -> None:
    """Over fragments, HIGHESTMODSEQ is the highest given out, capped by the lowest bound
    (so a change on a node whose bound was low is still above it); nodes without
    mod-sequences (bound 0) do not count."""

    def info(h: int, bound: int) -> MailboxInfo:
        return MailboxInfo(INBOX, 1, 5, 1, 0, True, h, bound)

    [m] = merge_trees([("a", [info(500, 900)]), ("b", [info(100, 700)])])
    assert m.highestmodseq == 500 and m.modseq_bound == 700
    [m] = merge_trees([("a", [info(800, 900)]), ("b", [info(100, 700)])])
    assert m.highestmodseq == 700
    [m] = merge_trees([("a", [info(800, 900)]), ("old", [info(0, 0)])])
    assert m.highestmodseq == 800


def test_any_writer_of_flags_raises_modseq(store: FragmentStore) -> None:
    """A flag change written by other code through the bucket connection (replication
    applies logged updates so) raises the MODSEQ; writing the same flags does not."""
    store.store([msg(b"1")])
    before = modseqs(store)[1]
    db = store._db(bucket_of(A))
    db.execute("UPDATE messages SET flags='' WHERE user=? AND uid=1", (A,))
    assert modseqs(store)[1] == before
    db.execute("UPDATE messages SET flags='\\Seen' WHERE user=? AND uid=1", (A,))
    assert modseqs(store)[1] > before and highest(store) == modseqs(store)[1]
