"""YimaNode.from_config: the Yima composition root builds the whole graph once, and a port
that cannot be bound fails when_ready() without stopping the reactor."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from yimaporc.admin.dashboard import NodeSummary
from yimaporc.admin.mount import admin_endpoint
from yimaporc.cluster.listening import CannotStart, ListeningService
from yimaporc.cluster.node import ClusterNode, ConfigError, NodeConfig
from yimaporc.yima.node import YimaConfig, YimaNode
from yimaporc.yima.rtspservice import YimaStreamingService
from yimaporc.yima.service import YimaStorageService
from yimaporc.yima.store import SynchronousThreadPool

HOST = "127.0.139.1"
ADMIN = f"tcp:8080:interface={HOST}"
RTSP = f"tcp:8554:interface={HOST}"


class _UdpPort:
    def __init__(self, number: int) -> None:
        self.number = number

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", HOST, self.number)

    def write(self, data: bytes, addr: Any) -> None:
        pass

    def setBroadcastAllowed(self, enabled: bool) -> None:
        pass

    def stopListening(self) -> Deferred[None]:
        return succeed(None)


class _Reactor(MemoryReactorClock):
    """A memory reactor with fake UDP ports, a synchronous callFromThread, one busy TCP port."""

    def __init__(self, busy: int = 0) -> None:
        super().__init__()
        self.busy = busy
        self.udp: list[_UdpPort] = []
        self.stopped = False

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port == self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)

    def listenUDP(self, port: int, protocol: Any, interface: str = "", **kw: Any) -> _UdpPort:
        udp = _UdpPort(port or 40000 + len(self.udp))
        protocol.transport = udp
        self.udp.append(udp)
        return udp

    def callFromThread(self, f: Callable[..., object], *args: Any, **kw: Any) -> None:
        f(*args, **kw)

    def stop(self) -> None:
        self.stopped = True


def _config(tmp_path: Path, **kw: Any) -> YimaConfig:
    node = NodeConfig("y1", "yima", tmp_path / "data", HOST, 7946)
    return YimaConfig(node, b"s" * 32, disks=[(tmp_path / "d0", None)], **kw)


def _outcome(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_from_config_builds_every_part_once_and_wires_it(tmp_path: Path) -> None:
    """from_config makes the node the parent of first, admin, storage, streaming (after its lag monitor), in that order."""
    reactor = _Reactor()
    first = Service()
    yima = YimaNode.from_config(
        reactor, _config(tmp_path, admin=ADMIN, rtsp=RTSP), rng=random.Random(1), first=[first]
    )
    assert yima.service is yima.node
    assert list(yima.node)[1:] == [first, yima.admin, yima.storage, yima.streaming]
    assert isinstance(yima.admin, ListeningService)
    assert yima.admin.label == f"--admin {ADMIN}"
    assert isinstance(yima.storage, YimaStorageService)
    assert isinstance(yima.streaming, YimaStreamingService)
    assert yima.streaming.storage is yima.storage and yima.streaming.node is yima.node
    assert yima.storage.node is yima.node
    # The admin face: the dashboard's summary RPC and its route, on the node itself.
    assert yima.node.registry.lookup(NodeSummary.commandName) is not None
    assert [r.path for r in yima.node.routes].count("/api/cluster") == 1


def test_without_admin_the_node_still_answers_the_dashboard(tmp_path: Path) -> None:
    """No --admin: no admin child, but members' dashboards still get this node's summary."""
    yima = YimaNode.from_config(_Reactor(), _config(tmp_path), rng=random.Random(1))
    assert yima.admin is None
    assert list(yima.node)[1:] == [yima.storage, yima.streaming]
    assert yima.node.registry.lookup(NodeSummary.commandName) is not None


def test_bad_configuration_fails_before_anything_is_built(tmp_path: Path) -> None:
    """A bad --mode or an unparsable --admin endpoint is a ConfigError at build time."""
    with pytest.raises(ConfigError, match="--mode"):
        _config(tmp_path, mode="round-robin")
    with pytest.raises(ConfigError, match="--admin"):
        YimaNode.from_config(_Reactor(), _config(tmp_path, admin="nonsense:1"))
    assert not (tmp_path / "data").exists()


def _started(tmp_path: Path, reactor: _Reactor) -> YimaNode:
    node = ClusterNode(
        reactor, NodeConfig("y1", "yima", tmp_path / "data", HOST, 7946), b"s" * 32,
        rng=random.Random(1), threadpool=SynchronousThreadPool(),
    )  # fmt: skip
    storage = YimaStorageService(node, reactor, SynchronousThreadPool(), [(tmp_path / "d0", None)])
    streaming = YimaStreamingService(
        node, reactor, storage, rtsp_endpoint=RTSP, rng=random.Random(2)
    )
    yima = YimaNode(
        node, storage, streaming, admin=admin_endpoint(reactor, ADMIN), admin_label="--admin x"
    )
    yima.service.startService()
    return yima


def test_every_port_listening_fires_when_ready(tmp_path: Path) -> None:
    """With free ports, when_ready() fires once admin and RTSP listen on their endpoints."""
    reactor = _Reactor()
    yima = _started(tmp_path, reactor)
    assert _outcome(yima.when_ready()) == [None]
    assert sorted(port for port, *_ in reactor.tcpServers) == [7946, 8080, 8554]
    stopped = _outcome(yima.service.stopService())
    assert len(stopped) == 1 and not isinstance(stopped[0], Failure), stopped
    assert yima.admin is not None and yima.admin.port is None
    assert not reactor.stopped


@pytest.mark.parametrize(("busy", "named"), [(8080, "--admin x"), (8554, "--rtsp tcp:8554")])
def test_a_busy_port_fails_when_ready_and_leaves_the_reactor_alone(
    tmp_path: Path, busy: int, named: str
) -> None:
    """A port in use errbacks when_ready() with CannotStart naming its option; nothing stops."""
    reactor = _Reactor(busy=busy)
    yima = _started(tmp_path, reactor)
    got = _outcome(yima.when_ready())
    assert len(got) == 1 and got[0].check(CannotStart), got
    assert named in got[0].getErrorMessage()
    assert not reactor.stopped
    yima.service.stopService()
