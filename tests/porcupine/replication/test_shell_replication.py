"""ReplicationService: nodes on simulation-kernel hosts, frames over AMP on its stream links."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.python.failure import Failure

from yimaporc.cluster.rpc import PeerUnavailable, RpcClient, RpcRegistry, RpcServerFactory
from yimaporc.cluster.wire import Scope
from yimaporc.porcupine.replication import (
    Ack,
    LogEntry,
    MalformedMessage,
    MemoryLog,
    MemoryObjectStore,
    PersistLog,
    ReplicationConfig,
    Timestamp,
    Update,
)
from yimaporc.porcupine.replication.amp import Replicate, pack_frames, responder
from yimaporc.porcupine.replication.shell import ReplicationRefused, ReplicationService
from yimaporc.porcupine.replication.sqlite_log import SqliteLog
from yimaporc.testing.pytest_plugin import LoggedFailures
from yimaporc.testing.simnet import T0, SimNet

KEY = b"k" * 32
SCOPE = Scope("test", "porcupine")
#: where each node listens for RPC on its host
PORT = 7000


def sync_run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run 'blocking' work at once (the stores are in memory)."""
    return maybeDeferred(f, *args)


class Node:
    """One node on a kernel host: its durable disk (log + store) survives restarts of its
    process; each boot listens for RPC on the host and calls peers with its own client."""

    def __init__(self, mesh: Mesh, node_id: str) -> None:
        self.mesh = mesh
        self.node_id = node_id
        self.address = f"{mesh.net.host(node_id).ip}:{PORT}"
        self.log = MemoryLog()
        self.store = MemoryObjectStore()
        self.registry = RpcRegistry()
        self.service: ReplicationService | None = None
        self.rpc: RpcClient | None = None
        self.registry.register(Replicate, self._handle)

    def _handle(self, frames: bytes, sender: str) -> dict[str, Any]:
        assert self.service is not None
        return responder(self.service)(frames=frames, sender=sender)  # type: ignore[no-any-return]

    def start(self) -> ReplicationService:
        reactor = self.mesh.net.reactor(self.node_id)  # boots the host if it is down
        reactor.listenTCP(PORT, RpcServerFactory(self.registry, KEY, self.node_id, scope=SCOPE))
        rpc = self.rpc = RpcClient(reactor, KEY, self.node_id, scope=SCOPE, registry=self.registry)
        svc = ReplicationService(
            reactor,
            self.node_id,
            self.log,
            self.store,
            lambda to, frames: self.mesh.send(self.node_id, rpc, to, frames),
            run=self.mesh.run,
            config=self.mesh.config,
            rng=random.Random(self.node_id),
        )
        svc.startService()
        self.service = svc
        return svc

    def crash(self) -> None:
        """The process vanishes: its host crashes (timers, ports, connections gone), and
        its peers' ends of its connections are reset (at once: zero latency)."""
        assert self.service is not None
        self.service.running = False  # nor does a write the test releases later run on
        self.service = None
        self.mesh.net.kernel.crash(self.mesh.net.host(self.node_id))
        self.mesh.disconnect(self.node_id)
        self.mesh.net.flush()


class Mesh:
    """N nodes on hosts of one kernel, Replicate calls over its stream links (the shipped
    RpcClient and NodeAMP, authenticated); calls on a held pair wait for the next flush
    after it is released."""

    def __init__(
        self,
        ids: Iterable[str],
        config: ReplicationConfig | None = None,
        run: Callable[..., Deferred[Any]] = sync_run,
    ) -> None:
        self.net = SimNet(start=T0)
        self.config = config or ReplicationConfig()
        self.run = run
        self.nodes = {i: Node(self, i) for i in ids}
        #: the ordered pairs whose first node called the second
        self.links: dict[tuple[str, str], RpcClient] = {}
        self.held: set[tuple[str, str]] = set()
        self._waiting: list[tuple[str, str, RpcClient, bytes, Deferred[Any]]] = []
        #: (a, b) -> how many of a's next calls to b fail in transit
        self.fail_calls: dict[tuple[str, str], int] = {}

    def disconnect(self, node: str) -> None:
        for pair in [p for p in self.links if node in p]:
            del self.links[pair]
        self._waiting = [w for w in self._waiting if w[0] != node]  # a dead process's

    def send(self, a: str, rpc: RpcClient, b: str, frames: list[bytes]) -> Deferred[Any]:
        if self.fail_calls.get((a, b), 0) > 0:
            self.fail_calls[(a, b)] -= 1
            return fail(PeerUnavailable(f"{a} -> {b} lost"))
        self.links[(a, b)] = rpc
        d: Deferred[Any] = Deferred()
        self._waiting.append((a, b, rpc, pack_frames(frames), d))
        self._release()
        return d

    def _release(self) -> bool:
        """Make the calls of pairs not held, in order; True if there were any."""
        go = [w for w in self._waiting if (w[0], w[1]) not in self.held]
        self._waiting = [w for w in self._waiting if (w[0], w[1]) in self.held]
        for _, b, rpc, blob, d in go:
            rpc.call(self.nodes[b].address, Replicate, frames=blob).chainDeferred(d)
        return bool(go)

    def flush(self) -> None:
        """Deliver everything in flight (except held pairs' calls) until quiet."""
        for _ in range(100):
            self.net.flush()
            if not self._release():
                return
        raise AssertionError("mesh does not settle")

    def start_all(self) -> None:
        for n in self.nodes.values():
            n.start()
        self.set_live(self.nodes)

    def set_live(self, ids: Iterable[str]) -> None:
        live = sorted(ids)
        for n in self.nodes.values():
            if n.service is not None:
                n.service.set_live(live)

    def svc(self, node: str) -> ReplicationService:
        s = self.nodes[node].service
        assert s is not None
        return s

    def advance(self, seconds: float, step: float = 0.25) -> None:
        t = 0.0
        while t < seconds:
            self.net.advance(step)
            self.flush()
            t += step


