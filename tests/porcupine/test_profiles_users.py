"""Profile DB (scrypt, SQLite), user manager and the delivery/retrieval proxies."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from mailtest_helpers import result_of
from twisted.mail import smtp

from yimaporc.porcupine.delivery import DeliveryProxy
from yimaporc.porcupine.fragments import MailboxManager
from yimaporc.porcupine.profiledb import ProfileDB, check_password, hash_password
from yimaporc.porcupine.retrieval import RetrievalProxy
from yimaporc.porcupine.users import UserManager
from yimaporc.porcupine.values import INBOX, BadCredentials, NoSuchUser, Profile, UserExists

A = "alice@example.org"


def test_scrypt_round_trip() -> None:
    """hash_password salts; check_password accepts the right password only."""
    h1, h2 = hash_password("pw", n=16, r=1, p=1), hash_password("pw", n=16, r=1, p=1)
    assert h1 != h2 and h1.startswith("scrypt$16$1$1$")
    assert check_password("pw", h1) and not check_password("pW", h1)
    assert not check_password("pw", "garbage")


def test_profile_db_stores_hash_not_password(profile_db: ProfileDB, tmp_path: Path) -> None:
    """The SQLite file holds a scrypt hash, never the plaintext password."""
    result_of(profile_db.add("Alice@Example.org", "s3cret-pw", 2))
    db = sqlite3.connect(tmp_path / "mail" / "profiles.sqlite")
    [(address, stored, replicas)] = db.execute(
        "SELECT address, password_hash, replicas FROM profiles"
    ).fetchall()
    assert (address, replicas) == (A, 2)
    assert "s3cret-pw" not in stored and stored.startswith("scrypt$")
    assert profile_db.count() == 1


def test_profile_db_add_twice_and_missing(profile_db: ProfileDB) -> None:
    """UserExists on a second add; NoSuchUser for passwd/remove of a stranger."""
    result_of(profile_db.add(A, "pw"))
    with pytest.raises(UserExists):
        result_of(profile_db.add(A, "other"))
    with pytest.raises(NoSuchUser):
        result_of(profile_db.set_password("x@example.org", "pw"))
    with pytest.raises(NoSuchUser):
        result_of(profile_db.remove("x@example.org"))


def test_verify_and_password_change(profile_db: ProfileDB) -> None:
    """verify accepts the current password, rejects old and wrong ones after passwd."""
    result_of(profile_db.add(A, "old"))
    assert result_of(profile_db.verify(A, "old")).address == A
    assert result_of(profile_db.verify(A, "old")).address == A  # from the auth cache
    result_of(profile_db.set_password(A, "new"))
    with pytest.raises(BadCredentials):
        result_of(profile_db.verify(A, "old"))
    assert result_of(profile_db.verify(A, "new")).address == A
    with pytest.raises(BadCredentials):
        result_of(profile_db.verify("nobody@example.org", "new"))


def test_removed_user_cannot_log_in_from_cache(profile_db: ProfileDB) -> None:
    """Removing a profile also drops its cached verification."""
    result_of(profile_db.add(A, "pw"))
    result_of(profile_db.verify(A, "pw"))
    result_of(profile_db.remove(A))
    with pytest.raises(BadCredentials):
        result_of(profile_db.verify(A, "pw"))


def _proxies(
    profile_db: ProfileDB, mailbox_manager: MailboxManager
) -> tuple[UserManager, DeliveryProxy, RetrievalProxy]:
    users = UserManager("n1", profile_db)
    delivery = DeliveryProxy(
        "n1", lambda a: users, lambda n: mailbox_manager, lambda: ["n1"], lambda: 5.0
    )
    return users, delivery, RetrievalProxy("n1", lambda a: users, lambda n: mailbox_manager)


def test_delivery_proxy_stores_and_records_fragment(
    profile_db: ProfileDB, mailbox_manager: MailboxManager
) -> None:
    """Delivery stores in INBOX and adds this node to the user's fragment list."""
    users, delivery, retrieval = _proxies(profile_db, mailbox_manager)
    result_of(profile_db.add(A, "pw"))
    assert result_of(users.fragments(A)) == ()
    [d] = result_of(delivery.deliver([A, A.upper()], b"hi\r\n"))
    assert d.uid == 1 and result_of(users.fragments(A)) == ("n1",)
    mail = retrieval.open(A)
    digests = result_of(mail.digests(INBOX))
    assert result_of(mail.fetch(INBOX, digests)) == {1: b"hi\r\n"}


def test_delivery_proxy_unknown_user_is_550(
    profile_db: ProfileDB, mailbox_manager: MailboxManager
) -> None:
    """An unknown local recipient fails with an SMTP 550."""
    _, delivery, _ = _proxies(profile_db, mailbox_manager)
    with pytest.raises(smtp.SMTPServerError) as e:
        result_of(delivery.deliver(["ghost@example.org"], b"x"))
    assert e.value.code == 550


def test_choose_nodes_prefers_fragments_then_self(
    profile_db: ProfileDB, mailbox_manager: MailboxManager
) -> None:
    """Replicas: existing fragments first, this node next, never more than live nodes."""
    delivery = DeliveryProxy(
        "n1", lambda a: None, lambda n: mailbox_manager, lambda: ["n1", "n2", "n3"], lambda: 0.0
    )  # type: ignore[arg-type]
    p = Profile(A, "h", replicas=2)
    assert delivery.choose_nodes(p, ("n3",)) == ["n3", "n1"]
    assert delivery.choose_nodes(Profile(A, "h", 1), ()) == ["n1"]
    assert delivery.choose_nodes(Profile(A, "h", 9), ("n2",)) == ["n2", "n1", "n3"]


def test_retrieval_delete_flags_append(
    profile_db: ProfileDB, mailbox_manager: MailboxManager
) -> None:
    """UserMail sets flags, appends and deletes through the mailbox manager."""
    _, delivery, retrieval = _proxies(profile_db, mailbox_manager)
    result_of(profile_db.add(A, "pw"))
    result_of(delivery.deliver([A], b"one\r\n"))
    mail = retrieval.open(A)
    appended = result_of(mail.append(INBOX, b"two\r\n", ["\\Seen"], 7.0))
    assert appended.uid == 2 and appended.flags == ("\\Seen",)
    digests = result_of(mail.digests(INBOX))
    assert result_of(mail.set_flags(INBOX, digests[:1], ["\\Deleted"], 1)) == {1: ("\\Deleted",)}
    assert result_of(mail.delete(INBOX, digests[:1])) == [1]
    assert [d.uid for d in result_of(mail.digests(INBOX))] == [2]
    assert result_of(retrieval.authenticate(A, "pw")).address == A


def test_user_manager_caches_profiles_until_forgotten(profile_db: ProfileDB) -> None:
    """Profile lookups are cached (soft state); forget() drops the entry."""
    users = UserManager("n1", profile_db)
    result_of(profile_db.add(A, "pw", 1))
    first = result_of(users.profile(A))
    result_of(profile_db.remove(A))
    assert result_of(users.profile(A.upper())) == first
    users.forget(A)
    assert result_of(users.profile(A)) is None
