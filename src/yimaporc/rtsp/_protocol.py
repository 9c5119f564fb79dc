"""Thin Twisted shells around the sans-IO RTSP connections.

:class:`RtspServerFactory` owns the session table (capped in total and per
client address; a UDP session outlives its connection for a short grace), runs
each request's checks (:func:`~._machine.prepare`), calls the injected
:class:`~.interfaces.IRtspHandler`, applies the transition, and reaps silent
sessions a bounded batch at a time with one timer on the injected ``clock``.
:class:`RtspServerProtocol` answers requests of one connection in order, a
bounded number per reactor turn, none while its output buffer is full, and
closes itself when idle.
:class:`RtspClientProtocol` returns a Deferred per request.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._connection import SERVER_NAME, RtspClientConnection, RtspServerConnection
from ._errors import RemoteProtocolError, RtspError, RtspStatusError
from ._events import NEED_DATA, ConnectionClosed, RequestReceived, ResponseReceived
from ._machine import (
    PUBLIC,
    ForeignDestination,
    Prepared,
    ServerSession,
    SessionTable,
    abort,
    complete,
    prepare,
)
from ._messages import (
    DEFAULT_LIMITS,
    Headers,
    InterleavedFrame,
    Limits,
    Request,
    Response,
    serialize_interleaved,
)
from ._status import (
    reason_phrase,
)
from ._wire import (
    NptRange,
    SessionHeader,
    TransportSpec,
    serialize_range,
    serialize_rtp_info,
    serialize_session,
    serialize_transport,
)
from .interfaces import IRtspHandler, PlayReply
from .sdp import SessionDescription, serialize_sdp

#: Seconds between two log lines about refused sessions (the counters count them all).
REFUSAL_LOG_INTERVAL = 10.0


class RtspConnectionLost(RtspError):
    """The RTSP connection closed before the response came."""


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
        if delay is not None and not self._lost:
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
        for call in (self._idle, self._later):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._later = None
        self.factory.connection_lost(self)


@attrs.frozen
class _Done:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    reason: str = ""


def _refused(exc: RtspStatusError) -> _Done:
    """The answer to a refused request; a detail beyond the standard reason phrase
    goes in the status line (players print it) and, whole, in a text/plain body."""
    standard = reason_phrase(exc.status)
    detail = " ".join(exc.reason.split())
    if not detail or detail == standard:
        return _Done(exc.status, exc.headers)
    line = detail if detail.startswith(standard) else f"{standard}: {detail}"
    line = line if len(line) <= 200 else line[:197] + "..."
    body = (detail + "\r\n").encode("utf-8", "replace")
    return _Done(exc.status, (*exc.headers, ("Content-Type", "text/plain; charset=utf-8")),
                 body, line)  # fmt: skip


class RtspServerFactory(Factory):
    """Builds :class:`RtspServerProtocol`; holds the sessions and the handler.

    Hostile-client guards (docs/wire.md, "Sessions under load"):
    ``max_sessions`` in all (503) and ``max_sessions_per_client`` per client
    address (453); a session never played is reaped after ``setup_timeout`` s
    of silence; a UDP session whose connection closed ends ``detached_timeout``
    s later unless a request names it again (RTCP does not keep it); a
    connection without a request for ``idle_timeout`` s and without a live
    session is closed; at most ``reap_batch`` sessions are torn down per
    reactor turn and ``max_requests_per_turn`` requests of one connection
    handled per turn.
    """

    log = Logger()

    def __init__(
        self,
        handler: IRtspHandler,
        clock: IReactorTime,
        rng: random.Random,
        *,
        session_timeout: float = 60.0,
        limits: Limits = DEFAULT_LIMITS,
        max_sessions: int = 1024,
        max_sessions_per_client: int | None = 64,
        setup_timeout: float | None = 15.0,
        detached_timeout: float | None = 10.0,
        idle_timeout: float | None = 30.0,
        reap_batch: int = 64,
        max_requests_per_turn: int = 16,
        server_name: str = SERVER_NAME,
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.limits = limits
        self.server_name = server_name
        self.sessions = SessionTable(
            rng,
            session_timeout,
            max_sessions,
            max_per_client=max_sessions_per_client,
            setup_timeout=setup_timeout,
            detached_timeout=detached_timeout,
        )
        self.idle_timeout = idle_timeout
        self.reap_batch = max(1, reap_batch)
        self.max_requests_per_turn = max(1, max_requests_per_turn)
        self.protocols: set[RtspServerProtocol] = set()
        self._reaper: IDelayedCall | None = None
        self.reaped = 0
        self.idle_closed = 0
        self.refused_destinations = 0
        self.interleaved_dropped = 0
        self._refusal_logged_at = float("-inf")
        self._refusals_unlogged = 0

    def buildProtocol(self, addr: IAddress | None) -> RtspServerProtocol:
        proto = RtspServerProtocol(self, getattr(addr, "host", None))
        self.protocols.add(proto)
        return proto

    # --- sessions ---------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters for ``/api/status`` (``rtsp``)."""
        return {
            "sessions": len(self.sessions),
            "connections": len(self.protocols),
            "refused_sessions": self.sessions.refused,
            "refused_destinations": self.refused_destinations,
            "reaped": self.reaped,
            "idle_closed": self.idle_closed,
            "interleaved_dropped": self.interleaved_dropped,
        }

    def touch(self, session_id: str) -> bool:
        """Note client activity (e.g. RTCP over UDP) on a session; False if unknown."""
        return self.sessions.touch(session_id, self.clock.seconds())

    def end_session(self, session: ServerSession) -> Deferred[Any]:
        """Tear a session down from the server side (timeout, lost connection, shutdown)."""
        self.sessions.remove(session.session_id)
        self._release(session)
        d = maybeDeferred(self.handler.teardown, session)
        d.addErrback(
            lambda f: self.log.failure("rtsp: teardown of {sid} failed", f, sid=session.session_id)
        )
        self._schedule_reap()
        return d

    def stop(self) -> None:
        """Cancel the reaper timer."""
        if self._reaper is not None and self._reaper.active():
            self._reaper.cancel()
        self._reaper = None

    def _schedule_reap(self) -> None:
        at = self.sessions.next_expiry()
        if at is None:
            self.stop()
            return
        if self._reaper is not None and self._reaper.active():
            if self._reaper.getTime() <= at:
                return  # it fires first and reschedules then
            self._reaper.cancel()
        self._reaper = self.clock.callLater(max(0.0, at - self.clock.seconds()), self._reap)

    def _release(self, session: ServerSession) -> None:
        sender = session.sender
        if isinstance(sender, RtspServerProtocol):
            sender.forget(session)

    def _reap(self) -> None:
        # At most reap_batch per turn; the timer comes back at once for the rest, so a
        # burst of expiries is spread over reactor turns instead of stalling one.
        self._reaper = None
        expired = self.sessions.expire(self.clock.seconds(), self.reap_batch)
        self.reaped += len(expired)
        if len(expired) > 1:
            self.log.info("rtsp: {n} sessions timed out", n=len(expired))
        for session in expired:
            if len(expired) == 1:
                self.log.info("rtsp: session {sid} timed out", sid=session.session_id)
            self.end_session(session)
        self._schedule_reap()

    def connection_lost(self, proto: RtspServerProtocol) -> None:
        """A connection closed: its interleaved sessions end; UDP ones are detached and
        end ``detached_timeout`` s later unless a request on another connection names them."""
        self.protocols.discard(proto)
        now = self.clock.seconds()
        for session in list(proto.owned):
            if session.sender is not proto or self.sessions.get(session.session_id) is not session:
                continue
            session.sender = None
            if any(t.is_tcp for t in session.streams.values()):
                self.end_session(session)
            else:
                self.sessions.detach(session, now)
        proto.owned.clear()
        proto.channels.clear()
        self._schedule_reap()

    # --- requests ---------------------------------------------------------------------

    def dispatch(self, request: Request, proto: RtspServerProtocol) -> Deferred[Response]:
        """Check, run and answer one request; the Deferred never fails."""
        now = self.clock.seconds()
        refused = self.sessions.refused
        try:
            prep = prepare(
                request, self.sessions, now, peer=proto.peer, used_channels=proto.used_channels()
            )
        except RtspStatusError as exc:
            if isinstance(exc, ForeignDestination):
                self.refused_destinations += 1
            if self.sessions.refused > refused:
                self._log_refusal(now, proto.peer, exc)
            else:
                self.log.info(
                    "rtsp: {method} {url}: {status}",
                    method=request.method,
                    url=request.url,
                    status=exc.status,
                )
            return succeed(self._response(request, None, _refused(exc)))
        session = prep.session
        if session is not None and not prep.created:
            # A request naming the session: it is controlled from this connection now
            # if the one that set it up has gone.
            self.sessions.attach(session)
            if session.sender is None:
                proto.bind(session)
        d = cast("Deferred[_Done]", maybeDeferred(self._run, prep, proto))

        def ok(done: _Done) -> Response:
            return self._response(request, prep.session, done)

        def failed(failure: Failure) -> Response:
            abort(prep, self.sessions)
            exc = failure.value
            if isinstance(exc, RtspStatusError):
                return self._response(request, None, _refused(exc))
            self.log.failure(
                "rtsp: {method} {url} failed", failure, method=request.method, url=request.url
            )
            return self._response(request, None, _Done(500))

        return d.addCallbacks(ok, failed).addCallback(self._after)

    def _log_refusal(self, now: float, peer: str | None, exc: RtspStatusError) -> None:
        # A flood of SETUPs must not become a flood of log lines: one line, then at most
        # one summary per REFUSAL_LOG_INTERVAL.
        self._refusals_unlogged += 1
        if now - self._refusal_logged_at < REFUSAL_LOG_INTERVAL:
            return
        self.log.warn(
            "rtsp: refused {n} new session(s) ({status} {reason}; last from {peer})",
            n=self._refusals_unlogged,
            status=exc.status,
            reason=exc.reason,
            peer=peer,
        )
        self._refusal_logged_at, self._refusals_unlogged = now, 0

    def _after(self, response: Response) -> Response:
        self._schedule_reap()
        return response

    def _response(self, request: Request, session: ServerSession | None, done: _Done) -> Response:
        fields: list[tuple[str, str]] = [("CSeq", str(request.cseq)), ("Server", self.server_name)]
        if session is not None and self.sessions.get(session.session_id) is session:
            timeout = round(session.timeout) if request.method == "SETUP" else None
            fields.append(
                ("Session", serialize_session(SessionHeader(session.session_id, timeout)))
            )
        fields += done.headers
        reason = done.reason or reason_phrase(done.status)
        return Response(done.status, reason, Headers(tuple(fields)), done.body)

    def _run(self, prep: Prepared, proto: RtspServerProtocol) -> Deferred[_Done] | _Done:
        method = prep.method
        req = prep.request
        session = prep.session
        if method == "OPTIONS":
            return _Done(200, (("Public", PUBLIC),))
        if method == "DESCRIBE":
            return maybeDeferred(self.handler.describe, req.url).addCallback(
                self._described, req.url
            )
        if method in ("GET_PARAMETER", "SET_PARAMETER"):
            if method == "GET_PARAMETER":
                d = maybeDeferred(self.handler.get_parameter, session, req.body)
                return d.addCallback(lambda body: _Done(200, _typed(body), body or b""))
            d = maybeDeferred(self.handler.set_parameter, session, req.body)
            return d.addCallback(lambda _: _Done())
        if session is None:  # TEARDOWN without a session: Init -> Init, nothing to do
            return _Done()
        session.user_agent = req.headers.get("User-Agent") or session.user_agent
        if method == "SETUP":
            chosen = prep.transport
            assert chosen is not None
            d = maybeDeferred(self.handler.setup, req.url, chosen, session)
            return d.addCallback(self._set_up, prep, proto, chosen)
        if method == "PLAY":
            d = maybeDeferred(self.handler.play, session, prep.range)
            return d.addCallback(self._played, prep)
        if method == "PAUSE":
            d = maybeDeferred(self.handler.pause, session)
            return d.addCallback(self._paused, prep)
        d = maybeDeferred(self.handler.teardown, session)
        return d.addCallback(lambda _: self._completed(prep))

    def _completed(self, prep: Prepared, reply: TransportSpec | None = None) -> _Done:
        complete(prep, self.sessions, reply)
        if prep.method == "TEARDOWN" and prep.session is not None:
            self._release(prep.session)
        return _Done()

    def _described(self, body: bytes | SessionDescription, url: str) -> _Done:
        if isinstance(body, SessionDescription):
            body = serialize_sdp(body)
        base = url if url.endswith("/") else url + "/"
        return _Done(200, (("Content-Type", "application/sdp"), ("Content-Base", base)), body)

    def _set_up(
        self,
        reply: TransportSpec | None,
        prep: Prepared,
        proto: RtspServerProtocol,
        chosen: TransportSpec,
    ) -> _Done:
        reply = reply or chosen
        if chosen.is_tcp and reply.interleaved is None:
            reply = attrs.evolve(reply, interleaved=chosen.interleaved)
        session = prep.session
        assert session is not None
        if reply.is_tcp or session.sender is None:
            proto.bind(session, reply)
        complete(prep, self.sessions, reply)
        return _Done(200, (("Transport", serialize_transport(reply)),))

    def _played(self, reply: PlayReply | None, prep: Prepared) -> _Done:
        complete(prep, self.sessions)
        headers: list[tuple[str, str]] = []
        rng = reply.range if reply is not None and reply.range is not None else prep.range
        if rng is not None:
            headers.append(("Range", serialize_range(rng)))
        if reply is not None and reply.rtp_info:
            headers.append(("RTP-Info", serialize_rtp_info(reply.rtp_info)))
        # Only normal play is offered (prepare refused any other): say so, RFC 2326 §12.34.
        headers += [(h, "1") for h in ("Scale", "Speed") if prep.request.headers.get(h)]
        return _Done(200, tuple(headers))

    def _paused(self, reply: NptRange | None, prep: Prepared) -> _Done:
        complete(prep, self.sessions)
        if isinstance(reply, NptRange):
            return _Done(200, (("Range", serialize_range(reply)),))
        return _Done()


