"""Several MailServices wired by MailCluster over a simulated network: each node a host
of one simulation kernel (its clock the host's reactor), each call a kernel call.

Every call crosses the AMP command's own serialisation (arguments, response and
error codes) but no sockets; a node can be cut off (a kernel partition: its calls
fail with PeerUnavailable) and views are committed by the test, as TRM would.
Messages take no time (zero latency): what a call sets off happens at the instant
it is made, once the kernel runs (``net.flush()``, ``net.result_of(d)``).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mailtest_helpers import SyncPool, fast_hash
from twisted.internet.defer import Deferred, fail
from twisted.protocols import amp

from yimaporc.cluster.buckets import BucketMap
from yimaporc.cluster.membership import View
from yimaporc.cluster.rpc import PeerUnavailable, RpcRegistry
from yimaporc.cluster.wire import Member
from yimaporc.porcupine.cluster import Hints, Json, MailCluster, MbStore, ProfilePut
from yimaporc.porcupine.retrieval import Fragmented
from yimaporc.porcupine.service import MailService
from yimaporc.porcupine.storage import MailStorage
from yimaporc.porcupine.usermap import N_BUCKETS, bucket_of
from yimaporc.porcupine.values import INBOX, BadCredentials, Digest, NoSuchMailbox
from yimaporc.testing.simnet import SimNet, Watched

DOMAIN = "example.org"


class AffinityChooser:
    """``balancer.LoadBalancer``'s API, but predictable: the user's fragment nodes
    (least loaded first), then the others by (failed recently, load, name)."""

    def __init__(self, me: str, *, spread_limit: int = 2, **_: Any) -> None:
        self.me = me
        self.spread_limit = spread_limit
        self.loads: dict[str, tuple[float, float]] = {}
        self.failures: dict[str, float] = {}

    def observe(self, node: str, load: float, now: float) -> None:
        """A load figure heard from ``node``."""
        self.loads[node] = (load, now)

    def failed(self, node: str, now: float) -> None:
        """A call to ``node`` failed."""
        self.failures[node] = now

    def choose(
        self,
        live: Sequence[str],
        fragments: Sequence[str],
        replicas: int,
        now: float,
        prefer: str | None = None,
    ) -> list[str]:
        """Existing fragments first (least loaded), then the least loaded others
        (``prefer`` is not honoured: these tests place mail by name)."""

        def load(n: str) -> tuple[bool, float, str]:
            failed = now - self.failures.get(n, -1e9) < 10.0
            return (failed, self.loads.get(n, (0.0, 0.0))[0], n)

        have = sorted((n for n in fragments if n in live), key=load)
        if len(have) >= self.spread_limit:
            pool = have
        else:
            pool = have + sorted((n for n in live if n not in have), key=load)
        return pool[: max(1, min(replicas, len(pool)))]

    def status(self) -> dict[str, Any]:
        """Known loads."""
        return {"loads": {n: v for n, (v, _) in self.loads.items()}}


class SimBuckets:
    """BucketMapService's face (IBucketMap): the map, owner(), subscribe(), was_away()."""

    def __init__(self) -> None:
        self.map = BucketMap.empty(N_BUCKETS)
        self.listeners: list[Any] = []

    def subscribe(self, listener: Any) -> None:
        self.listeners.append(listener)

    def owner(self, bucket: int) -> str:
        return self.map.owners[bucket]

    def was_away(self) -> bool:
        return False  # only the boot counts as away here

    def install(self, new: BucketMap) -> None:
        old, self.map = self.map, new
        for listener in self.listeners:
            listener(old, new, new.fresh(old))


class SimRpc:
    def __init__(self, net: Net, me: str) -> None:
        self.net, self.me = net, me

    def call(self, address: str, command: type[amp.Command], **kw: Any) -> Deferred[Any]:
        return self.net.dispatch(self.me, address, command, kw)


