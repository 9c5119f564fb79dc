"""Replicated messages and profiles on real fragment stores, through the shell."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mailtest_helpers import ImmediateReactor, SyncPool, fast_hash, result_of
from twisted.internet.defer import Deferred, fail, maybeDeferred
from zope.interface.verify import verifyObject

from yimaporc.cluster.rpc import PeerUnavailable
from yimaporc.porcupine.fragments import FragmentStore, MailboxManager
from yimaporc.porcupine.profiledb import ProfileDB
from yimaporc.porcupine.replication import (
    IObjectStore,
    MemoryLog,
    ReplicationConfig,
    Timestamp,
    Update,
)
from yimaporc.porcupine.replication.objects import (
    MalformedObject,
    MessageObject,
    ReplicaObjectStore,
    ReplicatedMailboxManager,
    key_of,
    message_id,
    profile_id,
)
from yimaporc.porcupine.replication.shell import ReplicationService
from yimaporc.porcupine.values import INBOX, NewMessage
from yimaporc.testing.simnet import SimNet

ALICE = "alice@example.org"
RID = "0123456789abcdef0123456789abcdef"
T0 = 1_700_000_000.0


def upd(oid: str, wall: int, body: bytes | None, node: str = "a") -> Update:
    """An update at ``wall`` µs."""
    return Update(oid, Timestamp(wall, node), body)


def msg_body(data: bytes = b"Subject: hi\r\n\r\nbody\r\n", **kw: Any) -> bytes:
    """A message object body."""
    return MessageObject(kw.pop("mailbox", INBOX), data, **kw).to_body()


@pytest.fixture
def store(tmp_path: Path) -> ReplicaObjectStore:
    """A replica object store over a fresh fragment store."""
    fs = FragmentStore(tmp_path, "a", lambda: T0)
    return ReplicaObjectStore(tmp_path / "mail" / "replicas.sqlite", fs)


def test_replica_store_provides_iobjectstore(store: ReplicaObjectStore) -> None:
    """verifyObject: the replica store provides IObjectStore, apply_many included."""
    assert verifyObject(IObjectStore, store)


def test_message_lands_once_under_its_shared_key(store: ReplicaObjectStore) -> None:
    """Applying a message stores it as <rid>.m; the same update again is discarded."""
    oid = message_id(ALICE, RID)
    assert store.apply(upd(oid, 10, msg_body(uid=7, flags=("\\Flagged",))))
    assert not store.apply(upd(oid, 10, msg_body()))
    (d,) = store.fragments.digests(ALICE, INBOX)
    assert d.key == key_of(RID) and d.uid == 7 and d.flags == ("\\Flagged",)
    assert store.version(oid) == Timestamp(10, "a")


def test_reapply_after_lost_version_row_is_idempotent(store: ReplicaObjectStore) -> None:
    """A crash between the fragment commit and the version row: re-applying adds no copy."""
    oid = message_id(ALICE, RID)
    store.apply(upd(oid, 10, msg_body()))
    store.db.execute("DELETE FROM objects")
    assert store.apply(upd(oid, 10, msg_body()))
    assert len(store.fragments.digests(ALICE, INBOX)) == 1


def test_total_object_update_changes_flags(store: ReplicaObjectStore) -> None:
    """A newer version with other flags updates the row in place; an older one is dropped."""
    oid = message_id(ALICE, RID)
    store.apply(upd(oid, 10, msg_body()))
    assert store.apply(upd(oid, 20, msg_body(flags=("\\Seen",))))
    assert not store.apply(upd(oid, 15, msg_body(flags=("\\Deleted",))))
    (d,) = store.fragments.digests(ALICE, INBOX)
    assert d.flags == ("\\Seen",)


def test_tombstone_removes_and_blocks_older_creates(store: ReplicaObjectStore) -> None:
    """A deletion removes the message and keeps a tombstone that beats a late create."""
    oid = message_id(ALICE, RID)
    store.apply(upd(oid, 10, msg_body()))
    assert store.apply(upd(oid, 20, None))
    assert store.fragments.digests(ALICE, INBOX) == []
    assert not store.apply(upd(oid, 15, msg_body()))
    assert store.fragments.digests(ALICE, INBOX) == []
    assert store.purge_tombstones(21) == 1 and store.version(oid) is None


def test_missing_mailbox_is_created(store: ReplicaObjectStore) -> None:
    """A message for a mailbox this replica lacks creates the mailbox."""
    store.apply(upd(message_id(ALICE, RID), 10, msg_body(mailbox="Archive/2026")))
    assert len(store.fragments.digests(ALICE, "Archive/2026")) == 1


@pytest.mark.parametrize(
    "oid,body",
    [
        ("msg/alice@example.org/nothex", b"x"),
        ("msg//" + RID, b"x"),
        ("msg/alice@example.org/" + RID, b"not json\nbody"),
        ("msg/alice@example.org/" + RID, b'{"v":2}\nbody'),
        ("profile/x@example.org", b"[]"),
    ],
)
def test_malformed_objects_are_refused(store: ReplicaObjectStore, oid: str, body: bytes) -> None:
    """Bad ids and bodies raise MalformedObject and store nothing."""
    with pytest.raises(MalformedObject):
        store.apply(upd(oid, 10, body))
    assert store.version(oid) is None


def test_profile_records_merge(tmp_path: Path) -> None:
    """A profile object merges into the profile DB; an older one does not win."""
    reactor = ImmediateReactor()
    db = ProfileDB(
        reactor,
        SyncPool(),  # type: ignore[arg-type]
        tmp_path / "p.sqlite",
        lambda: T0,
        hasher=fast_hash,
    )
    fs = FragmentStore(tmp_path, "a", lambda: T0)
    store = ReplicaObjectStore(tmp_path / "r.sqlite", fs, db._db)
    rec = [ALICE, fast_hash("pw"), 2, T0, T0, False]
    assert store.apply(upd(profile_id(ALICE), 10, json.dumps(rec).encode()))
    got = result_of(db.get(ALICE))
    assert got is not None and got.replicas == 2
    with pytest.raises(MalformedObject):
        store.apply(upd(profile_id(ALICE), 20, json.dumps(["bob@x", "h", 1, 0, 0, 0]).encode()))


# --- two nodes through the shell ----------------------------------------------------


class Net:
    """Nodes, each a host of one simulation kernel; frames go by kernel calls (0.5 ms
    each way)."""

    def __init__(self, tmp_path: Path, ids: str, config: ReplicationConfig) -> None:
        self.sim = SimNet(latency=0.0005, start=T0)
        self.tmp = tmp_path
        self.config = config
        self.logs = {n: MemoryLog() for n in ids}
        self.nodes: dict[str, ReplicatedMailboxManager | None] = {}
        self.stores: dict[str, ReplicaObjectStore] = {}
        for n in ids:
            self.start(n)

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return maybeDeferred(f, *args)

    def start(self, n: str) -> ReplicatedMailboxManager:
        fs = FragmentStore(self.tmp / n, n, lambda: T0)
        objects = ReplicaObjectStore(self.tmp / n / "mail" / "replicas.sqlite", fs)
        self.stores[n] = objects
        reactor = self.sim.reactor(n)
        inner = MailboxManager(reactor, SyncPool(), fs)  # type: ignore[arg-type]

        def send(to: str, frames: list[bytes]) -> Deferred[Any]:
            return self.send(n, to, frames)

        svc = ReplicationService(
            reactor,
            n,
            self.logs[n],
            objects,
            send,
            run=self.run,
            config=self.config,
            rng=random.Random(n),
        )
        mm = ReplicatedMailboxManager(inner, objects, svc, self.run)
        svc.on_applied = mm.applied
        svc.startService()
        self.nodes[n] = mm
        return mm

    def crash(self, n: str) -> None:
        assert self.nodes[n] is not None
        self.sim.kernel.crash(self.sim.host(n))
        self.nodes[n] = None

    def send(self, a: str, b: str, frames: list[bytes]) -> Deferred[Any]:
        if b not in self.nodes:
            return fail(PeerUnavailable(b))

        def deliver(reactor: Any) -> dict[str, Any]:
            mm = self.nodes[b]
            assert mm is not None  # the kernel delivers only to a running process
            for frame in frames:
                mm.replication.receive(a, frame)
            return {}

        return self.sim.call(a, b, deliver, b"".join(frames))

    def live(self, ids: str) -> None:
        for mm in self.nodes.values():
            if mm is not None:
                mm.replication.set_live(list(ids))

    def settle(self, seconds: float = 1.0) -> None:
        self.sim.advance(seconds)

    def result_of(self, d: Deferred[Any]) -> Any:
        """``d``'s result once what is due now ran."""
        return self.sim.result_of(d)

    def mm(self, n: str) -> ReplicatedMailboxManager:
        mm = self.nodes[n]
        assert mm is not None
        return mm


