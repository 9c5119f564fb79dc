"""MailReplication on real MailServices (synchronous pool), each node a host of one
simulation kernel, its RPCs kernel calls through the commands' AMP encoding."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import attrs
import pytest
from mailtest_helpers import SyncPool, fast_hash
from twisted.internet.defer import Deferred, fail

from yimaporc.cluster.membership import View
from yimaporc.cluster.rpc import PeerMaybeDone, PeerUnavailable, RpcRegistry
from yimaporc.cluster.wire import Member
from yimaporc.porcupine.replication.amp import Replicate, StoreReplicated
from yimaporc.porcupine.replication.mail import MailReplication
from yimaporc.porcupine.retrieval import ReplicatedCopies
from yimaporc.porcupine.service import MailService
from yimaporc.porcupine.storage import MailStorage
from yimaporc.porcupine.usermap import bucket_of
from yimaporc.porcupine.values import INBOX, PENDING, NewMessage
from yimaporc.testing.simnet import T0, SimNet, authenticated_end

ALICE = "alice@example.org"


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
        return self.net.sim.seconds()

    def subscribe(self, listener: Any) -> None:
        self.listeners.append(listener)

    def add_status(self, provider: Any) -> None:
        self.statuses.append(provider)

    def call(self, address: str, command: Any, **kw: Any) -> Deferred[Any]:
        n = address.split(":")[0]
        if n not in self.net.boxes:
            return fail(PeerUnavailable(address))
        if command is Replicate or any(n == b"sender" for n, _ in command.arguments):
            kw["sender"] = self.node_id  # the authenticated peer id (PeerNode)
        # the registry of the callee's running process (a killed one answers nothing)
        lookup = lambda name: self.net.boxes[n].node.registry.lookup(name)  # noqa: E731
        end = authenticated_end(n, self.node_id)
        return self.net.sim.amp_call(self.node_id, n, lookup, command, kw, proto=end)


class Box:
    """One node: its mail service and replication."""

    def __init__(self, net: Net, node_id: str) -> None:
        self.node = FakeNode(net, node_id)
        reactor = net.sim.reactor(node_id)
        storage = MailStorage(reactor, node_id, net.tmp / node_id, threadpool=SyncPool())  # type: ignore[arg-type]
        storage.profiles._hash = fast_hash
        self.repl = MailReplication(storage, self.node)  # type: ignore[arg-type]
        self.mail = MailService(
            reactor,
            node_id=node_id,
            data_dir=net.tmp / node_id,
            domain="example.org",
            storage=storage,
            replica=self.repl,
            copy_policy=ReplicatedCopies(),
        )
        self.repl.use_topology(self.mail.topology)
        self.repl.startService()

    def inbox(self) -> list[Any]:
        return self.mail.fragment_store.digests(ALICE, INBOX)


class Net:
    """Nodes (hosts of one kernel: 0.5 ms each way), a view, and who is up."""

    def __init__(self, tmp: Path, ids: str) -> None:
        self.tmp = tmp
        self.sim = SimNet(latency=0.0005, start=T0)
        self.up = set(ids)
        self.view = View(1, tuple(Member(n, f"{n}:1", 1) for n in ids), ids[0])
        self.boxes = {n: Box(self, n) for n in ids}
        self.set_view(ids)

    def set_view(self, ids: str) -> None:
        old = self.view
        self.view = View(old.epoch + 1, tuple(Member(n, f"{n}:1", 1) for n in ids), ids[0])
        for n in self.up:
            for listener in self.boxes[n].node.listeners:
                listener.membership_changed(old, self.view)

    def kill(self, n: str) -> None:
        """``n``'s process dies (its host crashes: timers and answers gone)."""
        self.up.discard(n)
        self.sim.kernel.crash(self.sim.host(n))

    def restart(self, n: str, wipe: bool = False) -> Box:
        """``n`` comes back (from its disk, or an empty one) and joins the view."""
        self.sim.kernel.crash(self.sim.kernel.hosts[n])  # a new process
        if wipe:
            shutil.rmtree(self.tmp / n)
        self.boxes[n] = Box(self, n)
        self.up.add(n)
        self.set_view("".join(sorted(self.up)))
        return self.boxes[n]

    def settle(self, seconds: float) -> None:
        self.sim.advance(seconds)

    def result_of(self, d: Deferred[Any]) -> Any:
        """``d``'s result once what is due now ran."""
        return self.sim.result_of(d)