def unsynced(store: Any) -> None:
    """The bucket indexes of a simulated node without fsync (speed: every UID mark
    and commit would fsync on a real disk; durability is not what these tests pin)."""
    opened = store._db_locked
    store.marks_db().execute("PRAGMA synchronous=OFF")

    def db_locked(bucket: int) -> Any:
        fresh = bucket not in store._dbs
        db = opened(bucket)
        if fresh:
            db.execute("PRAGMA synchronous=OFF")
        return db

    store._db_locked = db_locked


class SimNode:
    """ClusterNode's face as MailCluster uses it."""

    def __init__(self, net: Net, node_id: str, tmp_path: Path) -> None:
        self.net = net
        self.node_id = node_id
        self.registry = RpcRegistry()
        self.rpc = SimRpc(net, node_id)
        self.view = View(0, (), "")
        self.buckets = SimBuckets()
        clock = net.sim.reactor(node_id)
        storage = MailStorage(clock, node_id, tmp_path / node_id, threadpool=SyncPool())  # type: ignore[arg-type]
        storage.profiles._hash = fast_hash
        # no fsync of the profile table in the simulation (speed; durability is not tested here)
        storage.profiles._db.db.execute("PRAGMA synchronous=OFF")
        unsynced(storage.fragment_store)
        # read_wait=0: a read a lapsed read lease makes uncertain is refused at that
        # instant (these tests read without running the clock; the wait has its own test)
        self.cluster = MailCluster(
            storage,
            self,
            self.buckets,
            balancer=AffinityChooser(node_id),
            settle_timeout=2.0,
            read_wait=0.0,
        )
        self.mail = MailService(
            clock, node_id=node_id, data_dir=tmp_path / node_id, domain=DOMAIN,
            storage=storage, topology=self.cluster,
            layout=Fragmented(self.cluster.home_of, now=clock.seconds),
            forward_deliveries=net.forwarding,
        )  # fmt: skip

    def synced_cluster_time(self) -> float | None:
        """Never synced to a time reference (no timesync here: no read leases)."""
        return None

    def deliver(self, user: str, body: bytes) -> list[Digest]:
        digests: list[Digest] = self.net.result_of(self.mail.delivery.deliver([user], body))
        return digests

    def read(self, user: str) -> tuple[list[Digest], dict[int, bytes]]:
        mail = self.mail.retrieval.open(user)
        digests = self.net.result_of(mail.digests(INBOX))
        return digests, self.net.result_of(mail.fetch(INBOX, digests))


class Clock:
    """The kernel's time as the tests move it (every host's clock shows it)."""

    def __init__(self, sim: SimNet) -> None:
        self.sim = sim

    def seconds(self) -> float:
        return self.sim.seconds()

    def advance(self, seconds: float) -> None:
        self.sim.advance(seconds)