def _typed(body: bytes | None) -> tuple[tuple[str, str], ...]:
    return (("Content-Type", "text/parameters"),) if body else ()


class RtspClientProtocol(_Shell):
    """An RTSP client connection: one Deferred per request, interleaved frames to a callback.

    A non-2xx response errbacks with :class:`RtspStatusError` (``.response``
    holds it); a lost connection errbacks pending requests with
    :class:`RtspConnectionLost`; ``timeout`` (seconds, with ``clock``) cancels
    requests that get no answer.
    """

    log = Logger()

    def __init__(
        self,
        on_interleaved: Callable[[int, bytes], None] | None = None,
        *,
        clock: IReactorTime | None = None,
        timeout: float | None = None,
        limits: Limits = DEFAULT_LIMITS,
        user_agent: str = SERVER_NAME,
    ) -> None:
        self.conn = RtspClientConnection(limits, user_agent)
        self.on_interleaved = on_interleaved
        self.clock = clock
        self.timeout = timeout
        self._waiting: dict[int, Deferred[Response]] = {}
        self.ready: Deferred[RtspClientProtocol] = Deferred()
        self._lost = False

    @property
    def session_id(self) -> str | None:
        """The session the server gave at SETUP."""
        return self.conn.session_id

    def connectionMade(self) -> None:
        self.ready.callback(self)

    def _send(self, cseq: int, data: bytes) -> Deferred[Response]:
        d: Deferred[Response] = Deferred()
        if self._lost:
            d.errback(RtspConnectionLost("not connected"))
            return d
        self._waiting[cseq] = d
        self._t.write(data)
        if self.timeout is not None and self.clock is not None:
            d.addTimeout(self.timeout, self.clock)
        return d

    def request(
        self, method: str, url: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
    ) -> Deferred[Response]:
        """Send any request."""
        return self._send(*self.conn.request(method, url, headers, body))

    def options(self, url: str) -> Deferred[Response]:
        """OPTIONS."""
        return self._send(*self.conn.options(url))

    def describe(self, url: str) -> Deferred[Response]:
        """DESCRIBE (the SDP is the body; Content-Base is a header)."""
        return self._send(*self.conn.describe(url))

    def setup(
        self, url: str, transport: TransportSpec | Sequence[TransportSpec]
    ) -> Deferred[Response]:
        """SETUP."""
        return self._send(*self.conn.setup(url, transport))

    def play(self, url: str, rng: NptRange | None = None) -> Deferred[Response]:
        """PLAY."""
        return self._send(*self.conn.play(url, rng))

    def pause(self, url: str) -> Deferred[Response]:
        """PAUSE."""
        return self._send(*self.conn.pause(url))

    def teardown(self, url: str) -> Deferred[Response]:
        """TEARDOWN."""
        return self._send(*self.conn.teardown(url))

    def get_parameter(self, url: str, body: bytes = b"") -> Deferred[Response]:
        """GET_PARAMETER (keep-alive with an empty body)."""
        return self._send(*self.conn.get_parameter(url, body))

    def set_parameter(self, url: str, body: bytes) -> Deferred[Response]:
        """SET_PARAMETER."""
        return self._send(*self.conn.set_parameter(url, body))

    def send_interleaved(self, channel: int, data: bytes) -> None:
        """Send a frame (e.g. RTCP) on an interleaved channel."""
        if not self._lost:
            self._t.write(self.conn.send_interleaved(channel, data))

    def dataReceived(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                self.log.warn("rtsp client: {error}", error=exc)
                self._fail_all(exc)
                self._t.loseConnection()
                return
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return
            if isinstance(event, InterleavedFrame):
                if self.on_interleaved is not None:
                    try:
                        self.on_interleaved(event.channel, event.data)
                    except Exception:
                        self.log.failure("rtsp client: interleaved callback failed")
            elif isinstance(event, ResponseReceived):
                d = self._waiting.pop(event.cseq, None)
                if d is None:
                    continue
                if event.response.ok:
                    d.callback(event.response)
                else:
                    r = event.response
                    d.errback(RtspStatusError(r.status, r.reason, r.headers.fields, r))

    def _fail_all(self, exc: Exception) -> None:
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(exc)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._lost = True
        self._fail_all(RtspConnectionLost(str(reason.value)))


def _fitting(frames: Sequence[bytes], room: int) -> int:
    """How many of ``frames``, from the first, fit in ``room`` bytes."""
    n = 0
    for frame in frames:
        room -= len(frame)
        if room < 0:
            break
        n += 1
    return n