def message(uid: int = 0) -> NewMessage:
    """A small message for alice."""
    return NewMessage(ALICE, INBOX, b"Subject: x\r\n\r\nhello\r\n", (), T0, uid)


def test_answer_waits_for_the_second_replica(tmp_path: Path) -> None:
    """R=2 coordinated here: the delivery fires only once b holds the message too."""
    net = Net(tmp_path, "abc")
    d = net.boxes["a"].repl.store(["a", "b"], message(3))
    assert not net.sim.fired(d)
    net.settle(0.01)
    digests = net.result_of(d)
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
    assert sorted(x.node for x in net.result_of(d)) == ["a", "b", "c"]
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
    assert sorted(x.node for x in net.result_of(d)) == ["a", "b", "c"]
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
    net.result_of(d)
    net.kill("b")
    net.set_view("a")
    mm = net.boxes["a"].mail.mailbox_manager
    net.result_of(mm.set_flags(ALICE, INBOX, [1], ["\\Seen"], 1))
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
    net.result_of(a.mail.profiles.add(ALICE, "pw", 2))
    rec = net.result_of(a.mail.profiles.record(ALICE))
    net.result_of(a.repl.push_profiles([rec]))
    net.settle(0.05)
    for n in "bc":
        got = net.result_of(net.boxes[n].mail.profiles.get(ALICE))
        assert got is not None and got.replicas == 2
        assert net.boxes[n].mail.profiles.count() == 1


def settled(net: Net, d: Deferred[Any]) -> Any:
    """The result of ``d`` once the network had 50 ms to carry the messages."""
    net.settle(0.05)
    return net.result_of(d)


def repl_status(net: Net, box: Box) -> dict[str, Any]:
    """The box's replication status (the under-replicated count refreshed first: it
    runs at most once a second, in the synchronous pool)."""
    net.settle(1.0)
    box.repl.status()
    net.sim.flush()  # the pool's answer comes through callFromThread
    doc: dict[str, Any] = box.repl.status()["replication"]
    return doc


def test_wiped_replica_gets_its_copies_back(tmp_path: Path) -> None:
    """b loses its disk: back with an empty data dir, it fetches every message it is a
    replica of from the survivors, same UIDs, current flags; nothing is missing after."""
    net = Net(tmp_path, "abc")
    a = net.boxes["a"]
    for uid in (1, 2, 3):
        settled(net, a.repl.store(["a", "b"], message(uid)))
    settled(net, a.repl.store(["a", "c"], message(4)))
    net.settle(0.05)
    settled(net, a.mail.mailbox_manager.set_flags(ALICE, INBOX, [2], ["\\Seen"], 1))
    net.settle(0.05)
    net.kill("b")
    net.set_view("ac")
    assert repl_status(net, a)["under_replicated"] == 3  # b is away: 3 copies short
    b = net.restart("b", wipe=True)
    assert b.inbox() == []
    net.settle(0.5)
    got = {d.uid: d.flags for d in b.inbox()}
    assert got == {1: (), 2: ("\\Seen",), 3: ()}  # not message 4: b is no replica of it
    st = repl_status(net, b)
    assert st["repair"]["synced"] and st["repair"]["repaired"] == 3
    assert all(repl_status(net, net.boxes[n])["under_replicated"] == 0 for n in "abc")
    # the copies are replicas again: a later flag change reaches b
    settled(net, a.mail.mailbox_manager.set_flags(ALICE, INBOX, [3], ["\\Flagged"], 1))
    net.settle(0.05)
    assert {d.uid: d.flags for d in b.inbox()}[3] == ("\\Flagged",)


