"""The replication simulator's kernel (:mod:`.sim`): :class:`ReplicationSim`, nodes
running replication cores on one virtual clock, the shell performing their actions,
the links, crashes and partitions, and the convergence checks."""

from __future__ import annotations

import random
from collections.abc import Iterable

from ...simloop import CoreNet
from ._manager import ReplicationConfig, ReplicationManager
from ._sim_model import SIM_CONFIG, CrashPlan, Faults, SimNode, Submission
from ._values import (
    Acknowledge,
    Action,
    Apply,
    DropLog,
    MarkAlive,
    PersistLog,
    PurgeTombstones,
    SendMessage,
)
from ._wire import Message, Push, from_bytes


class ReplicationSim(CoreNet):
    """Nodes, links and a virtual clock (:class:`~yimaporc.simloop.CoreNet`: the event
    queue, partitions, the message draws); ``run_until`` advances true time."""

    def __init__(
        self,
        seed: int,
        n: int,
        *,
        faults: Faults | None = None,
        config: ReplicationConfig = SIM_CONFIG,
        skew: float = 0.0,
        detect_delay: float = 0.05,
        start: float = 1_700_000_000.0,
        encode: bool = True,
        disk_time: float = 0.0,
    ) -> None:
        super().__init__(seed, start=start)
        self.faults = faults or Faults()
        self.config = config
        self.detect_delay = detect_delay
        self.encode = encode
        self.disk_time = disk_time
        self.nodes: dict[str, SimNode] = {}
        self.plans: list[CrashPlan] = []
        self.submissions: list[Submission] = []
        self._pending: dict[tuple[str, int], Submission] = {}
        self.sent: dict[str, int] = {"Push": 0, "Ack": 0, "Retire": 0}
        self.regressions: list[tuple[str, str]] = []
        self.crashes = 0
        self.log_samples: list[int] = []
        for i in range(n):
            node_id = f"n{i}"
            node = SimNode(node_id, self.rng.uniform(-skew, skew))
            self.nodes[node_id] = node
        for node_id in self.nodes:
            self._boot(self.nodes[node_id])
        self._membership_changed()

    # --- agents -----------------------------------------------------------------

    def submit(
        self, object_id: str, body: bytes | None, targets: Iterable[str], via: str | None = None
    ) -> Submission:
        """An agent's update, sent to ``via`` (or a random up target); retried on crash."""
        sub = Submission(object_id, body, tuple(sorted(targets)))
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

        def go() -> None:
            self.submit(object_id, body, t, via)

        self._at(when, go)

    def _try(self, sub: Submission, via: str | None = None) -> None:
        up = [t for t in sub.targets if self.nodes[t].up]
        if via is None or via not in up:
            if not up:
                # every replica down: the agent tries again a little later
                self._at(self.now + 0.2, lambda: self._try(sub))
                return
            via = self.rng.choice(up)
        node = self.nodes[via]
        assert node.core is not None
        sub.attempts += 1
        sub.coordinator = via
        current = node.disk.store.version(sub.object_id)
        token, actions = node.core.submit(
            sub.object_id, sub.body, sub.targets, self._local(node), current
        )
        sub.token = token
        first = next(a for a in actions if isinstance(a, PersistLog | Apply))
        sub.stamps.append(
            first.entry.timestamp if isinstance(first, PersistLog) else first.update.timestamp
        )
        self._pending[(via, token)] = sub
        self._perform(node, actions)

    # --- faults -----------------------------------------------------------------

    def crash(self, node_id: str, down_for: float | None = None) -> None:
        """Stop a node now; restart it after ``down_for`` seconds (None: stays down)."""
        node = self.nodes[node_id]
        if node.core is None:
            return
        self.crashes += 1
        node.core = None
        node.timer_gen += 1
        node.boots += 1
        node.backlog.clear()
        node.busy = False
        lost = [k for k in self._pending if k[0] == node_id]
        for key in lost:
            sub = self._pending.pop(key)
            # no answer: the agent picks another coordinator (seed §4.3)
            self._at(self.now + 0.01, lambda s=sub: self._try(s))  # type: ignore[misc]
        if down_for is not None:
            self._at(self.now + down_for, lambda: self.restart(node_id))
        self._membership_changed()

    def restart(self, node_id: str) -> None:
        """Boot a node from its disk."""
        node = self.nodes[node_id]
        if node.core is None:
            self._boot(node)
            self._membership_changed()

    def wipe(self, node_id: str) -> None:
        """Delete a (down) node's hard state: log, alive mark and objects."""
        node = self.nodes[node_id]
        assert node.core is None, "wipe a node only while it is down"
        node.disk.log.wipe()
        node.disk.store.wipe()
        node.high.clear()

    def partition(self, *groups: Iterable[str]) -> None:
        """Only nodes in the same group can talk (the live sets follow)."""
        super().partition(*groups)
        self._membership_changed()

    def heal(self) -> None:
        """Remove every partition and cut link (the live sets follow)."""
        super().heal()
        self._membership_changed()

    def cut(self, a: str, b: str) -> None:
        """Only the link between ``a`` and ``b`` fails (the live sets follow)."""
        super().cut(a, b)
        self._membership_changed()

    # --- time -------------------------------------------------------------------

    def _local(self, node: SimNode) -> float:
        return self.now + node.skew

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
        return (
            all(
                n.up and not n.disk.log.entries and len(n.core or ()) == 0
                for n in self.nodes.values()
            )
            and not self._pending
            and all(s.acknowledged for s in self.submissions)
        )

    # --- plumbing ---------------------------------------------------------------

    def _boot(self, node: SimNode) -> None:
        log = node.disk.log
        core, actions = ReplicationManager.recover(
            node.node_id,
            log.load(),
            log.last_alive(),
            self._local(node),
            random.Random(self.rng.getrandbits(64)),
            self.config,
        )
        node.core = core
        node.spin = 0
        self._perform(node, actions)

    def _membership_changed(self) -> None:
        def deliver() -> None:
            for node in self.nodes.values():
                if node.core is None:
                    continue
                live = [
                    o.node_id
                    for o in self.nodes.values()
                    if o.up and self.connected(node.node_id, o.node_id)
                ]
                self._perform(node, node.core.set_live(live, self._local(node)))

        self._at(self.now + self.detect_delay, deliver)

    def object_of(self, node_id: str, action: Action) -> str | None:
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
            sub = self._pending.get((node_id, action.token))
            return None if sub is None else sub.object_id
        return None

    def _crash_due(self, node: SimNode, action: Action) -> CrashPlan | None:
        for plan in self.plans:
            if plan.fired or plan.node != node.node_id or not plan.when(node.node_id, action):
                continue
            plan.seen += 1
            if plan.seen >= plan.nth:
                plan.fired = True
                return plan
        return None

    def _perform(self, node: SimNode, actions: list[Action]) -> None:
        """Queue a batch behind earlier ones; the shell performs actions strictly in order."""
        node.backlog.extend(actions)
        self._schedule(node)
        if not node.busy:
            self._drain(node)

    def _drain(self, node: SimNode) -> None:
        while node.backlog and node.core is not None:
            action = node.backlog.popleft()
            plan = self._crash_due(node, action)
            if plan is not None:
                self.crash(node.node_id, plan.down_for)
                return
            if self.disk_time > 0 and isinstance(action, PersistLog | Apply | DropLog):
                # the write completes (and later actions start) after the disk's time
                node.busy = True
                boots = node.boots

                def done(action: Action = action, boots: int = boots) -> None:
                    if node.boots == boots:
                        node.busy = False
                        self._execute(node, action)
                        self._drain(node)

                self._at(self.now + self.disk_time, done)
                return
            self._execute(node, action)

    def _execute(self, node: SimNode, action: Action) -> None:
        disk = node.disk
        if isinstance(action, PersistLog):
            disk.log.put(action.entry)
        elif isinstance(action, Apply):
            self._apply(node, action)
        elif isinstance(action, DropLog):
            disk.log.drop(action.object_id, action.timestamp)
        elif isinstance(action, SendMessage):
            self._transmit(node, action)
        elif isinstance(action, Acknowledge):
            sub = self._pending.pop((node.node_id, action.token), None)
            if sub is not None:
                sub.acknowledged = True
                sub.timestamp = action.timestamp
        elif isinstance(action, PurgeTombstones):
            disk.store.purge_tombstones(action.before)
        elif isinstance(action, MarkAlive):
            disk.log.mark_alive(action.wallclock)

    def _apply(self, node: SimNode, action: Apply) -> None:
        update = action.update
        high = node.high.get(update.object_id)
        applied = node.disk.store.apply(update)
        if applied and high is not None and update.timestamp < high:
            self.regressions.append((node.node_id, update.object_id))
        if high is None or update.timestamp > high:
            node.high[update.object_id] = update.timestamp

    def _schedule(self, node: SimNode) -> None:
        core = node.core
        if core is None:
            return
        node.timer_gen += 1
        gen = node.timer_gen
        deadline = core.next_deadline()
        if deadline is None:
            return
        when = max(self.now, deadline - node.skew)

        def fire() -> None:
            if node.timer_gen != gen or node.core is None:
                return
            local = max(self._local(node), deadline)
            if local == node.last_tick:
                node.spin += 1
                if node.spin > 10_000:
                    raise RuntimeError(f"timer spin on {node.node_id} at {local}")
            else:
                node.spin = 0
            node.last_tick = local
            self._perform(node, node.core.tick(local))

        self._at(when, fire)

    def _transmit(self, src: SimNode, act: SendMessage) -> None:
        msg = act.message
        self.sent[type(msg).__name__] += 1
        payload: bytes | Message = msg.to_bytes() if self.encode else msg
        dst = self.nodes.get(act.to)
        if dst is None or not self.connected(src.node_id, dst.node_id):
            return
        f = self.faults
        for delay in self._delays(f.latency, f.loss, f.duplicate):
            self._at(
                self.now + delay,
                lambda p=payload: self._deliver(src.node_id, dst, p),  # type: ignore[misc]
            )

    def _deliver(self, src: str, dst: SimNode, payload: bytes | Message) -> None:
        if dst.core is None or not self.connected(src, dst.node_id):
            return
        msg = from_bytes(payload) if isinstance(payload, bytes) else payload
        self._perform(dst, dst.core.receive(src, msg, self._local(dst)))

    # --- checks -----------------------------------------------------------------

    def check_converged(self) -> list[str]:
        """Problems with the final state (empty when all invariants hold).

        Every replica of every object holds the same newest version and body;
        every acknowledged update is there or superseded by a newer one; the
        winning version is one an agent submitted; no store ever went back.
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
                    # a purged tombstone: only legitimate if the newest acked was a delete
                    problems.append(f"{object_id}: acknowledged {sub.timestamp} vanished")
                elif final.timestamp < sub.timestamp:
                    problems.append(f"{object_id}: acked {sub.timestamp} lost, have {final}")
            if final is not None and not any(
                final.timestamp == stamp and final.body == s.body
                for s in subs
                for stamp in s.stamps
            ):
                problems.append(f"{object_id}: final version never submitted: {final}")
        if self.regressions:
            problems.append(f"older updates overwrote newer: {self.regressions[:5]}")
        return problems

    def check_drained(self) -> list[str]:
        """Logs (on disk and in the cores) that still hold entries."""
        return [
            f"{n.node_id}: {len(n.disk.log.entries)} entries left"
            for n in self.nodes.values()
            if n.disk.log.entries or (n.core is not None and len(n.core))
        ]
