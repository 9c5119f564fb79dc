"""The verified-credential cache: AuthCache alone, in the profile DB, and behind the throttle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mailtest_helpers import ImmediateReactor, SyncPool, fast_hash, result_of
from prometheus_client import CollectorRegistry, generate_latest
from twisted.cred import portal as cred_portal
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.mail import imap4
from twisted.python.failure import Failure
from zope.interface import implementer

from yimaporc.admin.metrics import families
from yimaporc.porcupine.auth import ManagerChecker, ThrottledPortal
from yimaporc.porcupine.authcache import AuthCache
from yimaporc.porcupine.cluster import ProfileReplicator
from yimaporc.porcupine.profiledb import ProfileDB, check_password
from yimaporc.porcupine.retrieval import RetrievalProxy
from yimaporc.porcupine.throttle import AuthThrottle, LoginThrottled, ThrottlePolicy
from yimaporc.porcupine.users import UserManager
from yimaporc.porcupine.values import BadCredentials

A = "alice@example.org"
B = "bob@example.org"
H1 = "scrypt$16$1$1$c2FsdDE=$aGFzaDE="
H2 = "scrypt$16$1$1$c2FsdDI=$aGFzaDI="


# --- AuthCache alone ------------------------------------------------------------------


def test_hit_needs_same_address_hash_and_password() -> None:
    """Only the exact (address, stored hash, password) remembered matches."""
    clock = Clock()
    cache = AuthCache(clock.seconds, ttl=60, max_entries=10)
    cache.remember(A, H1, "pw")
    assert cache.check(A, H1, "pw")
    assert not cache.check(A, H1, "pW")  # wrong password
    assert not cache.check(A, H2, "pw")  # the hash changed: a passwd not heard of
    assert not cache.check(B, H1, "pw")  # another user
    assert not cache.check(A, "", "pw")  # no stored hash (deleted): never a hit
    assert (cache.hits, cache.misses) == (1, 3)


def test_entries_hold_no_password() -> None:
    """An entry is a keyed digest: the password and the stored hash appear nowhere."""
    cache = AuthCache(Clock().seconds, key=b"k" * 32)
    cache.remember(A, H1, "correct horse")
    dump = repr(cache._entries) + repr(cache._by_address)
    assert "correct horse" not in dump and H1 not in dump
    other = AuthCache(Clock().seconds, key=b"j" * 32)  # another process, another key
    other.remember(A, H1, "correct horse")
    assert set(cache._entries) != set(other._entries)


def test_ttl_expiry() -> None:
    """An entry answers until ttl seconds after it was made, never after."""
    clock = Clock()
    cache = AuthCache(clock.seconds, ttl=60)
    cache.remember(A, H1, "pw")
    clock.advance(59.9)
    assert cache.check(A, H1, "pw")  # a hit does not extend the entry
    clock.advance(0.1)
    assert not cache.check(A, H1, "pw")
    assert len(cache) == 0


def test_lru_bound() -> None:
    """At max_entries the least recently used entry goes first."""
    cache = AuthCache(Clock().seconds, ttl=60, max_entries=2)
    cache.remember(A, H1, "a")
    cache.remember(B, H1, "b")
    assert cache.check(A, H1, "a")  # A is now the most recent
    cache.remember("carol@example.org", H1, "c")
    assert len(cache) == 2
    assert cache.check(A, H1, "a") and not cache.check(B, H1, "b")
    assert cache.check("carol@example.org", H1, "c")
    assert B not in cache._by_address  # the per-address index is bounded too


def test_forget_drops_every_entry_of_one_address_only() -> None:
    """forget(address) drops that address's entries (old and new hash), not others'."""
    cache = AuthCache(Clock().seconds)
    cache.remember(A, H1, "pw")
    cache.remember(A, H2, "pw2")
    cache.remember(B, H1, "pw")
    cache.forget(A)
    assert not cache.check(A, H1, "pw") and not cache.check(A, H2, "pw2")
    assert cache.check(B, H1, "pw")


def test_zero_ttl_or_size_disables_and_bounds_are_checked() -> None:
    """ttl 0 or size 0 caches nothing (and counts nothing); out-of-range values raise."""
    for cache in (AuthCache(Clock().seconds, ttl=0), AuthCache(Clock().seconds, max_entries=0)):
        cache.remember(A, H1, "pw")
        cache.miss()
        assert not cache.check(A, H1, "pw") and len(cache) == 0
        assert (cache.hits, cache.misses) == (0, 0)
    for bad in ({"ttl": -1}, {"ttl": float("nan")}, {"ttl": 1e9}, {"max_entries": -1}):
        with pytest.raises(ValueError):
            AuthCache(Clock().seconds, **bad)  # type: ignore[arg-type]


# --- in the profile DB ----------------------------------------------------------------


class CountingPool(SyncPool):
    """SyncPool counting the jobs run, or holding them while ``hold`` is set."""

    def __init__(self) -> None:
        self.jobs = 0
        self.hold = False
        self.held: list[Any] = []

    def callInThreadWithCallback(self, on_result: Any, f: Any, *a: Any, **kw: Any) -> None:
        self.jobs += 1
        if self.hold:
            self.held.append((on_result, f, a, kw))
            return
        super().callInThreadWithCallback(on_result, f, *a, **kw)

    def release(self) -> None:
        held, self.held = self.held, []
        for on_result, f, a, kw in held:
            super().callInThreadWithCallback(on_result, f, *a, **kw)


class Scrypt:
    """check_password, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, password: str, stored: str) -> bool:
        self.calls += 1
        return check_password(password, stored)


