"""The membership scenario runs the shipped ClusterNode shell on the kernel and replays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import ISSLTransport

from yimaporc.cluster.rpc import Echo, PeerUnavailable
from yimaporc.cluster.udp import MembershipProtocol
from yimaporc.sim.cluster import ClusterSim, make_cluster
from yimaporc.sim.kernel import Faults
from yimaporc.testing.certs import make_cert


def eventful(seed: int) -> tuple[str, list[Any]]:
    """A 6-node run with loss, duplication, reordering, skew, a partition, a bridge, a
    pause and a crash/restart; its trace digest and every node's committed epochs."""
    faults = Faults(latency=(0.0002, 0.004), loss=0.02, duplicate=0.02, reorder=0.05)
    with make_cluster(6, seed, faults=faults, skew=2.0) as sim:
        sim.run_until_converged(30.0)
        sim.partition(["n0", "n1", "n2"], ["n3", "n4", "n5"])
        sim.run_until(sim.now + 8.0)
        sim.heal()
        sim.cut("n0", "n5")
        sim.pause("n2", 2.0)
        sim.run_until(sim.now + 8.0)
        sim.crash("n4")
        sim.run_until(sim.now + 1.0)
        sim.start("n4")
        sim.run_until(sim.now + 10.0)
        epochs = [[v.epoch for _, v in m.views] for m in sim.nodes.values()]
        return sim.kernel.trace_digest(), epochs


def test_same_seed_same_trace_other_seed_differs() -> None:
    """Running a faulty scenario twice from one seed gives the same trace and views."""
    first = eventful(11)
    assert eventful(11) == first
    assert eventful(12)[0] != first[0]


def test_a_seed_replays_in_another_process() -> None:
    """The same seed in a fresh interpreter (other string hash seed) gives the same trace."""
    here = eventful(5)
    code = (
        "import json, sys; sys.path[:0] = [sys.argv[1]];"
        f"from tests.sim.{Path(__file__).stem} import eventful;"
        "print(json.dumps(eventful(5)))"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, root], env=env, capture_output=True, check=True, timeout=120
    )
    digest, epochs = json.loads(out.stdout)
    assert (digest, epochs) == (here[0], here[1])


def test_nodes_are_the_shipped_shell_and_restart_from_their_disk() -> None:
    """Each node is a ClusterNode with its MembershipProtocol; after a crash it restarts from
    membership.json on its host disk with a higher incarnation and its epoch kept."""
    with make_cluster(3, 1, faults=Faults(latency=(0.0002, 0.002))) as sim:
        assert sim.run_until_converged(30.0) is not None
        n1 = sim.nodes["n1"]
        assert n1.node is not None and isinstance(n1.node.protocol, MembershipProtocol)
        assert n1.node.protocol.stats["accepted"] > 0
        incarnation, epoch = n1.node.state.incarnation, n1.view.epoch
        saved = json.loads((n1.host.disk / "membership.json").read_text())
        assert saved["epoch"] == epoch
        sim.crash("n1")
        assert sim.run_until_converged(10.0) is not None
        sim.start("n1")
        assert n1.node is not None and n1.node.state.incarnation > incarnation
        assert sim.run_until_converged(10.0) is not None
        assert n1.view.epoch > epoch and len(n1.view.members) == 3
        assert not sim.epoch_went_back


def rpc(sim: ClusterSim, src: str, dst: str) -> Any:
    node = sim.nodes[src].node
    assert node is not None
    out: list[Any] = []
    node.rpc.call(sim.nodes[dst].address, Echo, payload=b"x" * 1000).addBoth(out.append)
    sim.run_until(sim.now + 12.0, stop=lambda: bool(out))
    assert out, "the call never finished"
    return out[0]


def test_rpc_between_nodes_runs_over_stream_links() -> None:
    """The nodes' authenticated AMP RPC works across the kernel's stream links; across a
    partition the call fails with PeerUnavailable."""
    with make_cluster(2, 3, faults=Faults(latency=(0.0002, 0.002))) as sim:
        assert sim.run_until_converged(30.0) is not None
        assert rpc(sim, "n0", "n1") == {"payload": b"x" * 1000}
        assert sim.kernel.stream_bytes > 1000
        sim.partition(["n0"], ["n1"])
        failed = rpc(sim, "n1", "n0")
        assert failed.check(PeerUnavailable)
        assert sim.run_until_converged(10.0) is not None
        assert sim.nodes["n0"].view.node_ids == ("n0",)


def test_rpc_over_tls_on_the_kernel(tmp_path: Any) -> None:
    """With --tls-cert/--tls-key the nodes' RPC runs real TLS (mutual certificates) over
    the kernel's stream links, as listenSSL/connectSSL do on a real reactor."""
    tls = make_cert(tmp_path)
    with make_cluster(2, 4, faults=Faults(latency=(0.0002, 0.002)), tls=tls) as sim:
        assert sim.run_until_converged(30.0) is not None
        assert rpc(sim, "n1", "n0") == {"payload": b"x" * 1000}
        node = sim.nodes["n1"].node
        assert node is not None
        proto = node.rpc._ready[sim.nodes["n0"].address]
        assert ISSLTransport.providedBy(proto.transport)


def test_a_node_stopped_cleanly_is_left_out() -> None:
    """stopService runs on the kernel (ports closed, RPC closed, nothing logged as a
    failure); the survivors then commit a view without the node."""
    with make_cluster(3, 2, faults=Faults(latency=(0.0002, 0.002))) as sim:
        assert sim.run_until_converged(30.0) is not None
        assert rpc(sim, "n1", "n2") == {"payload": b"x" * 1000}
        done: list[object] = []
        sim.stop("n2").addBoth(done.append)
        sim.run_until(sim.now + 0.1)
        assert done == [None] and not sim.nodes["n2"].up
        assert sim.run_until_converged(10.0) is not None
        assert sim.nodes["n0"].view.node_ids == ("n0", "n1")
