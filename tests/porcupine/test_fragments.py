"""Mailbox fragments on disk: layout, UIDs, UIDVALIDITY, flags, recovery."""

from __future__ import annotations

from pathlib import Path

import pytest
from mailtest_helpers import result_of

from yimaporc.porcupine.fragments import FragmentStore, MailboxManager, mailbox_name
from yimaporc.porcupine.usermap import N_BUCKETS, BadAddress, bucket_dir, bucket_of, normalise
from yimaporc.porcupine.values import (
    INBOX,
    MailboxExists,
    MailboxHasChildren,
    NewMessage,
    NoSuchMailbox,
)
from yimaporc.testing.pytest_plugin import LoggedFailures

A = "alice@example.org"
B = "bob@example.org"


def msg(user: str, body: bytes, box: str = INBOX) -> NewMessage:
    return NewMessage(user, box, body, (), 0.0)


def test_bucket_of_is_stable_and_in_range() -> None:
    """bucket_of is case-insensitive, deterministic and below N_BUCKETS."""
    assert bucket_of(A) == bucket_of(A.upper())
    assert 0 <= bucket_of(A) < N_BUCKETS
    assert bucket_dir(7) == "007"


def test_normalise_refuses_path_tricks() -> None:
    """Addresses that could escape the bucket directory are refused."""
    assert normalise(" Alice@Example.ORG ") == A
    for bad in ("../x@example.org", "a/b@example.org", "noat", "a..b@example.org", ".a@x.org"):
        with pytest.raises(BadAddress):
            normalise(bad)


def test_store_writes_body_under_bucket_dir(fragment_store: FragmentStore, tmp_path: Path) -> None:
    """A stored body is a file in mail/buckets/NNN/<user>/ with the exact bytes."""
    [d] = fragment_store.store([msg(A, b"Subject: x\r\n\r\nhello\r\n")])
    path = tmp_path / "mail" / "buckets" / bucket_dir(bucket_of(A)) / A / d.key
    assert path.read_bytes() == b"Subject: x\r\n\r\nhello\r\n"
    assert list((tmp_path / "mail" / "tmp").iterdir()) == []
    assert d.uid == 1 and d.size == len(path.read_bytes()) and d.node == "n1"


def test_uids_strictly_ascend_and_survive_expunge(fragment_store: FragmentStore) -> None:
    """UIDs ascend per mailbox and are never reused after deletion."""
    uids = [d.uid for d in fragment_store.store([msg(A, b"1"), msg(A, b"2"), msg(B, b"3")])]
    assert uids == [1, 2, 1]
    assert fragment_store.delete(A, INBOX, [2]) == [2]
    [d] = fragment_store.store([msg(A, b"4")])
    assert d.uid == 3
    assert [x.uid for x in fragment_store.digests(A, INBOX)] == [1, 3]


def test_a_late_cluster_uid_is_kept_if_free(fragment_store: FragmentStore) -> None:
    """A replica applying a later message first still stores the earlier one under the
    UID the cluster gave it (every copy has one UID); a taken UID goes to UIDNEXT."""

    def at(uid: int, body: bytes) -> NewMessage:
        return NewMessage(A, INBOX, body, (), 0.0, uid)

    assert [d.uid for d in fragment_store.store([at(50, b"later")])] == [50]
    assert [d.uid for d in fragment_store.store([at(19, b"earlier")])] == [19]
    assert [d.uid for d in fragment_store.store([at(19, b"clash")])] == [51]
    assert [d.uid for d in fragment_store.store([msg(A, b"local")])] == [52]
    assert [x.uid for x in fragment_store.digests(A, INBOX)] == [19, 50, 51, 52]


def test_uidvalidity_stable_across_reopen(tmp_path: Path) -> None:
    """Reopening the store on the same dir keeps UIDVALIDITY and UIDNEXT."""
    s1 = FragmentStore(tmp_path, "n1", lambda: 1000.0)
    s1.store([msg(A, b"x")])
    before = {m.name: (m.uidvalidity, m.uidnext) for m in s1.mailboxes(A)}
    s1.close()
    s2 = FragmentStore(tmp_path, "n1", lambda: 5000.0)
    after = {m.name: (m.uidvalidity, m.uidnext) for m in s2.mailboxes(A)}
    assert before == after == {INBOX: (1000, 2)}


