"""The in-memory mailbox index: exact against SQLite, bounded, no pool trip when warm."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import attrs
import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings
from mailtest_helpers import ImmediateReactor, SyncPool, result_of

from yimaporc.porcupine.fragments import FragmentStore, MailboxManager
from yimaporc.porcupine.mailindex import MailIndex, UserIndex
from yimaporc.porcupine.replication import Timestamp, Update
from yimaporc.porcupine.replication.objects import (
    MessageObject,
    ReplicaObjectStore,
    message_id,
)
from yimaporc.porcupine.usermap import bucket_of
from yimaporc.porcupine.values import (
    INBOX,
    PENDING,
    Digest,
    MailboxHasChildren,
    MailboxInfo,
    NewMessage,
    NoSuchMailbox,
)

A = "alice@example.org"
B = "bob@example.org"
T0 = 1_700_000_000.0


class CountingPool(SyncPool):
    """SyncPool that counts the jobs handed to it."""

    def __init__(self) -> None:
        self.jobs: list[str] = []

    def callInThreadWithCallback(self, on_result: Any, f: Any, *a: Any, **kw: Any) -> None:
        self.jobs.append(getattr(f, "__name__", repr(f)))
        super().callInThreadWithCallback(on_result, f, *a, **kw)


def truth(store: FragmentStore, user: str) -> UserIndex:
    """What SQLite says now, read without the index."""
    tree = store.mailboxes(user)
    boxes = {i.name: tuple(store.digests(user, i.name)) for i in tree}
    return UserIndex(tuple(tree), boxes)


def plain(tree: Any) -> tuple[MailboxInfo, ...]:
    """A tree without the mod-sequence bound the manager adds per read (docs/mail.md)."""
    return tuple(attrs.evolve(i, modseq_bound=0) for i in tree)


def entry(u: int, flags: tuple[str, ...] = ()) -> Digest:
    return Digest(u, f"k{u}", 10, flags, 1.0, "n1")


def idx(n: int) -> UserIndex:
    """An entry of ``n`` messages in INBOX (n + 1 rows)."""
    return UserIndex.build([(INBOX, 1, n + 1, True)], [(INBOX, entry(u)) for u in range(1, n + 1)])


# --- MailIndex alone ------------------------------------------------------------------


def test_build_counts_unseen_and_sorts() -> None:
    """UserIndex.build sorts mailboxes by name and UIDs ascending, counts \\Seen-less as unseen."""
    e = UserIndex.build(
        [("b", 5, 9, False), (INBOX, 1, 4, True)],
        [(INBOX, entry(3, ("\\Seen",))), (INBOX, entry(1)), ("b", entry(2, ("\\Flagged",)))],
    )
    assert [i.name for i in e.tree] == [INBOX, "b"]
    assert e.tree[0] == MailboxInfo(INBOX, 1, 4, 2, 1, True)
    assert e.tree[1] == MailboxInfo("b", 5, 9, 1, 1, False)
    assert [d.uid for d in e.boxes[INBOX]] == [1, 3]
    assert e.rows == 5


def test_lru_keeps_total_rows_within_bound() -> None:
    """Installing past the bound drops least recently used users; rows never exceed it."""
    index = MailIndex(max_rows=10)
    for user in ("a", "b", "c"):
        assert index.install(user, index.begin_fill(user), idx(3))  # 4 rows each
        assert index.status()["rows"] <= 10
    assert "a" not in index and "b" in index and "c" in index
    assert index.lookup("b") is not None  # b is now the most recent
    index.install("d", index.begin_fill("d"), idx(3))
    assert "c" not in index and "b" in index and "d" in index
    assert index.status()["evictions"] == 2 and index.status()["rows"] == 8


def test_user_bigger_than_bound_is_not_kept() -> None:
    """An entry larger than the whole bound is refused and evicts nobody."""
    index = MailIndex(max_rows=10)
    index.install("a", index.begin_fill("a"), idx(3))
    assert not index.install("big", index.begin_fill("big"), idx(20))
    assert "a" in index and "big" not in index and index.status()["too_big"] == 1


def test_fill_raced_by_a_write_is_not_installed() -> None:
    """An invalidation between begin_fill and install spoils that fill (old state never kept)."""
    index = MailIndex()
    token = index.begin_fill(A)
    index.invalidate(A)
    assert not index.install(A, token, idx(1))
    assert index.lookup(A) is None
    assert index.install(A, index.begin_fill(A), idx(1))


def test_zero_bound_turns_index_off(tmp_path: Path) -> None:
    """--mail-index-rows 0: the manager reads SQLite every time."""
    store = FragmentStore(tmp_path, "n1", lambda: T0)
    pool = CountingPool()
    manager = MailboxManager(ImmediateReactor(), pool, store, index=MailIndex(0))  # type: ignore[arg-type]
    assert manager.index is None and store.index is None
    result_of(manager.mailboxes(A))
    result_of(manager.mailboxes(A))
    assert pool.jobs == ["mailboxes", "mailboxes"]


def test_negative_bound_is_refused() -> None:
    """A negative bound is a ValueError."""
    with pytest.raises(ValueError):
        MailIndex(-1)


# --- through the manager ------------------------------------------------------------


@pytest.fixture
def indexed(tmp_path: Path) -> tuple[MailboxManager, FragmentStore, CountingPool]:
    store = FragmentStore(tmp_path, "n1", lambda: T0)
    pool = CountingPool()
    manager = MailboxManager(ImmediateReactor(), pool, store, index=MailIndex())  # type: ignore[arg-type]
    return manager, store, pool


def test_warm_reads_make_no_pool_trip(
    indexed: tuple[MailboxManager, FragmentStore, CountingPool],
) -> None:
    """Once a user is filled, LIST (mailboxes) and digests (STAT/UID FETCH FLAGS) use no pool
    job; a body read uses one job that only reads files (keys from memory)."""
    manager, _, pool = indexed
    result_of(manager.store([NewMessage(A, INBOX, b"one\r\n", (), T0)]))
    pool.jobs.clear()
    assert [i.messages for i in result_of(manager.mailboxes(A))] == [1]
    assert pool.jobs == ["load_user"]
    pool.jobs.clear()
    for _ in range(3):
        result_of(manager.mailboxes(A))
        (d,) = result_of(manager.digests(A, "inbox"))
    assert pool.jobs == []
    assert result_of(manager.fetch(A, INBOX, [d.uid, 99])) == {d.uid: b"one\r\n"}
    assert pool.jobs == ["read_bodies"]
    with pytest.raises(NoSuchMailbox):
        result_of(manager.digests(A, "Nope"))
    status = manager.index.status()  # type: ignore[union-attr]
    assert status["hits"] >= 7 and status["fills"] == 1


def test_every_write_path_invalidates(
    indexed: tuple[MailboxManager, FragmentStore, CountingPool],
) -> None:
    """Store, flag change, copy, expunge, rename, delete of a mailbox, numbering of pending
    mail, demotion and user removal each drop the user's entry (and only that user's)."""
    manager, store, _ = indexed
    result_of(manager.store([NewMessage(A, INBOX, b"a\r\n", (), T0)]))
    result_of(manager.store([NewMessage(B, INBOX, b"b\r\n", (), T0)]))
    store.create_mailbox(A, "Box")
    fence = "m@1"
    store.set_fences({bucket_of(A): fence})
    steps: list[tuple[str, Any]] = [
        ("store", lambda: result_of(manager.store([NewMessage(A, INBOX, b"x\r\n", (), T0)]))),
        ("flags", lambda: result_of(manager.set_flags(A, INBOX, [1], ["\\Seen"], 1))),
        ("copy", lambda: result_of(manager.copy(A, INBOX, [1], "Box"))),
        ("expunge", lambda: result_of(manager.delete(A, INBOX, [2]))),
        ("rename", lambda: result_of(manager.rename_mailbox(A, "Box", "Box2"))),
        ("subscribe", lambda: result_of(manager.subscribe(A, "Box2", False))),
        # unnumbered mail is not listed: the entry may stay, and must stay right
        ("pending", lambda: store.store([NewMessage(A, INBOX, b"p\r\n", (), T0, PENDING)])),
        ("number", lambda: result_of(manager.number_pending(A, fence, 50, 5))),
        ("demote", lambda: store.demote(A, INBOX, 50, store.digests(A, INBOX)[-1].key)),
        ("drop box", lambda: result_of(manager.delete_mailbox(A, "Box2"))),
        ("remove user", lambda: result_of(manager.remove_user(A))),
    ]
    for name, step in steps:
        result_of(manager.mailboxes(A))
        result_of(manager.mailboxes(B))
        assert A in manager.index and B in manager.index  # type: ignore[operator]
        step()
        if name != "pending":
            assert A not in manager.index, name  # type: ignore[operator]
        else:
            assert manager.index.peek(A) == truth(store, A)  # type: ignore[union-attr]
        assert B in manager.index, name  # type: ignore[operator]
        assert plain(result_of(manager.mailboxes(A))) == plain(truth(store, A).tree)
        for box, digests in truth(store, A).boxes.items():
            assert tuple(result_of(manager.digests(A, box))) == digests, name


def test_replicated_updates_invalidate(tmp_path: Path) -> None:
    """Remote updates applied by replication (new message, flags, batch, tombstone) drop the
    user's entry; the refill matches SQLite."""
    store = FragmentStore(tmp_path, "a", lambda: T0)
    manager = MailboxManager(ImmediateReactor(), SyncPool(), store, index=MailIndex())  # type: ignore[arg-type]
    replicas = ReplicaObjectStore(tmp_path / "mail" / "replicas.sqlite", store)
    rid1, rid2 = "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"

    def upd(rid: str, wall: int, body: bytes | None) -> Update:
        return Update(message_id(A, rid), Timestamp(wall, "b"), body)

    def body(uid: int, flags: tuple[str, ...] = ()) -> bytes:
        return MessageObject(INBOX, b"Subject: x\r\n\r\nx\r\n", flags=flags, uid=uid).to_body()

    updates = [
        lambda: replicas.apply(upd(rid1, 10, body(1))),
        lambda: replicas.apply(upd(rid1, 20, body(1, ("\\Seen",)))),
        lambda: replicas.apply_many(
            [upd(rid2, 30, body(2)), upd(rid1, 40, body(1, ("\\Answered",)))]
        ),
        lambda: replicas.apply_many([upd(rid2, 50, body(2, ("\\Flagged",)))]),
        lambda: replicas.apply(upd(rid1, 60, None)),
    ]
    for apply in updates:
        result_of(manager.mailboxes(A))
        assert A in manager.index  # type: ignore[operator]
        apply()
        assert A not in manager.index, apply  # type: ignore[operator]
        assert tuple(result_of(manager.digests(A, INBOX))) == truth(store, A).boxes[INBOX]
    assert [d.flags for d in result_of(manager.digests(A, INBOX))] == [("\\Flagged",)]


