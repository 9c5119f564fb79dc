"""The manager AMP commands and remote proxies over an in-memory AMP connection (iosim)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from mailtest_helpers import ImmediateReactor, SyncPool, fast_hash, result_of
from twisted.internet.defer import Deferred
from twisted.protocols import amp
from twisted.test.iosim import connectedServerAndClient

from yimaporc.cluster.buckets import BucketMap
from yimaporc.cluster.rpc import NodeAMP, RpcRegistry
from yimaporc.cluster.wire import Scope
from yimaporc.porcupine.cluster import (
    ERRORS,
    UID_GAP,
    ClusterUserManager,
    RemoteMailboxManager,
    RemoteUserManager,
    register_handlers,
)
from yimaporc.porcupine.delivery import DeliveryProxy
from yimaporc.porcupine.fragments import FragmentStore, MailboxManager
from yimaporc.porcupine.interfaces import IMailboxManager, IUserManager
from yimaporc.porcupine.profiledb import ProfileDB
from yimaporc.porcupine.usermap import N_BUCKETS
from yimaporc.porcupine.values import (
    INBOX,
    BadCredentials,
    MailboxExists,
    NewMessage,
    NoSuchMailbox,
    NoSuchUser,
)
from yimaporc.testing.hints import apply_hint

KEY = b"k" * 32
SCOPE = Scope("test", "porcupine")
USER = "dora@example.org"


class Raise(amp.Command):
    """Test-only: the server raises the error named by ``code``."""

    commandName = b"test.raise"
    arguments = [(b"code", amp.Unicode())]
    errors = ERRORS  # type: ignore[assignment]


class Peer:
    """Node n2's managers answering AMP from node n1 over an iosim pump."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = ImmediateReactor()
        store = FragmentStore(tmp_path / "n2", "n2", lambda: 1_700_000_000.0)
        self.mailboxes = MailboxManager(self.clock, SyncPool(), store)  # type: ignore[arg-type]
        self.profiles = ProfileDB(
            self.clock, SyncPool(), tmp_path / "n2" / "p.sqlite", self.clock.seconds,  # type: ignore[arg-type]
            hasher=fast_hash,
        )  # fmt: skip
        self.users = ClusterUserManager("n2", self.profiles, self.clock)
        # n2 manages every bucket (alone: a majority of itself), settled; its store
        # holds the matching fences.
        self.users.install(BucketMap(("n2",) * N_BUCKETS, (1,) * N_BUCKETS), ["n2"])
        for b in range(N_BUCKETS):
            apply_hint(self.users, "n2", [b, 1, [], []])
        store.set_fences(dict.fromkeys(range(N_BUCKETS), "n2@1"))
        registry = RpcRegistry()
        register_handlers(registry, lambda: self.users, lambda: self.mailboxes, load=lambda: 3.0)
        by_code = {code.decode(): cls for cls, code in ERRORS.items()}

        def raise_(code: str) -> dict[str, Any]:
            raise by_code[code](f"boom {code}")

        registry.register(Raise, raise_)
        client, _server, self.pump = connectedServerAndClient(
            lambda: NodeAMP(registry, KEY, "n2", scope=SCOPE),
            lambda: NodeAMP(RpcRegistry(), KEY, "n1", scope=SCOPE),
        )
        self.client: NodeAMP = client
        d = client.authenticate()
        self.pump.flush()
        result_of(d)
        self.calls: Counter[str] = Counter()
        self.loads: list[tuple[str, float]] = []

    def call(self, node: str, command: type[amp.Command], /, **kw: Any) -> Deferred[Any]:
        assert node == "n2"
        self.calls[command.commandName.decode()] += 1  # type: ignore[union-attr]
        # A fresh Deferred, as RpcClient does: AMP's own errback on callRemote's
        # Deferred would otherwise see the error first and drop the connection.
        out: Deferred[Any] = Deferred()
        self.client.callRemote(command, **kw).addCallbacks(out.callback, out.errback)
        return out

    def result(self, d: Deferred[Any]) -> Any:
        """Move the bytes until ``d`` fires; its result (or raise its failure)."""
        self.pump.flush()
        return result_of(d)

    def remote_boxes(self) -> RemoteMailboxManager:
        return RemoteMailboxManager("n2", self.call, lambda n, v: self.loads.append((n, v)))

    def remote_users(self) -> RemoteUserManager:
        return RemoteUserManager("n2", self.call, self.clock.seconds)


