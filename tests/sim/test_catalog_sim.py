"""ReplicatedDocument on the simulation kernel: real nodes, real RPC, files on the host disk.

Each node is a real ``ClusterNode``; its document pushes records as ``PutRecords`` RPCs
over the kernel's stream links and writes record files through the host's simulated
thread pool into the host's disk directory, which a restarted node reads back.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet.threads import deferToThreadPool

from yimaporc.cluster.catalog import ReplicatedDocument
from yimaporc.sim.cluster import ClusterSim, make_cluster
from yimaporc.sim.kernel import Faults
from yimaporc.testing.seeds import sweep


def attach(sim: ClusterSim, node_id: str) -> ReplicatedDocument:
    """The document ``cat`` (one record per key) on the node's current boot."""
    node = sim.nodes[node_id].node
    assert node is not None
    reactor = node.reactor
    pool = reactor.getThreadPool()

    def run(f: Any, *args: Any) -> Any:
        return deferToThreadPool(reactor, pool, f, *args)

    return ReplicatedDocument(
        node,
        "cat",
        {},
        run=run,
        split=lambda v: {k: v[k] for k in v},
        join=lambda records: dict(records),
    )


@pytest.mark.parametrize("seed", sweep(range(30), 6))
def test_concurrent_claims_at_most_one_wins(seed: int) -> None:
    """Two nodes claim one record at once; whatever order the kernel's latencies give the
    messages, at most one claim wins and every member then holds the winner's value."""
    with make_cluster(3, seed, faults=Faults(latency=(0.0002, 0.01))) as sim:
        assert sim.run_until_converged(30.0) is not None
        docs = {i: attach(sim, i) for i in sorted(sim.nodes)}
        won: dict[str, bool] = {}
        a, b = random.Random(seed).sample(sorted(docs), 2)
        for who in (a, b):
            d = docs[who].claim(lambda v, who=who: {**v, "pending": v.get("pending") or who})
            d.addCallback(lambda ok, who=who: won.__setitem__(who, ok))
        sim.run_until(sim.now + 5.0)
        assert sorted(won) == sorted((a, b))
        assert list(won.values()).count(True) <= 1, won
        winner = [w for w, ok in won.items() if ok]
        if winner:
            assert {d.value.get("pending") for d in docs.values()} == set(winner)


@pytest.mark.parametrize("seed", sweep(range(30), 6))
def test_updates_converge_through_partitions_and_restarts(seed: int) -> None:
    """Nodes change different records while partitioned, one node crashes and restarts
    from its files; once healed every node holds the same document, with every answered
    change."""
    rng = random.Random(seed)
    n = rng.randint(3, 5)
    faults = Faults(latency=(0.0002, 0.005), loss=rng.choice([0.0, 0.02]))
    with make_cluster(n, seed, faults=faults) as sim:
        assert sim.run_until_converged(30.0) is not None
        ids = sorted(sim.nodes)
        docs = {i: attach(sim, i) for i in ids}
        acked: dict[str, str] = {}  # puts answered (on the writer's disk)
        cut = rng.randint(1, n - 1)
        sim.partition(ids[:cut], ids[cut:])
        assert sim.run_until_converged(30.0) is not None
        for k in range(12):
            who = rng.choice(ids)
            if not sim.nodes[who].up:
                continue
            key = f"r{k}"
            docs[who].put({key: who}).addCallback(
                lambda _, key=key, who=who: acked.update({key: who})
            )
            if k == 5:
                victim = rng.choice(ids)
                sim.crash(victim)
                sim.run_until(sim.now + rng.uniform(0.1, 4.0))
                sim.start(victim)
                docs[victim] = attach(sim, victim)
            sim.run_until(sim.now + rng.uniform(0.0, 0.5))
        sim.heal()
        assert sim.run_until_converged(30.0) is not None
        sim.run_until(sim.now + 5.0)
        values = [doc.value for doc in docs.values()]
        assert all(v == values[0] for v in values), values
        assert {k: values[0].get(k) for k in acked} == acked
