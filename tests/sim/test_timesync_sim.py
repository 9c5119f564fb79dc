"""The common clock: nodes with clocks skewed by seconds agree on cluster time."""

from __future__ import annotations

import pytest

from yimaporc.sim.cluster import make_cluster
from yimaporc.sim.kernel import Faults


@pytest.mark.parametrize("seed", range(10))
def test_cluster_time_agrees_despite_skew(seed: int) -> None:
    """After convergence, every node's cluster time is within max one-way latency of the reference's."""
    latency = (0.0005, 0.004)
    net = make_cluster(10, seed, faults=Faults(latency=latency), skew=5.0)
    assert net.run_until_converged(60) is not None
    net.run_until(net.now + 5.0)
    times = []
    for node in net.nodes.values():
        assert node.core is not None and node.core.clock_sync.synced
        times.append(net.now + node.skew + node.core.clock_sync.offset)
    assert max(times) - min(times) <= latency[1]


def test_reference_change_does_not_jump_clock() -> None:
    """When the reference node dies, cluster time moves on without a jump."""
    net = make_cluster(5, 3, faults=Faults(latency=(0.0005, 0.002)), skew=3.0)
    assert net.run_until_converged(60) is not None
    net.run_until(net.now + 5.0)
    ref = min(net.nodes.values(), key=lambda n: n.address)

    def cluster_times() -> list[float]:
        return [
            net.now + n.skew + n.core.clock_sync.offset
            for n in net.nodes.values()
            if n.core is not None
        ]

    t0, before = net.now, cluster_times()
    net.crash(ref.node_id)
    assert net.run_until_converged(60) is not None
    net.run_until(net.now + 5.0)
    t1, after = net.now, cluster_times()
    assert max(after) - min(after) <= 0.002, "everybody agrees on the new reference's time"
    c0, c1 = sum(before) / len(before), sum(after) / len(after)
    assert abs((c1 - c0) - (t1 - t0)) < 0.003, "cluster time advanced like true time: no jump"