def test_replicated_message_flags_and_deletion_reach_every_replica(tmp_path: Path) -> None:
    """store_replicated puts one copy (same key and UID) on each target; a flag change
    at a participant and a deletion at the coordinator follow; logs drain."""
    net = Net(tmp_path, "abc", ReplicationConfig(acks_before_reply=2))
    net.live("abc")
    d = net.mm("a").store_replicated(RID, NewMessage(ALICE, INBOX, b"M\r\n", (), T0, 5), ["b"])
    assert not net.sim.fired(d)  # acks_before_reply=2: b must hold it first
    net.settle(0.01)
    digests = net.result_of(d)
    assert sorted(x.node for x in digests) == ["a", "b"] and {x.uid for x in digests} == {5}
    net.settle(0.05)
    for n in "ab":
        (got,) = net.stores[n].fragments.digests(ALICE, INBOX)
        assert got.key == key_of(RID) and got.uid == 5
    assert net.stores["c"].fragments.users_with_mail() == []
    net.result_of(net.mm("b").set_flags(ALICE, INBOX, [5], ["\\Seen"], 1))
    net.settle(0.05)
    assert net.stores["a"].fragments.digests(ALICE, INBOX)[0].flags == ("\\Seen",)
    net.crash("b")
    net.live("ac")
    assert net.result_of(net.mm("a").delete(ALICE, INBOX, [5])) == [5]
    assert net.stores["a"].fragments.digests(ALICE, INBOX) == []
    net.settle(0.05)
    assert net.mm("a").replication.status()["replication"]["awaiting"] == {"b": 1}
    net.start("b")
    net.live("abc")
    net.settle(0.05)
    assert net.stores["b"].fragments.digests(ALICE, INBOX) == []
    assert all(not log.entries for log in net.logs.values())


