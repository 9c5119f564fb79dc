"""UIDs under pauses and partitions (issue 14, item 1), with the real MailCluster,
ClusterUserManager and FragmentStore of every node over the simulated network of
``test_cluster_sim`` (in-memory AMP, one Clock).

A pause is what SIGSTOP does to a node: its timers do not run (its lease loop is
stopped) and calls to it fail; it wakes up with the map it had.  A partition cuts
calls between two sides, each side commits its own views.  After each scenario the
checker reads every user's INBOX at every node and asserts the invariants of
docs/mail.md ("UIDs under partitions and pauses").
"""

from __future__ import annotations

import random
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest
from test_cluster_recon import ReconNet
from test_cluster_sim import DOMAIN, Net, add_user, users_managed_by

from yimaporc.porcupine.cluster import MbStore
from yimaporc.porcupine.reconstruct import NODE_READ_LEASE
from yimaporc.porcupine.usermap import bucket_of
from yimaporc.porcupine.values import INBOX, Digest, MailUnavailable
from yimaporc.testing.seeds import sweep

DEBUG = False


class PartNet(ReconNet):
    """``ReconNet`` (every node runs the real BucketMapService, so a node that was
    away knows it) with partitions (``sides``: kernel partitions, a call between two
    sides fails like a dead peer)."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.sides: list[set[str]] = []

    @classmethod
    def with_user(cls, tmp_path: Path, nodes: list[str], manager: str) -> tuple[PartNet, str]:
        """``nodes`` in one view, started, and a user (added at n1) whose bucket
        ``manager`` manages."""
        net = cls(tmp_path)
        for n in nodes:
            net.add(n)
        net.commit(nodes)
        net.start()
        user = users_managed_by(net, manager, 1)[0]
        add_user(net, "n1", user)
        return net, user

    def start(self) -> None:
        """Start every node's MailCluster (lease loop, reminders) on the Clock."""
        for node in self.nodes.values():
            node.cluster.startService()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.cluster.stopService()

    def pause(self, node_id: str) -> None:
        """SIGSTOP: no timers run there, no calls get through."""
        loop = self.nodes[node_id].cluster._lease_loop
        assert loop is not None
        loop.stop()
        self.down.add(node_id)

    def wake(self, node_id: str) -> None:
        """SIGCONT: calls get through again; its timers run again (late)."""
        self.down.discard(node_id)
        loop = self.nodes[node_id].cluster._lease_loop
        assert loop is not None
        loop.start(self.nodes[node_id].cluster.lease / 4, now=True)

    def run(self, seconds: float, step: float = 0.25) -> None:
        t = 0.0
        while t < seconds:
            self.clock.advance(step)
            t += step