def test_repair_does_not_resurrect_a_deleted_message(tmp_path: Path) -> None:
    """A message deleted while its other replica was down stays deleted there: the
    inventory lists live objects only, and the tombstone reaches the returning node."""
    net = Net(tmp_path, "ab")
    a = net.boxes["a"]
    settled(net, a.repl.store(["a", "b"], message(1)))
    settled(net, a.repl.store(["a", "b"], message(2)))
    net.settle(0.05)
    net.kill("b")
    net.set_view("a")
    settled(net, a.mail.mailbox_manager.delete(ALICE, INBOX, [1]))
    net.settle(0.05)
    b = net.restart("b")
    net.settle(0.5)
    assert [d.uid for d in b.inbox()] == [2]


def test_fewer_live_nodes_than_r_gives_r_copies_once_they_are_back(tmp_path: Path) -> None:
    """R=2 with only a in reach: the answer comes with one durable copy, the replica set
    is filled up with the down node b, the log holds it for b, and b gets it on return."""
    net = Net(tmp_path, "ab")
    net.kill("b")
    net.set_view("a")
    a = net.boxes["a"]
    d = a.repl.store(["a"], message(7), replicas=2)
    net.settle(0.01)
    assert sorted(x.node for x in net.result_of(d)) == ["a", "b"]  # b: a replica, later
    assert [x.uid for x in a.inbox()] == [7]
    st = repl_status(net, a)
    assert st["awaiting"] == {"b": 1} and st["under_replicated"] == 1
    b = net.restart("b")
    net.settle(0.5)
    assert [x.uid for x in b.inbox()] == [7]
    assert repl_status(net, a)["under_replicated"] == 0 and repl_status(net, a)["log_length"] == 0


def test_a_plan_naming_fewer_than_r_live_nodes_gets_r_copies_now(tmp_path: Path) -> None:
    """R=2, a plan naming only a while b and c are live (its manager saw fewer members):
    a second live node gets a copy now; one copy alone would be hidden, not refused,
    when a is out of reach (a reader counts fewer than R holders away as harmless)."""
    net = Net(tmp_path, "abc")
    a = net.boxes["a"]
    d = a.repl.store(["a"], message(9), replicas=2)
    net.settle(0.5)
    holders = sorted(x.node for x in net.result_of(d))
    assert holders[0] == "a" and len(holders) == 2 and holders[1] in ("b", "c")
    copies = [n for n, box in net.boxes.items() if [x.uid for x in box.inbox()] == [9]]
    assert sorted(copies) == holders
    assert repl_status(net, a)["under_replicated"] == 0


def test_replication_timeout_answers_with_the_durable_copy(tmp_path: Path) -> None:
    """A replica that stays silent and no spare node: after the retargets the delivery
    is answered with the copy durable here (a 4xx would make the client send it again,
    a second message under another UID); the silent one gets it under the same UID."""
    net = Net(tmp_path, "ab")
    net.kill("b")  # still in the view: silent
    a = net.boxes["a"]
    d = a.repl.store(["a", "b"], message(5), replicas=2)
    net.settle(a.repl.ack_timeout * (a.repl.max_retargets + 1) + 0.1)
    assert [x.uid for x in net.result_of(d)] == [5]
    assert a.repl.short_acks == 1
    b = net.restart("b")
    net.settle(0.5)
    assert [x.uid for x in b.inbox()] == [5]
    assert [x.uid for x in a.inbox()] == [5]


def test_deluser_reaches_a_node_that_was_down(tmp_path: Path) -> None:
    """deluser while c is down: the profile tombstone waits in the log for c; back, c
    drops the user's mail, also a message whose push to c was still pending."""
    net = Net(tmp_path, "abc")
    a, b = net.boxes["a"], net.boxes["b"]
    net.result_of(a.mail.profiles.add(ALICE, "pw", 2))
    settled(net, a.repl.push_profiles([net.result_of(a.mail.profiles.record(ALICE))]))
    settled(net, b.repl.store(["b", "c"], message(1)))
    net.settle(0.05)
    assert len(net.boxes["c"].inbox()) == 1
    net.kill("c")
    net.set_view("ab")
    settled(net, b.repl.store(["b", "c"], message(2), replicas=2))  # pending for c
    net.result_of(a.mail.profiles.remove(ALICE))
    settled(net, a.repl.push_profiles([net.result_of(a.mail.profiles.record(ALICE))]))
    net.settle(0.05)
    assert b.inbox() == []  # applying the tombstone removed the mail on b
    c = net.restart("c")
    net.settle(0.5)
    assert c.mail.fragment_store.users_with_mail() == []
    assert net.result_of(c.mail.profiles.get(ALICE)) is None
    assert all(repl_status(net, net.boxes[n])["log_length"] == 0 for n in "abc")
    assert all(repl_status(net, net.boxes[n])["under_replicated"] == 0 for n in "abc")