def make_db(
    tmp_path: Path, name: str = "n1", ttl: float = 300, size: int = 100
) -> tuple[ProfileDB, ImmediateReactor, CountingPool, Scrypt]:
    reactor, pool, scrypt = ImmediateReactor(), CountingPool(), Scrypt()
    db = ProfileDB(
        reactor,
        pool,  # type: ignore[arg-type]
        tmp_path / name / "profiles.sqlite",
        lambda: 1_700_000_000.0 + reactor.seconds(),
        hasher=fast_hash,
        auth_cache_ttl=ttl,
        auth_cache_size=size,
        checker=scrypt,
    )
    return db, reactor, pool, scrypt


def failed(d: Deferred[Any]) -> bool:
    try:
        result_of(d)
    except BadCredentials:
        return True
    return False


def test_hit_skips_scrypt_and_the_pool(tmp_path: Path) -> None:
    """A second login with the same password runs no scrypt and no pool job."""
    db, _, pool, scrypt = make_db(tmp_path)
    result_of(db.add(A, "pw"))
    assert result_of(db.verify(A, "pw")).address == A
    calls, jobs = scrypt.calls, pool.jobs
    for _ in range(5):
        assert result_of(db.verify(A.upper(), "pw")).address == A
    assert (scrypt.calls, pool.jobs) == (calls, jobs)
    assert (db.auth_cache.hits, db.auth_cache.misses) == (5, 1)


def test_wrong_password_never_hits(tmp_path: Path) -> None:
    """With the right password cached, a wrong one still runs scrypt and fails, every time."""
    db, _, _, scrypt = make_db(tmp_path)
    result_of(db.add(A, "pw"))
    result_of(db.verify(A, "pw"))
    for i, wrong in enumerate(["pw ", "PW", "", "pw" * 100]):
        assert failed(db.verify(A, wrong))
        assert scrypt.calls == 2 + i
    assert result_of(db.verify(A, "pw")).address == A and scrypt.calls == 5
    assert db.auth_cache.hits == 1