def test_recreated_mailbox_gets_new_uidvalidity(fragment_store: FragmentStore) -> None:
    """Deleting and recreating a mailbox changes its UIDVALIDITY (clock unchanged)."""
    v1 = fragment_store.create_mailbox(A, "Work").uidvalidity
    fragment_store.delete_mailbox(A, "Work")
    v2 = fragment_store.create_mailbox(A, "Work").uidvalidity
    assert v2 > v1


def test_flags_modes(fragment_store: FragmentStore) -> None:
    """STORE replace, add and remove (case-insensitive) flags."""
    fragment_store.store([msg(A, b"x")])
    assert fragment_store.set_flags(A, INBOX, [1], ["\\Seen"], 0) == {1: ("\\Seen",)}
    assert fragment_store.set_flags(A, INBOX, [1], ["\\Flagged", "\\Seen"], 1) == {
        1: ("\\Seen", "\\Flagged")
    }
    assert fragment_store.set_flags(A, INBOX, [1, 99], ["\\seen"], -1) == {1: ("\\Flagged",)}
    assert [m.unseen for m in fragment_store.mailboxes(A)] == [1]


def test_copy_shares_body_until_last_reference(fragment_store: FragmentStore) -> None:
    """COPY shares the body; it is removed only when no mailbox refers to it."""
    fragment_store.create_mailbox(A, "Archive")
    [d] = fragment_store.store([msg(A, b"keep me")])
    [c] = fragment_store.copy(A, INBOX, [1], "Archive")
    assert c.key == d.key and c.uid == 1
    fragment_store.delete(A, INBOX, [1])
    assert fragment_store.fetch(A, "Archive", [1]) == {1: b"keep me"}
    fragment_store.delete(A, "Archive", [1])
    assert not (fragment_store.user_path(A) / d.key).exists()


def test_mailbox_tree_operations(fragment_store: FragmentStore) -> None:
    """CREATE makes parents, RENAME moves children, DELETE refuses a parent."""
    fragment_store.create_mailbox(A, "a/b/c")
    with pytest.raises(MailboxExists):
        fragment_store.create_mailbox(A, "a/b")
    with pytest.raises(MailboxHasChildren):
        fragment_store.delete_mailbox(A, "a")
    fragment_store.rename_mailbox(A, "a", "z")
    assert [m.name for m in fragment_store.mailboxes(A)] == [INBOX, "z", "z/b", "z/b/c"]
    with pytest.raises(NoSuchMailbox):
        fragment_store.delete_mailbox(A, INBOX)


def test_rename_inbox_moves_messages_and_recreates_it(fragment_store: FragmentStore) -> None:
    """RENAME INBOX moves its messages into the new name and leaves an empty INBOX."""
    fragment_store.store([msg(A, b"x")])
    fragment_store.rename_mailbox(A, "inbox", "Old")
    counts = {m.name: m.messages for m in fragment_store.mailboxes(A)}
    assert counts == {INBOX: 0, "Old": 1}


def test_recover_removes_half_stored(fragment_store: FragmentStore) -> None:
    """tmp files and bodies without an index row vanish at recovery; rows stay."""
    [d] = fragment_store.store([msg(A, b"x")])
    (fragment_store.tmp / "partial").write_bytes(b"half")
    (fragment_store.user_path(A) / "orphan.m").write_bytes(b"no row")
    (fragment_store.user_path(A) / "foreign").write_bytes(b"not ours")
    assert fragment_store.recover() == 2
    assert [x.key for x in fragment_store.digests(A, INBOX)] == [d.key]
    assert sorted(p.name for p in fragment_store.user_path(A).iterdir()) == sorted(
        [d.key, "foreign"]
    )


def test_mailbox_name_rules() -> None:
    """INBOX is case-insensitive; empty levels and wildcards are refused."""
    assert mailbox_name("iNbOx") == INBOX
    for bad in ("", "a//b", "a*", "x%"):
        with pytest.raises(NoSuchMailbox):
            mailbox_name(bad)


