"""RTSP server sessions, sans-IO: the RFC 2326 state table and every request check.

All transitions live in :data:`TRANSITIONS` (RFC 2326 Appendix A.2, server side,
without RECORD).  A request goes through :func:`prepare` (which raises
:class:`~yimaporc.rtsp.RtspStatusError` with the status to answer: 400, 405,
454, 455, 457, 461, 501, 551, 503), then the application runs it, then
:func:`complete` applies the transition, or :func:`abort` undoes a session
that SETUP created.  :class:`SessionTable` holds sessions across connections,
caps them (in total and per client address) and tells which have timed out at
``now`` (time is always passed in).
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
import random
from collections.abc import Iterator, Sequence
from typing import Protocol

import attrs

from ._errors import MalformedHeader, RtspStatusError
from ._messages import (
    Request,
)
from ._wire import (
    NptRange,
    TransportSpec,
    parse_range,
    parse_session,
    parse_transport,
)


class SessionState(enum.Enum):
    """Server-side session states (RFC 2326 Appendix A.2)."""

    INIT = "Init"
    READY = "Ready"
    PLAYING = "Playing"


_I, _R, _P = SessionState.INIT, SessionState.READY, SessionState.PLAYING

#: (state, method) -> next state.  Methods absent for a state answer 455.
#: Deviation, documented in docs/wire.md: PAUSE in Ready is accepted as a no-op,
#: because players send it around seeks before PLAY.
TRANSITIONS: dict[tuple[SessionState, str], SessionState] = {
    (_I, "SETUP"): _R,
    (_I, "TEARDOWN"): _I,
    (_R, "SETUP"): _R,
    (_R, "PLAY"): _P,
    (_R, "PAUSE"): _R,
    (_R, "TEARDOWN"): _I,
    (_P, "SETUP"): _P,
    (_P, "PLAY"): _P,
    (_P, "PAUSE"): _R,
    (_P, "TEARDOWN"): _I,
}

#: Methods that never change the state of a session.
STATELESS_METHODS = ("OPTIONS", "DESCRIBE", "GET_PARAMETER", "SET_PARAMETER")
STATE_METHODS = ("SETUP", "PLAY", "PAUSE", "TEARDOWN")
SERVER_METHODS = (
    "OPTIONS",
    "DESCRIBE",
    "SETUP",
    "PLAY",
    "PAUSE",
    "TEARDOWN",
    "GET_PARAMETER",
    "SET_PARAMETER",
)
#: RFC 2326 methods this server knows but does not offer (405 with Allow).
UNOFFERED_METHODS = ("ANNOUNCE", "RECORD", "REDIRECT")
PUBLIC = ", ".join(SERVER_METHODS)
#: Streams (SETUP URLs) one session may hold; a SETUP of one more answers 453.
MAX_STREAMS = 8
SUPPORTED_PROFILES = ("RTP/AVP", "RTP/AVPF")


def allowed_in(state: SessionState) -> str:
    """The Allow header of a 455 answer: the methods valid in ``state``."""
    ok = [m for m in SERVER_METHODS if m in STATELESS_METHODS or (state, m) in TRANSITIONS]
    return ", ".join(ok)


class InterleavedSink(Protocol):
    """Where a session's interleaved frames go: the RTSP connection that set it up."""

    def send_interleaved(self, channel: int, data: bytes) -> bool:
        """Queue one frame; False if the connection is gone."""

    def send_interleaved_many(self, channel: int, packets: Sequence[bytes]) -> int:
        """Queue frames on one channel in one write; how many went."""


def send_interleaved_many(session: ServerSession, channel: int, packets: Sequence[bytes]) -> int:
    """Frames on one channel of ``session``'s connection in one write; how many went
    (none once the connection is gone)."""
    sink = session.sender
    if sink is None:
        return 0
    return sink.send_interleaved_many(channel, packets)


