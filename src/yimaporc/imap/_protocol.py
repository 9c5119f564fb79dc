"""The thin Twisted shell: bytes <-> :class:`~._connection.ImapConnection`, commands
run in order through :class:`~._session.CommandRunner`.

Commands of one connection execute strictly one after another, even when the
backend answers later (SELECT + FETCH + NOOP in one packet run in that
order).  At most ``max_queued`` parsed commands wait; beyond that the
connection stops parsing and the transport stops reading (backpressure) until
the queue drains.  A connection without input for ``idle_timeout`` seconds
(on the injected clock; IDLE counts as activity for ``idle_timeout_idle``)
gets ``* BYE`` and is closed.  LOGOUT and connection loss release the session
and the selected mailbox.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._connection import ImapConnection
from ._events import (
    AuthenticateResponse,
    CommandReceived,
    CommandRejected,
    Event,
    IdleDone,
    ProtocolFailure,
)
from ._lexer import DEFAULT_LIMITS, Limits
from ._machine import State
from ._serialize import ResponseCode, StatusResponse
from ._session import CommandRunner
from .interfaces import BACKEND_EXTENSIONS, IImapBackend, ImapError, IMessageRenderer

#: Capabilities every connection has (the rest depends on state, TLS and the backend).
BASE_CAPABILITIES = (
    "IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE", "UIDPLUS", "MOVE",
    "UNSELECT", "CHILDREN", "LIST-EXTENDED", "LIST-STATUS", "SPECIAL-USE", "ESEARCH",
    "SEARCHRES", "UTF8=ACCEPT",
)  # fmt: skip


def backend_extensions(backend: IImapBackend) -> list[str]:
    """The capabilities ``backend`` says it can do (its ``extensions``); names the
    package does not know are not advertised."""
    have = {e.upper() for e in backend.extensions}
    return [e for e in BACKEND_EXTENSIONS if e in have]


@implementer(IPushProducer)
class _WriteGate:
    """Registered with the transport: tells whether its write buffer is full."""

    def __init__(self, on_resume: Callable[[], None]) -> None:
        self.paused = False
        self.on_resume = on_resume

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.on_resume()

    def stopProducing(self) -> None:
        self.paused = True


class ImapServerProtocol(Protocol):
    """One IMAP connection.

    No new command starts while the transport's write buffer is full (a client
    that pipelines FETCHes without reading makes the server wait, not buffer),
    and a running FETCH produces its next batch only when the buffer has room
    (:meth:`writable`).
    """

    log = Logger()

    def __init__(self, factory: ImapServerFactory) -> None:
        self.factory = factory
        self.conn = ImapConnection(factory.limits)
        self.runner = CommandRunner(
            self.conn,
            factory.backend,
            factory.renderer,
            self.capabilities,
            self.flush,
            self._start_tls if factory.tls is not None else None,
            self.auth_allowed,
            self.writable,
        )
        self._writable: list[Deferred[None]] = []
        self.queue: deque[Event] = deque()
        self._running = False
        self._pumping = False
        self._lost = False
        self._paused = False
        self._timer: IDelayedCall | None = None
        self._later: IDelayedCall | None = None
        self._gate = _WriteGate(self._write_resumed)
        self._registered = False
        self._last_input = factory.clock.seconds()
        self._last_drain = self._last_input
        self.tls_active = factory.implicit_tls
        #: Commands run, for tests and counters.
        self.commands_run = 0

    @property
    def _t(self) -> Any:
        assert self.transport is not None
        return self.transport

    def capabilities(self, authenticated: bool = False) -> list[str]:
        """What CAPABILITY says now."""
        caps = list(BASE_CAPABILITIES)
        caps.append(f"APPENDLIMIT={self.factory.limits.max_append}")
        caps += backend_extensions(self.factory.backend)
        if self.factory.backend.supports_modseq:
            caps += ["CONDSTORE", "QRESYNC"]
        if not authenticated:
            if self.factory.tls is not None and not self.tls_active:
                caps.append("STARTTLS")
            caps.append("AUTH=PLAIN" if self.auth_allowed() else "LOGINDISABLED")
        return caps

    def auth_allowed(self) -> bool:
        """Whether LOGIN/AUTHENTICATE may run now (not before STARTTLS when a
        certificate is configured, unless ``plaintext_auth``)."""
        return self.tls_active or self.factory.plaintext_auth

    # -- Protocol -----------------------------------------------------------------

    def _write_resumed(self) -> None:
        # The client read what we wrote: progress, as input is (see _check_idle).
        self._last_drain = self.factory.clock.seconds()
        # Not from inside the transport's write: run the queue on the next turn.
        if not self._lost and self._later is None:
            self._later = self.factory.clock.callLater(0, self._pump_later)

    def _pump_later(self) -> None:
        self._later = None
        if self._writable and not self._gate.paused:
            waiting, self._writable = self._writable, []
            for d in waiting:
                d.callback(None)
        self._pump()

    def writable(self) -> Deferred[None]:
        """Fires when the transport's write buffer has room (at once if it has now);
        fails with :class:`ImapError` if the connection is lost first."""
        if self._lost:
            return fail(ImapError("connection closed"))
        if not self._gate.paused:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._writable.append(d)
        return d

    def close(self) -> None:
        """Close the connection (the write gate unregistered first: a transport holding
        a paused producer would never finish closing)."""
        self._close()

    def _close(self) -> None:
        if self._registered:
            self._registered = False
            self._t.unregisterProducer()
        self._t.loseConnection()

    def connectionMade(self) -> None:
        self._t.registerProducer(self._gate, True)
        self._registered = True
        code = ResponseCode("CAPABILITY", tuple(self.capabilities()))
        self.conn.send(StatusResponse("OK", f"{self.factory.greeting} ready", code))
        self.flush()
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        self._last_input = self.factory.clock.seconds()
        self._accept(self.conn.receive_data(data, self._room()))
        self._pump()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._lost = True
        for call in (self._timer, self._later):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._later = None
        waiting, self._writable = self._writable, []
        for d in waiting:
            d.errback(ImapError("connection closed"))
        self.queue.clear()
        self.runner.connection_lost()
        self.factory.connections.discard(self)

    # -- flow ---------------------------------------------------------------------

    def _room(self) -> int:
        return max(0, self.factory.max_queued - len(self.queue))

    def _accept(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, IdleDone):
                self.runner.idle_done(event.valid)
            elif isinstance(event, AuthenticateResponse):
                self.runner.sasl_response(event.data, event.error)
            elif isinstance(event, ProtocolFailure):
                self.factory.count("protocol_errors")
                self.log.info("imap: closing a connection: {text}", text=event.text)
                if event.tag is not None:
                    code = ResponseCode(event.code) if event.code else None
                    self.conn.send(StatusResponse("BAD", event.text, code, event.tag))
                self.conn.bye(event.text)
                self.flush()
                self.queue.clear()
                self._close()
                return
            else:
                self.queue.append(event)

    def _backpressure(self) -> None:
        full = self.conn.buffered > 0 and self._room() == 0
        if full and not self._paused and not self._lost:
            self._paused = True
            self._t.pauseProducing()
        elif not full and self._paused and not self._lost:
            self._paused = False
            self._t.resumeProducing()

    def _pump(self) -> None:
        """Run queued commands one at a time; a loop, not recursion, so a long
        pipeline of commands answered at once does not grow the stack."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._lost and not self.conn.closed:
                # Keep up to max_queued commands parsed ahead; the rest stays unread.
                room = self._room()
                if self.conn.buffered and room:
                    self._accept(self.conn.next_events(room))
                if self._running or not self.queue or self._lost or self._gate.paused:
                    break
                event = self.queue.popleft()
                if isinstance(event, CommandRejected):
                    self.factory.count("rejected")
                    self.conn.reject(event)
                    continue
                assert isinstance(event, CommandReceived)
                self._running = True
                self.commands_run += 1
                d = self.runner.run(event.command)
                d.addErrback(self._bug)
                d.addBoth(self._ran)
        finally:
            self._pumping = False
        self.flush()
        if not self._lost:
            self._backpressure()

    def _bug(self, f: Failure) -> None:
        self.log.failure("imap: command runner failed", f)

    def _ran(self, _: object) -> None:
        self._running = False
        if self._lost:
            return
        self.flush()
        if self.conn.state is State.LOGOUT:
            self._close()
            return
        self._pump()

    def flush(self) -> None:
        """Write what the connection queued."""
        data = self.conn.data_to_send()
        if data and not self._lost and self.transport is not None:
            self._t.write(data)

    def _start_tls(self) -> bool:
        self.flush()
        self._t.startTLS(self.factory.tls)
        self.tls_active = True
        return True

    # -- idle timeout ---------------------------------------------------------------

    def _arm(self, delay: float | None = None) -> None:
        timeout = self.factory.idle_timeout
        if timeout is None or self._lost:
            return
        self._timer = self.factory.clock.callLater(
            timeout if delay is None else delay, self._check_idle
        )

    def _check_idle(self) -> None:
        self._timer = None
        timeout = self.factory.idle_timeout
        assert timeout is not None
        quiet = self.factory.clock.seconds() - max(self._last_input, self._last_drain)
        waiting_on_client = (
            self.runner._idle is not None or self.runner._sasl is not None or bool(self._writable)
        )
        if quiet < timeout or (self._running and not waiting_on_client):
            # A command the backend still works on does not time the client out;
            # a client silent in IDLE or in the middle of AUTHENTICATE does, and so
            # does one that stopped reading the answer of a FETCH.
            self._arm(max(timeout - quiet, 1.0))
            return
        self.factory.count("timed_out")
        self.conn.bye("autologout: idle for too long")
        self.flush()
        self._close()