# --- exactness under random sequences (hypothesis) --------------------------------------

BOXES = [INBOX, "Work", "Work/Old"]
FLAGS = ["\\Seen", "\\Flagged", "\\Deleted", "$Label"]

op = st.one_of(
    st.tuples(st.just("store"), st.sampled_from([A, B]), st.sampled_from(BOXES),
              st.lists(st.sampled_from(FLAGS), max_size=2)),
    st.tuples(st.just("flags"), st.sampled_from([A, B]), st.sampled_from(BOXES),
              st.lists(st.integers(1, 8), min_size=1, max_size=3),
              st.lists(st.sampled_from(FLAGS), max_size=2), st.sampled_from([-1, 0, 1])),
    st.tuples(st.just("expunge"), st.sampled_from([A, B]), st.sampled_from(BOXES),
              st.lists(st.integers(1, 8), min_size=1, max_size=3)),
    st.tuples(st.just("copy"), st.sampled_from([A, B]), st.sampled_from(BOXES),
              st.lists(st.integers(1, 8), min_size=1, max_size=3), st.sampled_from(BOXES)),
    st.tuples(st.just("create"), st.sampled_from([A, B]), st.sampled_from(BOXES[1:])),
    st.tuples(st.just("drop"), st.sampled_from([A, B]), st.sampled_from(BOXES[1:])),
    st.tuples(st.just("raw_flags"), st.sampled_from([A, B]), st.sampled_from(FLAGS)),
    st.tuples(st.just("read"), st.sampled_from([A, B])),
)  # fmt: skip


