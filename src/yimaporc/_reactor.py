"""The reactor types the shells take (typing only: nothing checks them at run time).

A shell takes the narrowest of these that covers what it calls:

- :class:`~twisted.internet.interfaces.IReactorTime` (Twisted's) when it only reads the
  clock and sets timers;
- :class:`IClockThreads` when it also hands blocking work to a thread pool
  (``deferToThreadPool`` needs ``callFromThread``);
- :class:`INodeReactor` for a node's whole graph: timers, threads, TCP (and TLS), UDP.

Twisted types its global reactor with a make-believe combination of interfaces
(``twisted.internet._IReactorCommon``) in the same way.  The real reactor provides all of
these; the simulated one (:class:`yimaporc.sim.reactor.SimReactor`) declares
:class:`INodeReactor`; a composition root (``tap``, the CLI) casts the global reactor
once (:func:`node_reactor`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet.interfaces import (
    IProtocolFactory,
    IReactorFromThreads,
    IReactorSSL,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUDP,
)
from twisted.internet.protocol import DatagramProtocol
from zope.interface import Interface


class IClockThreads(IReactorTime, IReactorFromThreads):
    """Timers, and results handed back from pool threads (``deferToThreadPool``)."""


class ICallWhenRunning(Interface):
    """``callWhenRunning``, the one ``IReactorCore`` method the shells use."""

    def callWhenRunning(callable: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Call ``callable`` once the reactor runs (now, if it does)."""


class INodeReactor(
    IClockThreads, IReactorThreads, IReactorTCP, IReactorSSL, IReactorUDP, ICallWhenRunning
):
    """What a node's shells use of a reactor: timers, thread pool, TCP/TLS and UDP.

    The listening methods are restated with the defaults every reactor has (Twisted's
    interfaces declare none) and any factory (an ``IProtocolFactory``)."""

    def listenTCP(
        port: int, factory: IProtocolFactory, backlog: int = 50, interface: str = ""
    ) -> Any:
        """Listen for TCP connections (the port: ``getHost().port`` is the one bound)."""

    def listenSSL(
        port: int,
        factory: IProtocolFactory,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> Any:
        """Listen for TLS connections."""

    def listenUDP(
        port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> Any:
        """Bind a UDP port (``getHost().port`` is the one bound)."""


def node_reactor(reactor: object) -> INodeReactor:
    """The global reactor (or any full reactor) as an :class:`INodeReactor`."""
    return cast(INodeReactor, reactor)


__all__ = ["ICallWhenRunning", "IClockThreads", "INodeReactor", "IReactorTime", "node_reactor"]