def acked(d: Deferred[Timestamp]) -> list[Timestamp]:
    out: list[Timestamp] = []
    d.addCallback(out.append)
    return out


def test_push_ack_retire_three_replicas() -> None:
    """R=3: the agent is answered, every replica applies, every log drains to empty."""
    mesh = Mesh("abc")
    mesh.start_all()
    got = acked(mesh.svc("a").submit("msg/u/1", b"hello", ["a", "b", "c"]))
    assert len(got) == 1  # acks_before_reply=1: durable here is enough
    assert len(mesh.nodes["a"].log.entries) == 1
    mesh.flush()
    for n in mesh.nodes.values():
        assert n.store.get("msg/u/1") == b"hello"
        assert n.log.entries == {}
        assert n.service is not None and len(n.service.core or []) == 0
    status = mesh.svc("a").status()["replication"]
    assert status["log_length"] == 0 and status["awaiting"] == {}
    # 2 pushes, 2 acks, 2 retires
    assert sum(mesh.svc(n).sent for n in "abc") == 6


def test_deletion_leaves_tombstone_everywhere() -> None:
    """A deletion is an update: every replica keeps a tombstone with its timestamp."""
    mesh = Mesh("ab")
    mesh.start_all()
    first = acked(mesh.svc("a").submit("o", b"v1", ["a", "b"]))
    mesh.flush()
    acked(mesh.svc("b").submit("o", None, ["a", "b"], current=first[0]))
    mesh.flush()
    for n in mesh.nodes.values():
        assert "o" in n.store.objects and n.store.get("o") is None
        assert n.log.entries == {}


class ManualRun:
    """A thread pool the test drives: each job waits until released."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((f, args, d))
        return d

    def release_all(self) -> int:
        n = 0
        while self.jobs:
            f, args, d = self.jobs.pop(0)
            d.callback(f(*args))
            n += 1
        return n


class Recorder(MemoryLog):
    """A log that records its writes into a shared journal."""

    journal: list[str]

    def put(self, entry: LogEntry) -> None:
        self.journal.append(f"log:{entry.object_id}")
        super().put(entry)


class RecStore(MemoryObjectStore):
    """A store that records its applies into a shared journal."""

    journal: list[str]

    def apply(self, update: Update) -> bool:
        self.journal.append(f"apply:{update.object_id}")
        return super().apply(update)


def test_durability_order_log_then_apply_then_answer() -> None:
    """The agent's answer waits for the log write and the store write, in that order;
    a participant's ack waits for its own writes."""
    run = ManualRun()
    mesh = Mesh("ab", config=ReplicationConfig(), run=run)
    journal: list[str] = []
    for n in mesh.nodes.values():
        n.log = Recorder()
        n.log.journal = journal
        n.store = RecStore()
        n.store.journal = journal
    for n in mesh.nodes.values():
        n.start()
    run.release_all()  # log loading
    mesh.set_live("ab")
    run.release_all()  # alive marks
    journal.clear()
    d = mesh.svc("a").submit("msg/u/1", b"x", ["a", "b"])
    answered = acked(d)
    d.addCallback(lambda _: journal.append("250"))
    assert answered == [] and journal == []  # nothing durable yet: no answer
    mesh.flush()
    assert mesh.links == {}  # and no push left before the writes either
    assert run.release_all() == 1
    assert journal == ["log:msg/u/1", "apply:msg/u/1", "250"]
    mesh.flush()  # the push reaches b, whose writes are pending: no ack yet
    assert mesh.nodes["a"].service is not None
    assert mesh.svc("a").core is not None and len(mesh.svc("a").core) == 1  # type: ignore[arg-type]
    assert run.jobs, "b must be writing"
    sent_before = mesh.svc("b").sent
    assert sent_before == 0
    run.release_all()
    assert journal[-2:] == ["log:msg/u/1", "apply:msg/u/1"]
    assert mesh.svc("b").sent == 1  # the ack left only now
    mesh.flush()
    run.release_all()
    mesh.flush()
    run.release_all()
    assert mesh.nodes["a"].log.entries == {} and mesh.nodes["b"].log.entries == {}