@attrs.define(eq=False)
class ServerSession:
    """One RTSP session on the server: its state, streams and liveness.

    Until its first PLAY a session lives ``setup_timeout`` seconds after the
    last activity instead of ``timeout``; once ``detached`` (its RTSP connection
    closed, at ``detached_at``) it ends ``detached_timeout`` seconds later
    whatever else it receives, unless a request re-attaches it.
    """

    session_id: str
    timeout: float
    last_seen: float
    state: SessionState = SessionState.INIT
    streams: dict[str, TransportSpec] = attrs.field(factory=dict)
    peer: str | None = None
    sender: InterleavedSink | None = None
    setup_timeout: float | None = None
    played: bool = False
    detached_timeout: float | None = None
    detached_at: float | None = None
    # The client's User-Agent (from its last SETUP or PLAY), for known client quirks.
    user_agent: str = ""

    @property
    def expires_at(self) -> float:
        """When the session is reaped unless touched before."""
        timeout = self.timeout
        if not self.played and self.setup_timeout is not None:
            timeout = min(timeout, self.setup_timeout)
        at = self.last_seen + timeout
        if self.detached_at is not None and self.detached_timeout is not None:
            at = min(at, self.detached_at + self.detached_timeout)
        return at

    def touch(self, now: float) -> None:
        """Note activity (a request, RTCP from the client) at ``now``."""
        self.last_seen = max(self.last_seen, now)

    def send_interleaved(self, channel: int, data: bytes) -> bool:
        """Send one frame on the RTSP connection; False if there is none."""
        if self.sender is None:
            return False
        return self.sender.send_interleaved(channel, data)


