"""One simulated host's reactor: timers, UDP ports, TCP/TLS links, a thread pool.

:class:`SimReactor` provides ``IReactorTime``, ``IReactorUDP``, ``IReactorTCP``,
``IReactorSSL`` and ``IReactorFromThreads`` over a
:class:`~yimaporc.sim.kernel.SimKernel`, so a shell written against the real reactor
(``callLater``, ``listenUDP``, ``listenTCP``, ``connectTCP``, ``deferToThreadPool``, and
endpoints built on them such as ``TCP4ClientEndpoint``) runs on it as shipped.  The
stream links themselves are in :mod:`.stream`.
Exceptions raised by a timer or a protocol are logged with ``log.failure``, as a
real reactor does (the test suite's plugin then fails the test).
"""

from __future__ import annotations

import ipaddress
import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IUDPTransport,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from .._reactor import INodeReactor
from .stream import SimConnector, SimStreamTransport

if TYPE_CHECKING:
    from .kernel import SimHost

#: Event kinds (as in :mod:`.kernel`, repeated to keep the import one-way).
_TIMER = 0
_IO = 1


@implementer(INodeReactor)
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
        """Run ``callable`` after ``delay`` seconds of this host's clock.  A positive
        delay too small to change the clock's float still fires at a later instant, as
        it would on a real clock, which moves on meanwhile (a shell re-arming for a
        deadline a few ulps ahead must not spin at one instant for ever)."""
        now = self.seconds()
        when = now + delay
        if delay > 0 and when <= now:
            when = math.nextafter(now, math.inf)
        dc = DelayedCall(
            when,
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

    def getThreadPool(self) -> SimThreadPool:  # type: ignore[override]  # duck-typed pool
        """This host's simulated thread pool (``deferToThreadPool`` works with it)."""
        if self._pool is None:
            self._pool = SimThreadPool(self)
        return self._pool

    def callInThread(self, callable: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """Run ``callable`` on the simulated thread pool."""
        self.getThreadPool().callInThread(callable, *args, **kw)

    def suggestThreadPoolSize(self, size: int) -> None:
        """The simulated pool has no threads to size."""

    def _schedule(self, dc: DelayedCall) -> None:
        due = dc.time
        skew = self.host.skew
        true = max(self.kernel.now, due - skew)
        while true + skew < due:
            # rounding: at the instant it fires, the host's clock must read ``due``
            # (a LoopingCall seeing itself early reschedules at once, for ever)
            true = math.nextafter(true, math.inf)
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
        protocol: DatagramProtocol,
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
        if udp.peer is not None and tuple(source) != udp.peer:
            return True  # a connected port hears its peer only
        try:
            udp.protocol.datagramReceived(data, source)
        except Exception:
            self.log.failure("simulated datagram handler on {host} failed", host=self.host.name)
        return True

    # --- IReactorTCP -----------------------------------------------------------------

    def listenTCP(
        self, port: int, factory: IProtocolFactory, backlog: int = 50, interface: str = ""
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

    def __init__(self, reactor: SimReactor, port: int, protocol: DatagramProtocol) -> None:
        self.reactor = reactor
        self.port = port
        self.protocol = protocol
        self.open = True
        #: The peer of a connected port (``connect``): its default destination and
        #: the only source it receives from, as with a connected socket.
        self.peer: tuple[str, int] | None = None

    def write(self, packet: bytes, addr: tuple[str, int] | None = None) -> None:
        """Send one datagram to ``addr`` (a connected port: to its peer)."""
        if addr is None:
            addr = self.peer
        elif self.peer is not None and tuple(addr) != self.peer:
            raise ValueError("a connected UDP port sends only to its peer")
        if addr is None:
            raise ValueError("a simulated UDP port that is not connected needs an address")
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
        """Connect to ``host:port`` (an IP address, as Twisted requires): the default
        destination of :meth:`write`, and datagrams from anyone else are dropped."""
        if self.peer is not None:
            raise RuntimeError("already connected, reconnecting is not currently supported")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise error.InvalidAddressError(host, "not an IP address") from None
        self.peer = (host, int(port))

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

    def __init__(self, reactor: SimReactor, port: int, factory: IProtocolFactory) -> None:
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
