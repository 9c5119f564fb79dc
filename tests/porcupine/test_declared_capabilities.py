"""Capabilities the mail service relies on are declared (interfaces, an exception
type), not found by attribute probes: each implementation and fake provides them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_auth_cache import make_db
from test_smtp_hostile import AcceptAll, codes, server
from twisted.cred import portal as cred_portal
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.mail import imap4
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from yimaporc.cluster.rpc import PeerMaybeDone, PeerUnavailable, may_have_run
from yimaporc.porcupine._cluster_remote import RemoteUserManager
from yimaporc.porcupine._cluster_users import ClusterUserManager
from yimaporc.porcupine.auth import ManagerChecker, ThrottledPortal
from yimaporc.porcupine.delivery import SmtpDelivery, SmtpPolicy
from yimaporc.porcupine.interfaces import (
    ICachingChecker,
    ISmtpDelivery,
    ISmtpSession,
    IUserManager,
)
from yimaporc.porcupine.replication.amp import CoordinatorUnsure
from yimaporc.porcupine.retrieval import RetrievalProxy
from yimaporc.porcupine.throttle import AuthThrottle, ThrottlePolicy
from yimaporc.porcupine.users import UserManager


def _no_call(node: str, command: Any, /, **kw: Any) -> Any:
    raise AssertionError("no RPC expected")


def test_every_user_manager_provides_iusermanager_with_cached_login(tmp_path: Path) -> None:
    """verifyObject(IUserManager) holds, cached_login included, for the local, the
    clustered and the remote user manager."""
    db, reactor, _, _ = make_db(tmp_path)
    managers = [
        UserManager("n1", db),
        ClusterUserManager("n1", db, reactor),
        RemoteUserManager("n2", _no_call, now=reactor.seconds),
    ]
    for manager in managers:
        assert verifyObject(IUserManager, manager)
        assert manager.cached_login("nobody@example.org", "pw") is None


def test_manager_checker_is_a_caching_checker_answering_from_the_cache(tmp_path: Path) -> None:
    """ManagerChecker provides ICachingChecker; cached_avatar_id vouches only for a
    password the profile DB verified, and never for a bad user name."""
    db, _, _, _ = make_db(tmp_path)
    users = UserManager("n1", db)
    retrieval = RetrievalProxy("n1", lambda a: users, lambda n: None)  # type: ignore[arg-type,return-value]
    checker = ManagerChecker(retrieval, "example.org")
    assert verifyObject(ICachingChecker, checker)
    from mailtest_helpers import result_of

    result_of(db.add("alice@example.org", "pw", 1))
    creds = UsernamePassword(b"alice", b"pw")
    assert checker.cached_avatar_id(creds) is None  # not verified yet
    result_of(db.verify("alice@example.org", "pw"))
    assert checker.cached_avatar_id(creds) == b"alice@example.org"
    assert checker.cached_avatar_id(UsernamePassword(b"alice", b"nope")) is None
    assert checker.cached_avatar_id(UsernamePassword(b"a b@@", b"pw")) is None


class PlainChecker:
    """An ICredentialsChecker without a cache (any twisted.cred checker)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.asked = 0

    def requestAvatarId(self, creds: Any) -> Any:
        self.asked += 1
        return succeed(creds.username)


class Realm:
    def requestAvatar(self, avatar_id: Any, mind: Any, *ifaces: Any) -> Any:
        return (ifaces[0], avatar_id, lambda: None)


def test_a_checker_without_the_cache_interface_is_asked_every_time() -> None:
    """A portal checker not providing ICachingChecker takes the throttled path (a slot,
    requestAvatarId) on every login."""
    checker = PlainChecker()
    assert not ICachingChecker.providedBy(checker)
    portal = cred_portal.Portal(Realm(), [checker])  # type: ignore[list-item]
    throttle = AuthThrottle(ThrottlePolicy(delay=0))
    p = ThrottledPortal(portal, throttle, Clock(), "10.0.0.1", "example.org", lambda: None)
    out: list[Any] = []
    for _ in range(2):
        p.login(UsernamePassword(b"bob", b"pw"), None, imap4.IAccount).addBoth(out.append)
    assert [o[1] for o in out] == [b"bob", b"bob"] and checker.asked == 2


def test_smtp_deliveries_provide_ismtpdelivery() -> None:
    """SmtpDelivery and the test deliveries provide ISmtpDelivery (authenticated_as)."""
    policy = SmtpPolicy("example.org", "n1.example.org", 4000)
    real = SmtpDelivery(None, policy, lambda: 0.0, "alice@example.org")  # type: ignore[arg-type]
    assert verifyObject(ISmtpDelivery, real) and real.authenticated_as == "alice@example.org"
    assert verifyObject(ISmtpDelivery, AcceptAll())


def test_the_smtp_session_provides_ismtpsession() -> None:
    """MailESMTP provides ISmtpSession (policy, startedTLS, message_for), what its
    delivery reads of it (the listener's policy, the Received protocol)."""
    p, _, _, _ = server()
    assert verifyObject(ISmtpSession, p)
    assert p.policy.domain == "example.org" and p.startedTLS is False


def test_submission_sends_only_as_the_authenticated_address() -> None:
    """On a submission listener MAIL FROM must be the address the session authenticated
    as (553 otherwise), read from the delivery's authenticated_as."""
    delivery = AcceptAll()
    delivery.authenticated_as = "alice@example.org"
    p, t, _, _ = server(delivery)
    p.policy = SmtpPolicy("example.org", "n1.example.org", 4000, submission=True)
    p.authenticated = True
    p.dataReceived(b"EHLO c.example\r\nMAIL FROM:<mallory@example.org>\r\n")
    p.dataReceived(b"MAIL FROM:<Alice@example.org>\r\n")
    assert codes(t) == [b"250", b"553", b"250"]


def test_maybe_done_is_declared_and_has_an_exception_type() -> None:
    """maybe_done is a declared attribute of PeerUnavailable (False); PeerMaybeDone, the
    failure after the request was sent, and CoordinatorUnsure set it."""
    assert issubclass(PeerMaybeDone, PeerUnavailable)
    assert issubclass(CoordinatorUnsure, PeerMaybeDone)
    assert PeerMaybeDone("x").maybe_done and not PeerUnavailable("x").maybe_done
    assert may_have_run(Failure(PeerMaybeDone("x"))) and may_have_run(Failure(CoordinatorUnsure()))
    assert not may_have_run(Failure(PeerUnavailable("x")))
    assert not may_have_run(Failure(ValueError("x")))
