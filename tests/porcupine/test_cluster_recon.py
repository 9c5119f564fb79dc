"""Soft-state reconstruction when a node was *away* without any map showing it, and
hints whose bucket epoch went back at a partition merge (the two bugs ``mailsim``
found; see docs/mail.md, "Load balancing and the cluster simulator").

The simulated cluster of ``test_cluster_sim`` (AMP encoding over one SimKernel), but every
node runs the real ``BucketMapService``: a commit's attachment is what the
coordinator's service computes from *its* map and view, and each member installs
it as ``ClusterNode`` would, so views and maps of different histories can be
scripted (``commit(..., on=..., coordinator=...)``).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mailtest_helpers import SyncPool, fast_hash
from test_cluster_sim import (
    DOMAIN,
    AffinityChooser,
    Net,
    SimNode,
    SimRpc,
    add_user,
    check_mailbox,
    unsynced,
)
from twisted.protocols import amp

from yimaporc.cluster.buckets import BucketMap, MalformedMap
from yimaporc.cluster.bucketservice import BucketMapService, pack_commit, unpack_commit
from yimaporc.cluster.membership import View
from yimaporc.cluster.rpc import RpcRegistry
from yimaporc.cluster.statefile import StateFile
from yimaporc.cluster.wire import Member
from yimaporc.porcupine.balancer import FAIL_AVOID
from yimaporc.porcupine.cluster import Hints, HintsRequest, Json, MailCluster, MbStore
from yimaporc.porcupine.retrieval import Fragmented
from yimaporc.porcupine.service import MailService
from yimaporc.porcupine.storage import MailStorage
from yimaporc.porcupine.usermap import N_BUCKETS, bucket_of
from yimaporc.testing.pools import CallsNow, ImmediatePool

HINTS_REQUEST = HintsRequest.commandName


class ReconNode(SimNode):
    """``SimNode`` with the real BucketMapService and ClusterNode's listener plumbing."""

    def __init__(self, net: Net, node_id: str, tmp_path: Path) -> None:
        self.net = net
        self.node_id = node_id
        self.registry = RpcRegistry()
        self.rpc = SimRpc(net, node_id)
        self.view = View(0, (), "")
        self.config = SimpleNamespace(data_dir=tmp_path / f"{node_id}.cluster")
        self.provider: Any = None
        self.listeners: list[Any] = []
        self.state_file_for = lambda name, path, durable: StateFile(
            CallsNow(), ImmediatePool(), path, durable=durable
        )
        self.buckets = BucketMapService(self, N_BUCKETS)  # type: ignore[arg-type,assignment]
        clock = net.sim.reactor(node_id)
        storage = MailStorage(clock, node_id, tmp_path / node_id, threadpool=SyncPool())  # type: ignore[arg-type]
        storage.profiles._hash = fast_hash
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

    def set_commit_attachment(self, provider: Any) -> None:
        self.provider = provider

    def subscribe(self, listener: Any) -> None:
        self.listeners.append(listener)

    def install(self, view: View) -> None:
        """What ClusterNode does on a committed view."""
        old, self.view = self.view, view
        for listener in self.listeners:
            listener.membership_changed(old, view)