@pytest.fixture
def peer(tmp_path: Path) -> Peer:
    return Peer(tmp_path)


def test_proxies_provide_the_interfaces(peer: Peer) -> None:
    """The remote proxies can stand wherever the local managers do."""
    assert IMailboxManager.providedBy(peer.remote_boxes())
    assert IUserManager.providedBy(peer.remote_users())


def test_store_and_fetch_big_bodies_round_trip_with_load(peer: Peer) -> None:
    """A 300 KB body (over AMP's 64 KiB value limit) and an empty one, byte for byte."""
    boxes = peer.remote_boxes()
    big = bytes(range(256)) * 1200
    msgs = [NewMessage(USER, INBOX, big, ("\\Flagged",), 5.0, 7), NewMessage(USER, INBOX, b"")]
    digests = peer.result(boxes.store(msgs))
    assert [d.uid for d in digests] == [7, 8], "the cluster UID is honoured, then counted on"
    assert digests[0].node == "n2" and digests[0].size == len(big)
    assert peer.loads == [("n2", 3.0)], "the store reply carries the node's load"
    got = peer.result(boxes.fetch(USER, INBOX, [7, 8, 99]))
    assert got == {7: big, 8: b""}
    assert [d.uid for d in peer.result(boxes.digests(USER, INBOX))] == [7, 8]
    assert peer.result(boxes.users_in_bucket(_bucket(USER))) == [USER]


def test_mailbox_calls_and_errors_cross_as_the_same_exceptions(peer: Peer) -> None:
    """Every mailbox method works remotely; MailboxExists/NoSuchMailbox come back as such."""
    boxes = peer.remote_boxes()
    info = peer.result(boxes.create_mailbox(USER, "Work"))
    assert info.name == "Work" and info.uidnext == 1
    with pytest.raises(MailboxExists):
        peer.result(boxes.create_mailbox(USER, "Work"))
    with pytest.raises(NoSuchMailbox):
        peer.result(boxes.delete_mailbox(USER, "Nope"))
    peer.result(boxes.subscribe(USER, "Work", False))
    peer.result(boxes.rename_mailbox(USER, "Work", "Job"))
    names = {i.name: i for i in peer.result(boxes.mailboxes(USER))}
    assert set(names) == {INBOX, "Job"} and not names["Job"].subscribed
    peer.result(boxes.store([NewMessage(USER, INBOX, b"a\r\n"), NewMessage(USER, INBOX, b"b\r\n")]))
    flags = peer.result(boxes.set_flags(USER, INBOX, [1, 2], ["\\Seen"], 1))
    assert flags == {1: ("\\Seen",), 2: ("\\Seen",)}
    copied = peer.result(boxes.copy(USER, INBOX, [2], "Job"))
    assert [(d.uid, d.flags) for d in copied] == [(1, ("\\Seen",))]
    assert peer.result(boxes.delete(USER, INBOX, [1, 5])) == [1]
    peer.result(boxes.delete_mailbox(USER, "Job"))
    peer.result(boxes.remove_user(USER))
    assert peer.result(boxes.users_in_bucket(_bucket(USER))) == []


@pytest.mark.parametrize("error", sorted(ERRORS, key=str))
def test_every_mail_error_comes_back_as_itself(peer: Peer, error: type[Exception]) -> None:
    """The AMP error codes map each manager error back onto its own class and message."""
    d = peer.call("n2", Raise, code=ERRORS[error].decode())
    with pytest.raises(error, match="boom"):
        peer.result(d)


