"""Replication crash points on the kernel: the shipped shell, stopped between two actions.

Each node is a host of a :class:`~yimaporc.sim.kernel.SimKernel` running the shipped
:class:`~yimaporc.porcupine.replication.shell.ReplicationService` on its simulated
reactor, unmodified: its rounds of durable writes run on the host's simulated thread
pool, its frames travel over the kernel's request/response links
(:meth:`SimKernel.call <yimaporc.sim.kernel.SimKernel.call>`, the one exchange of a
``Replicate`` RPC), its timers on the host's skewed clock.  The "disk" of a node (a
:class:`MemoryLog` and a :class:`MemoryObjectStore`) survives crashes; each boot sees it
through collaborators bound to that boot, which report every action they are about to
perform to :meth:`SimKernel.step <yimaporc.sim.kernel.SimKernel.step>`.  So a
:class:`CrashPlan` stops a node just before any chosen action *as the shell performs
it*: before a round's log transaction (all of it or nothing), between the log write
and the store write, in the middle of a round's store writes, after the writes and
before the answer, between the pushes to two peers, in the middle of a retire.  Live
sets come from an oracle (who is up and reachable), delivered after a detection delay,
as the membership service would.  Everything is drawn from the kernel's one
``random.Random(seed)`` and folded into its trace: a failing seed replays exactly.

The workloads and the figures of docs/replication.md are in :mod:`.replication_figures`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from ..porcupine.replication import (
    Acknowledge,
    Action,
    Apply,
    DropLog,
    LogEntry,
    MarkAlive,
    MemoryLog,
    MemoryObjectStore,
    PersistLog,
    PurgeTombstones,
    Push,
    ReplicationConfig,
    SendMessage,
    Timestamp,
    Update,
)
from ..porcupine.replication._wire import from_bytes
from ..porcupine.replication.interfaces import ILogStore, IObjectStore
from ..porcupine.replication.shell import ReplicationService, Send
from .kernel import CrashPoint, Faults, SimHost, SimKernel
from .reactor import SimReactor

__all__ = [
    "SIM_CONFIG",
    "CrashPlan",
    "Disk",
    "Faults",
    "ReplicationSim",
    "SimNode",
    "Submission",
]

#: Simulator tunables: fast retries so that runs last seconds of virtual time.
SIM_CONFIG = ReplicationConfig(
    push_initial=0.05, push_max=1.0, stall_timeout=3.0, alive_interval=30.0
)

#: A crash point: ``CrashPlan(node, when(node_id, action), nth, down_for)``.
CrashPlan = CrashPoint


@attrs.define
class Disk:
    """What survives a crash: the update log and the object store."""

    log: MemoryLog = attrs.field(factory=MemoryLog)
    store: MemoryObjectStore = attrs.field(factory=MemoryObjectStore)


@attrs.define(eq=False)
class SimNode:
    """One node: its host, its disk and, while up, its replication shell."""

    node_id: str
    host: SimHost
    disk: Disk = attrs.field(factory=Disk)
    service: ReplicationService | None = None
    #: highest version ever applied per object (tombstones included), to catch regressions
    high: dict[str, Timestamp] = attrs.field(factory=dict)

    @property
    def up(self) -> bool:
        """True while the node's process runs."""
        return self.service is not None and self.host.up

    @property
    def skew(self) -> float:
        """The host clock's offset from true time."""
        return self.host.skew


@attrs.define(eq=False)
class Submission:
    """One agent request, and what became of it."""

    object_id: str
    body: bytes | None
    targets: tuple[str, ...]
    key: int = 0
    coordinator: str | None = None
    #: the timestamp the agent was answered with
    timestamp: Timestamp | None = None
    acknowledged: bool = False
    attempts: int = 0


class _BootDisk:
    """A node's disk as one boot of its process sees it: every write is a step of the
    kernel (a crash point may stop the host just before it) and does nothing once that
    boot is dead."""

    def __init__(self, sim: ReplicationSim, node: SimNode) -> None:
        self.sim = sim
        self.node = node
        self.host = node.host
        self.generation = node.host.generation
        self.disk = node.disk

    def alive(self) -> bool:
        """This boot still runs."""
        return self.host.up and self.host.generation == self.generation

    def step(self, action: Action) -> bool:
        """Report ``action``; True when it may be performed."""
        return self.alive() and self.sim.kernel.step(self.host, action)