class Checker:
    """What clients were shown, and the invariants over every read."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.acked: dict[str, list[bytes]] = {}
        self.top_shown: dict[str, int] = {}  # highest UID any client saw, per user
        self.uidnext_shown: dict[tuple[str, str], int] = {}  # (node, user) -> UIDNEXT
        self.uid_of: dict[tuple[str, bytes], int] = {}  # (user, body) -> UID first shown
        self.validity: dict[str, int] = {}
        self.refusals = 0

    def deliver(self, at: str, user: str, body: bytes) -> list[Digest]:
        digests = self.net.nodes[at].deliver(user, body)  # raises unless acknowledged
        self.acked.setdefault(user, []).append(body)
        return digests

    def read(self, at: str, user: str) -> dict[int, bytes] | None:
        """A client's SELECT and full read at ``at``; checks what it is shown against
        the past; None when the node honestly refused (mail out of reach)."""
        mail = self.net.nodes[at].mail.retrieval.open(user)
        (inbox,) = [i for i in self.net.result_of(mail.mailboxes()) if i.name == INBOX]
        key = (at, user)
        assert inbox.uidnext >= self.uidnext_shown.get(key, 0), "UIDNEXT went down"
        self.uidnext_shown[key] = inbox.uidnext
        self.validity.setdefault(user, inbox.uidvalidity)
        assert inbox.uidvalidity == self.validity[user], "UIDVALIDITY changed"
        try:
            digests = self.net.result_of(mail.digests(INBOX, complete=True))
        except MailUnavailable:
            self.refusals += 1
            return None
        bodies = self.net.result_of(mail.fetch(INBOX, digests))
        uids = [d.uid for d in digests]
        assert uids == sorted(set(uids)), f"{user} at {at}: two messages under one UID {uids}"
        assert all(0 < u < inbox.uidnext for u in uids), (uids, inbox.uidnext)
        top = self.top_shown.get(user, 0)
        for d in digests:
            body = bodies[d.uid]
            if (user, body) not in self.uid_of:
                assert d.uid > top, f"{user}: {body!r} newly visible as {d.uid} <= {top} shown"
            seen = self.uid_of.setdefault((user, body), d.uid)
            assert seen == d.uid, f"{user}: {body!r} changed UID {seen} -> {d.uid}"
        mine = [u for (uu, _), u in self.uid_of.items() if uu == user]
        assert len(mine) == len(set(mine)), f"{user}: one UID for two different messages"
        if digests:
            self.top_shown[user] = max(self.top_shown.get(user, 0), max(uids))
        return {d.uid: bodies[d.uid] for d in digests}

    def check_all(self, nodes: list[str], waiting: Collection[bytes] = ()) -> None:
        """Every acknowledged message listed exactly once at every node; those
        ``waiting`` (acknowledged unnumbered, their manager not told yet) at most once."""
        for user, want in sorted(self.acked.items()):
            for at in nodes:
                got = self.read(at, user)
                assert got is not None, f"{user} at {at}: refused after the heal"
                listed = sorted(got.values())
                assert [b for b in listed if b not in waiting] == sorted(
                    b for b in want if b not in waiting
                ), f"{user} at {at}: {len(got)} listed, {len(want)} acknowledged"
                assert all(listed.count(b) <= 1 for b in waiting), f"{user} at {at}: twice"


def newly_visible_above(checker: Checker, user: str, before: int, bodies: list[bytes]) -> None:
    """Messages that became visible after a client saw UIDs up to ``before`` are above it."""
    for b in bodies:
        assert checker.uid_of[(user, b)] > before, (user, b, checker.uid_of[(user, b)], before)


def test_paused_manager_waking_after_a_bucket_move_numbers_nothing_twice(tmp_path: Path) -> None:
    """n3 manages a user's bucket and is paused 3.5 s: one of its allocations is in
    flight at n2's delivery proxy.  The others move the bucket and deliver under the
    new manager.  n3 wakes with its old map: the in-flight store (fence of n3) and a
    delivery n3 itself takes are acknowledged but stored unnumbered; after n3 rejoins
    the legitimate manager numbers them above every UID shown: no UID twice, nothing
    hidden, UIDNEXT never down, at every node."""
    net, user = PartNet.with_user(tmp_path, ["n1", "n2", "n3"], "n3")
    check = Checker(net)
    for i in range(3):
        check.deliver("n1", user, b"before %d\r\n" % i)
    check.check_all(["n1", "n2", "n3"])
    # n2's proxy got a UID from n3 (n3's fence); its store is in flight when n3 stops.
    net.hold.add(MbStore.commandName)  # type: ignore[arg-type]
    inflight = net.nodes["n2"].mail.delivery.deliver([user], b"in flight\r\n")
    net.flush()  # its plan answered, its store made (and held)
    net.hold.discard(MbStore.commandName)  # type: ignore[arg-type]
    assert not net.fired(inflight) and net.held
    net.pause("n3")
    net.run(3.5)
    net.commit(["n1", "n2"], on=["n1", "n2"])
    new_manager = net.map.owners[bucket_of(user)]
    assert new_manager in ("n1", "n2")
    # n3's read lease may still run on n1 and n2's promises: no marks for its buckets
    net.run(0.5 + NODE_READ_LEASE)
    for i in range(5):
        check.deliver(["n1", "n2"][i % 2], user, b"moved %d\r\n" % i)
    check.check_all(["n1", "n2"])
    shown_before_wake = check.top_shown[user]
    net.release()  # the stale store lands at its node, which holds the new fence
    assert [d.uid for d in net.result_of(inflight)] == [0], "acknowledged, stored unnumbered"
    check.acked[user].append(b"in flight\r\n")
    # n3 wakes (I/O before its timers): a delivery it takes itself, with its old map.
    net.down.discard("n3")
    assert not net.nodes["n3"].cluster.lease_ok(), "its lease lapsed during the pause"
    stale = check.deliver("n3", user, b"taken by the woken manager\r\n")
    assert [d.uid for d in stale] == [0]
    net.wake("n3")
    assert net.nodes["n3"].cluster.pauses == 1
    net.run(1.0)
    # Still consistent.  n3's pending note went to the manager of its own (old) map,
    # n3, which may not number: the new manager hears of that message from the
    # holder's reminder (every 3 s) or the rejoin's hints, and lists it only then.
    check.check_all(["n1", "n2"], waiting=[b"taken by the woken manager\r\n"])
    net.commit(["n1", "n2", "n3"])
    net.run(4.0)
    check.check_all(["n1", "n2", "n3"])
    newly_visible_above(
        check,
        user,
        shown_before_wake,
        [b"in flight\r\n", b"taken by the woken manager\r\n"],
    )
    assert all(n.mail.fragment_store.pending(user) == 0 for n in net.nodes.values())
    net.stop()


def test_clean_partition_deliveries_on_both_sides_then_heal(tmp_path: Path) -> None:
    """{n1,n2} | {n3,n4,n5}: both sides acknowledge every delivery; the minority side
    numbers nothing (its mail waits unnumbered), the majority side numbers as usual.
    After the heal: every acknowledged message once at every node, UIDs unique, the
    minority's mail numbered above every UID shown before, UIDNEXT never down."""
    net = PartNet(tmp_path)
    nodes = ["n1", "n2", "n3", "n4", "n5"]
    for n in nodes:
        net.add(n)
    net.commit(nodes)
    net.start()
    rng = random.Random(14)
    users = [f"user{i}@{DOMAIN}" for i in range(8)]
    for u in users:
        add_user(net, "n1", u)
    check = Checker(net)
    for i in range(16):
        check.deliver(rng.choice(nodes), rng.choice(users), b"whole %d\r\n" % i)
    check.check_all(nodes)
    minority, majority = ["n1", "n2"], ["n3", "n4", "n5"]
    net.sides = [set(minority)]
    net.run(1.0)
    net.commit(minority, on=minority)
    net.commit(majority, on=majority)
    net.run(3.0)
    assert not net.nodes["n1"].cluster.user_manager.quorum()
    assert net.nodes["n3"].cluster.user_manager.quorum()
    minority_mail: dict[str, list[bytes]] = {}
    for i in range(30):
        u = rng.choice(users)
        if i % 2:
            body = b"minority %d\r\n" % i
            digests = check.deliver(rng.choice(minority), u, body)
            assert [d.uid for d in digests] == [0], "no majority: unnumbered"
            minority_mail.setdefault(u, []).append(body)
        else:
            check.deliver(rng.choice(majority), u, b"majority %d\r\n" % i)
        if i % 5 == 0:
            for u2 in users:
                check.read(rng.choice(majority), u2)
    assert check.refusals > 0, "mail on the minority side was out of reach: said so"
    shown = dict(check.top_shown)
    net.sides = []
    net.commit(nodes)
    net.run(6.0)
    check.check_all(nodes)
    for u, bodies in minority_mail.items():
        newly_visible_above(check, u, shown.get(u, 0), bodies)
    assert sum(n.mail.fragment_store.pending(u) for n in net.nodes.values() for u in users) == 0
    net.stop()