def test_mailbox_changes_reach_a_holder_that_was_down(tmp_path: Path) -> None:
    """CREATE, then RENAME of a mailbox with messages, logged while b is down: b makes
    the same changes when back (its messages move with the mailbox)."""
    net = Net(tmp_path, "ab")
    a, b = net.boxes["a"], net.boxes["b"]
    settled(net, a.repl.box_ops(ALICE, [("Work", True, None, None)], ["a", "b"]))
    net.settle(0.05)
    moved = NewMessage(ALICE, "Work", b"Subject: w\r\n\r\nw\r\n", (), T0, 3)
    settled(net, a.repl.store(["a", "b"], moved))
    net.settle(0.05)
    assert [d.uid for d in b.mail.fragment_store.digests(ALICE, "Work")] == [3]
    net.kill("b")
    net.set_view("a")
    a.mail.fragment_store.rename_mailbox(ALICE, "Work", "Done")  # as on the live holders
    ops = [("Done", True, "Work", None), ("Work", False, None, "Done"), ("Old", True, None, None)]
    settled(net, a.repl.box_ops(ALICE, ops, ["a", "b"]))
    net.settle(0.05)
    b = net.restart("b")
    net.settle(0.5)
    names = {i.name for i in b.mail.fragment_store.mailboxes(ALICE)}
    assert {"Done", "Old"} <= names and "Work" not in names
    assert [d.uid for d in b.mail.fragment_store.digests(ALICE, "Done")] == [3]
    settled(net, a.repl.box_ops(ALICE, [("Old", False, None, None)], ["a", "b"]))
    net.settle(0.05)
    assert "Old" not in {i.name for i in b.mail.fragment_store.mailboxes(ALICE)}


def test_unnumbered_replicated_message_gets_one_uid_on_every_copy(tmp_path: Path) -> None:
    """Stored without a UID (no majority): only the coordinator's copy waits to be
    numbered, the other replica holds its copy unlisted; once the manager numbers the
    coordinator's, the other copy takes the same UID (never one of its own)."""
    net = Net(tmp_path, "abc")
    a, b = net.boxes["a"], net.boxes["b"]
    got = settled(net, a.repl.store(["a", "b"], message(PENDING)))
    assert {(d.node, d.uid) for d in got} == {("a", 0), ("b", 0)}  # acknowledged, unnumbered
    assert a.mail.fragment_store.pending(ALICE) == 1 and a.inbox() == []
    assert b.mail.fragment_store.pending(ALICE) == 0 and b.inbox() == []
    bucket = bucket_of(ALICE)
    for box in (a, b):
        box.mail.fragment_store.set_fences({bucket: "f@1"})
    # the manager numbers wherever the delivery noted a copy: b has nothing to number
    assert settled(net, b.mail.mailbox_manager.number_pending(ALICE, "f@1", 20, 5))[0] == 0
    assert settled(net, a.mail.mailbox_manager.number_pending(ALICE, "f@1", 9, 5))[0] == 1
    net.settle(0.05)
    assert [d.uid for d in a.inbox()] == [9]
    assert [d.uid for d in b.inbox()] == [9]
    key = b.inbox()[0].key
    assert not b.mail.fragment_store.is_held(ALICE, key)
    # a flag change afterwards reaches the promoted copy
    settled(net, b.mail.mailbox_manager.set_flags(ALICE, INBOX, [9], ["\\Seen"], 1))
    assert a.inbox()[0].flags == ("\\Seen",)


