"""One simulated host's reactor: timers, UDP ports and TCP links on the kernel.

:class:`SimReactor` provides ``IReactorTime``, ``IReactorUDP`` and ``IReactorTCP``
over a :class:`~yimaporc.sim.kernel.SimKernel`, so a shell written against the
real reactor (``callLater``, ``listenUDP``, ``listenTCP``, ``connectTCP``, and
endpoints built on them such as ``TCP4ClientEndpoint``) runs on it as shipped.
Exceptions raised by a timer or a protocol are logged with ``log.failure``, as a
real reactor does (the test suite's plugin then fails the test).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IConnector,
    IDelayedCall,
    IListeningPort,
    IReactorFromThreads,
    IReactorSSL,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
    ITCPTransport,
    IUDPTransport,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from .kernel import SimHost

#: Event kinds (as in :mod:`.kernel`, repeated to keep the import one-way).
_TIMER = 0
_IO = 1


@implementer(IReactorTime, IReactorUDP, IReactorTCP, IReactorSSL, IReactorFromThreads)
class SimReactor:
    """The reactor of one boot of one :class:`SimHost`; dead once the host crashes."""

    log = Logger()

    def __init__(self, host: SimHost) -> None:
        self.host = host
        self.kernel = host.kernel
        self.generation = host.generation
        self.alive = True
        self._calls: dict[DelayedCall, None] = {}
        self._udp: dict[int, SimUDPPort] = {}
        self._tcp: dict[int, SimTCPPort] = {}
        self._ends: dict[SimStreamTransport, None] = {}
        self._ports = itertools.count(40000)
        self._pool: SimThreadPool | None = None

    # --- IReactorTime ----------------------------------------------------------------

    def seconds(self) -> float:
        """The host's local clock (true time plus its skew)."""
        return self.kernel.now + self.host.skew

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> IDelayedCall:
        """Run ``callable`` after ``delay`` seconds of this host's clock."""
        dc = DelayedCall(
            self.seconds() + delay,
            callable,
            args,
            kw,
            self._cancelled,
            self._schedule,
            self.seconds,
        )
        self._calls[dc] = None
        self._schedule(dc)
        return dc

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        """The pending calls, soonest first."""
        return sorted(self._calls, key=lambda dc: dc.getTime())

    def callWhenRunning(self, callable: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """The simulated reactor is always running: call soon."""
        self.callLater(0, callable, *args, **kw)

    # --- threads (IReactorFromThreads, IReactorThreads) ------------------------------------

    def callFromThread(self, callable: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """Simulated threads run on the reactor: call soon."""
        self.callLater(0, callable, *args, **kw)

    def getThreadPool(self) -> SimThreadPool:
        """This host's simulated thread pool (``deferToThreadPool`` works with it)."""
        if self._pool is None:
            self._pool = SimThreadPool(self)
        return self._pool

    def callInThread(self, callable: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """Run ``callable`` on the simulated thread pool."""
        self.getThreadPool().callInThread(callable, *args, **kw)

    def _schedule(self, dc: DelayedCall) -> None:
        due = dc.time
        true = max(self.kernel.now, due - self.host.skew)
        self.kernel.at(
            true,
            lambda: self._fire(dc, due),
            host=self.host,
            kind=_TIMER,
            generation=self.generation,
        )

    def _cancelled(self, dc: DelayedCall) -> None:
        self._calls.pop(dc, None)

    def _fire(self, dc: DelayedCall, due: float) -> None:
        if dc.cancelled or dc.called or dc.time != due:
            return  # cancelled, or reset to another time (another event carries it)
        if dc.delayed_time:
            dc.activate_delay()
            self._schedule(dc)
            return
        dc.called = 1
        self._calls.pop(dc, None)
        func = dc.func
        self.kernel.record(self.host, "timer " + getattr(func, "__qualname__", type(func).__name__))
        try:
            func(*dc.args, **dc.kw)
        except Exception:
            self.log.failure("simulated timer {f!r} on {host} failed", f=func, host=self.host.name)

    # --- IReactorUDP -----------------------------------------------------------------

    def listenUDP(
        self,
        port: int,
        protocol: Any,
        interface: str = "",
        maxPacketSize: int = 8192,
    ) -> SimUDPPort:
        """Bind a datagram port on this host (``port`` 0 picks one)."""
        self._check_interface(interface, port)
        port = port or self._free_port(self._udp)
        if port in self._udp:
            raise error.CannotListenError(interface, port, OSError("address in use"))
        udp = SimUDPPort(self, port, protocol)
        self._udp[port] = udp
        protocol.makeConnection(udp)
        return udp

    def deliver_datagram(self, port: int, data: bytes, source: tuple[str, int]) -> bool:
        """A datagram arrived for ``port``; False when nothing listens there."""
        udp = self._udp.get(port)
        if udp is None:
            return False
        self.kernel.record(self.host, f"udp< {port}", data)
        try:
            udp.protocol.datagramReceived(data, source)
        except Exception:
            self.log.failure("simulated datagram handler on {host} failed", host=self.host.name)
        return True

    # --- IReactorTCP -----------------------------------------------------------------

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> SimTCPPort:
        """Listen for stream connections on this host (``port`` 0 picks one)."""
        self._check_interface(interface, port)
        port = port or self._free_port(self._tcp)
        if port in self._tcp:
            raise error.CannotListenError(interface, port, OSError("address in use"))
        tcp = SimTCPPort(self, port, factory)
        self._tcp[port] = tcp
        factory.doStart()
        return tcp

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: Any,
        timeout: float = 30,
        bindAddress: tuple[str, int] | None = None,
    ) -> SimConnector:
        """Open a stream link to ``host:port`` through the kernel's network."""
        connector = SimConnector(self, host, port, factory, timeout)
        connector.connect()
        return connector

    # --- IReactorSSL: TLS in memory over a stream link ------------------------------------

    def listenSSL(
        self,
        port: int,
        factory: Any,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> SimTCPPort:
        """Listen for TLS connections: the real TLS protocol (``TLSMemoryBIOFactory``) over
        a simulated stream port, as Twisted's own reactors do."""
        wrapped = TLSMemoryBIOFactory(contextFactory, False, factory, clock=self)
        return self.listenTCP(port, wrapped, backlog, interface)

    def connectSSL(
        self,
        host: str,
        port: int,
        factory: Any,
        contextFactory: Any,
        timeout: float = 30,
        bindAddress: tuple[str, int] | None = None,
    ) -> SimConnector:
        """Open a TLS connection over a simulated stream link."""
        wrapped = TLSMemoryBIOFactory(contextFactory, True, factory, clock=self)
        return self.connectTCP(host, port, wrapped, timeout, bindAddress)

    # --- helpers ---------------------------------------------------------------------

    def _check_interface(self, interface: str, port: int) -> None:
        if interface not in ("", "0.0.0.0", self.host.ip):
            raise error.CannotListenError(
                interface, port, OSError(f"{interface} is not an address of {self.host.name}")
            )

    def _free_port(self, taken: dict[int, Any]) -> int:
        while True:
            port = next(self._ports)
            if port not in taken:
                return port

    def at(self, delay: float, fn: Callable[[], None], *, host: SimHost | None = None) -> None:
        """Run ``fn`` as I/O arriving at ``host`` ``delay`` s from now.  For this host it
        is dropped if the process died by then; another host gets it whatever its boot."""
        target = host or self.host
        generation = self.generation if host is None else None
        self.kernel.at(self.kernel.now + delay, fn, host=target, kind=_IO, generation=generation)

    def die(self) -> None:
        """The process was killed: nothing of it runs again; peers see resets."""
        self.alive = False
        self._calls.clear()
        self._udp.clear()
        self._tcp.clear()
        ends, self._ends = list(self._ends), {}
        for end in ends:
            end.vanish()


class SimThreadPool:
    """A thread pool whose jobs run on the simulated host, each after a seeded disk latency
    (``Faults.disk_latency``), so jobs submitted together may finish in any order, as
    concurrent threads do.  A job runs whole at its finishing instant; if the host
    crashes first it never ran (a write the crash interrupted did not happen)."""

    def __init__(self, reactor: SimReactor) -> None:
        self.reactor = reactor
        self.started = True
        self.jobs = 0

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], None] | None,
        func: Callable[..., Any],
        *args: Any,
        **kw: Any,
    ) -> None:
        """Run ``func`` later on the host; then ``onResult(success, result)``."""
        kernel = self.reactor.kernel

        def job() -> None:
            self.jobs += 1
            kernel.record(self.reactor.host, "job " + getattr(func, "__qualname__", "?"))
            try:
                result = func(*args, **kw)
            except BaseException as e:
                ok, value = False, Failure(e)
            else:
                ok, value = True, result
            if onResult is not None:
                onResult(ok, value)
            elif not ok:
                self.reactor.log.failure("simulated thread job failed", failure=value)

        self.reactor.at(kernel.rng.uniform(*kernel.faults.disk_latency), job)

    def callInThread(self, func: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """Run ``func`` later on the host."""
        self.callInThreadWithCallback(None, func, *args, **kw)

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""


@implementer(IUDPTransport, IListeningPort)
class SimUDPPort:
    """A bound datagram port; ``write`` hands datagrams to the kernel."""

    def __init__(self, reactor: SimReactor, port: int, protocol: Any) -> None:
        self.reactor = reactor
        self.port = port
        self.protocol = protocol
        self.open = True

    def write(self, packet: bytes, addr: tuple[str, int] | None = None) -> None:
        """Send one datagram to ``addr``."""
        if addr is None:
            raise ValueError("a simulated UDP port needs an address")
        if self.open and self.reactor.alive:
            self.reactor.kernel.send_datagram(self.reactor.host, self.port, packet, addr)

    def getHost(self) -> IPv4Address:
        """This port's address."""
        return IPv4Address("UDP", self.reactor.host.ip, self.port)

    def stopListening(self) -> Deferred[None]:
        """Unbind and stop the protocol."""
        if self.open:
            self.open = False
            self.reactor._udp.pop(self.port, None)
            self.protocol.doStop()
        return succeed(None)

    def startListening(self) -> None:
        """Bound at creation."""

    def connect(self, host: str, port: int) -> None:
        """Connected UDP is not simulated."""
        raise NotImplementedError("connected UDP is not simulated")

    def getBroadcastAllowed(self) -> bool:
        return False

    def setBroadcastAllowed(self, enabled: bool) -> None:
        """Broadcast is not simulated."""

    def loseConnection(self) -> None:
        """Same as :meth:`stopListening`."""
        self.stopListening()


@implementer(IListeningPort)
class SimTCPPort:
    """A listening stream port: the kernel builds server protocols from its factory."""

    def __init__(self, reactor: SimReactor, port: int, factory: Any) -> None:
        self.reactor = reactor
        self.port = port
        self.factory = factory
        self.open = True

    def getHost(self) -> IPv4Address:
        """This port's address."""
        return IPv4Address("TCP", self.reactor.host.ip, self.port)

    def startListening(self) -> None:
        """Bound at creation."""

    def stopListening(self) -> Deferred[None]:
        """Stop accepting (open connections stay)."""
        if self.open:
            self.open = False
            self.reactor._tcp.pop(self.port, None)
            self.factory.doStop()
        return succeed(None)


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
            # nothing the server writes may overtake the SYN-ACK
            server_end.last_arrival = kernel.now + synack
            server_end.attach(proto)

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
        self.protocol: Any = None
        self.connected = False
        #: When the last byte written here reaches the peer (keeps the link FIFO).
        self.last_arrival = 0.0
        self.producer: Any = None

    def attach(self, protocol: Any) -> None:
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
        try:
            self.protocol.dataReceived(data)
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

    def registerProducer(self, producer: Any, streaming: bool) -> None:
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
        try:
            self.protocol.connectionLost(failure)
        except Exception:
            self.reactor.log.failure("simulated connectionLost failed")
        if self.connector is not None:
            self.connector.lost(failure)