class ReconNet(Net):
    """``Net`` whose commits are computed by the coordinator's BucketMapService."""

    def add(self, node_id: str) -> SimNode:
        node = self.nodes[node_id] = ReconNode(self, node_id, self.tmp_path)
        self._topology()
        self.flush()  # the boot's reads from disk land first
        return node

    def node(self, node_id: str) -> ReconNode:
        n = self.nodes[node_id]
        assert isinstance(n, ReconNode)
        return n

    def commit(
        self, live: list[str], *, on: list[str] | None = None, coordinator: str | None = None
    ) -> None:
        """A view of ``live`` coordinated by ``coordinator`` (default: the lowest id)
        from its own view and map, installed on ``on`` (default: ``live``) in order."""
        self.epoch += 1
        coord = self.node(coordinator or min(live))
        members = tuple(Member(n, n) for n in sorted(live))
        attachment = coord.provider(coord.view, members, self.epoch)
        view = View(self.epoch, members, coord.node_id, attachment)
        for n in (
            on if on is not None else [coord.node_id, *(x for x in live if x != coord.node_id)]
        ):
            self.node(n).install(view)
            self.flush()  # what it sets off lands before the next installs
        self.map = coord.buckets.map

    def restart(self, node_id: str) -> ReconNode:
        """The process restarts from its data dir and boots into a group of one."""
        old = self.node(node_id)
        old.mail.fragment_store.close()
        old.mail.profiles.close()
        self.sim.kernel.crash(self.sim.host(node_id))  # its timers end with it
        node = ReconNode(self, node_id, self.tmp_path)
        self.nodes[node_id] = node
        self.flush()  # the boot's reads from disk land first
        self.epoch += 1
        node.install(View(self.epoch, (Member(node_id, node_id),), node_id))
        self.flush()
        return node


def mail_on(net: Net, user: str, body: bytes, store_on: str) -> None:
    """Deliver at ``store_on`` with every other node refusing stores and avoided by the
    proxy's balancer (so no store is tried there, and no holder recorded first): stored
    there."""
    delivery = net.nodes[store_on].mail.delivery
    others = [n for n in net.nodes if n != store_on]
    now = delivery.now()
    for n in others:
        delivery.balancer.failed(n, now)
    net.refuse = {(n, MbStore.commandName) for n in others}  # type: ignore[misc]
    digests = net.nodes[store_on].deliver(user, body)
    net.refuse = set()
    for n in others:  # usable again
        delivery.balancer.failed(n, now - 2 * FAIL_AVOID)
    assert [d.node for d in digests] == [store_on]


def test_manager_restarting_within_failure_detection_pulls_its_users_fragments(
    tmp_path: Path,
) -> None:
    """n2 (manager of some users whose mail is on n1 and n3) is killed and back before
    anyone notices: the next commit has the same members and the same map, so nobody
    sends it hints. The commit names the coordinator's previous view, which is not
    n2's (it booted into a group of one): n2 pulls hints for its buckets from every
    member, and its fragment lists and UID counters are whole again."""
    net = ReconNet(tmp_path)
    for n in ("n1", "n2", "n3"):
        net.add(n)
    net.commit(["n1", "n2", "n3"])
    users = [
        u
        for u in (f"user{i}@{DOMAIN}" for i in range(2000))
        if net.map.owners[bucket_of(u)] == "n2"
    ][:6]
    want: dict[str, set[bytes]] = {}
    for i, u in enumerate(users):
        add_user(net, "n1", u)
        a, b = b"%s on n1\r\n" % u.encode(), b"%s on n3\r\n" % u.encode()
        mail_on(net, u, a, "n1")
        mail_on(net, u, b, "n3")
        want[u] = {a, b}
        if i % 2:
            c = b"%s on n2\r\n" % u.encode()
            mail_on(net, u, c, "n2")
            want[u].add(c)
    expected = {u: ("n1", "n2", "n3") if i % 2 else ("n1", "n3") for i, u in enumerate(users)}
    um = net.node("n2").cluster.user_manager
    assert {u: net.result_of(um.fragments(u)) for u in users} == expected
    top = {u: max(d.uid for d in check_mailbox(net, "n3", u, want[u])) for u in users}
    before = net.calls["porcupine.hints"]

    n2 = net.restart("n2")
    net.commit(["n1", "n2", "n3"])  # n1 coordinates: same members, same map
    assert net.map.fresh(net.node("n1").buckets.map) == set()
    um = n2.cluster.user_manager
    assert {u: net.result_of(um.fragments(u)) for u in users} == expected
    assert um.settling == {}, "both pulls answered: settled"
    assert net.calls["porcupine.hints"] - before == 2, "only n2 pushes (to n1 and n3)"
    assert net.calls["porcupine.hints-request"] == 2, "n2 asked n1 and n3"
    for u in users:
        digests = check_mailbox(net, "n1", u, want[u])
        assert max(d.uid for d in digests) == top[u]
        new = net.nodes["n3"].deliver(u, b"after\r\n")[0]
        assert new.uid > top[u], "the rebuilt UID counter starts above every node's UIDNEXT"