def test_new_manager_starts_above_uids_stored_only_on_nodes_it_cannot_reach(
    tmp_path: Path,
) -> None:
    """A user's 40 messages (more than UID_GAP) all sit on n2; n1 manages the user.
    {n1,n2} | {n3,n4,n5}: the majority side's new manager hears no hint about them,
    but the UID mark n1 had a majority record is in its hints: its UIDs start above
    all 40, so after the heal no UID is held twice and nothing needs renumbering."""
    nodes = ["n1", "n2", "n3", "n4", "n5"]
    net, user = PartNet.with_user(tmp_path, nodes, "n1")
    check = Checker(net)
    net.refuse = {(n, MbStore.commandName) for n in nodes if n != "n2"}  # type: ignore[misc]
    for i in range(40):
        assert check.deliver("n2", user, b"on n2 %d\r\n" % i)[0].node == "n2"
    net.refuse = set()
    check.check_all(["n1", "n2"])  # (a read records UIDNEXT on the reading node)
    net.sides = [{"n1", "n2"}]
    net.commit(["n1", "n2"], on=["n1", "n2"])
    net.commit(["n3", "n4", "n5"], on=["n3", "n4", "n5"])
    net.run(3.0)
    later = [check.deliver("n4", user, b"majority %d\r\n" % i) for i in range(5)]
    assert min(d[0].uid for d in later) > 40, [d[0].uid for d in later]
    check.read("n4", user)  # a majority-side client sees these UIDs
    net.sides = []
    net.commit(nodes)
    net.run(4.0)
    check.check_all(nodes)  # every UID shown before still names the same message
    net.stop()


