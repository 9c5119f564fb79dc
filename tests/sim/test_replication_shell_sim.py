"""Replication on the simulation kernel: the shipped shells, end to end.

Every node is a real ``ClusterNode`` (membership, authenticated AMP RPC) with the
real ``ReplicationService`` on it: its frames travel as ``Replicate`` RPCs over the
kernel's stream links, its durable writes run on the host's simulated thread pool
(a crash before a write finishes loses the write), the membership view drives its
live set.  The "disk" is the service's log and object store (in memory), kept
across crashes.  Invariants as in the core simulator (tests/porcupine/replication):
after healing, every replica of every object holds the same newest version, no
acknowledged update is lost, the final value was submitted, and every log drains.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
import pytest

from yimaporc.porcupine.replication import MemoryLog, MemoryObjectStore, Timestamp
from yimaporc.porcupine.replication.amp import node_sender, register
from yimaporc.porcupine.replication.shell import ReplicationService
from yimaporc.sim.cluster import ClusterSim
from yimaporc.sim.kernel import Faults
from yimaporc.sim.replication import SIM_CONFIG
from yimaporc.testing.seeds import sweep


@attrs.define
class Submission:
    """One agent request and its answer."""

    object_id: str
    body: bytes | None
    targets: tuple[str, ...]
    timestamp: Timestamp | None = None


class ReplicatedCluster:
    """``n`` nodes, each a ClusterNode plus a ReplicationService, on one kernel."""

    def __init__(self, seed: int, n: int, *, faults: Faults, skew: float = 0.0) -> None:
        self.sim = ClusterSim(seed, faults=faults, skew=skew)
        self.rng = self.sim.rng
        self.disks: dict[str, tuple[MemoryLog, MemoryObjectStore]] = {}
        self.services: dict[str, ReplicationService] = {}
        self.submissions: list[Submission] = []
        for i in range(n):
            seeds = [f"10.0.0.{j + 1}:7946" for j in range(n) if j != i][:2]
            self.sim.add_node(f"n{i}", f"10.0.0.{i + 1}:7946", seeds)
            self.disks[f"n{i}"] = (MemoryLog(), MemoryObjectStore())
            self.start(f"n{i}")

    def start(self, node_id: str) -> None:
        """Boot the node's process: its ClusterNode, then replication over its disk."""
        self.sim.start(node_id)
        member = self.sim.nodes[node_id]
        node = member.node
        assert node is not None
        log, store = self.disks[node_id]
        service = ReplicationService(
            node.reactor,
            node_id,
            log,
            store,
            node_sender(node),
            threadpool=node.reactor.getThreadPool(),
            now=member.host.wall_time,
            config=SIM_CONFIG,
            rng=random.Random(self.rng.getrandbits(64)),
        )
        register(node.registry, service)
        node.subscribe(service)
        service.startService()
        self.services[node_id] = service

    def crash(self, node_id: str) -> None:
        """SIGKILL: the node's process (ClusterNode and replication) vanishes."""
        self.sim.crash(node_id)
        del self.services[node_id]

    def submit(self, object_id: str, body: bytes | None, targets: list[str]) -> None:
        """An agent's update through a random live target (dropped if none is up)."""
        sub = Submission(object_id, body, tuple(sorted(targets)))
        self.submissions.append(sub)
        up = [t for t in sub.targets if t in self.services]
        if not up:
            return
        via = self.rng.choice(up)

        def answered(ts: Timestamp) -> None:
            sub.timestamp = ts

        d = self.services[via].submit(object_id, body, sub.targets)
        d.addCallbacks(answered, lambda f: None)

    def workload(self, objects: int, window: float) -> None:
        """Each object gets a replica set and 1-3 updates (some deletes) within ``window``."""
        nodes = sorted(self.sim.nodes)
        for k in range(objects):
            targets = self.rng.sample(nodes, self.rng.randint(1, min(3, len(nodes))))
            for j in range(self.rng.randint(1, 3)):
                body = None if j and self.rng.random() < 0.2 else f"o{k}.{j}".encode()
                when = self.sim.now + self.rng.uniform(0, window)

                def go(o: str = f"o{k}", b: bytes | None = body, t: list[str] = targets) -> None:
                    self.submit(o, b, t)

                self.sim.kernel.at(when, go)

    def problems(self) -> list[str]:
        """What breaks the invariants now (empty when all hold)."""
        out: list[str] = []
        by_object: dict[str, list[Submission]] = {}
        for sub in self.submissions:
            by_object.setdefault(sub.object_id, []).append(sub)
        for object_id, subs in by_object.items():
            replicas = sorted({t for s in subs for t in s.targets})
            states = {r: self.disks[r][1].objects.get(object_id) for r in replicas}
            values = {None if u is None else (u.timestamp, u.body) for u in states.values()}
            if len(values) != 1:
                out.append(f"{object_id}: replicas differ: {states}")
                continue
            final = next(iter(states.values()))
            for sub in subs:
                if sub.timestamp is not None and (final is None or final.timestamp < sub.timestamp):
                    out.append(f"{object_id}: acknowledged {sub.timestamp} lost, have {final}")
            if final is not None and final.body not in {s.body for s in subs}:
                out.append(f"{object_id}: final value never submitted: {final}")
        for node_id, (log, _) in self.disks.items():
            if log.entries:
                out.append(f"{node_id}: {len(log.entries)} log entries left")
        return out

    def finish(self, limit: float = 120.0) -> list[str]:
        """Heal, restart whoever is down, run until every invariant holds (or ``limit``)."""
        self.sim.heal()
        for node_id, member in self.sim.nodes.items():
            if not member.up:
                self.start(node_id)
        end = self.sim.now + limit
        while self.sim.now < end:
            self.sim.run_until(self.sim.now + 0.5)
            if not self.problems():
                return []
        return self.problems()