@implementer(ILogStore)
class _BootLog(_BootDisk):
    """The log store of one boot (``write_many`` is one transaction: all or nothing)."""

    def load(self) -> list[LogEntry]:
        return self.disk.log.load()

    def last_alive(self) -> int | None:
        return self.disk.log.last_alive()

    def write_many(self, ops: Sequence[PersistLog | DropLog | MarkAlive]) -> None:
        for op in ops:
            if not self.step(op):
                return  # the process died before the transaction committed
        for op in ops:
            if isinstance(op, PersistLog):
                self.sim.created(self.node.node_id, op.entry.update)
        self.disk.log.write_many(ops)

    def put(self, entry: LogEntry) -> None:
        self.write_many([PersistLog(entry)])

    def drop(self, object_id: str, timestamp: Timestamp) -> None:
        self.write_many([DropLog(object_id, timestamp)])

    def mark_alive(self, wallclock: int) -> None:
        self.write_many([MarkAlive(wallclock)])

    def wipe(self) -> None:
        if self.alive():
            self.disk.log.wipe()


@implementer(IObjectStore)
class _BootStore(_BootDisk):
    """The object store of one boot: each update is applied as a step of its own."""

    def version(self, object_id: str) -> Timestamp | None:
        return self.disk.store.version(object_id)

    def apply(self, update: Update) -> bool:
        if not self.step(Apply(update)):
            return False
        self.sim.created(self.node.node_id, update)
        return self.sim.apply(self.node, update)

    def apply_many(self, updates: Sequence[Update]) -> list[bool]:
        return [self.apply(u) for u in updates]

    def purge_tombstones(self, before: int) -> int:
        if not self.step(PurgeTombstones(before)):
            return 0
        return self.disk.store.purge_tombstones(before)