class Net:
    """Nodes, the calls between them, cut-off nodes and committed views.

    ``forwarding`` (set before adding nodes): deliveries of R=1 users are handed to
    their manager's node (``DeliveryProxy.forward``), as real nodes do; off by
    default here, so the receiving node's proxy places the mail where a test says."""

    forwarding = False

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.sim = SimNet(start=1_700_000_000)
        self.clock = Clock(self.sim)
        self.nodes: dict[str, SimNode] = {}
        #: cut-off nodes and sides of a partition, kept as the kernel's topology
        self.down: set[str] = Watched(lambda _: self._topology())
        self._sides: list[set[str]] = []
        self.epoch = 0
        self.map = BucketMap.empty(N_BUCKETS)
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.held: list[tuple[str, str, type[amp.Command], dict[str, Any], Deferred[Any]]] = []
        self.hold: set[bytes] = set()
        self.refuse: set[tuple[str, bytes]] = set()

    @property
    def sides(self) -> list[set[str]]:
        """Sides of a partition: nodes in different ones cannot talk."""
        return self._sides

    @sides.setter
    def sides(self, sides: list[set[str]]) -> None:
        self._sides = sides
        self._topology()

    def _topology(self) -> None:
        self.sim.set_topology(self.down, self._sides)

    def flush(self) -> None:
        """Run what is due now: every call made and answered."""
        self.sim.flush()

    def fired(self, d: Deferred[Any]) -> bool:
        """Has ``d`` fired once what is due now ran?"""
        return self.sim.fired(d)

    def result_of(self, d: Deferred[Any], within: float = 0.0) -> Any:
        """``d``'s result, the kernel run until it fires (by now, unless ``within``)."""
        return self.sim.result_of(d, within)

    def add(self, node_id: str) -> SimNode:
        node = self.nodes[node_id] = SimNode(self, node_id, self.tmp_path)
        self._topology()
        self.flush()  # the boot's reads from disk land first
        return node

    def commit(self, live: list[str], *, on: list[str] | None = None) -> None:
        """A view of ``live`` (map computed as the coordinator would), installed on ``on``."""
        self.epoch += 1
        self.map = self.map.reassign(live, self.epoch)
        members = tuple(Member(n, n) for n in sorted(live))
        view = View(self.epoch, members, min(live))
        for n in on if on is not None else live:
            self.nodes[n].view = view
            self.nodes[n].buckets.install(self.map)
            self.flush()  # what it sets off lands before the next installs

    def alone(self, node_id: str) -> None:
        """``node_id`` cut off: its own view holds only itself."""
        self.epoch += 1
        m = BucketMap.empty(N_BUCKETS).reassign([node_id], self.epoch)
        node = self.nodes[node_id]
        node.view = View(self.epoch, (Member(node_id, node_id),), node_id)
        node.buckets.install(m)
        self.flush()

    def dispatch(
        self, src: str, address: str, command: type[amp.Command], kw: dict[str, Any]
    ) -> Deferred[Any]:
        name = command.commandName.decode()  # type: ignore[union-attr]
        self.calls[name] += 1
        if (address, command.commandName) in self.refuse:
            return self.sim.call(src, address, self._refused)
        if command.commandName in self.hold:
            d: Deferred[Any] = Deferred()
            self.held.append((src, address, command, kw, d))
            return d
        return self._deliver(src, address, command, kw)

    @staticmethod
    def _refused(reactor: Any) -> None:
        raise PeerUnavailable(f"{reactor.host.name} refuses")

    def release(self) -> None:
        held, self.held = self.held, []
        for src, address, command, kw, d in held:
            self._deliver(src, address, command, kw).chainDeferred(d)
        self.flush()

    def _deliver(
        self, src: str, address: str, command: type[amp.Command], kw: dict[str, Any]
    ) -> Deferred[Any]:
        box = command.makeArguments(kw, None)
        self.bytes[command.commandName.decode()] += len(box.serialize())  # type: ignore[union-attr]
        if address not in self.nodes:
            return fail(PeerUnavailable(f"{address} is unknown"))

        def lookup(name: bytes) -> Any:  # the callee's registry when the call arrives
            return self.nodes[address].registry.lookup(name)

        return self.sim.amp_call(src, address, lookup, command, kw, box=box)


