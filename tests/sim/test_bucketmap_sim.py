"""Porcupine's user map on the simulation kernel: BucketMapService on real nodes.

The map rides in the TRM commit (the coordinator's attachment hook), every member
installs it from the commit and caches it in ``bucketmap.bin`` on its host disk.
"""

from __future__ import annotations

import random

import pytest

from yimaporc.cluster.bucketservice import BucketMapService
from yimaporc.cluster.node import ClusterNode
from yimaporc.sim.cluster import ClusterSim, SimMember, make_cluster
from yimaporc.sim.kernel import Faults
from yimaporc.testing.seeds import sweep


def with_maps(n: int, seed: int, **kw: object) -> tuple[ClusterSim, dict[str, BucketMapService]]:
    """``n`` nodes, each with its bucket map service (rebuilt at every boot)."""
    maps: dict[str, BucketMapService] = {}

    def boot(member: SimMember, node: ClusterNode) -> None:
        maps[member.node_id] = BucketMapService(node, n_buckets=64)

    sim = make_cluster(n, seed, on_boot=boot, **kw)
    return sim, maps


def check_components(sim: ClusterSim, maps: dict[str, BucketMapService]) -> None:
    """In each component every live node holds one map whose owners are exactly the
    component's members, each with its share (64 buckets, shares within one)."""
    for comp in sim.components():
        held = {maps[i].map for i in comp}
        assert len(held) == 1, comp
        counts = next(iter(held)).counts()
        assert set(counts) == comp and sum(counts.values()) == 64
        assert max(counts.values()) - min(counts.values()) <= 1, counts


@pytest.mark.parametrize("seed", sweep(range(30), 6))
def test_every_component_holds_one_map_of_its_members(seed: int) -> None:
    """After boot, a partition, a crash/restart and the heal, each connected component's
    live nodes hold one map assigning every bucket to one of them."""
    rng = random.Random(seed)
    n = rng.randint(3, 8)
    faults = Faults(latency=(0.0002, 0.005), loss=rng.choice([0.0, 0.02]))
    sim, maps = with_maps(n, seed, faults=faults)
    with sim:
        assert sim.run_until_converged(30.0) is not None
        check_components(sim, maps)
        ids = sorted(sim.nodes)
        cut = rng.randint(1, n - 1)
        shuffled = rng.sample(ids, n)
        sim.partition(shuffled[:cut], shuffled[cut:])
        assert sim.run_until_converged(30.0) is not None
        check_components(sim, maps)
        victim = rng.choice(ids)
        sim.crash(victim)
        sim.run_until(sim.now + rng.uniform(0.1, 4.0))
        sim.start(victim)
        sim.heal()
        assert sim.run_until_converged(30.0) is not None
        check_components(sim, maps)


@pytest.mark.parametrize("seed", sweep(range(20), 4))
def test_a_crash_moves_only_the_dead_nodes_buckets(seed: int) -> None:
    """When a node crashes, the survivors keep every bucket they managed; only the dead
    node's buckets move."""
    sim, maps = with_maps(5, seed, faults=Faults(latency=(0.0002, 0.002)))
    with sim:
        assert sim.run_until_converged(30.0) is not None
        before = maps["n0"].map
        victim = sorted(sim.nodes)[seed % 5]
        sim.crash(victim)
        assert sim.run_until_converged(10.0) is not None
        check_components(sim, maps)
        after = maps[next(i for i in sorted(sim.nodes) if i != victim)].map
        for b, owner in enumerate(before.owners):
            if owner != victim:
                assert after.owners[b] == owner, (b, owner, after.owners[b])
