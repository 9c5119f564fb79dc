"""Stream (TCP) links between simulated hosts: connectors and the two ends of a link.

:meth:`SimReactor.connectTCP <yimaporc.sim.reactor.SimReactor.connectTCP>` returns a
:class:`SimConnector`; an established link is a pair of :class:`SimStreamTransport`,
one per host, delivering bytes in order after the kernel's latency.  A write across a
cut link breaks the connection (both ends see ``ConnectionLost``); a host crash resets
its peers' ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IConnector,
    IProtocol,
    IPullProducer,
    IPushProducer,
    ITCPTransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from .reactor import SimReactor

#: The kernel's event kind for I/O (repeated to keep the imports one-way).
_IO = 1


@implementer(IConnector)
class SimConnector:
    """One outgoing stream connection attempt (what ``connectTCP`` returns)."""

    def __init__(
        self, reactor: SimReactor, host: str, port: int, factory: Any, timeout: float
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.factory = factory
        self.timeout = timeout
        self.state = "disconnected"
        self.transport: SimStreamTransport | None = None
        self._attempt = 0

    def getDestination(self) -> IPv4Address:
        """Where this connector connects."""
        return IPv4Address("TCP", self.host, self.port)

    def connect(self) -> None:
        """Start (or restart) connecting: SYN after a latency, SYN-ACK after another."""
        reactor = self.reactor
        kernel = reactor.kernel
        self.state = "connecting"
        self._attempt += 1
        attempt = self._attempt
        self.factory.doStart()
        self.factory.startedConnecting(self)
        me = reactor.host
        local = IPv4Address("TCP", me.ip, reactor._free_port({}))
        dst = kernel.by_ip.get(self.host)
        if dst is None or not kernel.connected(me.name, dst.name):
            reactor.at(self.timeout, lambda: self._failed(attempt, error.TimeoutError()))
            return

        def syn() -> None:
            if not reactor.alive or self.state != "connecting" or self._attempt != attempt:
                return
            server = dst.reactor
            listening = server._tcp.get(self.port) if server is not None else None
            if server is None or listening is None or not kernel.connected(me.name, dst.name):
                back = kernel.latency()
                reactor.at(back, lambda: self._failed(attempt, error.ConnectionRefusedError()))
                return
            remote = IPv4Address("TCP", dst.ip, self.port)
            proto = listening.factory.buildProtocol(local)
            if proto is None:
                reactor.at(kernel.latency(), lambda: self._failed(attempt, error.ConnectionLost()))
                return
            server_end = SimStreamTransport(server, remote, local)
            client_end = SimStreamTransport(reactor, local, remote, connector=self)
            server_end.peer, client_end.peer = client_end, server_end
            synack = kernel.latency()
            # nothing the server writes may overtake the SYN-ACK: its bytes arrive no
            # earlier, and the SYN-ACK is queued first (a greeting written in
            # connectionMade, arriving the same instant, then finds the client there)
            server_end.last_arrival = kernel.now + synack

            def established() -> None:
                if self.state != "connecting" or self._attempt != attempt:
                    server_end.peer_gone(error.ConnectionLost())
                    return
                if not server_end.connected:
                    # the server's process died (or closed) before the SYN-ACK came back
                    self._failed(attempt, error.ConnectionRefusedError())
                    return
                client = self.factory.buildProtocol(remote)
                if client is None:
                    self.state = "disconnected"
                    server_end.peer_gone(error.ConnectionLost())
                    return
                self.state = "connected"
                self.transport = client_end
                client_end.attach(client)

            reactor.at(synack, established)
            server_end.attach(proto)

        reactor.at(kernel.latency(), syn, host=dst)

    def _failed(self, attempt: int, reason: Exception) -> None:
        if self.state != "connecting" or self._attempt != attempt:
            return
        self.state = "disconnected"
        self.factory.clientConnectionFailed(self, Failure(reason))
        if self.state == "disconnected":
            self.factory.doStop()

    def stopConnecting(self) -> None:
        """Abandon a connection attempt."""
        if self.state != "connecting":
            raise error.NotConnectingError()
        self.state = "disconnected"
        self._attempt += 1
        self.factory.clientConnectionFailed(self, Failure(error.UserError()))
        if self.state == "disconnected":
            self.factory.doStop()

    def disconnect(self) -> None:
        """Close the connection or stop connecting."""
        if self.state == "connecting":
            self.stopConnecting()
        elif self.state == "connected" and self.transport is not None:
            self.transport.loseConnection()

    def lost(self, reason: Failure) -> None:
        """The established connection ended."""
        self.state = "disconnected"
        self.transport = None
        self.factory.clientConnectionLost(self, reason)
        if self.state == "disconnected":
            self.factory.doStop()


@implementer(ITCPTransport)
class SimStreamTransport:
    """One end of a stream link: bytes reach the other end in order after a latency."""

    disconnecting = False

    def __init__(
        self,
        reactor: SimReactor,
        local: IPv4Address,
        remote: IPv4Address,
        *,
        connector: SimConnector | None = None,
    ) -> None:
        self.reactor = reactor
        self.kernel = reactor.kernel
        self.local = local
        self.remote = remote
        self.connector = connector
        self.peer: SimStreamTransport | None = None
        self.protocol: IProtocol | None = None
        self.connected = False
        #: When the last byte written here reaches the peer (keeps the link FIFO).
        self.last_arrival = 0.0
        self.producer: IPushProducer | IPullProducer | None = None

    def attach(self, protocol: IProtocol) -> None:
        """The connection is established at this end."""
        self.protocol = protocol
        self.connected = True
        self.reactor._ends[self] = None
        try:
            protocol.makeConnection(self)
        except Exception:
            self.reactor.log.failure("simulated connectionMade failed")

    # --- ITransport --------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send ``data`` to the other end (breaks the link if it is cut)."""
        if not data or not self.connected or self.disconnecting or not self.reactor.alive:
            return
        peer = self.peer
        assert peer is not None
        kernel = self.kernel
        if not kernel.connected(self.reactor.host.name, peer.reactor.host.name):
            self._break()
            return
        kernel.stream_bytes += len(data)
        kernel.record(
            self.reactor.host, f"tcp> {self.remote.host}:{self.remote.port}", b"%d" % len(data)
        )
        arrival = max(kernel.now + kernel.latency(), self.last_arrival)
        self.last_arrival = arrival
        self._to_peer(arrival, lambda: peer.received(data))

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """Send the pieces of ``data`` as one write."""
        self.write(b"".join(data))

    def received(self, data: bytes) -> None:
        """Bytes from the other end arrived."""
        if not self.connected:
            return
        peer = self.peer
        assert peer is not None
        if not self.kernel.connected(self.reactor.host.name, peer.reactor.host.name):
            self._break()
            return
        protocol = self.protocol
        assert protocol is not None  # data flows only once attached
        try:
            protocol.dataReceived(data)
        except Exception:
            self.reactor.log.failure("simulated dataReceived failed; closing")
            self.abortConnection()

    def loseConnection(self) -> None:
        """Close after what was written reaches the other end."""
        if not self.connected or self.disconnecting:
            return
        self.disconnecting = True
        peer = self.peer
        assert peer is not None
        when = max(self.kernel.now + self.kernel.latency(), self.last_arrival)
        self._to_peer(when, lambda: peer.lost(error.ConnectionDone()))
        self.reactor.at(0.0, lambda: self.lost(error.ConnectionDone()))

    def abortConnection(self) -> None:
        """Close now, dropping what is in flight (the peer sees a reset)."""
        if not self.connected:
            return
        self.disconnecting = True
        self._reset_peer()
        self.reactor.at(0.0, lambda: self.lost(error.ConnectionAborted()))

    def loseWriteConnection(self) -> None:
        """Half-close is not simulated: close."""
        self.loseConnection()

    def getPeer(self) -> IPv4Address:
        """The other end's address."""
        return self.remote

    def getHost(self) -> IPv4Address:
        """This end's address."""
        return self.local

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Nagle is not simulated."""

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        """Keep-alives are not simulated."""

    # --- producers (a link is never full) ------------------------------------------------

    def registerProducer(self, producer: IPushProducer | IPullProducer, streaming: bool) -> None:
        """Accept a producer; a pull producer is asked for data until it unregisters."""
        self.producer = producer
        if not streaming:
            self.reactor.at(0.0, self._pull)

    def _pull(self) -> None:
        if self.producer is not None and self.connected:
            self.producer.resumeProducing()
            self.reactor.at(0.0, self._pull)

    def unregisterProducer(self) -> None:
        """Forget the producer."""
        self.producer = None

    def pauseProducing(self) -> None:
        """Reading is never paused in the simulation."""

    def resumeProducing(self) -> None:
        """Reading is never paused in the simulation."""

    def stopProducing(self) -> None:
        """Same as :meth:`loseConnection`."""
        self.loseConnection()

    # --- ends ----------------------------------------------------------------------------

    def _to_peer(self, when: float, fn: Callable[[], None]) -> None:
        peer = self.peer
        assert peer is not None
        target = peer.reactor.host
        self.kernel.at(when, fn, host=target, kind=_IO, generation=peer.reactor.generation)

    def _break(self) -> None:
        """The link is cut: both ends see the connection lost."""
        self.disconnecting = True
        self._reset_peer()
        self.reactor.at(0.0, lambda: self.lost(error.ConnectionLost()))

    def _reset_peer(self) -> None:
        peer = self.peer
        assert peer is not None
        self._to_peer(
            self.kernel.now + self.kernel.latency(), lambda: peer.lost(error.ConnectionLost())
        )

    def peer_gone(self, reason: Exception) -> None:
        """The other end went away before or while connecting: lose this end soon."""
        self.reactor.at(self.kernel.latency(), lambda: self.lost(reason))

    def vanish(self) -> None:
        """This end's process died: no callback here, a reset for the peer."""
        if self.connected:
            self.connected = False
            self._reset_peer()

    def lost(self, reason: Exception) -> None:
        """The connection ended at this end."""
        if not self.connected:
            return
        self.connected = False
        self.disconnecting = True
        self.reactor._ends.pop(self, None)
        failure = Failure(reason)
        protocol = self.protocol
        assert protocol is not None  # connected: attached
        try:
            protocol.connectionLost(failure)
        except Exception:
            self.reactor.log.failure("simulated connectionLost failed")
        if self.connector is not None:
            self.connector.lost(failure)