def test_idle_listeners_hear_replicated_arrivals(tmp_path: Path) -> None:
    """A message applied from a push wakes the mailbox change listeners (IMAP IDLE)."""
    net = Net(tmp_path, "ab", ReplicationConfig())
    net.live("ab")
    heard: list[tuple[str, str]] = []
    net.mm("b").inner.on_change(lambda u, m: heard.append((u, m)))
    net.mm("a").store_replicated(RID, NewMessage(ALICE, INBOX, b"M\r\n"), ["b"])
    net.settle(0.05)
    assert heard == [(ALICE, INBOX)]


def test_apply_many_matches_one_by_one(tmp_path: Path) -> None:
    """A batch (new messages in two buckets, a duplicate, a flag update of a message
    of the same batch, a tombstone, a missing mailbox) ends as applying one by one."""
    rids = [f"{i:032x}" for i in range(1, 6)]
    bob = "bob@example.org"
    batch = [
        upd(message_id(ALICE, rids[0]), 10, msg_body(uid=1)),
        upd(message_id(bob, rids[1]), 10, msg_body(uid=1)),
        upd(message_id(ALICE, rids[0]), 10, msg_body(uid=1)),
        upd(message_id(ALICE, rids[0]), 20, msg_body(uid=1, flags=("\\Seen",))),
        upd(message_id(ALICE, rids[2]), 10, msg_body(uid=2)),
        upd(message_id(ALICE, rids[2]), 30, None),
        upd(message_id(bob, rids[3]), 10, msg_body(mailbox="Later", uid=2)),
        upd(message_id(ALICE, rids[4]), 40, msg_body(uid=9, flags=("\\Answered",))),
    ]
    before = upd(message_id(ALICE, rids[4]), 5, msg_body(uid=9))
    stores = []
    for name in ("one", "many"):
        fs = FragmentStore(tmp_path / name, "a", lambda: T0)
        stores.append(ReplicaObjectStore(tmp_path / name / "r.sqlite", fs))
    one, many = stores
    assert one.apply(before) and many.apply(before)
    want = [one.apply(u) for u in batch]
    assert many.apply_many(batch) == want == [True, True, False, True, True, True, True, True]
    assert [d.flags for d in many.fragments.digests(ALICE, INBOX) if d.uid == 9] == [
        ("\\Answered",)
    ]
    for user, box in ((ALICE, INBOX), (bob, INBOX), (bob, "Later")):
        a = [(d.uid, d.key, d.flags) for d in one.fragments.digests(user, box)]
        b = [(d.uid, d.key, d.flags) for d in many.fragments.digests(user, box)]
        assert a == b and a
    for u in batch:
        assert one.version(u.object_id) == many.version(u.object_id)
