"""Simulated clusters: crashes at every step of an update, partitions, skew, loss.

The shipped replication shell on the simulation kernel (:mod:`yimaporc.sim.replication`),
stopped by the kernel's crash points just before an action as the shell performs it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs
import pytest

from yimaporc.porcupine.replication import (
    Acknowledge,
    Action,
    Apply,
    DropLog,
    PersistLog,
    Push,
    SendMessage,
)
from yimaporc.sim.replication import SIM_CONFIG, CrashPlan, Faults, ReplicationSim
from yimaporc.sim.replication_figures import random_workload
from yimaporc.testing.pytest_plugin import LoggedFailures

PROBE = "probe"


def message(kind: str) -> Callable[[Action], bool]:
    """Matches sending a message of type ``kind``."""
    return lambda a: isinstance(a, SendMessage) and type(a.message).__name__ == kind


#: (role, step) -> (node, matcher, nth).  The coordinator is n0, n1 a participant.
STEPS: dict[str, tuple[str, Callable[[Action], bool], int]] = {
    "coordinator-before-log": ("n0", lambda a: isinstance(a, PersistLog), 1),
    "coordinator-before-apply": ("n0", lambda a: isinstance(a, Apply), 1),
    "coordinator-before-answer": ("n0", lambda a: isinstance(a, Acknowledge), 1),
    "coordinator-before-push": ("n0", message("Push"), 1),
    "coordinator-mid-push": ("n0", message("Push"), 2),
    "coordinator-after-acks-before-retire": ("n0", lambda a: isinstance(a, DropLog), 1),
    "coordinator-mid-retire": ("n0", message("Retire"), 2),
    "participant-before-log": ("n1", lambda a: isinstance(a, PersistLog), 1),
    "participant-before-apply": ("n1", lambda a: isinstance(a, Apply), 1),
    "participant-before-ack": ("n1", message("Ack"), 1),
    "participant-before-retire": ("n1", lambda a: isinstance(a, DropLog), 1),
}


def faulty(seed: int, **kwargs: object) -> ReplicationSim:
    """3-7 nodes with seeded latency, loss, duplication and clock skew."""
    rng = random.Random(seed)
    faults = Faults(
        latency=(0.0005, rng.choice([0.005, 0.03])),
        loss=rng.choice([0.0, 0.05, 0.15]),
        duplicate=rng.choice([0.0, 0.05]),
    )
    skew = rng.choice([0.0, 0.01, 0.3])
    return ReplicationSim(seed, rng.randint(3, 7), faults=faults, skew=skew, **kwargs)  # type: ignore[arg-type]


def finish(sim: ReplicationSim, limit: float = 200.0) -> None:
    """Heal, restart everyone, run until quiet and check every invariant."""
    sim.heal()
    for node_id, node in sim.nodes.items():
        if not node.up:
            sim.restart(node_id)
    took = sim.run_until_quiet(limit)
    assert took is not None, (
        sim.check_drained(),
        [s for s in sim.submissions if not s.acknowledged],
    )
    assert sim.check_converged() == []
    assert sim.check_drained() == []


@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("seed", range(12))
def test_crash_at_every_step(step: str, seed: int) -> None:
    """A crash at any step of an update loses no acknowledged update and drains every log."""
    sim = faulty(seed)
    node, matcher, nth = STEPS[step]
    down = sim.rng.choice([0.01, 0.3, 5.0])
    plan = CrashPlan(
        node, lambda n, a: matcher(a) and sim.object_of(n, a) == PROBE, nth, down_for=down
    )
    sim.plans.append(plan)
    random_workload(sim, objects=sim.rng.randint(5, 15))
    t = sim.now
    sim.submit_at(t + 0.5, PROBE, b"first", ["n0", "n1", "n2"], via="n0")
    sim.run_until(t + 10)
    finish(sim)
    assert plan.fired  # every step is reached, whatever the seed's loss


@pytest.mark.parametrize("seed", range(12))
def test_participant_takes_over_from_dead_coordinator(seed: int) -> None:
    """The coordinator dies mid-push after answering; a participant completes the update."""
    sim = faulty(seed)
    sim.faults.loss = 0.0
    sim.plans.append(
        CrashPlan(
            "n0",
            lambda n, a: (
                isinstance(a, SendMessage)
                and isinstance(a.message, Push)
                and a.message.update.object_id == PROBE
            ),
            2,
            down_for=None,
        )
    )
    sub = sim.submit(PROBE, b"mail", ["n0", "n1", "n2"], via="n0")
    sim.run_until(sim.now + 0.5)
    assert sub.acknowledged and not sim.nodes["n0"].up
    sim.run_until(sim.now + SIM_CONFIG.push_max + 1)
    for replica in ("n1", "n2"):
        assert sim.nodes[replica].disk.store.get(PROBE) == b"mail"
        assert sim.nodes[replica].disk.log.entries == {}
    sim.restart("n0")
    assert sim.run_until_quiet(30) is not None
    assert sim.check_converged() == []


def chaos_plan(sim: ReplicationSim) -> CrashPlan:
    """A crash of a random node before a random kind of action, some time in the run."""
    kinds: list[Callable[[Action], bool]] = [
        lambda a: isinstance(a, PersistLog),
        lambda a: isinstance(a, Apply),
        lambda a: isinstance(a, DropLog),
        lambda a: isinstance(a, Acknowledge),
        message("Push"),
        message("Ack"),
        message("Retire"),
    ]
    matcher = sim.rng.choice(kinds)
    return CrashPlan(
        sim.rng.choice(sorted(sim.nodes)),
        lambda n, a: matcher(a),
        sim.rng.randint(1, 20),
        down_for=sim.rng.choice([0.001, 0.2, 1.0, 6.0]),
    )


@pytest.mark.parametrize("seed", range(60))
def test_chaos(seed: int) -> None:
    """Random crashes at random steps, partitions, loss, duplication, skew: all converge."""
    sim = faulty(1000 + seed)
    for _ in range(sim.rng.randint(2, 6)):
        sim.plans.append(chaos_plan(sim))
    random_workload(sim, objects=sim.rng.randint(10, 30), window=4.0)
    nodes = sorted(sim.nodes)
    t = sim.now
    for _ in range(sim.rng.randint(0, 2)):
        start = t + sim.rng.uniform(0, 4)
        cut = sim.rng.randint(1, len(nodes) - 1)
        shuffled = sim.rng.sample(nodes, len(nodes))
        groups = (shuffled[:cut], shuffled[cut:])
        sim.run_until(start)
        sim.partition(*groups)
        sim.run_until(start + sim.rng.uniform(0.1, 5))
        sim.heal()
    sim.run_until(t + 10)
    finish(sim)


@pytest.mark.parametrize("seed", range(30))
def test_concurrent_updates_across_partition_with_skew(seed: int) -> None:
    """Both sides of a partition update the same objects; after healing the newest wins."""
    rng = random.Random(seed)
    n = rng.randint(3, 7)
    sim = ReplicationSim(seed, n, skew=rng.choice([0.05, 0.5, 2.0]))
    nodes = sorted(sim.nodes)
    half = n // 2
    left, right = nodes[:half], nodes[half:]
    sim.partition(left, right)
    sim.run_until(sim.now + 0.1)
    for k in range(10):
        targets = [rng.choice(left), rng.choice(right)]
        for side in targets:
            body = None if rng.random() < 0.3 else f"{side}-{k}".encode()
            sim.submit(f"c{k}", body, targets, via=side)
    sim.run_until(sim.now + 2)
    assert all(s.acknowledged for s in sim.submissions)
    finish(sim)
    for k in range(10):
        subs = [s for s in sim.submissions if s.object_id == f"c{k}"]
        newest = max(subs, key=lambda s: s.timestamp)  # type: ignore[arg-type, return-value]
        for target in subs[0].targets:
            assert sim.nodes[target].disk.store.version(f"c{k}") == newest.timestamp


@pytest.mark.parametrize("seed", range(20))
def test_two_copies_before_answer_survive_losing_a_node_for_good(seed: int) -> None:
    """With acks_before_reply=2 no answered update is lost when one node never returns."""
    config = attrs.evolve(SIM_CONFIG, acks_before_reply=2)
    sim = faulty(2000 + seed, config=config)
    random_workload(sim, objects=20, replicas=(2, 3), window=3.0)
    victim = sim.rng.choice(sorted(sim.nodes))
    sim.run_until(sim.now + sim.rng.uniform(0.1, 2.5))
    sim.crash(victim, down_for=None)
    sim.run_until(sim.now + 20)
    for sub in sim.submissions:
        if not sub.acknowledged:
            continue
        assert sub.timestamp is not None
        held = [sim.nodes[r].disk.store.version(sub.object_id) for r in sub.targets if r != victim]
        assert any(v is not None and v >= sub.timestamp for v in held), sub
        assert len(set(held)) == 1, (sub.object_id, held)


def test_restarted_node_catches_up() -> None:
    """A node down during 200 updates has them all shortly after it restarts."""
    sim = ReplicationSim(7, 3)
    sim.crash("n2", down_for=None)
    sim.run_until(sim.now + 0.1)
    for k in range(200):
        sim.submit(f"m{k}", b"x" * 10, ["n0", "n1", "n2"], via="n0")
    sim.run_until(sim.now + 5)
    assert len(sim.nodes["n0"].disk.log.entries) == 200
    sim.restart("n2")
    took = sim.run_until_quiet(30, step=0.01)
    assert took is not None and took < 1.0
    assert sim.check_converged() == []


def test_node_away_longer_than_retention_must_be_wiped(logged_failures: LoggedFailures) -> None:
    """Peers drop its updates after the retention; the node refuses to start until wiped."""
    config = attrs.evolve(SIM_CONFIG, retention=20.0, alive_interval=1.0)
    sim = ReplicationSim(3, 3, config=config)
    sim.run_until(sim.now + 1)
    sim.crash("n2", down_for=None)
    sim.run_until(sim.now + 0.1)
    sim.submit("m", b"x", ["n0", "n2"], via="n0")
    sim.run_until(sim.now + 25)
    assert sim.nodes["n0"].disk.log.entries == {}  # retention dropped the entry for n2
    sim.restart("n2")
    sim.run_until(sim.now + 0.1)
    refused = sim.nodes["n2"].service
    assert refused is not None and refused.core is None
    assert refused.wipe_required is not None and "wipe" in refused.wipe_required
    assert [e["log_level"].name for e in logged_failures.take()] == ["critical"]
    sim.crash("n2")
    sim.wipe("n2")
    sim.restart("n2")
    sim.run_until(sim.now + 0.1)
    service = sim.nodes["n2"].service
    assert service is not None and service.core is not None and service.wipe_required is None


@pytest.mark.parametrize("seed", range(20))
def test_chaos_with_slow_disks_and_timed_crashes(seed: int) -> None:
    """With 2 ms writes, crashes at random instants (mid-write, mid-batch) lose nothing acked."""
    sim = faulty(3000 + seed, disk_time=0.002)
    random_workload(sim, objects=sim.rng.randint(10, 30), window=3.0)
    t = sim.now
    for _ in range(sim.rng.randint(1, 4)):
        sim.run_until(sim.now + sim.rng.uniform(0, 1.5))
        victim = sim.rng.choice(sorted(sim.nodes))
        sim.crash(victim, down_for=sim.rng.choice([0.001, 0.3, 4.0]))
    sim.run_until(t + 10)
    finish(sim)
    assert sim.crashes >= 1


FINGERPRINT = """
import sys
from yimaporc.sim.replication import CrashPlan, Faults, ReplicationSim
from yimaporc.sim.replication_figures import random_workload