def test_users_in_bucket(fragment_store: FragmentStore) -> None:
    """Reconstruction lists users with mail in one bucket."""
    fragment_store.store([msg(A, b"x"), msg(B, b"y")])
    assert A in fragment_store.users_in_bucket(bucket_of(A))
    assert sorted(fragment_store.users_with_mail()) == sorted({A, B})


def test_group_commit_batches_waiting_stores(mailbox_manager: MailboxManager) -> None:
    """Stores queued while a group is in flight go out together: one group commit."""
    groups: list[int] = []
    real = mailbox_manager.fragments.commit_group

    def counting(items: list[tuple[NewMessage, str]]) -> object:
        groups.append(len(items))
        return real(items)

    mailbox_manager.fragments.commit_group = counting  # type: ignore[method-assign]
    mailbox_manager._writing = True  # a batch is in flight: the next three wait
    ds = [mailbox_manager.store([msg(A, bytes([65 + i]))]) for i in range(3)]
    mailbox_manager._writing = False
    mailbox_manager._write_batch()
    assert groups == [3]
    assert [result_of(d)[0].uid for d in ds] == [1, 2, 3]


def test_bad_message_fails_only_its_caller(mailbox_manager: MailboxManager) -> None:
    """One message for a missing mailbox fails only its own caller, not its batch."""
    mailbox_manager._writing = True
    good = mailbox_manager.store([msg(A, b"ok")])
    bad = mailbox_manager.store([msg(A, b"no", box="Missing")])
    mailbox_manager._writing = False
    mailbox_manager._write_batch()
    assert result_of(good)[0].uid == 1
    with pytest.raises(NoSuchMailbox):
        result_of(bad)
    assert [d.uid for d in result_of(mailbox_manager.digests(A, INBOX))] == [1]
    assert len(list(mailbox_manager.fragments.user_path(A).iterdir())) == 1
    assert list(mailbox_manager.fragments.tmp.iterdir()) == []


def test_change_listener_hears_stores(mailbox_manager: MailboxManager) -> None:
    """Listeners learn which user's mailbox got mail."""
    heard: list[tuple[str, str]] = []
    mailbox_manager.on_change(lambda u, m: heard.append((u, m)))
    result_of(mailbox_manager.store([msg(A, b"x")]))
    assert heard == [(A, INBOX)]


def test_broken_batch_fails_callers_and_recovers(
    mailbox_manager: MailboxManager, logged_failures: LoggedFailures
) -> None:
    """An unexpected error of a whole group fails that group's callers; later stores work."""
    real = mailbox_manager.fragments.store_group

    def boom(*a: object) -> None:
        raise RuntimeError("bug")

    mailbox_manager.fragments.store_group = boom  # type: ignore[method-assign, assignment]
    d = mailbox_manager.store([msg(A, b"x")])
    with pytest.raises(RuntimeError):
        result_of(d)
    mailbox_manager.fragments.store_group = real  # type: ignore[method-assign]
    assert result_of(mailbox_manager.store([msg(A, b"y")]))[0].uid == 1
    assert len(logged_failures.take(RuntimeError)) == 1  # "group commit failed"


@pytest.mark.parametrize("uid", [0, 5])
def test_same_key_committed_twice_is_one_message(fragment_store: FragmentStore, uid: int) -> None:
    """A body key committed a second time (a replicated store applied twice) is the
    same message: one row, no IntegrityError, and its body file stays readable."""
    from yimaporc.porcupine.values import PENDING

    fs = fragment_store
    key = "0123456789abcdef0123456789abcdef.m"
    m = NewMessage(A, INBOX, b"Subject: x\r\n\r\nonce\r\n", (), 1.0, uid or PENDING)
    digests = []
    for _ in range(2):
        (fs.tmp / key).write_bytes(m.body)
        [got] = fs.commit_bucket(bucket_of(A), [(m, key)])
        digests.append(got)
    assert digests[0] == digests[1]
    assert fs.pending(A) == (0 if uid else 1)
    if uid:
        assert [d.uid for d in fs.digests(A, INBOX)] == [uid]
        assert fs.fetch(A, INBOX, [uid]) == {uid: m.body}
    assert (fs.user_path(A) / key).read_bytes() == m.body
