"""Thin Twisted shell of one RTSP server connection around the sans-IO connection.

:class:`RtspServerProtocol` answers requests of one connection in order, a
bounded number per reactor turn, none while its output buffer is full, and
closes itself when idle.  The sessions and the handler live in its factory
(:mod:`._factory`); the client side is :mod:`._client`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._connection import RtspServerConnection
from ._errors import RemoteProtocolError
from ._events import NEED_DATA, ConnectionClosed, RequestReceived
from ._machine import (
    ServerSession,
)
from ._messages import (
    InterleavedFrame,
    Response,
    serialize_interleaved,
)
from ._wire import (
    TransportSpec,
)

if TYPE_CHECKING:
    from ._factory import RtspServerFactory

#: Seconds a connection the server closes (idle, broken framing, the client's
#: ``Connection: close``) may take to deliver the output still queued for it before it
#: is aborted: a client that never reads would otherwise hold its descriptor, and its
#: place under the connection caps, forever (loseConnection waits for the buffer).
CLOSE_LINGER = 10.0


@implementer(IPushProducer)
class _WriteGate:
    """Registered with the transport: tells whether its write buffer is full."""

    def __init__(self, on_resume: Callable[[], None] | None = None) -> None:
        self.paused = False
        self.on_resume = on_resume
        # Bytes written since the transport said its buffer was full.
        self.written_while_paused = 0

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.written_while_paused = 0
        if self.on_resume is not None:
            self.on_resume()

    def stopProducing(self) -> None:
        self.paused = True


class _Shell(Protocol):
    @property
    def _t(self) -> Any:
        # The TCP transport (write, loseConnection, pause/resumeProducing, registerProducer).
        assert self.transport is not None
        return self.transport


class RtspServerProtocol(_Shell):
    """One RTSP connection: requests answered in order, interleaved data both ways."""

    log = Logger()

    def __init__(self, factory: RtspServerFactory, peer: str | None) -> None:
        self.factory = factory
        self.peer = peer
        self.conn = RtspServerConnection(factory.limits)
        self.channels: dict[int, ServerSession] = {}
        # Sessions whose sender this connection is (may hold ended ones until pruned).
        self.owned: set[ServerSession] = set()
        self._gate = _WriteGate(self._write_resumed)
        self._last_request = factory.clock.seconds()
        self._idle: IDelayedCall | None = None
        self._later: IDelayedCall | None = None
        self._linger: IDelayedCall | None = None
        self._busy = False
        self._pumping = False
        self._reading_paused = False
        self._lost = False
        self._registered = False
        self._held: list[bytes] | None = None
        self._held_bytes = 0

    @property
    def write_paused(self) -> bool:
        """True while the transport's write buffer is full (slow TCP reader)."""
        return self._gate.paused

    def connectionMade(self) -> None:
        self._t.registerProducer(self._gate, True)
        self._registered = True
        self._arm_idle(self.factory.idle_timeout)

    def _arm_idle(self, delay: float | None) -> None:
        if delay is not None and not self._lost and self._linger is None:
            self._idle = self.factory.clock.callLater(delay, self._idle_check)

    def _idle_check(self) -> None:
        """Close the connection after ``idle_timeout`` s without a request, unless it
        carries a live session (a player receiving over UDP keeps its connection)."""
        self._idle = None
        timeout = self.factory.idle_timeout
        assert timeout is not None
        quiet = self.factory.clock.seconds() - self._last_request
        if quiet < timeout:
            self._arm_idle(timeout - quiet)
        elif self.live_sessions():
            self._arm_idle(timeout)
        else:
            self.factory.idle_closed += 1
            self._close()

    def live_sessions(self) -> list[ServerSession]:
        """The sessions in the table this connection controls."""
        table = self.factory.sessions
        live = [s for s in self.owned if s.sender is self and table.get(s.session_id) is s]
        if len(live) != len(self.owned):
            self.owned = set(live)
        return live

    def _write_resumed(self) -> None:
        # The transport drained its buffer: answer what waited (not from inside its write).
        if not self._lost and self._later is None and self.conn.buffered:
            self._later = self.factory.clock.callLater(0, self._pump_later)

    def _pump_later(self) -> None:
        self._later = None
        self._pump()

    def _close(self) -> None:
        # A transport holding a paused producer would never finish closing.
        if self._registered:
            self._registered = False
            self._t.unregisterProducer()
        self._t.loseConnection()
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self._linger is None and not self._lost:
            self._linger = self.factory.clock.callLater(CLOSE_LINGER, self._abort)

    def _abort(self) -> None:
        """The closed connection's output was not read within CLOSE_LINGER: drop it."""
        self._linger = None
        self.factory.aborted_unread += 1
        self._t.abortConnection()

    def used_channels(self) -> frozenset[int]:
        """Interleaved channels already bound on this connection."""
        return frozenset(self.channels)

    def send_interleaved(self, channel: int, data: bytes) -> bool:
        """Write one interleaved frame; False if the connection is gone or the frame
        was dropped because the client has not read ``max_unread_output`` bytes."""
        if self._lost or self.conn.closed:
            return False
        frame = self.conn.send(InterleavedFrame(channel, data))
        if self._gate.paused:
            # A client that stops reading must not make the node buffer the whole title.
            if self._gate.written_while_paused + len(frame) > self.factory.limits.max_unread_output:
                self.factory.interleaved_dropped += 1
                return False
            self._gate.written_while_paused += len(frame)
        if self._held is not None:
            # A PLAY is being answered: frames wait until its response is written,
            # because players skip '$' data that arrives before the PLAY reply.
            if self._held_bytes + len(frame) > self.factory.limits.max_buffer:
                return False
            self._held.append(frame)
            self._held_bytes += len(frame)
            return True
        self._t.write(frame)
        return True

    def send_interleaved_many(self, channel: int, packets: Sequence[bytes]) -> int:
        """Frames on one channel with one transport write; how many were taken (the
        same bounds as :meth:`send_interleaved`, frame by frame: beyond one, that
        frame and the rest are dropped)."""
        if self._lost or self.conn.closed:
            return 0
        frames = [serialize_interleaved(channel, data) for data in packets]
        taken = len(frames)
        if self._gate.paused:
            room = self.factory.limits.max_unread_output - self._gate.written_while_paused
            taken = _fitting(frames, room)
            self.factory.interleaved_dropped += len(frames) - taken
        if self._held is not None:
            taken = _fitting(frames[:taken], self.factory.limits.max_buffer - self._held_bytes)
        if not taken:
            return 0
        block = b"".join(frames[:taken])
        if self._gate.paused:
            self._gate.written_while_paused += len(block)
        if self._held is not None:
            self._held.append(block)
            self._held_bytes += len(block)
        else:
            self._t.write(block)
        return taken

    def dataReceived(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._pump()
        if (
            not self._reading_paused
            and not self._lost
            and not self.conn.closed
            and self.conn.buffered > self.factory.limits.max_buffer
        ):
            self._t.pauseProducing()
            self._reading_paused = True

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        budget = self.factory.max_requests_per_turn
        try:
            while not self._busy and not self._lost and not self._gate.paused:
                if budget <= 0:
                    # Bounded work per reactor turn: the rest of a pipelined burst
                    # waits for the next turn, so one client cannot hold the reactor.
                    if self._later is None:
                        self._later = self.factory.clock.callLater(0, self._pump_later)
                    break
                try:
                    event = self.conn.next_event()
                except RemoteProtocolError as exc:
                    self.log.warn("rtsp: {peer}: {error}", peer=self.peer, error=exc)
                    self.factory.refused[exc.status] += 1
                    self._t.write(self.conn.send_error(exc))
                    self._close()
                    return
                if event is NEED_DATA:
                    break
                if isinstance(event, ConnectionClosed):
                    self._close()
                    break
                if isinstance(event, InterleavedFrame):
                    self._interleaved(event)
                elif isinstance(event, RequestReceived):
                    budget -= 1
                    self._last_request = self.factory.clock.seconds()
                    self._busy = True
                    if event.request.method == "PLAY":
                        self._held, self._held_bytes = [], 0
                    self.factory.dispatch(event.request, self).addCallback(self._respond)
        finally:
            self._pumping = False
        if (
            self._reading_paused
            and not self._lost
            and self.conn.buffered <= self.factory.limits.max_buffer
        ):
            self._reading_paused = False
            self._t.resumeProducing()

    def _interleaved(self, frame: InterleavedFrame) -> None:
        session = self.channels.get(frame.channel)
        if session is None or self.factory.sessions.get(session.session_id) is not session:
            return
        session.touch(self.factory.clock.seconds())
        try:
            self.factory.handler.interleaved_received(session, frame.channel, frame.data)
        except Exception:
            self.log.failure("rtsp: handler failed on interleaved data")

    def _respond(self, response: Response) -> None:
        self._busy = False
        held, self._held = self._held, None
        if self._lost:
            return
        self._t.write(self.conn.send(response))
        if held:
            self._t.writeSequence(held)
        self._pump()

    def bind(self, session: ServerSession, transport: TransportSpec | None = None) -> None:
        """Make this connection the session's sender, and route the interleaved
        channels of ``transport`` on it to ``session``."""
        session.sender = self
        self.owned.add(session)
        if transport is not None and transport.interleaved is not None:
            for ch in transport.interleaved:
                self.channels[ch] = session

    def forget(self, session: ServerSession) -> None:
        """The session ended: drop its channels and ownership here."""
        self.owned.discard(session)
        for ch in [c for c, s in self.channels.items() if s is session]:
            del self.channels[ch]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._lost = True
        for call in (self._idle, self._later, self._linger):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._later = self._linger = None
        self.factory.connection_lost(self)


def _fitting(frames: Sequence[bytes], room: int) -> int:
    """How many of ``frames``, from the first, fit in ``room`` bytes."""
    n = 0
    for frame in frames:
        room -= len(frame)
        if room < 0:
            break
        n += 1
    return n