def test_replaced_coordinator_gives_up_numbering_its_copy(tmp_path: Path) -> None:
    """a stored a message unnumbered as its first replica, then b coordinated a newer
    version of the same object (a coordinator replaced mid-delivery): a's copy moves to
    held, so only b's copy is numbered and a takes b's UID."""
    net = Net(tmp_path, "ab")
    a, b = net.boxes["a"], net.boxes["b"]
    (mine, _) = settled(net, a.repl.store(["a", "b"], message(PENDING)))
    rid = mine.key[: -len(".m")]
    settled(net, b.repl.mailboxes.store_replicated(rid, message(PENDING), ["b", "a"]))
    assert a.mail.fragment_store.pending(ALICE) == 0
    assert a.mail.fragment_store.is_held(ALICE, mine.key)
    assert b.mail.fragment_store.pending(ALICE) == 1
    bucket = bucket_of(ALICE)
    for box in (a, b):
        box.mail.fragment_store.set_fences({bucket: "f@1"})
    assert settled(net, a.mail.mailbox_manager.number_pending(ALICE, "f@1", 5, 5))[0] == 0
    assert settled(net, b.mail.mailbox_manager.number_pending(ALICE, "f@1", 7, 5))[0] == 1
    net.settle(0.05)
    assert [d.uid for d in a.inbox()] == [7] and [d.uid for d in b.inbox()] == [7]


def test_coordinator_timing_out_after_the_request_is_not_replaced(tmp_path: Path) -> None:
    """A StoreReplicated that reached b but timed out (maybe_done) fails the delivery
    (SMTP 451) instead of a second coordinator storing a second copy (issue 14)."""
    net = Net(tmp_path, "abc")
    c = net.boxes["c"]
    real_call = c.node.call

    def lossy(address: str, command: Any, **kw: Any) -> Deferred[Any]:
        sent = real_call(address, command, **kw)
        if command is not StoreReplicated:
            return sent
        sent.addErrback(lambda f: None)  # b runs it; its answer is lost
        err = PeerMaybeDone(f"{address}: (10.0, 'Deferred')")
        late: Deferred[Any] = Deferred()
        net.sim.reactor("c").callLater(0.0005, late.errback, err)
        return late

    c.node.call = lossy  # type: ignore[method-assign]
    d = c.repl.store(["b", "a"], message(7))
    net.settle(0.5)
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(PeerUnavailable)
    assert c.repl.retries == 0 and c.repl.unsure == 1
    assert c.repl.status()["replication"]["coordinator_unsure"] == 1
    # b's coordination went on: one message, one UID, on its two targets only
    assert [x.uid for x in net.boxes["b"].inbox()] == [7]
    assert [x.uid for x in net.boxes["a"].inbox()] == [7]
    assert c.inbox() == []


@pytest.mark.parametrize(
    "outcome", ["superseded", "stopped", "unreachable", "disk-full", "db-full"]
)
def test_store_replicated_answers_a_declared_error(tmp_path: Path, outcome: str) -> None:
    """StoreReplicated's responder answers CoordinatorUnsure (declared, maybe_done) for
    a superseded store, a stopping service, unreachable peers or a full disk here:
    never an undeclared error (AMP logs those at critical level on both nodes, the
    caller an unknown error) nor an IndexError (issue 14)."""
    import errno
    import sqlite3

    from twisted.internet.defer import succeed

    from yimaporc.porcupine.replication.amp import CoordinatorUnsure, message_args
    from yimaporc.porcupine.replication.shell import ReplicationStopped

    net = Net(tmp_path, "ab")
    a = net.boxes["a"]
    results = {
        "superseded": lambda: succeed([]),
        "stopped": lambda: fail(ReplicationStopped("replication stopped")),
        "unreachable": lambda: fail(PeerUnavailable("no second replica acknowledged in time")),
        "disk-full": lambda: fail(OSError(errno.ENOSPC, "No space left on device")),
        "db-full": lambda: fail(sqlite3.OperationalError("database or disk is full")),
    }
    a.repl.mailboxes.store_replicated = lambda *args, **kw: results[outcome]()  # type: ignore[method-assign]
    kw = message_args("0123456789abcdef0123456789abcdef", message(3), ["a", "b"])
    got: list[Any] = []
    a.repl._on_store(**kw).addBoth(got.append)
    assert got and got[0].check(CoordinatorUnsure) and got[0].value.maybe_done
    assert CoordinatorUnsure in StoreReplicated.errors


