"""A server endpoint as a child service that reports, rather than raises, a port it
cannot bind.

:class:`ListeningService` is Twisted's ``StreamServerEndpointService`` with the
node's :class:`~yimaporc.cluster.node.IReady` face: :meth:`when_ready` fires once
the port listens and errbacks with :class:`CannotStart` (naming the option, e.g.
``--admin tcp:8080``) when it cannot.  It never stops the reactor and never logs a
traceback: whoever runs the node (the twistd plugin's ``StopIfCannotStart``, an
embedding application) decides what a failed start means.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

__all__ = ["CannotStart", "IReady", "ListeningService"]


class CannotStart(Exception):
    """A port of the node could not be bound (message is user-facing)."""


class IReady(Interface):
    """A service whose start finishes later (its ports bind asynchronously)."""

    def when_ready() -> Deferred[None]:
        """Fires once the service listens; errbacks if it cannot."""


@implementer(IReady)
class ListeningService(Service):
    """Listen on ``endpoint`` with ``factory`` while running; ``label`` names it in errors."""

    log = Logger()

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, label: str
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.label = label
        self.port: IListeningPort | None = None
        self.error: CannotStart | None = None
        self._listening: Deferred[None] = succeed(None)

    def startService(self) -> None:
        """Start listening (the port binds now or later, per the endpoint)."""
        super().startService()
        self.error = None
        d: Deferred[Any] = maybeDeferred(self.endpoint.listen, self.factory)
        self._listening = d.addCallbacks(self._bound, self._failed)

    def _bound(self, port: IListeningPort) -> None:
        self.port = port

    def _failed(self, failure: Failure) -> None:
        self.error = CannotStart(f"cannot listen on {self.label}: {failure.getErrorMessage()}")
        self.log.error("{error}", error=self.error)

    def when_ready(self) -> Deferred[None]:
        """Fires once the port listens; errbacks with :class:`CannotStart` if it cannot.

        May be called any number of times; each call gets its own Deferred.
        """
        out: Deferred[None] = Deferred()

        def relay(result: object) -> object:
            if self.error is not None:
                out.errback(self.error)
            else:
                out.callback(None)
            return result

        self._listening.addCallback(relay)
        return out

    def stopService(self) -> Deferred[Any]:
        """Stop listening (a listen still in progress is waited for first)."""
        super().stopService()

        def close(_: object) -> Deferred[Any] | None:
            port, self.port = self.port, None
            if port is None:
                return None
            stopped: Deferred[Any] = maybeDeferred(port.stopListening)
            return stopped

        listened: Deferred[None] = Deferred()

        def relay(result: object) -> object:
            listened.callback(None)
            return result

        self._listening.addBoth(relay)
        return listened.addCallback(close)