def run_op(manager: MailboxManager, store: FragmentStore, o: tuple[Any, ...]) -> None:
    kind, user = o[0], o[1]
    try:
        if kind == "store":
            result_of(manager.store([NewMessage(user, o[2], b"m\r\n", tuple(o[3]), T0)]))
        elif kind == "flags":
            result_of(manager.set_flags(user, o[2], o[3], o[4], o[5]))
        elif kind == "expunge":
            result_of(manager.delete(user, o[2], o[3]))
        elif kind == "copy":
            result_of(manager.copy(user, o[2], o[3], o[4]))
        elif kind == "create":
            result_of(manager.create_mailbox(user, o[2]))
        elif kind == "drop":
            result_of(manager.delete_mailbox(user, o[2]))
        elif kind == "raw_flags":
            # as replication writes: straight through the bucket's connection, under its lock
            bucket = bucket_of(user)
            with store._lock_for(bucket):
                store._db(bucket).execute(
                    "UPDATE messages SET flags=? WHERE user=? AND uid % 2 = 1", (o[2], user)
                )
        else:
            result_of(manager.mailboxes(user))
    except Exception as e:  # a mailbox that is not there (or has children): the store's answer
        if (
            not isinstance(e, (NoSuchMailbox, MailboxHasChildren))
            and type(e).__name__ != "MailboxExists"
        ):
            raise


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=25))
def test_index_equals_sqlite_after_random_sequences(ops: list[tuple[Any, ...]]) -> None:
    """After any sequence of stores, flag changes, expunges, copies, mailbox changes and
    direct (replication-style) row updates, every warm entry equals a fresh SQLite read,
    and reads through the manager equal SQLite whether warm or cold."""
    tmp = tempfile.mkdtemp()
    try:
        store = FragmentStore(Path(tmp), "n1", lambda: T0)
        store._db(bucket_of(A)).execute("PRAGMA synchronous=OFF")
        store._db(bucket_of(B)).execute("PRAGMA synchronous=OFF")
        manager = MailboxManager(
            ImmediateReactor(),
            SyncPool(),
            store,
            index=MailIndex(max_rows=40),  # type: ignore[arg-type]
        )
        for o in ops:
            run_op(manager, store, o)
            for user in (A, B):
                warm = manager.index.peek(user)  # type: ignore[union-attr]
                if warm is not None:
                    assert warm == truth(store, user)
                assert manager.index.status()["rows"] <= 40  # type: ignore[union-attr]
        for user in (A, B):
            want = truth(store, user)
            assert plain(result_of(manager.mailboxes(user))) == plain(want.tree)
            for name, box in want.boxes.items():
                assert tuple(result_of(manager.digests(user, name))) == box
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_mail_index_rows_option_fails_fast(tmp_path: Path) -> None:
    """--mail-index-rows takes a whole number (0 turns the index off); anything else is a
    UsageError."""
    from twisted.python import usage

    from yimaporc.tap.porcupine import Options

    base = ["--node-id", "n", "--data-dir", str(tmp_path), "--domain", "example.org",
            "--cluster", "tcp:7946:interface=127.0.135.1"]  # fmt: skip
    o = Options()
    o.parseOptions(base)
    assert o.mail_index_rows == 200_000
    for good, want in (("0", 0), ("5000", 5000)):
        o = Options()
        o.parseOptions([*base, "--mail-index-rows", good])
        assert o.mail_index_rows == want
    for bad in ("-1", "lots", "1e6", "", "999999999999"):
        with pytest.raises(usage.UsageError, match="--mail-index-rows"):
            Options().parseOptions([*base, "--mail-index-rows", bad])