class ReplicationSim:
    """Replication shells on ``n`` hosts ``n0..`` of one kernel; ``run_until`` advances
    true time.  ``plans`` are the kernel's crash points."""

    def __init__(
        self,
        seed: int,
        n: int,
        *,
        faults: Faults | None = None,
        config: ReplicationConfig = SIM_CONFIG,
        skew: float = 0.0,
        detect_delay: float = 0.05,
        disk_time: float | None = None,
    ) -> None:
        self.kernel = kernel = SimKernel(seed, faults=faults or Faults())
        if disk_time is not None:
            kernel.faults.disk_latency = (disk_time, disk_time)
        self.rng = kernel.rng
        self.faults = kernel.faults
        self.config = config
        self.detect_delay = detect_delay
        self.nodes: dict[str, SimNode] = {}
        self.plans = kernel.crash_points
        self.submissions: list[Submission] = []
        self._pending: dict[tuple[str, int], Submission] = {}
        self._created: set[tuple[str, Timestamp, bytes | None]] = set()
        self.sent: dict[str, int] = {"Push": 0, "Ack": 0, "Retire": 0}
        self.regressions: list[tuple[str, str]] = []
        self.crashes = 0
        self.log_samples: list[int] = []
        for i in range(n):
            node_id = f"n{i}"
            host = kernel.add_host(node_id, f"10.0.0.{i + 1}", skew=self.rng.uniform(-skew, skew))
            node = SimNode(node_id, host)
            host.program = lambda reactor, node=node: self._boot(node, reactor)  # type: ignore[misc]
            self.nodes[node_id] = node
        kernel.watch(self._watched)
        for node in self.nodes.values():
            kernel.start(node.host)

    def close(self) -> None:
        """Remove the kernel's host directories."""
        self.kernel.close()

    @property
    def now(self) -> float:
        """True (simulated) time."""
        return self.kernel.now

    # --- agents -----------------------------------------------------------------

    def submit(
        self, object_id: str, body: bytes | None, targets: Iterable[str], via: str | None = None
    ) -> Submission:
        """An agent's update, sent to ``via`` (or a random up target); retried when its
        coordinator dies or refuses before answering."""
        sub = Submission(object_id, body, tuple(sorted(targets)), key=len(self.submissions))
        self.submissions.append(sub)
        self._try(sub, via)
        return sub

    def submit_at(
        self,
        when: float,
        object_id: str,
        body: bytes | None,
        targets: Iterable[str],
        via: str | None = None,
    ) -> None:
        """Schedule :meth:`submit` at true time ``when``."""
        t = tuple(targets)
        self.kernel.at(when, lambda: self._submit_later(object_id, body, t, via))

    def _submit_later(
        self, object_id: str, body: bytes | None, targets: tuple[str, ...], via: str | None
    ) -> None:
        self.submit(object_id, body, targets, via)

    def _try(self, sub: Submission, via: str | None = None) -> None:
        if sub.acknowledged:
            return
        up = [t for t in sub.targets if self.nodes[t].up]
        if via is None or via not in up:
            if not up:
                # every replica down: the agent tries again a little later
                self.kernel.at(self.now + 0.2, lambda: self._try(sub))
                return
            via = self.rng.choice(up)
        node = self.nodes[via]
        service = node.service
        assert service is not None
        sub.attempts += 1
        sub.coordinator = via
        key = (via, sub.key)
        self._pending[key] = sub
        current = node.disk.store.version(sub.object_id)
        d = service.submit(sub.object_id, sub.body, sub.targets, current)
        d.addCallback(self._answered, node, sub)
        d.addErrback(self._refused, key)

    def _answered(self, timestamp: Timestamp, node: SimNode, sub: Submission) -> None:
        # The answer leaving the coordinator is its last action for this update.
        if not self.kernel.step(node.host, Acknowledge(sub.key, timestamp)):
            return  # died before the answer left: the crash hands the agent over
        if self._pending.pop((node.node_id, sub.key), None) is None:
            return
        sub.acknowledged = True
        sub.timestamp = timestamp

    def _refused(self, f: Failure, key: tuple[str, int]) -> None:
        sub = self._pending.pop(key, None)
        if sub is not None:
            self.kernel.at(self.now + 0.2, lambda: self._try(sub))

    # --- faults -----------------------------------------------------------------

    def crash(self, node_id: str, down_for: float | None = None) -> None:
        """Stop a node now; restart it after ``down_for`` seconds (None: stays down)."""
        host = self.nodes[node_id].host
        if not host.up:
            return
        self.kernel.crash(host)
        if down_for is not None:
            self.kernel.restart_after(host, down_for)

    def restart(self, node_id: str) -> None:
        """Boot a node from its disk."""
        self.kernel.start(self.nodes[node_id].host)

    def wipe(self, node_id: str) -> None:
        """Delete a (down) node's hard state: log, alive mark and objects."""
        node = self.nodes[node_id]
        assert not node.up, "wipe a node only while it is down"
        node.disk.log.wipe()
        node.disk.store.wipe()
        node.high.clear()

    def partition(self, *groups: Iterable[str]) -> None:
        """Only nodes in the same group can talk (the live sets follow)."""
        self.kernel.partition(*groups)
        self._membership_changed()

    def heal(self) -> None:
        """Remove every partition and cut link (the live sets follow)."""
        self.kernel.heal()
        self._membership_changed()

    def cut(self, a: str, b: str) -> None:
        """Only the link between ``a`` and ``b`` fails (the live sets follow)."""
        self.kernel.cut(a, b)
        self._membership_changed()

    def connected(self, a: str, b: str) -> bool:
        """True when ``a`` and ``b`` can talk."""
        return self.kernel.connected(a, b)

    # --- time -------------------------------------------------------------------

    def run_until(self, until: float) -> None:
        """Advance to true time ``until``."""
        self.kernel.run_until(until)

    def run_until_quiet(self, limit: float, step: float = 0.25) -> float | None:
        """Run until every log is empty and every agent answered; the time taken, or None."""
        start = self.now
        while self.now < start + limit:
            self.run_until(self.now + step)
            self.log_samples.append(sum(len(n.disk.log.entries) for n in self.nodes.values()))
            if self.quiet():
                return self.now - start
        return None

    def quiet(self) -> bool:
        """All nodes up, all logs empty, no agent waiting."""
        for n in self.nodes.values():
            service = n.service
            if not n.up or n.disk.log.entries or service is None or service.core is None:
                return False
            if len(service.core):
                return False
        return not self._pending and all(s.acknowledged for s in self.submissions)

    # --- the process of a node --------------------------------------------------

    def _boot(self, node: SimNode, reactor: SimReactor) -> None:
        service = ReplicationService(
            reactor,
            node.node_id,
            _BootLog(self, node),
            _BootStore(self, node),
            self._sender(node),
            threadpool=reactor.getThreadPool(),  # type: ignore[arg-type]
            now=node.host.wall_time,
            config=self.config,
            rng=random.Random(self.rng.getrandbits(64)),
        )
        node.service = service
        service.startService()

    def _watched(self, what: str, host: SimHost) -> None:
        node = self.nodes[host.name]
        if what == "crash":
            self.crashes += 1
            node.service = None
            for key in [k for k in self._pending if k[0] == host.name]:
                sub = self._pending.pop(key)
                # no answer: the agent picks another coordinator (seed §4.3)
                self.kernel.at(self.now + 0.01, lambda s=sub: self._try(s))  # type: ignore[misc]
        self._membership_changed()

    def _membership_changed(self) -> None:
        self.kernel.at(self.now + self.detect_delay, self._deliver_live)

    def _deliver_live(self) -> None:
        for node in self.nodes.values():
            if node.service is None or not node.up:
                continue
            live = [
                o.node_id
                for o in self.nodes.values()
                if o.up and self.connected(node.node_id, o.node_id)
            ]
            node.service.set_live(live)

    def _sender(self, node: SimNode) -> Send:
        host = node.host

        def send(to: str, frames: list[bytes]) -> Deferred[Any]:
            # One Replicate call per batch: it leaves whole or (the process died at one
            # of its frames) not at all.
            messages = [from_bytes(f) for f in frames]
            for message in messages:
                if not self.kernel.step(host, SendMessage(to, message)):
                    return Deferred()  # never answered: the process is gone
            for message in messages:
                self.sent[type(message).__name__] += 1
            return self.kernel.call(
                host, to, lambda _: self._receive(to, node.node_id, frames), b"".join(frames)
            )

        return send

    def _receive(self, node_id: str, sender: str, frames: list[bytes]) -> None:
        service = self.nodes[node_id].service
        if service is None:
            raise ConnectionError(f"{node_id} is not running")
        for frame in frames:
            service.receive(sender, frame)

    # --- what a boot's disk reports -----------------------------------------------

    def created(self, node_id: str, update: Update) -> None:
        """A version written on the node that coordinated it (it made the timestamp)."""
        if update.timestamp.node_id == node_id:
            self._created.add((update.object_id, update.timestamp, update.body))

    def apply(self, node: SimNode, update: Update) -> bool:
        """Apply to the node's store, noting any older update overwriting a newer one."""
        high = node.high.get(update.object_id)
        applied = node.disk.store.apply(update)
        if applied and high is not None and update.timestamp < high:
            self.regressions.append((node.node_id, update.object_id))
        if high is None or update.timestamp > high:
            node.high[update.object_id] = update.timestamp
        return applied

    # --- checks -----------------------------------------------------------------

    def object_of(self, node_id: str, action: Any) -> str | None:
        """The object an action concerns (None for node-wide actions)."""
        if isinstance(action, PersistLog):
            return action.entry.object_id
        if isinstance(action, Apply):
            return action.update.object_id
        if isinstance(action, DropLog):
            return action.object_id
        if isinstance(action, SendMessage):
            msg = action.message
            return msg.update.object_id if isinstance(msg, Push) else msg.object_id
        if isinstance(action, Acknowledge):
            return self.submissions[action.token].object_id
        return None

    def check_converged(self) -> list[str]:
        """Problems with the final state (empty when all invariants hold).

        Every replica of every object holds the same newest version and body;
        every acknowledged update is there or superseded by a newer one; the
        winning version is one a coordinator made for a submitted body; no store
        ever went back.
        """
        problems: list[str] = []
        by_object: dict[str, list[Submission]] = {}
        for sub in self.submissions:
            by_object.setdefault(sub.object_id, []).append(sub)
        for object_id, subs in by_object.items():
            replicas = sorted({t for s in subs for t in s.targets})
            states = {r: self.nodes[r].disk.store.objects.get(object_id) for r in replicas}
            values = {(None if u is None else (u.timestamp, u.body)) for u in states.values()}
            if len(values) != 1:
                problems.append(f"{object_id}: replicas differ: {states}")
                continue
            final = next(iter(states.values()))
            for sub in subs:
                if not sub.acknowledged:
                    continue
                assert sub.timestamp is not None
                if final is None:
                    problems.append(f"{object_id}: acknowledged {sub.timestamp} vanished")
                elif final.timestamp < sub.timestamp:
                    problems.append(f"{object_id}: acked {sub.timestamp} lost, have {final}")
            if final is not None and not (
                (object_id, final.timestamp, final.body) in self._created
                and any(final.body == s.body for s in subs)
            ):
                problems.append(f"{object_id}: final version never submitted: {final}")
        if self.regressions:
            problems.append(f"older updates overwrote newer: {self.regressions[:5]}")
        return problems

    def check_drained(self) -> list[str]:
        """Logs (on disk and in the cores) that still hold entries."""
        out = []
        for n in self.nodes.values():
            core = n.service.core if n.service is not None else None
            if n.disk.log.entries or (core is not None and len(core)):
                out.append(f"{n.node_id}: {len(n.disk.log.entries)} entries left")
        return out
