"""MailReplication on real MailServices (synchronous pool), nodes joined by a fake RPC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mailtest_helpers import ImmediateReactor, SyncPool, fast_hash, result_of
from twisted.internet.defer import Deferred, fail, maybeDeferred

from yimaporc.cluster.membership import View
from yimaporc.cluster.rpc import PeerUnavailable, RpcRegistry
from yimaporc.cluster.wire import Member
from yimaporc.porcupine.replication.amp import Replicate
from yimaporc.porcupine.replication.mail import MailReplication
from yimaporc.porcupine.service import MailService
from yimaporc.porcupine.values import INBOX, NewMessage

ALICE = "alice@example.org"
T0 = 1_700_000_000.0


class FakeNode:
    """What MailReplication uses of a ClusterNode."""

    def __init__(self, net: Net, node_id: str) -> None:
        self.net = net
        self.node_id = node_id
        self.registry = RpcRegistry()
        self.rpc = self
        self.listeners: list[Any] = []
        self.statuses: list[Any] = []

    @property
    def view(self) -> View:
        return self.net.view

    def cluster_time(self) -> float:
        return float(self.net.reactor.seconds())

    def subscribe(self, listener: Any) -> None:
        self.listeners.append(listener)

    def add_status(self, provider: Any) -> None:
        self.statuses.append(provider)

    def call(self, address: str, command: Any, **kw: Any) -> Deferred[Any]:
        target = self.net.by_address(address)
        if target is None:
            return fail(PeerUnavailable(address))
        found = target.node.registry.lookup(command.commandName)
        assert found is not None
        _, handler = found
        if command is Replicate or any(n == b"sender" for n, _ in command.arguments):
            kw["sender"] = self.node_id  # the authenticated peer id (PeerNode)
        d: Deferred[Any] = Deferred()

        def deliver() -> None:
            if self.net.by_address(address) is None:
                d.errback(PeerUnavailable(address))
                return
            maybeDeferred(handler, **kw).chainDeferred(d)

        self.net.reactor.callLater(0.001, deliver)
        return d


class Box:
    """One node: its mail service and replication."""

    def __init__(self, net: Net, node_id: str) -> None:
        self.node = FakeNode(net, node_id)
        self.mail = MailService(
            net.reactor,
            node_id=node_id,
            data_dir=net.tmp / node_id,
            domain="example.org",
            threadpool=SyncPool(),  # type: ignore[arg-type]
        )
        self.mail.profiles._hash = fast_hash
        self.repl = MailReplication(self.mail, self.node)  # type: ignore[arg-type]
        self.repl.startService()

    def inbox(self) -> list[Any]:
        return self.mail.fragment_store.digests(ALICE, INBOX)


class Net:
    """Nodes, a view, and who is up."""

    def __init__(self, tmp: Path, ids: str) -> None:
        self.tmp = tmp
        self.reactor = ImmediateReactor()
        self.reactor.advance(T0)
        self.up = set(ids)
        self.view = View(1, tuple(Member(n, f"{n}:1", 1) for n in ids), ids[0])
        self.boxes = {n: Box(self, n) for n in ids}
        self.set_view(ids)

    def set_view(self, ids: str) -> None:
        old = self.view
        self.view = View(old.epoch + 1, tuple(Member(n, f"{n}:1", 1) for n in ids), ids[0])
        for n in self.up:
            self.boxes[n].repl.replication.membership_changed(old, self.view)

    def by_address(self, address: str) -> Box | None:
        n = address.split(":")[0]
        return self.boxes[n] if n in self.up else None

    def kill(self, n: str) -> None:
        self.up.discard(n)
        self.boxes[n].repl.replication.running = False

    def settle(self, seconds: float) -> None:
        for _ in range(int(seconds / 0.001)):
            self.reactor.advance(0.001)


def message(uid: int = 0) -> NewMessage:
    """A small message for alice."""
    return NewMessage(ALICE, INBOX, b"Subject: x\r\n\r\nhello\r\n", (), T0, uid)


def test_answer_waits_for_the_second_replica(tmp_path: Path) -> None:
    """R=2 coordinated here: the delivery fires only once b holds the message too."""
    net = Net(tmp_path, "abc")
    d = net.boxes["a"].repl.store(["a", "b"], message(3))
    assert not d.called
    net.settle(0.01)
    digests = result_of(d)
    assert sorted(x.node for x in digests) == ["a", "b"]
    assert [x.uid for x in net.boxes["b"].inbox()] == [3]
    net.settle(0.05)
    assert net.boxes["c"].inbox() == []
    for n in "abc":
        st = net.boxes[n].repl.status()["replication"]
        assert st["log_length"] == 0


def test_dead_coordinator_is_replaced_by_the_next_target(tmp_path: Path) -> None:
    """A delivery at c for targets a, b with a dead: b coordinates, c is added (a stays
    a target: a copy it may hold gets later versions when it returns)."""
    net = Net(tmp_path, "abc")
    net.kill("a")
    d = net.boxes["c"].repl.store(["a", "b"], message())
    net.settle(0.05)
    assert sorted(x.node for x in result_of(d)) == ["a", "b", "c"]
    assert len(net.boxes["b"].inbox()) == 1 and len(net.boxes["c"].inbox()) == 1
    assert net.boxes["c"].repl.retries == 1


def test_silent_participant_is_retargeted(tmp_path: Path) -> None:
    """A target that never acks (dead, still in the view): after ack_timeout a live node
    is added to the replica set and its ack is the second copy."""
    net = Net(tmp_path, "abc")
    net.kill("b")
    d = net.boxes["a"].repl.store(["a", "b"], message())
    net.settle(1.0)
    assert not d.called  # no second copy yet: no answer
    net.settle(3.0)
    assert sorted(x.node for x in result_of(d)) == ["a", "b", "c"]
    assert len(net.boxes["c"].inbox()) == 1
    assert net.boxes["a"].repl.retargets == 1
    net.boxes["b"] = Box(net, "b")  # b comes back: still a target, it gets the message
    net.up.add("b")
    net.set_view("abc")
    net.settle(10.0)
    assert len(net.boxes["b"].inbox()) == 1
    assert all(net.boxes[n].repl.status()["replication"]["log_length"] == 0 for n in "abc")


def test_flag_change_reaches_a_replica_that_was_down(tmp_path: Path) -> None:
    """A flag set while a replica is down reaches it when it is back in the view."""
    net = Net(tmp_path, "ab")
    d = net.boxes["a"].repl.store(["a", "b"], message(1))
    net.settle(0.05)
    result_of(d)
    net.kill("b")
    net.set_view("a")
    mm = net.boxes["a"].mail.mailbox_manager
    result_of(mm.set_flags(ALICE, INBOX, [1], ["\\Seen"], 1))
    net.settle(0.05)
    assert net.boxes["a"].repl.status()["replication"]["awaiting"] == {"b": 1}
    net.boxes["b"] = Box(net, "b")  # restart from its disk
    net.up.add("b")
    net.set_view("ab")
    net.settle(0.05)
    assert net.boxes["b"].inbox()[0].flags == ("\\Seen",)
    assert net.boxes["a"].repl.status()["replication"]["log_length"] == 0


def test_profiles_travel_through_the_log(tmp_path: Path) -> None:
    """push_profiles logs a profile object per record; every live node merges it."""
    net = Net(tmp_path, "abc")
    a = net.boxes["a"]
    result_of(a.mail.profiles.add(ALICE, "pw", 2))
    rec = result_of(a.mail.profiles.record(ALICE))
    result_of(a.repl.push_profiles([rec]))
    net.settle(0.05)
    for n in "bc":
        got = result_of(net.boxes[n].mail.profiles.get(ALICE))
        assert got is not None and got.replicas == 2
        assert net.boxes[n].mail.profiles.count() == 1