sim = ReplicationSim(int(sys.argv[1]), 5, faults=Faults(loss=0.05, duplicate=0.05), skew=0.1)
sim.plans.append(CrashPlan("n1", lambda n, a: type(a).__name__ == "Apply", 3, down_for=0.3))
sim.plans.append(CrashPlan("n2", lambda n, a: type(a).__name__ == "SendMessage", 5, down_for=1))
random_workload(sim, objects=20, window=3.0)
sim.run_until(10)
stores = sorted((k, repr(u)) for n in sim.nodes.values() for k, u in n.disk.store.objects.items())
print(sim.kernel.trace_digest(), sim.crashes, len(stores))
"""


def test_a_seed_replays_exactly_in_another_process() -> None:
    """The fingerprint (trace digest: every timer, job, crash and frame) of a seeded run
    with crash points is the same in processes with different hash seeds, and differs
    for another seed: a failing seed replays exactly."""
    import os
    import subprocess
    import sys

    def fingerprint(seed: int, hashseed: int) -> str:
        env = {**os.environ, "PYTHONHASHSEED": str(hashseed)}
        out = subprocess.run(
            [sys.executable, "-c", FINGERPRINT, str(seed)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return out.stdout.strip()

    first = fingerprint(7, 0)
    digest, crashes, _ = first.split()
    assert len(digest) == 64 and int(crashes) == 2
    assert fingerprint(7, 1) == first
    assert fingerprint(8, 0).split()[0] != digest