def test_user_manager_proxy(peer: Peer) -> None:
    """Profile, authenticate, fragment list, UID reservation, all over AMP."""
    users = peer.remote_users()
    assert peer.result(users.profile(USER)) is None
    with pytest.raises(BadCredentials):
        peer.result(users.authenticate(USER, "pw"))
    peer.result(peer.profiles.add(USER, "pw"))
    assert peer.result(users.profile(USER)).address == USER
    assert peer.result(users.authenticate(USER, "pw")).address == USER
    with pytest.raises(BadCredentials):
        peer.result(users.authenticate(USER, "wrong"))
    peer.result(users.add_fragment(USER, "n3"))
    peer.result(users.add_fragment(USER, "n1"))
    assert peer.result(users.fragments(USER)) == ("n1", "n3")
    peer.result(users.remove_fragment(USER, "n3"))
    assert peer.result(users.fragments(USER)) == ("n1",)
    assert peer.result(users.reserve_uids(USER, 3)) == 1
    assert peer.result(users.delivery_plan(USER, 1)) == (("n1",), 4, "n2@1")
    peer.users.replicated_ttl = peer.users.core.allocation_ttl + 5.0  # to tell them apart
    assert peer.result(users.delivery_plan(USER, 1, False, 3)) == (("n1",), 5, "n2@1")
    held = {f: e for f, (_, e) in peer.users.core.allocated[USER].items()}
    # the replica count crossed the wire: that allocation is held longer
    assert held[5] - held[4] == pytest.approx(
        peer.users.replicated_ttl - peer.users.core.allocation_ttl
    )
    with pytest.raises(NoSuchUser):
        peer.result(peer.profiles.remove("nobody@example.org"))


def test_rpc_messages_per_delivery(peer: Peer) -> None:
    """A delivery whose manager and store are both remote: profile + plan + store +
    add_fragment (every time: the 250 waits for the holder record, which the manager
    confirms at once when it has it; issue 14); the SMTP RCPT lookup's profile is
    reused within its TTL.  The first delivery to a node not yet holding the user's
    mail records it first (one more add_fragment, before the numbered store)."""
    peer.result(peer.profiles.add(USER, "pw"))
    users, boxes = peer.remote_users(), peer.remote_boxes()
    proxy = DeliveryProxy("n1", lambda a: users, lambda n: boxes, lambda: ["n2"], lambda: 10.0)
    counts = []
    for i in range(3):
        before = sum(peer.calls.values())
        assert peer.result(proxy.lookup(USER)) is not None  # SMTP RCPT TO
        digests = peer.result(proxy.deliver([USER], b"m%d\r\n" % i))
        counts.append(sum(peer.calls.values()) - before)
        assert [d.uid for d in digests] == [i + 1]
    assert counts == [5, 3, 3], peer.calls


def _bucket(user: str) -> int:
    from yimaporc.porcupine.usermap import bucket_of

    return bucket_of(user)


@pytest.mark.parametrize(("live", "first"), [(["n2"], 10), (["n1", "n2"], 10 + UID_GAP)])
def test_rebuilt_uid_counter_skips_a_gap_only_with_other_nodes(
    tmp_path: Path, live: list[str], first: int
) -> None:
    """The counter comes from the hints' highest UIDNEXT; with other nodes live (whose
    delivery proxies may hold UIDs of the previous manager) it starts UID_GAP higher."""
    clock = ImmediateReactor()
    profiles = ProfileDB(clock, SyncPool(), tmp_path / "p.sqlite", clock.seconds)  # type: ignore[arg-type]
    um = ClusterUserManager("n2", profiles, clock)
    b = _bucket(USER)
    new = BucketMap(("n2",) * N_BUCKETS, (3,) * N_BUCKETS)
    um.install(new, live)
    d = um.reserve_uids(USER, 1)
    assert not d.called, "waits while the bucket settles"
    for sender in live:
        apply_hint(um, sender, [b, 3, [[USER, sender == "n2", 10]], []])
    assert result_of(d) == first
    assert result_of(um.fragments(USER)) == ("n2",)
