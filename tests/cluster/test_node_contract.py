"""IClusterNode: the same contract tests against the real ClusterNode and the shipped
MemoryClusterNode fake, plus what the fake adds (in-process RPC and views)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from yimaporc.cluster.interfaces import IClusterNode, IRpcCaller
from yimaporc.cluster.membership import IMembershipListener, Membership, View
from yimaporc.cluster.node import ClusterNode, NodeConfig
from yimaporc.cluster.routes import Route
from yimaporc.cluster.rpc import PeerUnavailable
from yimaporc.cluster.timesync import TimeSample
from yimaporc.cluster.wire import Member
from yimaporc.testing.cluster import MemoryClusterNode, MemoryNetwork


def _real(tmp_path: Path, clock: Any) -> Any:
    config = NodeConfig("n1", "yima", tmp_path / "n1", "127.0.139.1", 7946)
    return ClusterNode(clock, config, b"s" * 32, rng=random.Random(1))


def _fake(tmp_path: Path, clock: Any) -> Any:
    return MemoryClusterNode("n1", clock, data_dir=tmp_path / "n1")


@pytest.fixture(params=[_real, _fake], ids=["ClusterNode", "MemoryClusterNode"])
def made(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    clock = MemoryReactorClock()
    yield request.param(tmp_path, clock), clock


def _outcome(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_provides_the_interfaces(made: tuple[Any, Any]) -> None:
    """verifyObject: the node provides IClusterNode, its rpc IRpcCaller."""
    node, _ = made
    assert verifyObject(IClusterNode, node)
    assert verifyObject(IRpcCaller, node.rpc)
    assert node.node_id == "n1" and node.config.node_id == "n1"


def test_status_has_the_common_fields_and_every_provider(made: tuple[Any, Any]) -> None:
    """status() carries node_id, kind, epoch, members, and each add_status provider's fields."""
    node, _ = made
    node.add_status(lambda: {"a": 1})
    node.add_status(lambda: {"b": [2]})
    doc = node.status()
    assert (doc["node_id"], doc["kind"]) == ("n1", "yima")
    assert isinstance(doc["epoch"], int) and isinstance(doc["members"], list)
    assert (doc["a"], doc["b"]) == (1, [2])


def test_routes_are_mounted_in_order(made: tuple[Any, Any]) -> None:
    """add_route appends to routes (after any the node mounts itself)."""
    node, _ = made
    before = list(node.routes)
    mine = [Route("GET", "/api/x", lambda b, q: {}), Route("POST", "/api/y", lambda b, q: {})]
    for route in mine:
        node.add_route(route)
    assert node.routes == before + mine


def test_cluster_time_follows_the_injected_clock(made: tuple[Any, Any]) -> None:
    """cluster_time() moves exactly as the clock does (no wall clock read)."""
    node, clock = made
    t0 = node.cluster_time()
    clock.advance(12.5)
    assert node.cluster_time() - t0 == pytest.approx(12.5)


def test_synced_cluster_time_is_none_until_synced(made: tuple[Any, Any]) -> None:
    """A node not (yet) synced to the cluster's time reference has no synced time."""
    node, _ = made
    assert node.synced_cluster_time() is None


def test_real_node_synced_time_follows_its_clock_sync(tmp_path: Path) -> None:
    """ClusterNode: synced alone (it is the reference), unsynced after a lower-address
    reference appears, synced again with that reference's offset once sampled."""
    clock = MemoryReactorClock()
    clock.advance(100)
    node = _real(tmp_path, clock)
    me = Member("n1", "127.0.139.1:7946", 1)
    node.core = Membership(me, rng=random.Random(1))
    assert node.synced_cluster_time() == 100
    ref = Member("n0", "127.0.139.0:7946", 1)
    node.core.clock_sync.set_members((ref, me), 100.0)
    assert node.synced_cluster_time() is None
    node.core.clock_sync.samples.append(TimeSample(2.5, 0.01))
    node.core.clock_sync.offset = 2.5
    assert node.synced_cluster_time() == pytest.approx(102.5) == node.cluster_time()


def test_fake_node_synced_time_is_the_clock_while_synced(tmp_path: Path) -> None:
    """MemoryClusterNode: synced_cluster_time() is the clock's time while ``synced``."""
    clock = Clock()
    clock.advance(7)
    node = MemoryClusterNode("n1", clock, data_dir=tmp_path / "n1")
    node.synced = True
    assert node.synced_cluster_time() == 7
    node.synced = False
    assert node.synced_cluster_time() is None


def test_ready_without_ports(made: tuple[Any, Any]) -> None:
    """With no child binding a port, when_ready() fires at once."""
    node, _ = made
    assert _outcome(node.when_ready()) == [None]


class Shout(amp.Command):
    arguments = [(b"word", amp.Unicode()), (b"times", amp.Integer())]
    response = [(b"said", amp.Unicode())]


@implementer(IMembershipListener)
class _Listener:
    def __init__(self) -> None:
        self.views: list[tuple[View, View]] = []

    def membership_changed(self, old: View, new: View) -> None:
        self.views.append((old, new))


def _pair(tmp_path: Path) -> tuple[MemoryNetwork, MemoryClusterNode, MemoryClusterNode]:
    net = MemoryNetwork()
    clock = Clock()
    a = MemoryClusterNode("a", clock, data_dir=tmp_path / "a", network=net)
    b = MemoryClusterNode("b", clock, data_dir=tmp_path / "b", network=net)
    return net, a, b


def test_fake_rpc_reaches_the_peer_through_amp_encoding(tmp_path: Path) -> None:
    """a.rpc.call reaches b's registered handler with AMP-decoded arguments and answer."""
    _, a, b = _pair(tmp_path)
    b.registry.register(Shout, lambda word, times: {"said": word.upper() * times})
    got = _outcome(a.rpc.call(b.config.cluster_address, Shout, word="hi", times=2))
    assert got == [{"said": "HIHI"}]
    bad = _outcome(a.rpc.call(b.config.cluster_address, Shout, word="hi", times="x"))
    assert isinstance(bad[0], Failure)  # what AMP would refuse to encode fails here too


def test_fake_rpc_to_a_down_or_unknown_node_is_peer_unavailable(tmp_path: Path) -> None:
    """Calls to an unknown address, a node marked down or a command not registered fail."""
    net, a, b = _pair(tmp_path)
    for address in ("127.0.139.9:1", b.config.cluster_address):
        got = _outcome(a.rpc.call(address, Shout, word="x", times=1))
        assert isinstance(got[0], Failure) and got[0].check(PeerUnavailable)
    b.registry.register(Shout, lambda word, times: {"said": word})
    net.down.add(b.config.cluster_address)
    got = _outcome(a.rpc.call(b.config.cluster_address, Shout, word="x", times=1))
    assert got[0].check(PeerUnavailable)


def test_fake_views_reach_every_listener(tmp_path: Path) -> None:
    """set_members commits one view (epoch, members, coordinator) on each member named."""
    net, a, b = _pair(tmp_path)
    heard = _Listener()
    b.subscribe(heard)
    view = net.set_members(["a", "b"])
    assert view.node_ids == ("a", "b") and view.coordinator == "a" and view.epoch == 1
    assert a.view == b.view == view
    assert heard.views == [(View(0, (), ""), view)]
    assert b.status()["members"] == [
        {"node_id": "a", "address": a.config.cluster_address},
        {"node_id": "b", "address": b.config.cluster_address},
    ]
