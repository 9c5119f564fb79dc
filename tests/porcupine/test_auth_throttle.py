"""The login throttle: the sans-IO core, its portal adapter on task.Clock, protocol replies."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.cred import credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.mail import imap4
from twisted.python.failure import Failure

from yimaporc.cluster.rpc import PeerUnavailable
from yimaporc.porcupine._guard import ClientErrors
from yimaporc.porcupine._pop3 import MailPOP3
from yimaporc.porcupine.auth import ThrottledPortal, login_address
from yimaporc.porcupine.imap_backend import (
    MailboxRegistry,
    PorcupineImapBackend,
)
from yimaporc.porcupine.imap_server import PorcupineImapFactory
from yimaporc.porcupine.throttle import AuthThrottle, LoginThrottled, ThrottlePolicy, source_key

A, B = "10.0.0.1", "10.0.0.2"
ALICE, BOB = "alice@example.org", "bob@example.org"


def fail_n(t: AuthThrottle, now: float, addr: str, account: str, n: int) -> list[float]:
    delays = []
    for _ in range(n):
        assert t.admit(now, addr, account).allowed
        delays.append(t.failed(now, addr, account))
        t.release(addr)
    return delays


def test_delays_grow_and_are_capped() -> None:
    """The first failure is answered at once, then delay doubles up to max_delay."""
    t = AuthThrottle(ThrottlePolicy(delay=0.5, max_delay=4, pair_failures=50))
    assert fail_n(t, 0, A, ALICE, 7) == [0, 0.5, 1, 2, 4, 4, 4]
    assert t.status()["throttled"] == 6 and t.status()["failures"] == 7


def test_pair_lock_refuses_that_account_from_that_address_only() -> None:
    """After pair_failures the (account, address) pair is refused for lockout s; others are not."""
    t = AuthThrottle(ThrottlePolicy(pair_failures=3, lockout=60))
    fail_n(t, 0, A, ALICE, 3)
    r = t.admit(1, A, ALICE)
    assert not r.allowed and r.reason == "pair" and r.retry_after == 59
    assert t.admit(1, B, ALICE).allowed  # the owner elsewhere
    t.release(B)
    assert t.admit(1, A, BOB).allowed  # another account from A
    t.release(A)
    assert t.admit(61, A, ALICE).allowed  # lock over
    assert t.status()["refused"] == 1


def test_lock_expiry_allows_one_try_per_lockout() -> None:
    """After a lock expires, one more failure within the window locks again at once."""
    t = AuthThrottle(ThrottlePolicy(pair_failures=3, lockout=60, window=900))
    fail_n(t, 0, A, ALICE, 3)
    fail_n(t, 61, A, ALICE, 1)
    assert not t.admit(62, A, ALICE).allowed
    assert t.admit(62 + 60, A, ALICE).allowed


def test_failures_are_forgotten_after_the_window() -> None:
    """A failure older than window no longer counts toward delay or lock."""
    t = AuthThrottle(ThrottlePolicy(pair_failures=3, window=100))
    fail_n(t, 0, A, ALICE, 2)
    assert fail_n(t, 101, A, ALICE, 1) == [0]
    assert t.admit(102, A, ALICE).allowed


def test_address_lock_covers_every_account() -> None:
    """address_failures failures over many accounts from one address refuse the address."""
    t = AuthThrottle(ThrottlePolicy(pair_failures=5, address_failures=6))
    for i in range(6):
        fail_n(t, 0, A, f"u{i}@example.org", 1)
    r = t.admit(1, A, "new@example.org")
    assert not r.allowed and r.reason == "address"
    assert t.admit(1, B, "new@example.org").allowed


def test_success_clears_only_its_pair() -> None:
    """A right password resets its (account, address) count, not the address count."""
    t = AuthThrottle(ThrottlePolicy(pair_failures=3, address_failures=4, delay=1, max_delay=60))
    fail_n(t, 0, A, BOB, 2)
    assert t.admit(0, A, BOB).allowed
    t.succeeded(0, A, BOB)
    t.release(A)
    # the pair is clear, the address still remembers 2 failures: the next one waits 2 s
    assert fail_n(t, 0, A, BOB, 1) == [2]
    fail_n(t, 0, A, ALICE, 1)
    assert t.admit(0, A, "x@example.org").reason == "address"


def test_account_lock_spares_addresses_that_logged_in_before() -> None:
    """A distributed guess locks the account for strangers, not for its owner's usual address."""
    t = AuthThrottle(ThrottlePolicy(pair_failures=5, address_failures=5, account_failures=10))
    assert t.admit(0, B, ALICE).allowed
    t.succeeded(0, B, ALICE)
    t.release(B)
    for i in range(10):
        fail_n(t, 1, f"10.1.0.{i}", ALICE, 1)
    stranger = t.admit(2, "10.2.0.1", ALICE)
    assert not stranger.allowed and stranger.reason == "account"
    assert t.admit(2, B, ALICE).allowed