def test_failures_are_not_cached(tmp_path: Path) -> None:
    """A failed check leaves nothing behind: the same wrong password runs scrypt again."""
    db, _, _, scrypt = make_db(tmp_path)
    result_of(db.add(A, "pw"))
    assert failed(db.verify(A, "bad")) and failed(db.verify(A, "bad"))
    assert failed(db.verify("nobody@example.org", "x"))
    assert scrypt.calls == 3 and len(db.auth_cache) == 0


def test_ttl_expiry_runs_scrypt_again(tmp_path: Path) -> None:
    """After the TTL the next login is checked with scrypt (and cached again)."""
    db, reactor, _, scrypt = make_db(tmp_path, ttl=60)
    result_of(db.add(A, "pw"))
    result_of(db.verify(A, "pw"))
    reactor.advance(59)
    result_of(db.verify(A, "pw"))
    assert scrypt.calls == 1
    reactor.advance(1)
    result_of(db.verify(A, "pw"))
    assert scrypt.calls == 2
    result_of(db.verify(A, "pw"))
    assert scrypt.calls == 2


def test_lru_bound_in_the_profile_db(tmp_path: Path) -> None:
    """With size 2 a third user's login evicts the least recent one, which pays scrypt again."""
    db, _, _, scrypt = make_db(tmp_path, size=2)
    users = [f"u{i}@example.org" for i in range(3)]
    for u in users:
        result_of(db.add(u, "pw"))
        result_of(db.verify(u, "pw"))
    assert scrypt.calls == 3 and len(db.auth_cache) == 2 and len(db._verified) == 2
    result_of(db.verify(users[2], "pw"))
    result_of(db.verify(users[1], "pw"))
    assert scrypt.calls == 3
    result_of(db.verify(users[0], "pw"))
    assert scrypt.calls == 4


def test_zero_ttl_checks_every_login(tmp_path: Path) -> None:
    """--auth-cache-ttl 0: every login runs scrypt."""
    db, _, _, scrypt = make_db(tmp_path, ttl=0)
    result_of(db.add(A, "pw"))
    for _ in range(3):
        result_of(db.verify(A, "pw"))
    assert scrypt.calls == 3


def test_passwd_flushes(tmp_path: Path) -> None:
    """After passwd the old password fails (scrypt runs) and the new one is cached anew."""
    db, _, _, scrypt = make_db(tmp_path)
    result_of(db.add(A, "old"))
    result_of(db.verify(A, "old"))
    result_of(db.set_password(A, "new"))
    assert failed(db.verify(A, "old")) and scrypt.calls == 2
    assert result_of(db.verify(A, "new")).address == A
    assert result_of(db.verify(A, "new")).address == A and scrypt.calls == 3


def test_passwd_to_the_same_password_drops_the_entry(tmp_path: Path) -> None:
    """passwd to the same password makes a new salted hash: the old entry cannot answer."""
    db, _, _, scrypt = make_db(tmp_path)
    result_of(db.add(A, "pw"))
    result_of(db.verify(A, "pw"))
    result_of(db.set_password(A, "pw"))
    result_of(db.verify(A, "pw"))
    assert scrypt.calls == 2


def test_deluser_flushes(tmp_path: Path) -> None:
    """After deluser the cached password fails at once; a re-created user needs scrypt."""
    db, _, _, scrypt = make_db(tmp_path)
    result_of(db.add(A, "pw"))
    result_of(db.verify(A, "pw"))
    result_of(db.remove(A))
    assert failed(db.verify(A, "pw"))
    result_of(db.add(A, "pw"))
    calls = scrypt.calls
    result_of(db.verify(A, "pw"))
    assert scrypt.calls == calls + 1


def test_check_racing_a_change_caches_nothing(tmp_path: Path) -> None:
    """A check that read the old hash before a passwd finished does not cache it."""
    db, _, pool, scrypt = make_db(tmp_path)
    result_of(db.add(A, "old"))
    pool.hold = True
    d = db.verify(A, "old")
    on_result, f, a, kw = pool.held.pop()
    outcome = f(*a, **kw)  # the thread half: reads the old hash, scrypt says yes
    pool.hold = False
    result_of(db.set_password(A, "new"))  # lands before that result reaches the reactor
    on_result(True, outcome)
    assert result_of(d).address == A
    calls = scrypt.calls
    assert failed(db.verify(A, "old")) and scrypt.calls == calls + 1


