"""ListeningService: an endpoint as a child service that reports, never raises, a failed bind."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor

from yimaporc.cluster.listening import CannotStart, IReady, ListeningService


class _Busy(MemoryReactor):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


def _outcome(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


class _Port:
    def __init__(self) -> None:
        self.stopped = 0

    def stopListening(self) -> None:
        self.stopped += 1


class _Endpoint:
    """Listens later (when ``bind`` is called), on a port that counts stopListening calls."""

    def __init__(self) -> None:
        self.factories: list[Any] = []
        self.pending: list[Deferred[_Port]] = []

    def listen(self, factory: Any) -> Deferred[_Port]:
        self.factories.append(factory)
        self.pending.append(Deferred())
        return self.pending[-1]


def test_listens_while_running_and_closes_on_stop() -> None:
    """when_ready() waits for the bind; stopped, the port closes once."""
    reactor = MemoryReactor()
    factory = Factory.forProtocol(Protocol)
    svc = ListeningService(TCP4ServerEndpoint(reactor, 8080, interface="127.0.139.1"), factory, "x")
    assert IReady.providedBy(svc)
    svc.startService()
    assert [(p, f) for p, f, *_ in reactor.tcpServers] == [(8080, factory)]
    assert _outcome(svc.when_ready()) == [None]
    assert _outcome(svc.when_ready()) == [None]  # asked again: the same answer

    endpoint = _Endpoint()
    svc = ListeningService(endpoint, factory, "x")  # type: ignore[arg-type]
    svc.startService()
    assert endpoint.factories == [factory]
    ready = _outcome(svc.when_ready())
    assert ready == []  # not bound yet
    port = _Port()
    endpoint.pending[0].callback(port)
    assert ready == [None] and svc.port is port
    assert _outcome(svc.stopService()) == [None]
    assert svc.port is None and port.stopped == 1


def test_a_stop_during_the_listen_closes_the_port_once_bound() -> None:
    """Stopped before the endpoint has bound, the service closes the port as soon as it is."""
    endpoint = _Endpoint()
    svc = ListeningService(endpoint, Factory(), "x")  # type: ignore[arg-type]
    svc.startService()
    stopped = _outcome(svc.stopService())
    assert stopped == []
    port = _Port()
    endpoint.pending[0].callback(port)
    assert stopped == [None] and port.stopped == 1


def test_a_port_that_cannot_be_bound_fails_when_ready_with_its_label() -> None:
    """A failed listen errbacks every when_ready() with CannotStart naming the option; stop is clean."""
    svc = ListeningService(TCP4ServerEndpoint(_Busy(), 8080), Factory(), "--admin tcp:8080")
    svc.startService()
    for _ in range(2):
        got = _outcome(svc.when_ready())
        assert len(got) == 1 and got[0].check(CannotStart)
        assert got[0].getErrorMessage().startswith("cannot listen on --admin tcp:8080: ")
        assert "in use" in got[0].getErrorMessage()
    assert _outcome(svc.stopService()) == [None]


def test_a_restart_forgets_the_last_failure() -> None:
    """Stopped and started again on a free port, the service is ready (the old error is gone)."""
    reactor = MemoryReactor()
    endpoint = TCP4ServerEndpoint(reactor, 8080)
    svc = ListeningService(endpoint, Factory(), "--admin")
    svc.error = CannotStart("an earlier start failed")
    svc.startService()
    assert _outcome(svc.when_ready()) == [None]
