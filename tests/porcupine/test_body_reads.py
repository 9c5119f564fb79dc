"""Body reads from memory (issue 20): the body cache and POP3 read-ahead, counted in pool jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mailtest_helpers import ImmediateReactor, SyncPool, result_of
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail import pop3

from yimaporc.porcupine._pop3 import MailPOP3, Pop3Mailbox
from yimaporc.porcupine.bodycache import BodyCache
from yimaporc.porcupine.fragments import FragmentStore, MailboxManager
from yimaporc.porcupine.mailindex import MailIndex
from yimaporc.porcupine.values import INBOX, Digest, NewMessage

A = "alice@example.org"
B = "bob@example.org"
T0 = 1_700_000_000.0


class CountingPool(SyncPool):
    """SyncPool that records the jobs handed to it; ``hold`` keeps them until ``run``."""

    def __init__(self) -> None:
        self.jobs: list[str] = []
        self.hold = False
        self.held: list[tuple[Any, Any, Any, Any]] = []

    def callInThreadWithCallback(self, on_result: Any, f: Any, *a: Any, **kw: Any) -> None:
        self.jobs.append(getattr(f, "__name__", repr(f)))
        if self.hold:
            self.held.append((on_result, f, a, kw))
            return
        super().callInThreadWithCallback(on_result, f, *a, **kw)

    def run(self, reverse: bool = False) -> None:
        held, self.held = self.held, []
        for on_result, f, a, kw in reversed(held) if reverse else held:
            super().callInThreadWithCallback(on_result, f, *a, **kw)


# --- BodyCache alone ------------------------------------------------------------------


def test_cache_is_lru_within_its_byte_bound() -> None:
    """Bytes held never exceed the bound; the least recently used body goes first; a body
    above bound/16 is never kept."""
    cache = BodyCache(max_bytes=1600)
    for k in ("a", "b", "c"):
        cache.put(A, k, b"x" * 100)
    assert cache.get(A, "a") == b"x" * 100  # a is now the most recent
    for k in range(14):
        cache.put(B, f"k{k}", b"y" * 100)
        assert cache.bytes <= 1600
    assert cache.get(A, "a") is not None
    assert cache.get(A, "b") is None and cache.evictions >= 1
    cache.put(A, "big", b"z" * 101)  # above 1600 // 16
    assert cache.get(A, "big") is None
    assert cache.bytes == sum(len(v) for v in cache._entries.values())


def test_forget_user_drops_only_that_user_and_blocks_stale_puts() -> None:
    """forget_user drops the user's bodies (others stay) and a put with the generation taken
    before it is not kept; one taken after is."""
    cache = BodyCache(max_bytes=10_000)
    cache.put(A, "k1", b"one")
    cache.put(B, "k1", b"bob")
    before = cache.generation(A)
    cache.forget_user(A)
    assert cache.get(A, "k1") is None and cache.get(B, "k1") == b"bob"
    assert cache.bytes == 3
    cache.put(A, "k2", b"two", before)
    assert cache.get(A, "k2") is None
    cache.put(A, "k2", b"two", cache.generation(A))
    assert cache.get(A, "k2") == b"two"


def test_bad_bounds_are_refused_and_zero_is_off() -> None:
    """A negative or huge bound is a ValueError; 0 keeps nothing."""
    with pytest.raises(ValueError):
        BodyCache(-1)
    with pytest.raises(ValueError):
        BodyCache(1 << 40)
    off = BodyCache(0)
    off.put(A, "k", b"x")
    assert not off.enabled and len(off) == 0


# --- through the manager ------------------------------------------------------------


@pytest.fixture
def cached(tmp_path: Path) -> tuple[MailboxManager, FragmentStore, CountingPool]:
    store = FragmentStore(tmp_path, "n1", lambda: T0)
    pool = CountingPool()
    manager = MailboxManager(
        ImmediateReactor(),  # type: ignore[arg-type]
        pool,  # type: ignore[arg-type]
        store,
        index=MailIndex(),
        bodies=BodyCache(1 << 20),
    )
    return manager, store, pool


def test_stored_and_read_bodies_are_served_without_a_pool_job(
    cached: tuple[MailboxManager, FragmentStore, CountingPool],
) -> None:
    """A body stored here is fetched with no pool job (the index fill aside); a body read
    once from its file (the cache cleared) is served from memory the next time; the bytes
    are the file's."""
    manager, store, pool = cached
    (d1, d2) = result_of(
        manager.store([NewMessage(A, INBOX, b"one\r\n", (), T0), NewMessage(A, INBOX, b"two\r\n", (), T0)])
    )  # fmt: skip
    result_of(manager.mailboxes(A))  # warm the index
    pool.jobs.clear()
    assert result_of(manager.fetch(A, INBOX, [d1.uid, d2.uid])) == {
        d1.uid: b"one\r\n",
        d2.uid: b"two\r\n",
    }
    assert pool.jobs == []
    manager.bodies.forget_user(A)  # type: ignore[union-attr]
    assert result_of(manager.fetch(A, INBOX, [d1.uid, d2.uid]))[d2.uid] == b"two\r\n"
    assert pool.jobs == ["read_bodies"]  # both files in one job
    assert result_of(manager.fetch(A, INBOX, [d2.uid])) == {d2.uid: b"two\r\n"}
    assert pool.jobs == ["read_bodies"]
    assert (store.user_path(A) / d2.key).read_bytes() == b"two\r\n"