def test_group_commit_one_round_for_a_burst() -> None:
    """Submissions queued during a write round go out together in the next round."""
    run = ManualRun()
    mesh = Mesh("ab", run=run)
    mesh.start_all()
    run.release_all()
    run.release_all()
    svc = mesh.svc("a")
    before = svc.rounds
    ds = [svc.submit(f"o{i}", b"x", ["a", "b"]) for i in range(20)]
    while run.jobs:
        run.release_all()
    assert svc.rounds - before == 2  # the first submit's round, then the 19 others in one
    assert all(d.called for d in ds)


def test_frames_to_one_peer_are_batched() -> None:
    """A round's frames to one peer go in one call: 50 pushes, 1 call."""
    run = ManualRun()
    mesh = Mesh("ab", run=run)
    mesh.start_all()
    run.release_all()
    run.release_all()
    a = mesh.svc("a")
    acked(a.submit("first", b"x", ["a", "b"]))
    for i in range(50):
        acked(a.submit(f"o{i}", b"x", ["a", "b"]))
    calls = a.calls
    run.release_all()  # the first round (1 push)
    run.release_all()  # the 50 others
    assert a.calls - calls == 2 and a.sent >= 51
    for _ in range(6):
        mesh.flush()
        run.release_all()
    assert mesh.nodes["b"].log.entries == {} and mesh.nodes["a"].log.entries == {}
    assert len(mesh.nodes["b"].store.objects) == 51


def test_lost_retire_is_sent_again() -> None:
    """A Retire lost in transit is re-sent, so the participant's log drains quickly."""
    mesh = Mesh("ab")
    mesh.start_all()
    mesh.held = {("b", "a")}  # b's ack waits, so the retire comes on its own call
    acked(mesh.svc("a").submit("m", b"x", ["a", "b"]))
    mesh.flush()
    mesh.fail_calls[("a", "b")] = 1
    mesh.held = set()
    mesh.flush()
    assert mesh.nodes["a"].log.entries == {} and len(mesh.nodes["b"].log.entries) == 1
    mesh.advance(1.5)
    assert mesh.nodes["b"].log.entries == {}


def test_acks_before_reply_two_waits_for_a_second_replica() -> None:
    """With acks_before_reply=2 the answer waits until a participant acked."""
    mesh = Mesh("abc", config=ReplicationConfig(acks_before_reply=2))
    mesh.start_all()
    mesh.held = {("a", "b"), ("a", "c")}
    got = acked(mesh.svc("a").submit("m", b"x", ["a", "b", "c"]))
    mesh.flush()
    assert got == []
    mesh.held = {("a", "c")}
    mesh.flush()
    assert len(got) == 1
    assert mesh.nodes["b"].store.get("m") == b"x"


def test_retries_after_a_peer_returns() -> None:
    """A down peer is pushed to with backoff while live, and at once when it returns."""
    mesh = Mesh("abc")
    mesh.start_all()
    mesh.nodes["c"].crash()
    acked(mesh.svc("a").submit("m", b"x", ["a", "b", "c"]))
    mesh.flush()
    st = mesh.svc("a").status()["replication"]
    assert st["awaiting"] == {"c": 1} and st["log_length"] == 1
    failures = mesh.svc("a").send_failures
    mesh.advance(5)  # c still in the live set: the push is retried, and fails
    assert mesh.svc("a").send_failures > failures
    assert mesh.svc("a").status()["replication"]["oldest_pending"]["age"] >= 5
    mesh.set_live("ab")  # membership notices
    failures = mesh.svc("a").send_failures
    mesh.advance(30)
    assert mesh.svc("a").send_failures == failures  # no pushes to a dead peer
    mesh.nodes["c"].start()
    mesh.set_live("abc")
    mesh.flush()
    assert mesh.nodes["c"].store.get("m") == b"x"
    assert all(n.log.entries == {} for n in mesh.nodes.values())
    assert mesh.svc("a").status()["replication"]["log_length"] == 0