def test_change_arriving_from_another_node_flushes(tmp_path: Path) -> None:
    """passwd/deluser on node A, merged on node B (the replicator's receive): B's cache drops."""
    db_a, _, _, _ = make_db(tmp_path, "a")
    db_b, _, _, scrypt_b = make_db(tmp_path, "b")
    forgotten: list[str] = []
    repl_a = ProfileReplicator(db_a, lambda a: None)
    repl_b = ProfileReplicator(db_b, forgotten.append)
    result_of(repl_a.add(A, "old"))
    result_of(repl_b.receive([result_of(db_a.record(A))]))
    result_of(db_b.verify(A, "old"))
    result_of(db_b.verify(A, "old"))
    assert scrypt_b.calls == 1 and db_b.auth_cache.hits == 1
    result_of(repl_a.set_password(A, "new"))
    result_of(repl_b.receive([result_of(db_a.record(A))]))
    assert failed(db_b.verify(A, "old"))
    assert result_of(db_b.verify(A, "new")).address == A
    result_of(repl_a.remove(A))
    result_of(repl_b.receive([result_of(db_a.record(A))]))
    assert failed(db_b.verify(A, "new"))
    assert forgotten.count(A) == 3


def test_profile_update_applied_by_replication_flushes(tmp_path: Path) -> None:
    """The replication log's apply hook (a profile/<address> update) flushes the cache."""
    from yimaporc.porcupine.replication.mail import MailReplication
    from yimaporc.porcupine.replication.objects import PROFILE
    from yimaporc.porcupine.topology import LocalTopology

    db, _, _, scrypt = make_db(tmp_path)
    result_of(db.add(A, "pw"))
    result_of(db.verify(A, "pw"))
    # The row changes underneath (as the object store's apply does), then the hook runs.
    db._db.set_hash(A, fast_hash("new"))

    class Storage:
        profiles = db

        def run_blocking(self, f: Any, *a: Any) -> Deferred[Any]:
            return succeed(f(*a))

    class Update:
        object_id = PROFILE + A
        body = b""

    shell: Any = MailReplication.__new__(MailReplication)
    shell.storage, shell._fragment_known = Storage(), set()
    shell.topology = LocalTopology("n1", db, None)  # type: ignore[arg-type]
    MailReplication._applied(shell, Update())  # type: ignore[arg-type]
    assert failed(db.verify(A, "pw")) and scrypt.calls == 2


def test_status_and_metrics_count_hits_and_misses(tmp_path: Path) -> None:
    """The auth status carries the cache counters; /metrics shows them as *_total."""
    db, _, _, _ = make_db(tmp_path)
    result_of(db.add(A, "pw"))
    for _ in range(3):
        result_of(db.verify(A, "pw"))
    status = db.auth_cache.status()
    assert (status["cache_hits"], status["cache_misses"], status["cache_entries"]) == (2, 1, 1)
    doc = {"kind": "porcupine", "node_id": "n1", "auth": status}

    class Collector:
        def collect(self) -> Any:
            yield from families(doc)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert "yimaporc_mail_auth_cache_hits_total 2" in text
    assert "yimaporc_mail_auth_cache_misses_total 1" in text
    assert "yimaporc_mail_auth_cache_shared_total 0" in text