def test_hint_from_merged_view_with_an_older_bucket_epoch_waits_for_that_view(
    tmp_path: Path,
) -> None:
    """Bucket epochs are not ordered across histories: n2 manages bucket b since epoch
    3 in n3's history, and since epoch 2 in n1's; n1 coordinates the merge, so b goes
    back to epoch 2. n3 installs first and sends its hint (bucket epoch 2, view 4)
    before n2 installs view 4: n2 keeps it for that view instead of dropping it as
    stale, and after installing, b's fragment list has n3 (n2's pulls are refused
    here, so only the kept hint can tell it)."""
    net = ReconNet(tmp_path)
    for n in ("n1", "n2", "n3", "n4"):
        net.add(n)
    net.commit(["n1", "n2", "n3", "n4"])
    after = BucketMap(net.map.owners, net.map.epochs).reassign(["n1", "n2", "n3"], 99)
    user = next(
        u
        for u in (f"user{i}@{DOMAIN}" for i in range(5000))
        if net.map.owners[bucket_of(u)] == "n4" and after.owners[bucket_of(u)] == "n2"
    )
    b = bucket_of(user)
    add_user(net, "n1", user)
    mail_on(net, user, b"kept on n3\r\n", "n3")
    net.down.add("n4")
    # n1 commits without n4, but only n1 and n2 install it (n3 never sees it).
    net.commit(["n1", "n2", "n3"], on=["n1", "n2"], coordinator="n1")
    assert net.node("n2").buckets.map.epochs[b] == net.epoch
    # n3 coordinates from its own (older) view: n2 gets b again, with a newer epoch.
    net.commit(["n1", "n2", "n3"], on=["n3", "n2"], coordinator="n3")
    high = net.epoch
    assert net.node("n2").buckets.map.epochs[b] == high
    # The merge: n1 coordinates from its view, where b has the older epoch.
    net.refuse = {(n, HINTS_REQUEST) for n in ("n1", "n3")}  # type: ignore[misc]
    net.commit(["n1", "n2", "n3"], on=["n1", "n3", "n2"], coordinator="n1")
    n2 = net.node("n2")
    assert n2.buckets.map.owners[b] == "n2" and n2.buckets.map.epochs[b] < high
    um = n2.cluster.user_manager
    net.clock.advance(3.0)  # the refused pulls give up; the bucket settles
    assert net.result_of(um.fragments(user)) == ("n3",)
    assert n2.buckets.away, "n2's previous view was not n1's"
    net.refuse = set()
    check_mailbox(net, "n1", user, {b"kept on n3\r\n"})


def test_commit_names_the_coordinators_previous_view(tmp_path: Path) -> None:
    """The attachment round-trips; a bare map (older coordinator) is not 'away'; junk
    heads are MalformedMap; a member whose previous view differs is away."""
    m = BucketMap.empty(8).reassign(["a", "b"], 3)
    prev = View(7, (), "b")
    assert unpack_commit(pack_commit(prev, m)) == ((7, "b"), m)
    assert unpack_commit(m.serialize()) == (None, m)
    for junk in (b"BKC1", b"BKC1" + b"\0" * 8 + b"\x05ab", b"BKC1" + b"\0" * 9 + b"BKM1"):
        with pytest.raises(MalformedMap):
            unpack_commit(junk)
    net = ReconNet(tmp_path)
    for n in ("n1", "n2"):
        net.add(n)
    net.commit(["n1", "n2"])
    assert net.node("n1").buckets.away is False and net.node("n2").buckets.away is False
    net.restart("n2")
    assert net.node("n2").buckets.away, "a boot's group of one counts as away"
    net.commit(["n1", "n2"])
    assert (net.node("n1").buckets.away, net.node("n2").buckets.away) == (False, True)
    net.commit(["n1", "n2"])
    assert net.node("n2").buckets.away is False