def test_concurrent_checks_per_address_are_bounded() -> None:
    """More than `concurrent` checks in flight from one address are refused until one ends."""
    t = AuthThrottle(ThrottlePolicy(concurrent=2))
    assert t.admit(0, A, ALICE).allowed and t.admit(0, A, BOB).allowed
    r = t.admit(0, A, "c@example.org")
    assert not r.allowed and r.reason == "concurrent"
    t.release(A)
    assert t.admit(0, A, "c@example.org").allowed
    assert t.status()["in_flight"] == 2


def test_ipv6_sources_are_grouped_by_64() -> None:
    """IPv6 peers count per /64, IPv4-mapped ones as IPv4; other strings as they are."""
    assert source_key("2001:db8::1") == source_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert source_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert source_key("unix") == "unix"


def test_tables_are_bounded_and_keep_locks() -> None:
    """A flood of fresh names stays within max_entries and does not evict a lock first."""
    t = AuthThrottle(ThrottlePolicy(pair_failures=2, max_entries=50, address_failures=10**6))
    fail_n(t, 0, A, ALICE, 2)
    for i in range(500):
        fail_n(t, 0, f"10.9.{i // 250}.{i % 250}", f"x{i}@example.org", 1)
    assert t.status()["tracked_accounts"] <= 50 and t.status()["tracked_addresses"] <= 50
    assert t.admit(1, A, ALICE).reason == "pair"


def test_policy_parse_rejects_unknown_and_bad_values() -> None:
    """--auth-throttle parsing: known keys set fields, unknown keys and bad numbers fail."""
    p = ThrottlePolicy.parse("delay=0.05, pair-failures=3")
    assert p.delay == 0.05 and p.pair_failures == 3 and p.lockout == 300
    for bad in ("nope=1", "delay=x", "pair-failures=0", "delay"):
        with pytest.raises(ValueError):
            ThrottlePolicy.parse(bad)


# --- the portal adapter on task.Clock ------------------------------------------


class Checker:
    """A portal whose password check answers from a table (or never, when held)."""

    def __init__(self, passwords: dict[str, str]) -> None:
        self.passwords = passwords
        self.checked = 0
        self.held: list[Deferred[Any]] = []

    def login(self, creds: Any, mind: Any, *ifaces: Any) -> Deferred[Any]:
        self.checked += 1
        user = login_address(creds.username, "example.org")
        if self.passwords.get(user) == creds.password.decode():
            return succeed((ifaces[0], user, lambda: None))
        return fail(UnauthorizedLogin())


def adapter(
    t: AuthThrottle, clock: Clock, checker: Checker, peer: str = A
) -> tuple[ThrottledPortal, list[str]]:
    closed: list[str] = []
    portal: Any = checker
    p = ThrottledPortal(portal, t, clock, peer, "example.org", lambda: closed.append("x"))
    return p, closed