def test_delete_drops_the_users_bodies_even_from_a_racing_read(
    cached: tuple[MailboxManager, FragmentStore, CountingPool],
) -> None:
    """An expunge drops the user's cached bodies; a file read that was asked for before the
    expunge and finishes after it is not put back in the cache."""
    manager, _, pool = cached
    (d1, d2) = result_of(
        manager.store([NewMessage(A, INBOX, b"one\r\n", (), T0), NewMessage(A, INBOX, b"two\r\n", (), T0)])
    )  # fmt: skip
    result_of(manager.mailboxes(A))
    bodies = manager.bodies
    assert bodies is not None
    bodies.forget_user(A)
    pool.hold = True
    racing = manager.fetch(A, INBOX, [d1.uid])  # read queued before the expunge
    gone = manager.delete(A, INBOX, [d2.uid])
    pool.run(reverse=True)  # the expunge finishes first, then the read
    assert result_of(racing) == {d1.uid: b"one\r\n"}
    assert result_of(gone) == [d2.uid]
    assert bodies.get(A, d1.key) is None and bodies.bytes == 0


def test_cache_is_off_without_the_index_or_with_a_zero_bound(tmp_path: Path) -> None:
    """With the index off (its keys are what the cache is looked up by) or a bound of 0,
    every fetch reads the file on the pool, and gives the same bytes."""
    for index, bodies in ((MailIndex(0), BodyCache(1 << 20)), (MailIndex(), BodyCache(0))):
        store = FragmentStore(tmp_path / str(id(index)), "n1", lambda: T0)
        pool = CountingPool()
        manager = MailboxManager(
            ImmediateReactor(),  # type: ignore[arg-type]
            pool,  # type: ignore[arg-type]
            store,
            index=index,
            bodies=bodies,
        )
        assert manager.bodies is None
        (d,) = result_of(manager.store([NewMessage(A, INBOX, b"one\r\n", (), T0)]))
        result_of(manager.mailboxes(A))
        pool.jobs.clear()
        for _ in range(2):
            assert result_of(manager.fetch(A, INBOX, [d.uid])) == {d.uid: b"one\r\n"}
        assert len(pool.jobs) == 2
        store.close()