def users_managed_by(net: Net, node: str, n: int, avoid: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    out = []
    for i in range(10_000):
        u = f"user{i}@{DOMAIN}"
        if net.map.owners[bucket_of(u)] == node and u not in avoid:
            out.append(u)
            if len(out) == n:
                return out
    raise AssertionError("no such users")


@pytest.fixture
def net(tmp_path: Path) -> Net:
    n = Net(tmp_path)
    for i in (1, 2, 3):
        n.add(f"n{i}")
    n.commit(["n1", "n2", "n3"])
    return n


def add_user(net: Net, via: str, user: str, pw: str = "pw") -> None:
    net.result_of(net.nodes[via].mail.replicator.add(user, pw, 1))


def check_mailbox(net: Net, at: str, user: str, want: set[bytes]) -> list[Digest]:
    digests, bodies = net.nodes[at].read(user)
    uids = [d.uid for d in digests]
    assert uids == sorted(set(uids)), "UIDs strictly ascending, each once"
    assert sorted(bodies.values()) == sorted(want) and len(digests) == len(want)
    return digests


def test_user_added_on_one_node_gets_mail_read_at_every_node(net: Net) -> None:
    """adduser on n1; every node knows the profile, takes mail for it and serves it."""
    user = users_managed_by(net, "n3", 1)[0]
    add_user(net, "n1", user)
    assert [net.nodes[n].mail.profiles.count() for n in ("n1", "n2", "n3")] == [1, 1, 1]
    rng = random.Random(1)
    want = set()
    for i in range(12):
        body = b"message %d\r\n" % i
        net.nodes[rng.choice(["n1", "n2", "n3"])].deliver(user, body)
        want.add(body)
    validity = set()
    for at in ("n1", "n2", "n3"):
        check_mailbox(net, at, user, want)
        mail = net.nodes[at].mail.retrieval.open(user)
        (inbox,) = [i for i in net.result_of(mail.mailboxes()) if i.name == INBOX]
        validity.add(inbox.uidvalidity)
        assert inbox.messages == 12
    assert len(validity) == 1, "one UIDVALIDITY whichever node answers"
    assert net.result_of(net.nodes["n2"].mail.retrieval.authenticate(user, "pw")).address == user
    with pytest.raises(BadCredentials):
        net.result_of(net.nodes["n2"].mail.retrieval.authenticate(user, "nope"))


def test_failed_store_retries_elsewhere_and_uids_ascend_over_fragments(net: Net) -> None:
    """The first chosen node is unreachable: the message goes to another node; the
    mailbox, now on two fragments, reads complete with ascending UIDs; expunging all
    of one fragment's messages takes that node off the fragment list."""
    user = users_managed_by(net, "n3", 1)[0]
    add_user(net, "n1", user)
    first = {net.nodes["n2"].deliver(user, b"a%d\r\n" % i)[0].node for i in range(4)}
    assert first == {"n1"}, "affinity: one node while it is healthy"
    net.down.add("n1")
    later = {net.nodes["n2"].deliver(user, b"b%d\r\n" % i)[0].node for i in range(4)}
    net.down.discard("n1")
    assert len(later) == 1 and later != first
    assert net.nodes["n2"].mail.delivery.retries >= 1
    want = {b"a%d\r\n" % i for i in range(4)} | {b"b%d\r\n" % i for i in range(4)}
    digests = check_mailbox(net, "n1", user, want)
    assert {d.node for d in digests} == first | later
    manager = net.nodes["n3"].cluster.user_manager
    assert net.result_of(manager.fragments(user)) == tuple(sorted(first | later))
    mail = net.nodes["n2"].mail.retrieval.open(user)
    (other,) = later
    gone = [d for d in digests if d.node == other]
    net.result_of(mail.delete(INBOX, gone))
    assert net.result_of(manager.fragments(user)) == ("n1",)
    check_mailbox(net, "n2", user, {b"a%d\r\n" % i for i in range(4)})
    nxt = net.nodes["n1"].deliver(user, b"c\r\n")[0]
    assert nxt.uid > max(d.uid for d in digests), "UIDs never go back"


def test_fourth_node_rebuilds_moved_managers_from_hints(net: Net) -> None:
    """n4 joins: buckets move to it; its fragment lists and UID counters come from the
    other nodes' hints (one Hints call per (sender, manager)), mail still reads complete,
    and new mail gets higher UIDs."""
    rng = random.Random(2)
    users = [f"u{i}@{DOMAIN}" for i in range(24)]
    for u in users:
        add_user(net, rng.choice(["n1", "n2", "n3"]), u)
    want: dict[str, set[bytes]] = {u: set() for u in users}
    # First round: n1 refuses stores, so mail lands on n2/n3; second round, delivered
    # at n1 while n2 and n3 refuse stores: on n1 too. Each user ends on two nodes.
    net.refuse.add(("n1", MbStore.commandName))  # type: ignore[arg-type]
    for i, u in enumerate(users * 2):
        if i == len(users):
            net.refuse = {(n, MbStore.commandName) for n in ("n2", "n3")}  # type: ignore[misc]
        via = rng.choice(["n2", "n3"]) if i < len(users) else "n1"
        body = b"%s %d\r\n" % (u.encode(), i)
        net.nodes[via].deliver(u, body)
        want[u].add(body)
    net.refuse.clear()
    assert all(
        len(net.result_of(net.nodes["n1"].mail.users_for(u).fragments(u))) == 2 for u in users
    )
    n4 = net.add("n4")
    before = net.calls["porcupine.hints"]
    net.commit(["n1", "n2", "n3", "n4"])
    assert n4.cluster.user_manager.settling == {}, "every live node answered"
    assert net.calls["porcupine.hints"] - before <= 4 * 3, "one Hints per sender and manager"
    moved = [u for u in users if net.map.owners[bucket_of(u)] == "n4"]
    assert moved, "n4 manages some users"
    for u in users:
        holders = {n for n, node in net.nodes.items() if u in node.mail.fragment_store.users_with_mail()}  # fmt: skip
        manager = net.nodes[net.map.owners[bucket_of(u)]].cluster.user_manager
        assert set(net.result_of(manager.fragments(u))) == holders, u
        digests = check_mailbox(net, rng.choice(["n1", "n2", "n3", "n4"]), u, want[u])
        new = n4.deliver(u, b"after\r\n")[0]
        assert new.uid > max(d.uid for d in digests)


def test_failed_node_leaves_lists_and_a_returning_node_resends(net: Net) -> None:
    """n2 fails: managers drop it (its mail is out of reach); it comes back (its own
    view had only itself): it sends hints for every bucket and its mail is back."""
    user = users_managed_by(net, "n1", 1)[0]
    add_user(net, "n3", user)
    net.down.add("n3")  # so that n2 stores it (AffinityChooser: least loaded, then name)
    net.nodes["n2"].cluster.balancer.failed("n1", net.clock.seconds())
    d = net.nodes["n2"].deliver(user, b"on n2\r\n")[0]
    net.down.discard("n3")
    assert d.node == "n2"
    net.down.add("n2")
    net.alone("n2")
    net.commit(["n1", "n3"])
    manager = net.nodes[net.map.owners[bucket_of(user)]].cluster.user_manager
    assert net.result_of(manager.fragments(user)) == ()
    net.down.discard("n2")
    net.commit(["n1", "n2", "n3"])
    manager = net.nodes[net.map.owners[bucket_of(user)]].cluster.user_manager
    assert net.result_of(manager.fragments(user)) == ("n2",)
    check_mailbox(net, "n3", user, {b"on n2\r\n"})


def test_profiles_converge_newest_wins_with_tombstones(net: Net) -> None:
    """A node away during adduser/passwd/deluser catches up when it returns; a
    deleted user stays deleted (the tombstone is newer than the stale copy)."""
    a, b = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
    add_user(net, "n1", b)
    net.down.add("n3")
    net.alone("n3")
    net.commit(["n1", "n2"])
    net.clock.advance(1)
    add_user(net, "n1", a, "old")
    net.clock.advance(1)
    net.result_of(net.nodes["n2"].mail.replicator.set_password(a, "new"))
    net.clock.advance(1)
    net.result_of(net.nodes["n2"].mail.replicator.remove(b))
    assert net.nodes["n3"].mail.profiles.count() == 1, "n3 missed all three"
    net.down.discard("n3")
    net.commit(["n1", "n2", "n3"])
    p3 = net.nodes["n3"].mail.profiles
    assert p3.count() == 1 and net.result_of(p3.get(b)) is None
    assert net.result_of(p3.verify(a, "new")).address == a
    for n in ("n1", "n2"):
        assert net.result_of(net.nodes[n].mail.profiles.get(b)) is None, "no resurrection"


def test_requests_for_a_settling_bucket_wait_for_hints_or_the_timeout(net: Net) -> None:
    """A new manager answers a fresh bucket's fragment list once every live node sent
    its hints; a missing sender delays the answer by at most settle_timeout."""
    user = users_managed_by(net, "n2", 1)[0]
    add_user(net, "n1", user)
    net.nodes["n1"].deliver(user, b"x\r\n")
    net.hold.add(Hints.commandName)  # type: ignore[arg-type]
    n4 = net.add("n4")
    net.commit(["n1", "n2", "n3", "n4"])
    owner = net.map.owners[bucket_of(user)]
    users = [u for u in (f"w{i}@{DOMAIN}" for i in range(5000)) if net.map.owners[bucket_of(u)] == "n4"]  # fmt: skip
    probe = users[0]
    manager = n4.cluster.user_manager
    d = manager.fragments(probe)
    assert not net.fired(d), "held hints: the bucket is settling"
    net.release()
    assert net.result_of(d) == ()
    net.hold.add(Hints.commandName)  # type: ignore[arg-type]
    net.commit(["n1", "n2", "n3"])  # n4 leaves: its buckets move back
    mgr = net.nodes[net.map.owners[bucket_of(probe)]].cluster.user_manager
    d = mgr.fragments(probe)
    assert not net.fired(d)
    net.clock.advance(2.0)
    assert net.result_of(d) == (), "answered from what is known after the timeout"
    net.release()  # late hints for an old epoch are ignored
    assert owner


def test_load_learned_from_store_replies_and_the_periodic_exchange(net: Net) -> None:
    """No central service: a store reply carries the storing node's load, and each
    exchange tick swaps figures with a few live members (both ways)."""
    user = users_managed_by(net, "n1", 1)[0]
    add_user(net, "n1", user)
    n2 = net.nodes["n2"]
    chooser = n2.cluster.balancer
    assert isinstance(chooser, AffinityChooser)
    n2.deliver(user, b"x\r\n")  # stored on n1 (remote for n2)
    assert "n1" in chooser.loads
    n3 = net.nodes["n3"]
    n3.cluster.meter.inflight = 5  # n3 is busy
    n3.cluster._exchange_load()
    net.flush()
    for n in ("n1", "n2"):  # 2 peers, fan-out 3: both hear n3's figure
        other = net.nodes[n].cluster.balancer
        assert isinstance(other, AffinityChooser) and other.loads["n3"][0] == 5.0
    mine = n3.cluster.balancer
    assert isinstance(mine, AffinityChooser)
    assert mine.loads.keys() == {"n1", "n2"}, "answers carry the callee's load"
    n3.cluster.meter.inflight = 0


def test_copies_on_two_nodes_share_a_uid_listed_once_flagged_and_deleted_on_both(
    net: Net,
) -> None:
    """A user with replicas=2: each message is stored on two nodes under one UID; the
    mailbox lists it once, and STORE/EXPUNGE reach both copies."""
    user = users_managed_by(net, "n2", 1)[0]
    net.result_of(net.nodes["n1"].mail.replicator.add(user, "pw", 2))
    digests = net.nodes["n3"].deliver(user, b"twice\r\n")
    assert len(digests) == 2 and len({d.uid for d in digests}) == 1
    assert len({d.node for d in digests}) == 2
    mail = net.nodes["n1"].mail.retrieval.open(user)
    (one,) = net.result_of(mail.digests(INBOX))
    assert net.result_of(mail.set_flags(INBOX, [one], ["\\Seen"], 1)) == {one.uid: ("\\Seen",)}
    for d in digests:
        flags = net.result_of(net.nodes[d.node].mail.mailbox_manager.digests(user, INBOX))[0].flags
        assert flags == ("\\Seen",), f"flag on the copy at {d.node}"
    assert net.result_of(mail.delete(INBOX, [one])) == [one.uid]
    for d in digests:
        assert net.result_of(net.nodes[d.node].mail.mailbox_manager.digests(user, INBOX)) == []
    manager = net.nodes["n2"].cluster.user_manager
    assert net.result_of(manager.fragments(user)) in ((), (mail.home,))


def test_reconfiguration_cost_per_node_does_not_grow_with_the_cluster(tmp_path: Path) -> None:
    """One node fails in clusters of 3, 10 and 30 holding the same 120 users: the hint
    traffic each surviving node sends stays bounded (it shrinks: fewer fresh buckets)."""
    figures = {}
    for size in (3, 10, 30):
        net = Net(tmp_path / str(size))
        names = [f"n{i:02d}" for i in range(size)]
        for n in names:
            net.add(n)
        net.commit(names)
        rng = random.Random(size)
        for i in range(120):
            u = f"r{i}@{DOMAIN}"
            add_user(net, rng.choice(names), u)
            net.nodes[rng.choice(names)].deliver(u, b"hello %d\r\n" % i)
        calls, sent = net.calls["porcupine.hints"], net.bytes["porcupine.hints"]
        net.down.add(names[-1])
        net.commit(names[:-1])
        per_node_calls = (net.calls["porcupine.hints"] - calls) / (size - 1)
        per_node_bytes = (net.bytes["porcupine.hints"] - sent) / (size - 1)
        assert all(not net.nodes[n].cluster.user_manager.settling for n in names[:-1])
        figures[size] = (per_node_calls, per_node_bytes)
    print("\nhints per surviving node after one failure (calls, bytes):", figures)
    assert all(calls <= 16 for calls, _ in figures.values())
    assert figures[30][1] <= figures[3][1], figures


class RawHints(amp.Command):
    """``porcupine.hints`` with untyped JSON: what a broken or hostile peer may send."""

    commandName = Hints.commandName
    arguments = [(b"sender", amp.Unicode()), (b"hints", Json()), (b"view", amp.Integer(optional=True))]  # fmt: skip


class RawProfilePut(amp.Command):
    """``porcupine.profiles`` with untyped JSON."""

    commandName = ProfilePut.commandName
    arguments = [(b"records", Json())]


def test_malformed_hints_and_profile_pushes_are_refused_or_ignored(net: Net) -> None:
    """Junk from a peer never breaks a node: bad boxes are AMP errors, bad entries skipped."""
    n1 = net.nodes["n1"]
    with pytest.raises(amp.UnknownRemoteError):
        net.result_of(n1.cluster.call("n2", RawHints, sender="n1", hints={"no": "list"}))
    junk = [[1], "x", [999, 1, [], []], [0, "e", 5, 7], [0, 10**9, [[None]], [[1, 2]]]]
    net.result_of(n1.cluster.call("n2", RawHints, sender="n1", hints=junk))
    net.result_of(n1.cluster.call("n2", RawProfilePut, records=[[1], "x", ["a@b", 1]]))
    with pytest.raises(amp.UnknownRemoteError):
        net.result_of(n1.cluster.call("n2", RawProfilePut, records={"no": "list"}))
    assert net.nodes["n2"].mail.profiles.count() == 0
    user = users_managed_by(net, "n2", 1)[0]
    add_user(net, "n1", user)
    assert net.nodes["n3"].deliver(user, b"still fine\r\n")


def test_open_imap_mailboxes_poll_for_mail_stored_elsewhere(net: Net) -> None:
    """Mail stored on another node reaches an IMAP session here within poll_interval."""
    n1 = net.nodes["n1"]
    polled: list[str] = []

    class Box:
        name = INBOX
        mail = SimpleNamespace(address=f"x@{DOMAIN}")  # the shape PorcupineMailbox has

        def changed(self) -> None:
            polled.append(self.name)

    box = Box()
    n1.mail.registry.open(box)  # type: ignore[arg-type]
    n1.cluster.startService()
    try:
        net.clock.advance(n1.cluster.poll_interval)
        assert polled == [INBOX]
        n1.mail.registry.close(box)  # type: ignore[arg-type]
        net.clock.advance(n1.cluster.poll_interval)
        assert polled == [INBOX], "closed mailboxes are not polled"
    finally:
        n1.cluster.stopService()


def test_load_counts_fetches_deletions_and_flag_changes_in_progress(net: Net) -> None:
    """The load figure is the node's outstanding disk work: a fetch, a deletion and a
    flag change still running on n1's disk count like stores, and stop counting when
    they end (also when they fail)."""
    cluster = net.nodes["n1"].cluster
    box = cluster._local_mailboxes
    waiting: list[Deferred[Any]] = []

    class Disk:
        node_id = "n1"

        def __getattr__(self, name: str) -> Any:
            def op(*args: Any) -> Deferred[Any]:
                d: Deferred[Any] = Deferred()
                waiting.append(d)
                return d

            return op

    box.inner = Disk()
    base = cluster.meter.inflight
    box.fetch("u@example.org", "INBOX", [1])
    box.delete("u@example.org", "INBOX", [2])
    box.set_flags("u@example.org", "INBOX", [3], ["\\Seen"], 1)
    box.copy("u@example.org", "INBOX", [3], "Other")
    assert cluster.meter.inflight == base + 4 and cluster.load() >= 4
    waiting[0].callback({1: b"x"})
    waiting[1].errback(RuntimeError("disk"))
    waiting[1].addErrback(lambda f: None)
    assert cluster.meter.inflight == base + 2
    for d in waiting[2:]:
        d.callback(None)
    assert cluster.meter.inflight == base


def test_a_mailbox_created_while_its_home_was_away_is_selectable_after(net: Net) -> None:
    """Found with offlineimap and mbsync (a paused home node): a folder created while
    the user's home was out of the view went to the then home; once the home was
    back LIST showed it, SELECT/STATUS said NONEXISTENT and CREATE ALREADYEXISTS, so
    every sync run failed and the folder's local mail was never uploaded.  Opening
    it now gives the home the mailbox (counted) and works, with one UIDVALIDITY."""
    user = users_managed_by(net, "n3", 1)[0]
    add_user(net, "n1", user)
    home = net.nodes["n1"].cluster.home_of(user)
    other = next(n for n in ("n1", "n2", "n3") if n != home)
    made = net.result_of(net.nodes[other].mail.mailbox_manager.create_mailbox(user, "Phantom"))
    # that node holds some of the user's mail (its fragment is listed)
    net.result_of(net.nodes["n3"].cluster.user_manager.add_fragment(user, other))
    mail = net.nodes["n1"].mail.retrieval.open(user)
    assert "Phantom" in [i.name for i in net.result_of(mail.mailboxes())], "listed"
    infos, digests = net.result_of(mail.open_mailbox("Phantom"))
    assert digests == []
    (box,) = [i for i in infos if i.name == "Phantom"]
    assert box.uidvalidity == made.uidvalidity, "the home's empty copy changes nothing"
    at_home = net.result_of(net.nodes[home].mail.mailbox_manager.mailboxes(user))
    assert "Phantom" in [i.name for i in at_home]
    assert mail.counts["home_mailbox_repairs"] == 1
    again = net.nodes["n2"].mail.retrieval.open(user)
    net.result_of(again.open_mailbox("Phantom"))
    assert again.counts["home_mailbox_repairs"] == 0, "repaired once"
    with pytest.raises(NoSuchMailbox):
        net.result_of(again.open_mailbox("Nowhere"))