class ImapServerFactory(Factory):
    """Builds :class:`ImapServerProtocol` over an :class:`IImapBackend`.

    ``clock`` times idle connections; ``tls`` (a context factory) enables
    STARTTLS (and, unless ``plaintext_auth``, keeps LOGIN/AUTHENTICATE until
    TLS runs: ``LOGINDISABLED``, ``NO [PRIVACYREQUIRED]``); ``implicit_tls``
    says the listener already speaks TLS; ``renderer`` computes
    ENVELOPE/BODYSTRUCTURE/sections.
    """

    protocol = ImapServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        backend: IImapBackend,
        renderer: IMessageRenderer,
        clock: IReactorTime,
        limits: Limits = DEFAULT_LIMITS,
        tls: Any = None,
        idle_timeout: float | None = 30 * 60.0,
        max_queued: int = 32,
        greeting: str = "yimaporc IMAP4rev1",
        plaintext_auth: bool | None = None,
        implicit_tls: bool = False,
    ) -> None:
        self.backend = backend
        self.renderer = renderer
        self.clock = clock
        self.limits = limits
        self.tls = tls
        self.idle_timeout = idle_timeout
        self.max_queued = max_queued
        self.greeting = greeting
        #: LOGIN/AUTHENTICATE without TLS: by default only when no certificate is configured.
        self.plaintext_auth = tls is None if plaintext_auth is None else plaintext_auth
        #: The listener wraps connections in TLS itself (IMAPS, port 993).
        self.implicit_tls = implicit_tls
        self.connections: set[ImapServerProtocol] = set()
        #: Counters: commands rejected (syntax/limits), connections closed for
        #: protocol errors, for idleness.
        self.rejected = 0
        self.protocol_errors = 0
        self.timed_out = 0
        #: Called with the counter's name each time one moves (an embedder's metrics).
        self.on_count: Callable[[str], None] | None = None

    def count(self, name: str) -> None:
        """Add one to the counter ``name`` and tell :attr:`on_count`."""
        setattr(self, name, getattr(self, name) + 1)
        if self.on_count is not None:
            self.on_count(name)

    def buildProtocol(self, addr: IAddress | None) -> ImapServerProtocol:
        p = ImapServerProtocol(self)
        self.connections.add(p)
        return p