def test_malformed_hint_requests_are_protocol_errors(tmp_path: Path) -> None:
    """``porcupine.hints-request`` with junk buckets is an AMP error, never a crash."""
    net = ReconNet(tmp_path)
    for n in ("n1", "n2"):
        net.add(n)
    net.commit(["n1", "n2"])
    n1 = net.nodes["n1"]
    for junk in ({"a": 1}, ["x"], [N_BUCKETS], [-1], list(range(N_BUCKETS + 1)), [True]):
        with pytest.raises(amp.UnknownRemoteError):
            net.result_of(n1.cluster.call("n2", RawHintsRequest, sender="n1", buckets=junk))
    got = net.result_of(n1.cluster.call("n2", RawHintsRequest, sender="n1", buckets=[3, 3, 0]))
    assert [e[0] for e in got["hints"]] == [0, 3]
    typed = net.result_of(n1.cluster.call("n2", HintsRequest, sender="n1", buckets=[3, 0]))
    assert [h.bucket for h in typed["hints"]] == [0, 3]


class RawHintsRequest(amp.Command):
    """``porcupine.hints-request`` with untyped JSON (a broken or hostile peer)."""

    commandName = HintsRequest.commandName
    arguments = [(b"sender", amp.Unicode()), (b"buckets", Json())]
    response = [(b"hints", Json())]


def test_fragment_note_reaching_a_new_manager_before_its_map_is_kept(tmp_path: Path) -> None:
    """n4 joins; n1 has installed the new map and n4 not yet. Mail for a user of a
    bucket moving to n4 is delivered at n1 after n1 sent its hints: the add_fragment
    note reaches n4 before n4 manages the bucket. n4 keeps it until it installs the
    map (which resets the fresh bucket), then applies it."""
    net = ReconNet(tmp_path)
    for n in ("n1", "n2", "n3"):
        net.add(n)
    net.commit(["n1", "n2", "n3"])
    n4 = net.add("n4")
    net.commit(["n1", "n2", "n3", "n4"], on=["n1", "n2", "n3"])
    user = next(
        u
        for u in (f"user{i}@{DOMAIN}" for i in range(5000))
        if net.map.owners[bucket_of(u)] == "n4"
    )
    add_user(net, "n1", user)
    mail_on(net, user, b"early\r\n", "n1")
    n4.install(net.node("n1").view)
    net.flush()
    um = n4.cluster.user_manager
    assert um.settling == {}, "the others' hints, sent before, were kept for this view"
    assert net.result_of(um.fragments(user)) == ("n1",)
    # n1 asked n4 for a UID before n4 managed the bucket: stored unnumbered, and the
    # pending note (kept like the fragment note) has n4 number it once it may.
    net.clock.advance(0)
    check_mailbox(net, "n2", user, {b"early\r\n"})


def test_failed_hint_push_is_resent_while_the_map_stands(tmp_path: Path) -> None:
    """n4 joins while it refuses hints for a moment: each sender resends 0.5 s later,
    so n4's fragment lists get n1's mail without waiting for a later map change."""
    net = ReconNet(tmp_path)
    for n in ("n1", "n2", "n3"):
        net.add(n)
    net.commit(["n1", "n2", "n3"])
    after = BucketMap(net.map.owners, net.map.epochs).reassign(["n1", "n2", "n3", "n4"], 99)
    user = next(
        u for u in (f"user{i}@{DOMAIN}" for i in range(5000)) if after.owners[bucket_of(u)] == "n4"
    )
    add_user(net, "n1", user)
    mail_on(net, user, b"on n1\r\n", "n1")
    n4 = net.add("n4")
    net.refuse = {("n4", Hints.commandName)}  # type: ignore[misc]
    net.commit(["n1", "n2", "n3", "n4"])
    um = n4.cluster.user_manager
    assert um.settling, "nobody's hints arrived"
    net.refuse = set()
    net.clock.advance(0.5)
    assert um.settling == {}, "resent and settled before the 2 s timeout"
    assert net.result_of(um.fragments(user)) == ("n1",)