def faults(seed: int) -> tuple[Faults, float]:
    """Seeded latency, loss and duplication, and a clock skew bound."""
    r = random.Random(seed * 7919)
    f = Faults(
        latency=(0.0002, r.choice([0.002, 0.01])),
        loss=r.choice([0.0, 0.01, 0.03]),
        duplicate=r.choice([0.0, 0.01]),
    )
    return f, r.choice([0.0, 0.05, 0.5])


def chaos(seed: int) -> ReplicatedCluster:
    """Updates under loss, a partition, a paused node and a crashed-then-restarted node,
    healed and run until every invariant holds; the cluster, for inspection."""
    f, skew = faults(seed)
    n = random.Random(seed).randint(3, 5)
    cluster = ReplicatedCluster(seed, n, faults=f, skew=skew)
    sim, rng = cluster.sim, cluster.rng
    assert sim.run_until_converged(30.0) is not None
    cluster.workload(objects=15, window=4.0)
    nodes = sorted(sim.nodes)
    sim.run_until(sim.now + rng.uniform(0.0, 2.0))
    cut = rng.randint(1, n - 1)
    shuffled = rng.sample(nodes, n)
    sim.partition(shuffled[:cut], shuffled[cut:])
    sim.run_until(sim.now + rng.uniform(0.5, 4.0))
    sim.heal()
    sim.pause(rng.choice(nodes), rng.uniform(0.2, 2.0))
    victim = rng.choice(nodes)
    cluster.crash(victim)
    sim.run_until(sim.now + rng.uniform(0.1, 3.0))
    cluster.start(victim)
    sim.run_until(sim.now + 4.0)
    assert cluster.finish() == []
    assert any(s.timestamp is not None for s in cluster.submissions)
    return cluster


@pytest.mark.parametrize("seed", sweep(range(40), 8))
def test_updates_survive_partitions_pauses_and_crashes(seed: int) -> None:
    """Updates under loss, a partition, a pause and a crashed-then-restarted node: after
    healing all replicas agree, nothing acknowledged is lost, every log drains."""
    chaos(seed).sim.close()


def test_a_replication_seed_replays() -> None:
    """The same seed gives the same trace and the same replicas; another seed does not."""

    def run(seed: int) -> tuple[str, list[Any]]:
        cluster = chaos(seed)
        cluster.sim.close()
        stores = [sorted(store.objects.items()) for _, store in cluster.disks.values()]
        return cluster.sim.kernel.trace_digest(), stores

    first = run(3)
    assert run(3) == first
    assert run(4)[0] != first[0]


@pytest.mark.parametrize("seed", sweep(range(20), 4))
def test_concurrent_updates_across_a_partition_newest_wins(seed: int) -> None:
    """Both sides of a partition update the same objects (every update answered); after
    healing, every replica holds the newest answered version."""
    rng = random.Random(seed)
    n = rng.randint(3, 5)
    cluster = ReplicatedCluster(seed, n, faults=Faults(latency=(0.0002, 0.002)), skew=0.05)
    sim = cluster.sim
    with sim:
        assert sim.run_until_converged(30.0) is not None
        nodes = sorted(sim.nodes)
        left, right = nodes[: n // 2], nodes[n // 2 :]
        sim.partition(left, right)
        assert sim.run_until_converged(30.0) is not None
        for k in range(10):
            targets = tuple(sorted((rng.choice(left), rng.choice(right))))
            for side in targets:  # each side's replica coordinates its own update
                body = None if rng.random() < 0.3 else f"{side}-{k}".encode()
                sub = Submission(f"c{k}", body, targets)
                cluster.submissions.append(sub)
                d: Any = cluster.services[side].submit(sub.object_id, body, targets)
                d.addCallback(lambda ts, sub=sub: setattr(sub, "timestamp", ts))
        sim.run_until(sim.now + 2.0)
        assert all(s.timestamp is not None for s in cluster.submissions)
        assert cluster.finish() == []
        for k in range(10):
            subs = [s for s in cluster.submissions if s.object_id == f"c{k}"]
            newest = max(s.timestamp for s in subs if s.timestamp is not None)
            for target in subs[0].targets:
                assert cluster.disks[target][1].version(f"c{k}") == newest