def test_concurrent_logins_with_one_password_share_one_check(tmp_path: Path) -> None:
    """Logins of one address with the same password while its check runs wait for that
    check: one pool job and one scrypt for all, each gets the profile; the next is a hit."""
    db, _, pool, scrypt = make_db(tmp_path)
    result_of(db.add(A, "pw"))
    jobs = pool.jobs
    pool.hold = True
    outs: list[list[Any]] = []
    for who in (A, A.upper(), A):
        out: list[Any] = []
        db.verify(who, "pw").addBoth(out.append)
        outs.append(out)
    assert pool.jobs == jobs + 1 and outs == [[], [], []]
    pool.hold = False
    pool.release()
    assert [o[0].address for o in outs] == [A, A, A] and scrypt.calls == 1
    status = db.auth_cache.status()
    assert (status["cache_misses"], status["cache_shared"], status["cache_hits"]) == (1, 2, 0)
    assert result_of(db.verify(A, "pw")).address == A and scrypt.calls == 1
    assert not db._flights


def test_a_shared_check_is_never_shared_across_passwords_users_or_changes(
    tmp_path: Path,
) -> None:
    """Only the same address, the same password and no profile change in between share a
    check: another password (a wrong one fails alone), another user, or a passwd while the
    check runs each get their own scrypt; waiters of a failed check fail with it."""
    db, _, pool, scrypt = make_db(tmp_path)
    result_of(db.add(A, "pw"))
    result_of(db.add(B, "pw"))
    pool.hold = True
    out: dict[str, list[Any]] = {}
    for name, who, pw in [
        ("a", A, "pw"), ("a_wrong", A, "bad"), ("a_wrong2", A, "bad"), ("b", B, "pw")
    ]:  # fmt: skip
        out[name] = []
        db.verify(who, pw).addBoth(out[name].append)
    assert pool.jobs - 2 == 3  # two adds, then a, a_wrong (a_wrong2 waits on it), b
    pool.hold = False
    result_of(db.set_password(A, "pw"))  # a change while a's check is held
    pool.hold = True
    late: list[Any] = []
    db.verify(A, "pw").addBoth(late.append)  # after the change: not joined to the old check
    assert len(pool.held) == 4
    pool.hold = False
    pool.release()
    assert out["a"][0].address == A and out["b"][0].address == B and late[0].address == A
    for name in ("a_wrong", "a_wrong2"):
        assert isinstance(out[name][0], Failure) and out[name][0].check(BadCredentials)
    assert scrypt.calls == 4 and db.auth_cache.shared == 1


def test_zero_ttl_shares_nothing(tmp_path: Path) -> None:
    """With the cache off (--auth-cache-ttl 0) concurrent logins each run their own check."""
    db, _, pool, scrypt = make_db(tmp_path, ttl=0)
    result_of(db.add(A, "pw"))
    pool.hold = True
    outs: list[list[Any]] = [[], []]
    for out in outs:
        db.verify(A, "pw").addBoth(out.append)
    pool.hold = False
    pool.release()
    assert [o[0].address for o in outs] == [A, A] and scrypt.calls == 2


# --- behind the throttle ----------------------------------------------------------------


@implementer(cred_portal.IRealm)
class Realm:
    def requestAvatar(self, avatar_id: Any, mind: Any, *ifaces: Any) -> Any:
        return (ifaces[0], avatar_id, lambda: None)


def test_throttle_still_locks_a_cached_password(tmp_path: Path) -> None:
    """A locked account/address pair is refused before the cache: even the cached right
    password gets LoginThrottled, and wrong passwords meanwhile all ran scrypt."""
    db, _, _, scrypt = make_db(tmp_path)
    result_of(db.add(A, "pw"))
    users = UserManager("n1", db)
    retrieval = RetrievalProxy("n1", lambda a: users, lambda n: None)  # type: ignore[arg-type,return-value]
    portal = cred_portal.Portal(Realm(), [ManagerChecker(retrieval, "example.org")])
    clock = Clock()
    throttle = AuthThrottle(ThrottlePolicy(delay=0, pair_failures=3, per_connection=10))

    def login(pw: str) -> list[Any]:
        p = ThrottledPortal(portal, throttle, clock, "10.0.0.1", "example.org", lambda: None)
        out: list[Any] = []
        p.login(UsernamePassword(b"alice", pw.encode()), None, imap4.IAccount).addBoth(out.append)
        clock.advance(0)
        return out

    assert login("pw")[0][1] == A.encode()  # cached now
    assert login("pw")[0][1] == A.encode() and scrypt.calls == 1  # a hit
    for i in range(3):
        r = login("wrong")
        assert isinstance(r[0], Failure) and r[0].check(UnauthorizedLogin)
        assert scrypt.calls == 2 + i
    r = login("pw")
    assert isinstance(r[0], Failure) and r[0].check(LoginThrottled)
    assert db.auth_cache.hits == 1  # refused before the cache was asked
    assert throttle.status()["refused"] == 1