def outcome(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def up(user: str, pw: str) -> credentials.UsernamePassword:
    return credentials.UsernamePassword(user.encode(), pw.encode())


def test_adapter_answers_failures_late_on_the_clock_and_closes() -> None:
    """Wrong passwords are answered after the delay; the third closes the connection."""
    clock, checker = Clock(), Checker({ALICE: "right"})
    t = AuthThrottle(ThrottlePolicy(delay=1, per_connection=3))
    portal, closed = adapter(t, clock, checker)
    first = outcome(portal.login(up("alice", "bad"), None, imap4.IAccount))
    assert isinstance(first[0], Failure) and first[0].check(UnauthorizedLogin)
    second = outcome(portal.login(up("alice", "bad"), None, imap4.IAccount))
    assert second == []
    clock.advance(0.99)
    assert second == [] and t.status()["in_flight"] == 1
    clock.advance(0.01)
    assert len(second) == 1 and not closed and t.status()["in_flight"] == 0
    third = outcome(portal.login(up("alice", "bad"), None, imap4.IAccount))
    clock.advance(2)
    assert len(third) == 1 and closed == ["x"]


def test_adapter_refuses_without_checking_and_closes() -> None:
    """A locked pair is refused with LoginThrottled before any password check, then closed."""
    clock, checker = Clock(), Checker({ALICE: "right"})
    t = AuthThrottle(ThrottlePolicy(delay=0, pair_failures=2, per_connection=10))
    portal, closed = adapter(t, clock, checker)
    for _ in range(2):
        outcome(portal.login(up("alice", "bad"), None, imap4.IAccount))
    checked = checker.checked
    r = outcome(portal.login(up("alice", "right"), None, imap4.IAccount))
    assert r[0].check(LoginThrottled) and checker.checked == checked
    assert closed == []
    clock.advance(0)
    assert closed == ["x"]


def test_adapter_right_password_from_elsewhere_is_prompt() -> None:
    """While one address is locked out, the right password from another answers at once."""
    clock, checker = Clock(), Checker({ALICE: "right"})
    t = AuthThrottle(ThrottlePolicy(delay=1, pair_failures=2))
    bad, _ = adapter(t, clock, checker, peer=A)
    for _ in range(2):
        outcome(bad.login(up("alice", "bad"), None, imap4.IAccount))
        clock.advance(10)
    good, closed = adapter(t, clock, checker, peer=B)
    r = outcome(good.login(up("alice", "right"), None, imap4.IAccount))
    assert len(r) == 1 and r[0][0] is imap4.IAccount and r[0][1] == ALICE
    assert not closed and t.status()["successes"] == 1


def test_adapter_one_check_at_a_time_per_connection() -> None:
    """A second login while one is pending on the same connection is refused unchecked."""
    clock, checker = Clock(), Checker({})
    t = AuthThrottle(ThrottlePolicy(delay=1))
    portal, _ = adapter(t, clock, checker)
    outcome(portal.login(up("a", "x"), None, imap4.IAccount))
    pending = outcome(portal.login(up("a", "x"), None, imap4.IAccount))
    assert pending == []
    extra = outcome(portal.login(up("a", "x"), None, imap4.IAccount))
    assert extra[0].check(LoginThrottled) and checker.checked == 2


# --- protocol replies --------------------------------------------------------------


def imap_server(portal: Any, clock: Clock, errors: ClientErrors | None = None) -> Any:
    """A connection of the node's IMAP factory whose logins go through ``portal``."""
    errors = errors or ClientErrors(clock.seconds)
    backend = PorcupineImapBackend(portal, MailboxRegistry(), clock, errors)
    return PorcupineImapFactory(backend, lambda p, addr: portal, errors, clock).buildProtocol(None)


def test_imap_login_replies_carry_rfc5530_codes() -> None:
    """IMAP: a wrong password is NO [AUTHENTICATIONFAILED], a throttled one NO [UNAVAILABLE]."""
    clock, checker = Clock(), Checker({ALICE: "right"})
    t = AuthThrottle(ThrottlePolicy(delay=0, pair_failures=1, per_connection=5))
    portal, _ = adapter(t, clock, checker)
    server = imap_server(portal, clock)
    tr = StringTransport()
    server.makeConnection(tr)
    tr.clear()
    server.dataReceived(b"a1 LOGIN alice bad\r\na2 LOGIN alice right\r\n")
    lines = tr.value().split(b"\r\n")
    assert lines[0].startswith(b"a1 NO [AUTHENTICATIONFAILED]")
    assert lines[1].startswith(b"a2 NO [UNAVAILABLE]")
    server.connectionLost(Failure(ConnectionError()))


def test_pop3_login_replies_carry_rfc3206_codes() -> None:
    """POP3: a wrong password is -ERR [AUTH], a throttled one -ERR [SYS/TEMP]."""
    clock, checker = Clock(), Checker({ALICE: "right"})
    t = AuthThrottle(ThrottlePolicy(delay=0, pair_failures=1, per_connection=5))
    server = MailPOP3(clock)
    portal, _ = adapter(t, clock, checker)
    server.portal = portal  # type: ignore[assignment]
    tr = StringTransport()
    server.makeConnection(tr)
    tr.clear()
    server.dataReceived(b"USER alice\r\nPASS bad\r\nUSER alice\r\nPASS right\r\n")
    lines = tr.value().split(b"\r\n")
    assert lines[1].startswith(b"-ERR [AUTH]") and lines[3].startswith(b"-ERR [SYS/TEMP]")
    server.connectionLost(Failure(ConnectionError()))


class SlowChecker(Checker):
    """Holds every password check until the test answers it."""

    def login(self, creds: Any, mind: Any, *ifaces: Any) -> Deferred[Any]:
        self.checked += 1
        d: Deferred[Any] = Deferred()
        self.held.append(d)
        return d


def test_more_parallel_logins_than_slots_wait_for_a_slot_not_a_refusal() -> None:
    """Six connections of one client log in at once (mail clients open several): the
    two beyond the 4 slots wait, are checked when slots free, and nobody is closed."""
    clock, checker = Clock(), SlowChecker({})
    t = AuthThrottle(ThrottlePolicy(concurrent=4))
    portals = [adapter(t, clock, checker) for _ in range(6)]
    results = [outcome(p.login(up("alice", "right"), None, imap4.IAccount)) for p, _ in portals]
    assert checker.checked == 4 and all(r == [] for r in results)
    checker.held.pop(0).callback((imap4.IAccount, ALICE, lambda: None))
    clock.advance(0.05)
    assert checker.checked == 5
    for d in list(checker.held):
        d.callback((imap4.IAccount, ALICE, lambda: None))
    checker.held.clear()
    clock.advance(0.1)
    for d in checker.held:
        d.callback((imap4.IAccount, ALICE, lambda: None))
    assert checker.checked == 6 and all(r and r[0][1] == ALICE for r in results)
    assert not any(closed for _, closed in portals) and t.status()["in_flight"] == 0


def test_a_login_waiting_too_long_for_a_slot_is_refused() -> None:
    """A slot that never frees: after the bounded wait the login is refused and closed."""
    clock, checker = Clock(), SlowChecker({})
    t = AuthThrottle(ThrottlePolicy(concurrent=1))
    first, _ = adapter(t, clock, checker)
    second, closed = adapter(t, clock, checker)
    outcome(first.login(up("alice", "x"), None, imap4.IAccount))
    waiting = outcome(second.login(up("alice", "x"), None, imap4.IAccount))
    clock.pump([0.5] * 21)
    assert waiting and isinstance(waiting[0], Failure) and waiting[0].check(LoginThrottled)
    assert closed and checker.checked == 1


def test_imap_login_with_the_profile_node_unavailable_is_no_unavailable() -> None:
    """IMAP: a login check failing with PeerUnavailable is NO [UNAVAILABLE] and a count, no traceback."""

    class DownPortal:
        def login(self, *a: Any) -> Any:
            return fail(PeerUnavailable("127.0.0.9:7946: timed out"))

    errors = ClientErrors(Clock().seconds)
    server = imap_server(DownPortal(), Clock(), errors)
    tr = StringTransport()
    server.makeConnection(tr)
    tr.clear()
    with capturedLogs() as events:
        server.dataReceived(b"a1 LOGIN alice pw\r\n")
    assert tr.value().startswith(b"a1 NO [UNAVAILABLE]")
    assert errors.counts["imap.login_peer_unavailable"] == 1
    assert not [e for e in events if e.get("log_failure") is not None]
    server.connectionLost(Failure(ConnectionError()))