def chaos(tmp_path: Path, seed: int, steps: int = 12, forwarding: bool = False) -> Checker:
    """A seeded schedule on 5 nodes: deliveries at random nodes, reads by clients at
    random nodes, and between them pauses (SIGSTOP 0.5-4 s; the others move on after
    2 s), clean partitions (each side commits its view) and heals; then everything
    heals.  The checker asserts the invariants on every read as it goes.
    ``forwarding``: deliveries handed to the user's manager node (as real nodes do)."""
    rng = random.Random(seed)
    net = PartNet(tmp_path / f"s{seed}")
    net.forwarding = forwarding
    nodes = ["n1", "n2", "n3", "n4", "n5"]
    for n in nodes:
        net.add(n)
    net.commit(nodes)
    net.start()
    users = [f"user{i}@{DOMAIN}" for i in range(6)]
    for u in users:
        add_user(net, "n1", u)
    check = Checker(net)
    paused: set[str] = set()
    seq = 0

    for _ in range(steps):
        for _ in range(rng.randint(2, 6)):
            at = rng.choice([n for n in nodes if n not in paused])
            seq += 1
            got = check.deliver(at, rng.choice(users), b"m%d seed %d\r\n" % (seq, seed))
            if DEBUG:
                print(f"{net.clock.seconds() - 1.7e9:.2f} m{seq} at {at}: {got}")
        for _ in range(2):
            at = rng.choice([n for n in nodes if n not in paused])
            check.read(at, rng.choice(users))
        action = rng.choice(["pause", "partition", "heal", "none"])
        if DEBUG:
            print(f"{net.clock.seconds() - 1.7e9:.2f} action {action} sides {net.sides}")
        if action == "pause" and not paused and not net.sides:
            victim = rng.choice(nodes)
            net.pause(victim)
            paused.add(victim)
            length = rng.uniform(0.5, 4.0)
            net.run(min(length, 2.0))
            if length > 2.0:  # failure detection: the others move on
                rest = [n for n in nodes if n != victim]
                net.commit(rest, on=rest)
                net.run(length - 2.0)
            net.wake(victim)
            paused.discard(victim)
            if length > 2.0:
                net.run(0.5)
                net.commit(nodes)
        elif action == "partition" and not net.sides:
            cut = rng.sample(nodes, rng.randint(1, 2))
            net.sides = [set(cut)]
            rest = [n for n in nodes if n not in cut]
            net.commit(cut, on=cut)
            net.commit(rest, on=rest)
        elif action == "heal" and net.sides:
            net.sides = []
            net.commit(nodes)
        net.run(rng.uniform(0.5, 3.0))
    net.sides = []
    net.commit(nodes)
    net.run(6.0)
    if DEBUG:
        for n, node in net.nodes.items():
            um = node.cluster.user_manager
            print(
                n,
                "pending",
                {u: node.mail.fragment_store.pending(u) for u in users},
                "um.pending",
                um.pending,
                "missing",
                um.missing,
                "settling",
                list(um.settling),
                "lease",
                node.cluster.lease_ok(),
                "members",
                sorted(um.members),
                "frag user0",
                um.state.fragment_list(users[0]) if um.state.manages(users[0]) else "-",
            )
            print(
                "  msgs",
                {
                    u: [d.uid for d in node.mail.fragment_store.digests(u, "INBOX")]
                    for u in users[:1]
                },
            )
    check.check_all(nodes)
    net.stop()
    return check


@pytest.mark.parametrize("forwarding", [False, True], ids=["placed-here", "handed-to-manager"])
@pytest.mark.parametrize("seed", sweep(range(6), 3))  # 3 in `make test`, 6 under `make test-slow`
def test_seeded_pauses_and_partitions_keep_the_uid_invariants(
    tmp_path: Path, seed: int, forwarding: bool
) -> None:
    """Seeded schedules of deliveries, reads, pauses and clean partitions over the real
    cores, with deliveries placed by the receiving node or handed to the user's manager
    node: on every read no UID twice, none changed, newly visible ones above all
    shown, UIDNEXT and UIDVALIDITY steady; after the heal every 250 once everywhere."""
    check = chaos(tmp_path, seed, forwarding=forwarding)
    assert sum(len(v) for v in check.acked.values()) > 20