def test_coordinator_dies_after_answering_participant_takes_over() -> None:
    """The coordinator answers, reaches b but not c, and dies: b finishes the update."""
    mesh = Mesh("abc")
    mesh.start_all()
    mesh.held = {("a", "c")}
    got = acked(mesh.svc("a").submit("m", b"x", ["a", "b", "c"]))
    mesh.flush()
    assert len(got) == 1
    assert mesh.nodes["b"].store.get("m") == b"x"
    assert mesh.nodes["c"].store.get("m") is None
    mesh.nodes["a"].crash()
    mesh.held = set()
    mesh.set_live("bc")
    mesh.flush()
    assert mesh.nodes["c"].store.get("m") == b"x"
    assert mesh.nodes["b"].log.entries == {} and mesh.nodes["c"].log.entries == {}
    # a comes back with its entry: the others answer Retire or Ack; everything drains
    assert len(mesh.nodes["a"].log.entries) == 1
    mesh.nodes["a"].start()
    mesh.set_live("abc")
    mesh.flush()
    assert all(n.log.entries == {} for n in mesh.nodes.values())


def test_restart_resumes_pushing_from_the_log() -> None:
    """A coordinator restarted with unpushed entries pushes them after recovery."""
    mesh = Mesh("ab")
    mesh.start_all()
    mesh.held = {("a", "b")}
    for i in range(5):
        acked(mesh.svc("a").submit(f"m{i}", b"x", ["a", "b"]))
    mesh.nodes["a"].crash()
    mesh.held = set()
    mesh.nodes["a"].start()
    mesh.set_live("ab")
    mesh.flush()
    assert sorted(mesh.nodes["b"].store.objects) == [f"m{i}" for i in range(5)]
    assert mesh.nodes["a"].log.entries == {}


def test_away_too_long_refuses_with_a_clear_message(logged_failures: LoggedFailures) -> None:
    """A node last up longer ago than the retention refuses to replicate until wiped."""
    mesh = Mesh("ab", config=ReplicationConfig(retention=3600.0))
    mesh.nodes["b"].log.alive = round((T0 - 7200) * 1e6)
    mesh.start_all()
    b = mesh.svc("b")
    assert b.wipe_required is not None and "wipe" in b.wipe_required
    st = b.status()["replication"]
    assert st["state"] == "refused" and "retention" in st["wipe_required"]
    failed: list[Failure] = []
    b.submit("m", b"x", ["a", "b"]).addErrback(failed.append)
    assert failed and failed[0].check(ReplicationRefused)
    # a push to it is refused over AMP, and a keeps the entry
    acked(mesh.svc("a").submit("m", b"x", ["a", "b"]))
    mesh.flush()
    assert mesh.nodes["b"].store.objects == {}
    assert len(mesh.nodes["a"].log.entries) == 1
    # after a wipe of its hard state it rejoins and catches up
    mesh.nodes["b"].log.wipe()
    mesh.nodes["b"].crash()
    mesh.nodes["b"].start()
    mesh.set_live("a")  # membership sees b leave and come back
    mesh.set_live("ab")
    mesh.flush()
    assert mesh.nodes["b"].store.get("m") == b"x"
    assert mesh.nodes["a"].log.entries == {}
    assert len(logged_failures.take()) == 1  # the REFUSING line, at critical level


def test_malformed_frame_is_a_protocol_error() -> None:
    """Garbage in a Replicate call is answered with REPLICATION_MALFORMED."""
    mesh = Mesh("ab")
    mesh.start_all()
    rpc = mesh.nodes["a"].rpc
    assert rpc is not None
    errors: list[Failure] = []
    good = Ack("m", Timestamp(1, "a")).to_bytes()
    blob = pack_frames([good, b"YPR1\x09junk"])
    rpc.call(mesh.nodes["b"].address, Replicate, frames=blob).addErrback(errors.append)
    mesh.flush()
    assert errors and errors[0].check(MalformedMessage)  # mapped from REPLICATION_MALFORMED


def test_sender_is_the_authenticated_peer() -> None:
    """The receiving core hears the frame from the connection's peer id."""
    mesh = Mesh("ab")
    mesh.start_all()
    seen: list[str] = []
    b = mesh.svc("b")
    original = b.receive

    def spy(sender: str, frame: bytes) -> None:
        seen.append(sender)
        original(sender, frame)

    b.receive = spy  # type: ignore[method-assign]
    acked(mesh.svc("a").submit("m", b"x", ["a", "b"]))
    mesh.flush()
    assert seen and set(seen) == {"a"}