class SessionTable:
    """The server's sessions, by identifier, with timeout bookkeeping (a lazy heap).

    ``max_sessions`` caps the table (503 beyond), ``max_per_client`` the
    sessions of one client address (453 beyond); ``refused`` counts both.
    """

    def __init__(
        self,
        rng: random.Random,
        timeout: float = 60.0,
        max_sessions: int = 1024,
        *,
        max_per_client: int | None = None,
        setup_timeout: float | None = None,
        detached_timeout: float | None = None,
    ) -> None:
        self.rng = rng
        self.timeout = timeout
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client
        self.setup_timeout = setup_timeout
        self.detached_timeout = detached_timeout
        self.refused = 0
        self._sessions: dict[str, ServerSession] = {}
        self._heap: list[tuple[float, str]] = []
        self._per_client: dict[str | None, int] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[ServerSession]:
        return iter(list(self._sessions.values()))

    def get(self, session_id: str) -> ServerSession | None:
        """The session, or None."""
        return self._sessions.get(session_id)

    def of_client(self, peer: str | None) -> int:
        """Sessions of one client address."""
        return self._per_client.get(peer, 0)

    def create(self, now: float, peer: str | None = None) -> ServerSession:
        """A new session in Init with a fresh random identifier.

        503 when the table is full, 453 when ``peer`` has its share already.
        """
        if len(self._sessions) >= self.max_sessions:
            self.refused += 1
            raise RtspStatusError(503, "Service Unavailable (too many sessions)")
        if self.max_per_client is not None and self.of_client(peer) >= self.max_per_client:
            self.refused += 1
            raise RtspStatusError(453, "Not Enough Bandwidth (too many sessions from this client)")
        while True:
            sid = f"{self.rng.getrandbits(64):016X}"
            if sid not in self._sessions:
                break
        session = ServerSession(
            sid,
            self.timeout,
            now,
            peer=peer,
            setup_timeout=self.setup_timeout,
            detached_timeout=self.detached_timeout,
        )
        self._sessions[sid] = session
        self._per_client[peer] = self.of_client(peer) + 1
        heapq.heappush(self._heap, (session.expires_at, sid))
        return session

    def _forget(self, session: ServerSession) -> None:
        left = self.of_client(session.peer) - 1
        if left > 0:
            self._per_client[session.peer] = left
        else:
            self._per_client.pop(session.peer, None)

    def detach(self, session: ServerSession, now: float) -> None:
        """Its RTSP connection closed: the session ends ``detached_timeout`` s from ``now``."""
        if self._sessions.get(session.session_id) is not session:
            return
        session.detached_at = now
        # The expiry may have moved earlier: the lazy heap needs an entry for it.
        heapq.heappush(self._heap, (session.expires_at, session.session_id))

    @staticmethod
    def attach(session: ServerSession) -> None:
        """A request on a connection names the session: it is no longer detached."""
        session.detached_at = None

    def remove(self, session_id: str) -> ServerSession | None:
        """Forget a session; returns it if it existed."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self._forget(session)
        return session

    def touch(self, session_id: str, now: float) -> bool:
        """Note activity on a session; False if unknown."""
        session = self._sessions.get(session_id)
        if session is None:
            return False
        session.touch(now)
        return True

    def _settle(self) -> None:
        # Drop heap entries of removed sessions and move touched ones to their real expiry.
        while self._heap:
            at, sid = self._heap[0]
            session = self._sessions.get(sid)
            if session is None:
                heapq.heappop(self._heap)
            elif session.expires_at > at:
                heapq.heapreplace(self._heap, (session.expires_at, sid))
            else:
                return

    def next_expiry(self) -> float | None:
        """The earliest instant a session may time out, or None."""
        self._settle()
        return self._heap[0][0] if self._heap else None

    def expire(self, now: float, limit: int | None = None) -> list[ServerSession]:
        """Remove and return the sessions silent for their whole timeout at ``now``
        (at most ``limit``, the earliest first)."""
        out: list[ServerSession] = []
        while limit is None or len(out) < limit:
            self._settle()
            if not self._heap or self._heap[0][0] > now:
                break
            _, sid = heapq.heappop(self._heap)
            session = self._sessions.pop(sid)
            self._forget(session)
            out.append(session)
        return out


@attrs.frozen
class Prepared:
    """A request that passed every check, ready for the application."""

    request: Request
    session: ServerSession | None
    created: bool = False
    transport: TransportSpec | None = None
    range: NptRange | None = None
    next_state: SessionState | None = None

    @property
    def method(self) -> str:
        """The request method."""
        return self.request.method


class ForeignDestination(RtspStatusError):
    """461: the only UDP alternatives named a ``destination`` other than the client."""

    def __init__(self) -> None:
        super().__init__(461, "Unsupported Transport (destination is not the client)")


def same_host(a: str | None, b: str | None) -> bool:
    """True if ``a`` and ``b`` name one IP address (IPv4-mapped IPv6 equals IPv4)."""
    if a is None or b is None:
        return False
    try:
        x, y = ipaddress.ip_address(a.strip("[]")), ipaddress.ip_address(b.strip("[]"))
    except ValueError:
        return False
    x = x.ipv4_mapped or x if isinstance(x, ipaddress.IPv6Address) else x
    y = y.ipv4_mapped or y if isinstance(y, ipaddress.IPv6Address) else y
    return x == y


def choose_transport(
    value: str | None, used_channels: frozenset[int] = frozenset(), peer: str | None = None
) -> TransportSpec:
    """The first acceptable alternative of a SETUP's Transport header (461 if none).

    Unicast RTP/AVP over UDP needs ``client_port``, and its ``destination``, if
    any, must be ``peer`` (the RTSP client's address): media never goes to a
    host that did not ask for it (RFC 2326 §12.39).
    RTP/AVP/TCP gets the lowest free even channel pair when the client names none.
    """
    if value is None:
        raise RtspStatusError(461, headers=(("Unsupported", "missing Transport"),))
    try:
        specs = parse_transport(value)
    except MalformedHeader:
        raise RtspStatusError(461) from None
    foreign = port_zero = False
    for spec in specs:
        if spec.profile not in SUPPORTED_PROFILES or not spec.unicast:
            continue
        if spec.mode not in (None, "play"):
            continue
        if spec.lower == "UDP" and spec.client_port is not None:
            if spec.destination is not None and not same_host(spec.destination, peer):
                foreign = True
                continue
            if 0 in spec.client_port:  # no player listens there: every send would fail
                port_zero = True
                continue
            return spec
        if spec.lower == "TCP":
            if spec.interleaved is not None:
                return spec
            n = 0
            while n in used_channels or n + 1 in used_channels:
                n += 2
            if n + 1 > 255:
                continue
            return attrs.evolve(spec, interleaved=(n, n + 1))
    if foreign:
        raise ForeignDestination()
    if port_zero:
        raise RtspStatusError(461, "Unsupported Transport (client_port 0)")
    raise RtspStatusError(461)


def _normal_play_only(request: Request) -> None:
    """``Scale`` and ``Speed`` (RFC 2326 §12.34-35) other than 1 are refused with 456:
    only normal-rate play is served (rate changes come from the Yima flow control)."""
    for name in ("Scale", "Speed"):
        value = request.headers.get(name)
        if value is None:
            continue
        try:
            ok = float(value.strip()) == 1.0
        except ValueError:
            ok = False
        if not ok:
            raise RtspStatusError(
                456, f"{name}: {value.strip()[:40]} not served: only normal play ({name}: 1)"
            )


def prepare(
    request: Request,
    table: SessionTable,
    now: float,
    *,
    peer: str | None = None,
    used_channels: frozenset[int] = frozenset(),
) -> Prepared:
    """Check ``request`` against the method set, its headers and the session's state.

    Raises :class:`RtspStatusError` with the status to answer.  A SETUP without
    a Session header creates a session in Init (``created``); call
    :func:`abort` if the application then fails.
    """
    method = request.method
    if request.cseq is None:
        raise RtspStatusError(400, "Missing CSeq")
    if method in UNOFFERED_METHODS:
        raise RtspStatusError(405, headers=(("Allow", PUBLIC),))
    if method not in SERVER_METHODS:
        raise RtspStatusError(501, headers=(("Public", PUBLIC),))
    required = request.headers.get_all("Require") + request.headers.get_all("Proxy-Require")
    if required:
        tags = ", ".join(t.strip() for v in required for t in v.split(",") if t.strip())
        raise RtspStatusError(551, headers=(("Unsupported", tags),))
    session: ServerSession | None = None
    raw = request.headers.get("Session")
    if raw is not None:
        try:
            sid = parse_session(raw).session_id
        except MalformedHeader:
            raise RtspStatusError(454) from None
        session = table.get(sid)
        if session is None:
            raise RtspStatusError(454)
        session.touch(now)
    state = session.state if session is not None else SessionState.INIT
    next_state: SessionState | None = None
    if method in STATE_METHODS:
        found = TRANSITIONS.get((state, method))
        if found is None:
            raise RtspStatusError(455, headers=(("Allow", allowed_in(state)),))
        next_state = found
    transport = None
    rng = None
    if method == "SETUP":
        transport = choose_transport(request.headers.get("Transport"), used_channels, peer)
    elif method == "PLAY":
        value = request.headers.get("Range")
        if value is not None:
            try:
                rng = parse_range(value)
            except MalformedHeader:
                raise RtspStatusError(
                    457, "Invalid Range: only npt=START-[END] is served (seconds or h:m:s)"
                ) from None
        _normal_play_only(request)
    if (
        method == "SETUP"
        and session is not None
        and request.url not in session.streams
        and len(session.streams) >= MAX_STREAMS
    ):
        raise RtspStatusError(453, "Not Enough Bandwidth (too many streams in this session)")
    created = False
    if method == "SETUP" and session is None:
        session = table.create(now, peer)
        created = True
    return Prepared(request, session, created, transport, rng, next_state)


def complete(
    prepared: Prepared, table: SessionTable, reply_transport: TransportSpec | None = None
) -> None:
    """Apply the transition of a request the application carried out."""
    session = prepared.session
    if session is None or prepared.next_state is None:
        return
    method = prepared.method
    url = prepared.request.url
    if method == "SETUP":
        chosen = reply_transport or prepared.transport
        if chosen is not None:
            session.streams[url] = chosen
    if method == "PLAY":
        session.played = True
    if method == "TEARDOWN":  # always the whole session (the handler tears it all down)
        session.streams.clear()
        session.state = SessionState.INIT
        table.remove(session.session_id)
        return
    session.state = prepared.next_state


def abort(prepared: Prepared, table: SessionTable) -> None:
    """Undo what :func:`prepare` did for a request the application refused."""
    if prepared.created and prepared.session is not None:
        table.remove(prepared.session.session_id)