def test_a_uid_in_flight_holds_back_what_readers_see_above_it(tmp_path: Path) -> None:
    """Bug 3 through the real shell: the manager hands UID n to one delivery (its store
    not landed yet) and n+1 to another that lands at once; a reader at another node
    (fragment list and horizon over AMP) is shown neither n+1 nor a UIDNEXT above n,
    so n cannot appear below a UID it saw; once n is found (or its allocation
    expires) both show, in order."""
    nodes = ["n1", "n2", "n3"]
    net, user = PartNet.with_user(tmp_path, nodes, "n1")
    check = Checker(net)
    check.deliver("n2", user, b"first\r\n")
    assert check.read("n3", user) is not None
    um = net.nodes["n1"].cluster.user_manager
    _, n, fence = net.result_of(um.delivery_plan(user, 1))  # a delivery still storing
    assert n == 2 and fence
    (later,) = check.deliver("n2", user, b"second\r\n")
    assert later.uid == n + 1
    # The proxy's holder note before the 250 confirmed the second's UID: only n is
    # still in flight.
    assert um.horizon_of(user).outstanding == ((n, n + 1),)
    shown = check.read("n3", user)
    assert shown is not None and sorted(shown) == [1], shown
    mail = net.nodes["n3"].mail.retrieval.open(user)
    (inbox,) = [i for i in net.result_of(mail.mailboxes()) if i.name == INBOX]
    assert inbox.uidnext <= n
    # The allocation expires (no store will admit it now): n+1 shows, above 1.
    net.run(um.core.allocation_ttl + 1.0)
    shown = check.read("n3", user)
    assert shown is not None and sorted(shown) == [1, n + 1], shown
    check.check_all(nodes)
    net.stop()


def test_manager_cut_off_before_failure_detection_stops_answering_certain(
    tmp_path: Path,
) -> None:
    """n3 manages a user and is cut off from n1 and n2, but installs no new view (its
    failure detection has not noticed): without a majority confirming its view it
    stops answering reads as certain within the read lease, so a reader at its side
    is refused instead of listing the mailbox without what the majority side numbers
    and shows meanwhile (mailsim seeds 117 and 432).  Its read lease is back after
    the heal."""
    net, user = PartNet.with_user(tmp_path, ["n1", "n2", "n3"], "n3")
    check = Checker(net)
    net.run(0.5)
    for i in range(3):
        check.deliver("n3", user, b"before %d\r\n" % i)
    assert net.nodes["n3"].cluster.user_manager.certain(user)
    assert check.read("n3", user) is not None
    net.sides = [{"n3"}]
    net.run(NODE_READ_LEASE)  # n3's last confirmed lease runs out; its view is unchanged
    um3 = net.nodes["n3"].cluster.user_manager
    assert um3.core.quorum(), "n3 still believes in its view"
    assert not um3.certain(user)
    net.commit(["n1", "n2"], on=["n1", "n2"])
    net.run(0.5)
    for i in range(3):
        check.deliver("n1", user, b"majority %d\r\n" % i)
    assert check.read("n1", user) is not None
    assert check.read("n3", user) is None, "refused: mail elsewhere may be missing"
    net.sides = []
    net.commit(["n1", "n2", "n3"])
    net.run(4.0)
    check.check_all(["n1", "n2", "n3"])
    assert net.nodes["n3"].cluster.status()["mail_cluster"]["read_lease"]["holds"]
    net.stop()


def test_append_allocation_holds_the_horizon_until_its_store_lands(tmp_path: Path) -> None:
    """Issue 14 item 4: an APPEND's UID is a fenced allocation the manager tracks like a
    delivery's: while its store is in flight readers show nothing at or above it (the
    horizon's bound), and the store's holder note confirms it; the APPENDed message is
    then listed above every UID shown before, at every node."""
    net, user = PartNet.with_user(tmp_path, ["n1", "n2", "n3"], "n3")
    check = Checker(net)
    net.run(0.5)
    for i in range(3):
        check.deliver("n1", user, b"delivered %d\r\n" % i)
    check.check_all(["n1", "n2", "n3"])
    shown = check.top_shown[user]
    manager = net.nodes["n3"].cluster.user_manager
    mail = net.nodes["n2"].mail.retrieval.open(user)
    net.hold.add(MbStore.commandName)  # type: ignore[arg-type]
    appended = mail.append(INBOX, b"appended\r\n", (), 0.0)
    net.flush()  # its plan answered, its store made (and held)
    net.hold.discard(MbStore.commandName)  # type: ignore[arg-type]
    done: list[Any] = []
    appended.addBoth(lambda r: done.append(r) or r)
    assert net.held and not done, "its store is held"
    horizon = manager.horizon_of(user)
    assert horizon.outstanding and horizon.bound([]) <= shown + 1, "held back meanwhile"
    net.release()
    digest = net.result_of(appended)
    assert digest.uid > shown
    assert not manager.horizon_of(user).outstanding, "confirmed by the holder note"
    check.acked[user].append(b"appended\r\n")
    check.check_all(["n1", "n2", "n3"])
    net.stop()