# --- the options ----------------------------------------------------------------------


def test_options_validate_and_reach_the_profile_db(tmp_path: Path) -> None:
    """--auth-cache-ttl/--auth-cache-size: defaults 300 s/10000, bad values are UsageErrors,
    and the values given are the node's cache's."""
    from twisted.python import usage

    from yimaporc.porcupine.service import MailService
    from yimaporc.tap.porcupine import Options

    base = ["--node-id", "n", "--cluster", "tcp:7946:interface=127.0.133.9"]
    base += ["--domain", "example.org", "--data-dir", str(tmp_path)]

    def parse(*extra: str) -> Options:
        o = Options()
        o.parseOptions([*base, *extra])
        return o

    o = parse()
    assert (o.auth_cache_ttl, o.auth_cache_size) == (300.0, 10_000)
    o = parse("--auth-cache-ttl", "0", "--auth-cache-size", "5")
    assert (o.auth_cache_ttl, o.auth_cache_size) == (0.0, 5)
    for extra in (
        ["--auth-cache-ttl", "-1"],
        ["--auth-cache-ttl", "soon"],
        ["--auth-cache-ttl", "nan"],
        ["--auth-cache-ttl", "1e9"],
        ["--auth-cache-size", "-3"],
        ["--auth-cache-size", "1.5"],
        ["--auth-cache-size", "99999999999"],
    ):
        with pytest.raises(usage.UsageError):
            parse(*extra)
    mail = MailService(
        Clock(), node_id="n", data_dir=tmp_path, domain="example.org",
        auth_cache_ttl=7, auth_cache_size=3,
    )  # fmt: skip
    try:
        cache = mail.profiles.auth_cache
        assert (cache.ttl, cache.max_entries) == (7.0, 3)
        assert mail.status()["auth"]["cache_hits"] == 0
    finally:
        mail.profiles.close()


def test_slot_covers_the_password_check_not_the_avatar(tmp_path: Path) -> None:
    """A login's concurrency slot is freed once its password is checked: a slow avatar
    (POP3 reading the mailbox listing) does not hold back other logins from that address."""
    db, _, _, _ = make_db(tmp_path)
    result_of(db.add(A, "pw"))
    result_of(db.add(B, "pw"))
    users = UserManager("n1", db)
    retrieval = RetrievalProxy("n1", lambda a: users, lambda n: None)  # type: ignore[arg-type,return-value]
    pending: list[Deferred[Any]] = []

    @implementer(cred_portal.IRealm)
    class SlowRealm:
        def requestAvatar(self, avatar_id: Any, mind: Any, *ifaces: Any) -> Any:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            return d.addCallback(lambda _: (ifaces[0], avatar_id, lambda: None))

    portal = cred_portal.Portal(SlowRealm(), [ManagerChecker(retrieval, "example.org")])
    clock = Clock()
    throttle = AuthThrottle(ThrottlePolicy(concurrent=1))

    def login(user: bytes) -> list[Any]:
        p = ThrottledPortal(portal, throttle, clock, "10.0.0.1", "example.org", lambda: None)
        out: list[Any] = []
        p.login(UsernamePassword(user, b"pw"), None, imap4.IAccount).addBoth(out.append)
        return out

    first = login(b"alice")
    assert first == [] and len(pending) == 1 and throttle.status()["in_flight"] == 0
    second = login(b"bob")  # admitted at once although alice's avatar is not ready
    assert len(pending) == 2 and throttle.status()["refused"] == 0
    for d in pending:
        d.callback(None)
    assert first[0][1] == A.encode() and second[0][1] == B.encode()
    assert throttle.status()["successes"] == 2 and throttle.status()["in_flight"] == 0