def test_restarted_member_is_pushed_to_at_once() -> None:
    """A view in which a member's incarnation changed counts as it leaving and returning."""
    from yimaporc.cluster.membership import View
    from yimaporc.cluster.wire import Member

    mesh = Mesh("ab")
    mesh.start_all()
    mesh.nodes["b"].crash()
    acked(mesh.svc("a").submit("m", b"x", ["a", "b"]))
    mesh.advance(3)  # a failed push, the next one is seconds away
    mesh.nodes["b"].start()
    mesh.svc("b").set_live("ab")
    old = View(1, (Member("a", "h:1", 1), Member("b", "h:2", 1)), "a")
    new = View(2, (Member("a", "h:1", 1), Member("b", "h:2", 2)), "a")
    mesh.svc("a").membership_changed(old, new)
    mesh.flush()
    assert mesh.nodes["b"].store.get("m") == b"x"


def test_sqlite_write_many_is_one_ordered_transaction(tmp_path: Path) -> None:
    """write_many performs puts and drops in order and survives a reopen."""
    from yimaporc.porcupine.replication import DropLog, MarkAlive

    log = SqliteLog(tmp_path / "l.sqlite")
    e1 = LogEntry(Update("o", Timestamp(1, "a"), b"1"), "a", frozenset("ab"), frozenset("b"))
    e2 = LogEntry(Update("o", Timestamp(2, "a"), b"2"), "a", frozenset("ab"), frozenset("b"))
    log.write_many([PersistLog(e1), DropLog("o", Timestamp(1, "a")), PersistLog(e2), MarkAlive(7)])
    log.close()
    log = SqliteLog(tmp_path / "l.sqlite")
    assert log.load() == [e2] and log.last_alive() == 7
    log.close()


def test_real_sqlite_log_under_the_shell(tmp_path: Path) -> None:
    """The shell with SqliteLog: entries written, then dropped on retirement."""
    mesh = Mesh("ab")
    logs = {n: SqliteLog(tmp_path / f"{n}.sqlite") for n in "ab"}
    for n, lg in logs.items():
        mesh.nodes[n].log = lg  # type: ignore[assignment]
    mesh.start_all()
    mesh.held = {("a", "b")}
    acked(mesh.svc("a").submit("m", b"x", ["a", "b"]))
    assert len(logs["a"]) == 1
    mesh.held = set()
    mesh.flush()
    assert len(logs["a"]) == 0 and len(logs["b"]) == 0
    for lg in logs.values():
        lg.close()


@pytest.mark.parametrize("n", [50])
def test_catch_up_many(n: int) -> None:
    """A node down for n updates catches up as soon as it is live again."""
    mesh = Mesh("abc")
    mesh.start_all()
    mesh.nodes["c"].crash()
    mesh.set_live("ab")
    for i in range(n):
        acked(mesh.svc("a" if i % 2 else "b").submit(f"m{i}", b"x", ["a", "b", "c"]))
    mesh.flush()
    # participants hold the entries too (they would take over a dead coordinator's)
    assert mesh.svc("a").status()["replication"]["awaiting"] == {"c": n}
    mesh.nodes["c"].start()
    mesh.set_live("abc")
    mesh.flush()
    assert len(mesh.nodes["c"].store.objects) == n
    assert all(x.log.entries == {} for x in mesh.nodes.values())


def test_no_write_round_after_stop() -> None:
    """A stop waits for the round in progress, then starts none (queued submissions,
    frames received later): its databases close after the last write (issue 14:
    "Cannot operate on a closed database" at SIGTERM)."""
    run = ManualRun()
    mesh = Mesh("ab", run=run)
    mesh.start_all()
    run.release_all()
    run.release_all()
    svc = mesh.svc("a")
    first = svc.submit("o1", b"x", ["a", "b"])
    second = svc.submit("o2", b"x", ["a", "b"])  # queued behind the running round
    first.addErrback(lambda f: None)
    second.addErrback(lambda f: None)
    assert len(run.jobs) == 1
    stopped = svc.stopService()
    assert not stopped.called, "waits for the round in progress"
    assert run.release_all() == 1
    assert stopped.called and run.jobs == [], "no round after the stop"
    rounds = svc.rounds
    b = mesh.svc("b")
    b.submit("o3", b"y", ["b", "a"]).addErrback(lambda f: None)
    for _ in range(3):
        mesh.flush()
        while run.jobs:  # b's own rounds only
            f, args, d = run.jobs.pop(0)
            d.callback(f(*args))
    assert svc.rounds == rounds