def test_service_status_and_metrics_show_index_counters(tmp_path: Path) -> None:
    """MailService builds the index with its bound; /api/status carries its counters and
    /metrics exposes yimaporc_mail_index_hits_total."""
    from yimaporc.admin.metrics import families
    from yimaporc.porcupine.service import MailService

    clock = ImmediateReactor()
    mail = MailService(
        clock, node_id="n1", data_dir=tmp_path, domain="example.org",
        threadpool=SyncPool(), mail_index_rows=1234,  # type: ignore[arg-type]
    )  # fmt: skip
    result_of(mail.mailbox_manager.mailboxes(A))
    result_of(mail.mailbox_manager.mailboxes(A))
    status = mail.status()["mail_index"]
    assert status["max_rows"] == 1234 and status["hits"] == 1 and status["fills"] == 1
    samples = {
        s.name: s.value for f in families({"kind": "porcupine", **mail.status()}) for s in f.samples
    }
    assert samples["yimaporc_mail_index_hits_total"] == 1
    assert samples["yimaporc_mail_index_users"] == 1
    mail.fragment_store.close()


def _stuff_by_lines(body: bytes) -> bytes:
    """The line-by-line definition of POP3 dot-stuffing (the former implementation)."""
    lines = body.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


@settings(deadline=None)  # examples from the profile (fuzz: 1000)
@given(
    st.lists(
        st.sampled_from([b"\r\n", b".", b"..", b"\r", b"\n", b"a", b"\r\n.", b" "]), max_size=30
    ).map(b"".join)
    | st.binary(max_size=64)
)
def test_whole_message_stuffing_equals_line_by_line(body: bytes) -> None:
    """RETR's fast dot-stuffing (bytes.replace) gives exactly the line-by-line result for any
    bytes, and hands back the body itself when nothing needs changing."""
    from yimaporc.porcupine._pop3 import dot_stuff

    assert dot_stuff(body) == _stuff_by_lines(body)
    clean = b"Subject: x\r\n\r\nno dots here\r\n"
    assert dot_stuff(clean) is clean