# --- waiting for a slot -----------------------------------------------------------------


class HeldChecker:
    """A portal stand-in whose password checks succeed only when the test fires them."""

    def __init__(self) -> None:
        self.held: list[Deferred[Any]] = []

    def login(self, creds: Any, mind: Any, *ifaces: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.held.append(d)
        return d


def test_waiting_logins_are_woken_by_released_slots_in_order() -> None:
    """With every slot of an address busy, further logins wait without polling: each
    released slot admits the oldest waiter on the next reactor turn."""
    from yimaporc.porcupine.auth import SlotWaiters

    clock, checker = Clock(), HeldChecker()
    throttle = AuthThrottle(ThrottlePolicy(concurrent=1))
    waiters = SlotWaiters(clock)
    closed: list[int] = []

    def login(i: int) -> list[Any]:
        p = ThrottledPortal(
            checker,  # type: ignore[arg-type]
            throttle, clock, "10.0.0.1", "example.org", lambda: closed.append(i), waiters,
        )  # fmt: skip
        out: list[Any] = []
        p.login(UsernamePassword(b"alice", b"pw"), None, imap4.IAccount).addBoth(out.append)
        return out

    results = [login(i) for i in range(3)]
    assert len(checker.held) == 1 and len(waiters) == 2
    clock.advance(5)  # no timer polls meanwhile: the refusals stay at the first two
    assert len(checker.held) == 1 and throttle.status()["refused"] == 2
    checker.held[0].callback((imap4.IAccount, "first", lambda: None))
    assert len(checker.held) == 1  # woken on the next turn, not inside the answer
    clock.advance(0)
    assert len(checker.held) == 2 and len(waiters) == 1
    checker.held[1].callback((imap4.IAccount, "second", lambda: None))
    clock.advance(0)
    checker.held[2].callback((imap4.IAccount, "third", lambda: None))
    assert [r[0][1] for r in results] == ["first", "second", "third"]
    assert len(waiters) == 0 and throttle.status()["in_flight"] == 0 and not closed


def test_a_waiter_is_refused_after_the_bounded_wait() -> None:
    """A slot that never frees: the waiting login is refused with LoginThrottled and closed
    after CONCURRENT_WAIT, and a later release does not wake it."""
    from yimaporc.porcupine.auth import CONCURRENT_WAIT, SlotWaiters

    clock, checker = Clock(), HeldChecker()
    throttle = AuthThrottle(ThrottlePolicy(concurrent=1))
    waiters = SlotWaiters(clock)
    closed: list[str] = []
    portal: Any = checker
    portals = [
        ThrottledPortal(
            portal, throttle, clock, "10.0.0.1", "example.org", lambda: closed.append("x"), waiters
        )
        for _ in range(2)
    ]
    outs: list[list[Any]] = [[], []]
    for p, out in zip(portals, outs, strict=True):
        p.login(UsernamePassword(b"alice", b"pw"), None, imap4.IAccount).addBoth(out.append)
    clock.advance(CONCURRENT_WAIT - 0.01)
    assert outs[1] == []
    clock.advance(0.01)
    assert isinstance(outs[1][0], Failure) and outs[1][0].check(LoginThrottled)
    clock.advance(0)
    assert closed == ["x"] and len(waiters) == 0
    checker.held[0].callback((imap4.IAccount, "first", lambda: None))
    clock.advance(0)
    assert len(checker.held) == 1 and outs[0][0][1] == "first"


def test_cached_login_needs_no_slot_and_skips_the_queue(tmp_path: Path) -> None:
    """While an address's only slot runs another user's scrypt, a login the cache vouches
    for is answered at once (no slot, no pool job); a wrong password still waits its turn."""
    from yimaporc.porcupine.auth import SlotWaiters

    db, _, pool, scrypt = make_db(tmp_path)
    result_of(db.add(A, "pw"))
    result_of(db.add(B, "pw"))
    result_of(db.verify(A, "pw"))
    users = UserManager("n1", db)
    retrieval = RetrievalProxy("n1", lambda a: users, lambda n: None)  # type: ignore[arg-type,return-value]
    portal = cred_portal.Portal(Realm(), [ManagerChecker(retrieval, "example.org")])
    clock = Clock()
    throttle = AuthThrottle(ThrottlePolicy(concurrent=1, delay=0))
    waiters = SlotWaiters(clock)

    def login(user: bytes, pw: bytes) -> list[Any]:
        p = ThrottledPortal(
            portal, throttle, clock, "10.0.0.1", "example.org", lambda: None, waiters
        )
        out: list[Any] = []
        p.login(UsernamePassword(user, pw), None, imap4.IAccount).addBoth(out.append)
        return out

    pool.hold = True
    bob = login(b"bob", b"pw")
    assert bob == [] and throttle.status()["in_flight"] == 1 and len(pool.held) == 1
    jobs, calls = pool.jobs, scrypt.calls
    alice = login(b"alice", b"pw")
    assert alice[0][1] == A.encode()  # at once
    assert (pool.jobs, scrypt.calls) == (jobs, calls)
    wrong = login(b"alice", b"nope")
    assert wrong == [] and len(waiters) == 1  # a miss: waits for the slot
    pool.hold = False
    pool.release()
    assert bob[0][1] == B.encode()
    clock.advance(0)
    assert isinstance(wrong[0], Failure) and wrong[0].check(UnauthorizedLogin)
    status = throttle.status()
    assert (status["attempts"], status["successes"], status["failures"]) == (4, 2, 1)
    assert status["in_flight"] == 0 and db.auth_cache.hits == 1


def test_a_woken_login_answered_from_the_cache_passes_the_slot_on(tmp_path: Path) -> None:
    """A waiter woken by a released slot that then needs none (the cache vouches for it
    by now) wakes the next waiter, which would otherwise wait out CONCURRENT_WAIT."""
    from yimaporc.porcupine.auth import SlotWaiters

    db, _, pool, _ = make_db(tmp_path)
    result_of(db.add(A, "pw"))
    result_of(db.add(B, "pw"))
    users = UserManager("n1", db)
    retrieval = RetrievalProxy("n1", lambda a: users, lambda n: None)  # type: ignore[arg-type,return-value]
    portal = cred_portal.Portal(Realm(), [ManagerChecker(retrieval, "example.org")])
    clock = Clock()
    throttle = AuthThrottle(ThrottlePolicy(concurrent=1))
    waiters = SlotWaiters(clock)

    def login(user: bytes) -> list[Any]:
        p = ThrottledPortal(
            portal, throttle, clock, "10.0.0.1", "example.org", lambda: None, waiters
        )
        out: list[Any] = []
        p.login(UsernamePassword(user, b"pw"), None, imap4.IAccount).addBoth(out.append)
        return out

    pool.hold = True
    first, again, bob = login(b"alice"), login(b"alice"), login(b"bob")
    assert len(pool.held) == 1 and len(waiters) == 2
    pool.release()  # alice checked and cached: her slot wakes "again"...
    clock.advance(0)  # ...answered from the cache, which wakes bob
    assert first[0][1] == A.encode() and again[0][1] == A.encode()
    clock.advance(0)
    assert len(pool.held) == 1 and len(waiters) == 0  # bob's check is running
    pool.hold = False
    pool.release()
    assert bob[0][1] == B.encode() and throttle.status()["in_flight"] == 0
