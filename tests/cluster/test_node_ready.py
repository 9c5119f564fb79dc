"""A node reports a port it cannot bind through when_ready(); only the tap stops the reactor."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from yimaporc.admin.mount import admin_endpoint, mount_admin
from yimaporc.cluster.node import CannotStart, ClusterNode, IReady, NodeConfig
from yimaporc.tap.common import StopIfCannotStart
from yimaporc.testing.pools import ImmediatePool
from yimaporc.testing.pytest_plugin import LoggedFailures


class BusyPortReactor(MemoryReactorClock):
    """A memory reactor on which one TCP port is taken by someone else."""

    def __init__(self, busy: int) -> None:
        super().__init__()
        self.busy = busy
        self.stopped = False

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port == self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> Any:
        protocol.transport = _UdpPort()
        return protocol.transport

    def stop(self) -> None:
        self.stopped = True


class _UdpPort:
    """Enough of a UDP port for the membership protocol (it only writes)."""

    def write(self, data: bytes, addr: Any) -> None:
        pass

    def stopListening(self) -> Deferred[None]:
        return succeed(None)


def _node(tmp_path: Path, reactor: BusyPortReactor, admin: str | None) -> ClusterNode:
    cfg = NodeConfig("n1", "yima", tmp_path, "127.0.0.1", 7946)
    node = ClusterNode(reactor, cfg, b"s" * 32, rng=random.Random(1), threadpool=ImmediatePool())
    endpoint = admin_endpoint(reactor, admin) if admin else None
    mount_admin(node, endpoint, label=f"--admin {admin}")
    return node


def _result(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_when_ready_fires_once_the_admin_port_listens(tmp_path: Path) -> None:
    """With every port free, when_ready() succeeds and the reactor keeps running."""
    reactor = BusyPortReactor(busy=1)
    node = _node(tmp_path, reactor, "tcp:8080:interface=127.0.0.1")
    node.startService()
    got = _result(node.when_ready())
    assert got == [None]
    assert not reactor.stopped
    node.stopService()


def test_a_busy_admin_port_fails_when_ready_and_does_not_stop_the_reactor(tmp_path: Path) -> None:
    """An admin port in use errbacks when_ready() with CannotStart naming it; the node leaves the reactor alone."""
    reactor = BusyPortReactor(busy=8080)
    node = _node(tmp_path, reactor, "tcp:8080:interface=127.0.0.1")
    node.startService()
    got = _result(node.when_ready())
    assert len(got) == 1 and got[0].check(CannotStart)
    assert "--admin tcp:8080" in got[0].getErrorMessage()
    assert not reactor.stopped
    # Asked again, the answer is the same.
    again = _result(node.when_ready())
    assert again[0].check(CannotStart)
    node.stopService()


@implementer(IReady)
class _Child(Service):
    def __init__(self, ready: Deferred[None]) -> None:
        self.ready = ready

    def when_ready(self) -> Deferred[None]:
        return self.ready


def test_a_child_that_cannot_listen_fails_the_node(tmp_path: Path) -> None:
    """when_ready() waits for every IReady child and fails with the first child's error."""
    reactor = BusyPortReactor(busy=1)
    node = _node(tmp_path, reactor, None)
    _Child(succeed(None)).setServiceParent(node)
    _Child(fail(CannotStart("cannot listen on --rtsp tcp:554: denied"))).setServiceParent(node)
    node.startService()
    got = _result(node.when_ready())
    assert got[0].check(CannotStart)
    assert "--rtsp" in got[0].getErrorMessage()
    node.stopService()


def test_the_tap_stops_the_reactor_when_the_node_cannot_start(
    tmp_path: Path, logged_failures: LoggedFailures
) -> None:
    """The twistd plugin's StopIfCannotStart turns the failure into a reactor stop; success leaves it running."""
    busy = BusyPortReactor(busy=8080)
    node = _node(tmp_path, busy, "tcp:8080:interface=127.0.0.1")
    StopIfCannotStart(node, busy).setServiceParent(node)
    node.startService()
    # twistd may still be starting the reactor: the stop waits until it runs.
    assert [hook for hook, _, _ in busy.whenRunningHooks] == [busy.stop]
    node.stopService()

    free = BusyPortReactor(busy=1)
    node = _node(tmp_path, free, "tcp:8080:interface=127.0.0.1")
    StopIfCannotStart(node, free).setServiceParent(node)
    node.startService()
    assert free.whenRunningHooks == []
    node.stopService()
    assert len(logged_failures.take()) == 1  # "node n1 cannot start: ...", at critical level