def test_shown_marks_already_durable_skip_the_write(
    indexed: tuple[MailboxManager, FragmentStore, CountingPool],
) -> None:
    """UIDNEXT records (``shown``, written on every cluster listing) already on disk are
    answered from memory with the same result; a higher UIDNEXT, another UIDVALIDITY or a
    removed user goes to disk again."""
    manager, store, pool = indexed
    result_of(manager.mailboxes(A))
    pool.jobs.clear()
    assert result_of(manager.shown(A, {INBOX: (7, 5)})) == {INBOX: 5}
    assert pool.jobs == ["shown"]
    assert result_of(manager.shown(A, {INBOX: (7, 3)})) == {INBOX: 5}
    assert result_of(manager.shown(A, {INBOX: (7, 5)})) == {INBOX: 5}
    assert pool.jobs == ["shown"], "already durable: no write"
    assert result_of(manager.shown(A, {INBOX: (7, 6)})) == {INBOX: 6}
    assert result_of(manager.shown(A, {INBOX: (8, 2)})) == {INBOX: 2}
    assert result_of(manager.shown(A, {INBOX: (8, 2), "Box": (1, 1)})) == {INBOX: 2, "Box": 1}
    assert pool.jobs == ["shown"] * 4
    assert manager.index.status()["shown_skipped"] == 2  # type: ignore[union-attr]
    result_of(manager.remove_user(A))
    result_of(manager.mailboxes(A))
    pool.jobs.clear()
    assert result_of(manager.shown(A, {INBOX: (8, 1)})) == {INBOX: 1}
    assert pool.jobs == ["shown"], "rows gone with the user: written again"
    on_disk = store._db(bucket_of(A)).execute(
        "SELECT mailbox, uidvalidity, uidnext FROM shown WHERE user=?", (A,)
    )
    assert {m: (v, n) for m, v, n in on_disk} == manager.index.shown_of(A)  # type: ignore[union-attr]
