"""The RTSP server factory: the session table, request checks, the handler, reaping.

:class:`RtspServerFactory` owns the session table (capped in total and per
client address; a UDP session outlives its connection for a short grace), runs
each request's checks (:func:`~._machine.prepare`), calls the injected
:class:`~.interfaces.IRtspHandler`, applies the transition, and reaps silent
sessions a bounded batch at a time with one timer on the injected ``clock``.
"""

from __future__ import annotations

import random
import resource
from collections import Counter
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._connection import SERVER_NAME
from ._errors import RtspStatusError
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
    Limits,
    Request,
    Response,
    serialize_response,
)
from ._protocol import RtspServerProtocol
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


class _LogBudget:
    """A flood of refusals must not become a flood of log lines: :meth:`due` counts
    one and says how many to log now (the first, then at most one summary per
    REFUSAL_LOG_INTERVAL; 0: not yet)."""

    def __init__(self) -> None:
        self.unlogged = 0
        self.logged_at = float("-inf")

    def due(self, now: float) -> int:
        self.unlogged += 1
        if now - self.logged_at < REFUSAL_LOG_INTERVAL:
            return 0
        n, self.unlogged, self.logged_at = self.unlogged, 0, now
        return n


#: File descriptors the default total connection cap leaves to the rest of the node
#: (disk files, cluster links and their listeners, admin connections, logs, worker
#: pipes) before it takes half of what is left: the other half is for the relay
#: sockets of played sessions (one each) and whatever else the node opens per session.
FD_RESERVE = 128
#: The smallest default total cap, however low the file descriptor limit.
MIN_CONNECTIONS = 16
#: The file descriptor limit assumed when there is none (RLIM_INFINITY).
UNLIMITED_NOFILE = 1 << 16


def default_max_connections(nofile: int | None = None) -> int:
    """The default cap on a server's RTSP connections in all: half of the soft
    RLIMIT_NOFILE (``nofile``, read from the process when None) less
    :data:`FD_RESERVE`, at least :data:`MIN_CONNECTIONS` (1024 -> 448, 65536 -> 32704)."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile < 0 or nofile == resource.RLIM_INFINITY:
        nofile = UNLIMITED_NOFILE
    return max(MIN_CONNECTIONS, (nofile - FD_RESERVE) // 2)


class _TooManyConnections(Protocol):
    """A connection past a cap (its client's, or ``peer`` None: the server's in all):
    one 503 with the reason, then closed."""

    def __init__(self, peer: str | None, server_name: str) -> None:
        self.peer, self.server_name = peer, server_name

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.peer is None:
            reason = f"{reason_phrase(503)}: too many connections to this server"
        else:
            reason = f"{reason_phrase(503)}: too many connections from {self.peer}"
        fields = (("Server", self.server_name), ("Connection", "close"))
        self.transport.write(serialize_response(Response(503, reason, Headers(fields))))
        self.transport.loseConnection()


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
    handled per turn.  Open connections are capped per client address
    (``max_connections_per_client``) and in all (``max_connections``, default
    :func:`default_max_connections`, from the file descriptor limit): a
    connection beyond either gets 503 and is closed.
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
        max_connections_per_client: int | None = None,
        max_connections: int | None = None,
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
        # Open connections per client address, capped (default: its session cap + 64, so
        # a player's DESCRIBE-only and keep-alive connections fit) so that one client
        # cannot take the node's file descriptors (1000 idle connections from one address
        # were all accepted; with the usual 1024 fd limit the node hit EMFILE).
        if max_connections_per_client is None and max_sessions_per_client is not None:
            max_connections_per_client = max_sessions_per_client + 64
        self.max_connections_per_client = max_connections_per_client
        self.per_client: Counter[str] = Counter()
        self.refused_connections = 0
        # Open connections in all, capped so that many addresses (a botnet, an IPv6
        # /64) cannot take the node's file descriptors either; None: from RLIMIT_NOFILE.
        if max_connections is None:
            max_connections = default_max_connections()
        self.max_connections = max_connections
        self.refused_server_connections = 0
        self._full_log = _LogBudget()
        self._reaper: IDelayedCall | None = None
        self.reaped = 0
        self.idle_closed = 0
        #: Connections the server closed whose client had not read the output queued
        #: for it CLOSE_LINGER s later, aborted (see :data:`._protocol.CLOSE_LINGER`).
        self.aborted_unread = 0
        self.refused_destinations = 0
        self.interleaved_dropped = 0
        #: Error answers by status: requests refused, and broken framing (400, 413, 414,
        #: 505; the connection then closes).
        self.refused: Counter[int] = Counter()
        self._refusal_log = _LogBudget()

    def buildProtocol(self, addr: IAddress | None) -> RtspServerProtocol | Protocol:  # type: ignore[override]
        peer = getattr(addr, "host", None)
        if len(self.protocols) >= self.max_connections:
            self.refused_server_connections += 1
            self.refused[503] += 1
            self._log_full(peer)
            return _TooManyConnections(None, self.server_name)
        cap = self.max_connections_per_client
        if peer is not None and cap is not None and self.per_client[peer] >= cap:
            self.refused_connections += 1
            self.refused[503] += 1
            return _TooManyConnections(peer, self.server_name)
        proto = RtspServerProtocol(self, peer)
        self.protocols.add(proto)
        if peer is not None:
            self.per_client[peer] += 1
        return proto

    # --- sessions ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters for ``/api/status`` (``rtsp``); ``refused``: error answers by status."""
        return {
            "sessions": len(self.sessions),
            "connections": len(self.protocols),
            "refused_sessions": self.sessions.refused,
            "refused_destinations": self.refused_destinations,
            "refused_connections": self.refused_connections,
            "max_connections": self.max_connections,
            "refused_server_connections": self.refused_server_connections,
            "reaped": self.reaped,
            "idle_closed": self.idle_closed,
            "aborted_unread": self.aborted_unread,
            "interleaved_dropped": self.interleaved_dropped,
            "refused": {str(k): v for k, v in sorted(self.refused.items())},
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
        if proto in self.protocols and proto.peer is not None:
            self.per_client[proto.peer] -= 1
            if self.per_client[proto.peer] <= 0:
                del self.per_client[proto.peer]
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
        n = self._refusal_log.due(now)
        if n:
            self.log.warn(
                "rtsp: refused {n} new session(s) ({status} {reason}; last from {peer})",
                n=n,
                status=exc.status,
                reason=exc.reason,
                peer=peer,
            )

    def _log_full(self, peer: str | None) -> None:
        n = self._full_log.due(self.clock.seconds())
        if n:
            self.log.warn(
                "rtsp: refused {n} connection(s): {cap} open, the server's cap (last from {peer})",
                n=n,
                cap=self.max_connections,
                peer=peer,
            )

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
        if done.status >= 400:
            self.refused[done.status] += 1
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