def fenced(uid: int, fence: str) -> NewMessage:
    """A message for alice carrying a manager's fenced UID."""
    return NewMessage(ALICE, INBOX, b"Subject: f\r\n\r\nfenced\r\n", (), T0, uid, fence)


def test_fenced_replicated_message_has_the_coordinators_uid_on_every_copy(
    tmp_path: Path,
) -> None:
    """Issue 14 bug 2: a replicated delivery's UID is fenced like an R=1 one; with the
    fence current at the coordinator, every copy is listed under that one UID."""
    net = Net(tmp_path, "abc")
    a, b = net.boxes["a"], net.boxes["b"]
    for box in net.boxes.values():
        box.mail.fragment_store.set_fences({bucket_of(ALICE): "f@1"})
    got = settled(net, a.repl.store(["a", "b"], fenced(7, "f@1")))
    assert {(d.node, d.uid) for d in got} == {("a", 7), ("b", 7)}
    assert [d.uid for d in a.inbox()] == [7] and [d.uid for d in b.inbox()] == [7]
    assert a.repl.mailboxes.fenced_stores == 1 and a.repl.mailboxes.fenced_refused == 0


def test_stale_fenced_replicated_message_waits_then_gets_one_uid_everywhere(
    tmp_path: Path,
) -> None:
    """A replicated delivery whose fence is stale at its coordinator (a paused or
    cut-off manager, or the coordinator installed a newer map) is acknowledged
    unnumbered on every copy, also where the fence would pass (the copies follow the
    coordinator, never number on their own); the current manager numbers the
    coordinator's copy and the other copy takes exactly that UID."""
    net = Net(tmp_path, "abc")
    a, b, c = net.boxes["a"], net.boxes["b"], net.boxes["c"]
    bucket = bucket_of(ALICE)
    a.mail.fragment_store.set_fences({bucket: "g@2"})  # a installed the newer map
    b.mail.fragment_store.set_fences({bucket: "f@1"})  # b still has the old one
    # c asks a to coordinate (over StoreReplicated, the fence on the wire)
    got = settled(net, c.repl.store(["a", "b"], fenced(7, "f@1")))
    assert {d.uid for d in got} == {0}, "acknowledged unnumbered"
    assert a.inbox() == [] and b.inbox() == []
    assert a.mail.fragment_store.pending(ALICE) == 1 and b.mail.fragment_store.pending(ALICE) == 0
    assert b.mail.fragment_store.is_held(ALICE, got[0].key)
    assert a.repl.mailboxes.fenced_refused == 1
    b.mail.fragment_store.set_fences({bucket: "g@2"})
    assert settled(net, a.mail.mailbox_manager.number_pending(ALICE, "g@2", 12, 5))[0] == 1
    net.settle(0.05)
    assert [d.uid for d in a.inbox()] == [12] and [d.uid for d in b.inbox()] == [12]


def test_fenced_replicated_uid_below_the_coordinators_uidnext_is_not_reused(
    tmp_path: Path,
) -> None:
    """A fenced UID the coordinator's mailbox already passed (an overtaken store, its
    allocation still young) keeps that UID on every copy; a UID taken already is never
    a second message under it on any copy: unnumbered, numbered later."""
    net = Net(tmp_path, "ab")
    a, b = net.boxes["a"], net.boxes["b"]
    for box in net.boxes.values():
        box.mail.fragment_store.set_fences({bucket_of(ALICE): "f@1"})
    settled(net, a.repl.store(["a", "b"], fenced(9, "f@1")))
    got = settled(net, a.repl.store(["a", "b"], fenced(8, "f@1")))
    assert {d.uid for d in got} == {8}
    other = attrs.evolve(fenced(9, "f@1"), body=b"Subject: g\r\n\r\nanother\r\n")
    got = settled(net, a.repl.store(["a", "b"], other))
    assert {d.uid for d in got} == {0}
    assert [d.uid for d in a.inbox()] == [8, 9] and [d.uid for d in b.inbox()] == [8, 9]