def test_mail_body_cache_option_fails_fast_and_reaches_status(tmp_path: Path) -> None:
    """--mail-body-cache-bytes takes a whole number (0 off); bad values are UsageErrors; the
    service's status and /metrics show the cache's counters."""
    from twisted.python import usage

    from yimaporc.admin.metrics import families
    from yimaporc.porcupine.service import MailService
    from yimaporc.tap.porcupine import Options

    base = ["--node-id", "n", "--data-dir", str(tmp_path), "--domain", "example.org",
            "--cluster", "tcp:7946:interface=127.0.148.1"]  # fmt: skip
    o = Options()
    o.parseOptions(base)
    assert o.mail_body_cache_bytes == 64 << 20
    o = Options()
    o.parseOptions([*base, "--mail-body-cache-bytes", "0"])
    assert o.mail_body_cache_bytes == 0
    for bad in ("-1", "lots", "1e6", "", str(1 << 40)):
        with pytest.raises(usage.UsageError, match="--mail-body-cache-bytes"):
            Options().parseOptions([*base, "--mail-body-cache-bytes", bad])
    mail = MailService(
        ImmediateReactor(), node_id="n1", data_dir=tmp_path / "d", domain="example.org",
        threadpool=SyncPool(), mail_body_cache_bytes=4096,  # type: ignore[arg-type]
    )  # fmt: skip
    (d,) = result_of(mail.mailbox_manager.store([NewMessage(A, INBOX, b"hi\r\n", (), T0)]))
    result_of(mail.mailbox_manager.mailboxes(A))
    assert result_of(mail.mailbox_manager.fetch(A, INBOX, [d.uid])) == {d.uid: b"hi\r\n"}
    status = mail.status()["mail_body_cache"]
    assert status["max_bytes"] == 4096 and status["hits"] == 1 and status["bytes"] == 4
    samples = {
        s.name: s.value for f in families({"kind": "porcupine", **mail.status()}) for s in f.samples
    }
    assert samples["yimaporc_mail_body_cache_hits_total"] == 1
    assert samples["yimaporc_mail_body_cache_bytes"] == 4
    mail.fragment_store.close()


# --- POP3 read-ahead -----------------------------------------------------------------


class FakeMail:
    """UserMail's fetch, recording each call's UIDs."""

    def __init__(self, bodies: dict[int, bytes]) -> None:
        self.bodies = bodies
        self.calls: list[list[int]] = []

    def fetch(self, mailbox: str, digests: list[Digest]) -> Deferred[dict[int, bytes]]:
        self.calls.append([d.uid for d in digests])
        return succeed({d.uid: self.bodies[d.uid] for d in digests if d.uid in self.bodies})


def mailbox(sizes: list[int]) -> tuple[Pop3Mailbox, FakeMail]:
    digests = [Digest(10 + k, f"k{k}", s, (), 0.0, "n1") for k, s in enumerate(sizes)]
    mail = FakeMail({d.uid: b"m%d\r\n" % d.uid for d in digests})
    return Pop3Mailbox(mail, 7, digests), mail  # type: ignore[arg-type]


def retr(p: MailPOP3, t: StringTransport, n: int) -> bytes:
    t.clear()
    p.dataReceived(b"RETR %d\r\n" % n)
    return t.value()


def session(box: Pop3Mailbox) -> tuple[MailPOP3, StringTransport]:
    class Portal:
        def login(self, *_: Any) -> Deferred[Any]:
            return succeed((pop3.IMailbox, box, lambda: None))

    p = MailPOP3(Clock())
    p.portal = Portal()  # type: ignore[assignment]
    t = StringTransport()
    p.makeConnection(t)
    p.dataReceived(b"USER alice\r\nPASS pw\r\n")
    return p, t


def test_retr_in_order_fetches_once_per_window_with_the_right_bytes() -> None:
    """RETR 1..5 of five small messages is one fetch of all five; each RETR sends its own
    message; deleted ones are not fetched ahead."""
    box, mail = mailbox([100] * 6)
    p, t = session(box)
    p.dataReceived(b"DELE 3\r\n")
    for n in (1, 2, 4, 5):
        assert retr(p, t, n) == b"+OK %d octets\r\nm%d\r\n.\r\n" % (len(b"m10\r\n"), 9 + n)
    assert mail.calls == [[10, 11, 13, 14, 15]]
    assert box.fetches == 1 and set(box.ahead) == {5}


def test_read_ahead_window_is_bounded_by_bytes_and_messages() -> None:
    """A window holds at most READ_AHEAD_BYTES of listed sizes and READ_AHEAD_MESSAGES
    messages; a message fetched ahead is handed out once, then fetched again."""
    big = Pop3Mailbox.READ_AHEAD_BYTES // 3
    box, mail = mailbox([big, big, big, big, 10])
    p, t = session(box)
    for n in (1, 2, 3, 4, 5):
        retr(p, t, n)
    assert mail.calls == [[10, 11, 12], [13, 14]]
    box, mail = mailbox([1] * (Pop3Mailbox.READ_AHEAD_MESSAGES + 2))
    p, t = session(box)
    retr(p, t, 1)
    assert len(mail.calls[0]) == Pop3Mailbox.READ_AHEAD_MESSAGES
    retr(p, t, 2)
    retr(p, t, 2)
    assert mail.calls[1][0] == 11 and len(mail.calls) == 2
