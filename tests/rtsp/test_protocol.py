"""The Twisted RTSP server and client over in-memory transports with a fake clock."""

from __future__ import annotations

import random
from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer
from zope.interface.verify import verifyObject

from yimaporc.rtsp import (
    InterleavedFrame,
    IRtspHandler,
    Limits,
    NptRange,
    PlayReply,
    Response,
    RtpInfo,
    RtspClientConnection,
    RtspClientProtocol,
    RtspConnectionLost,
    RtspServerFactory,
    RtspServerProtocol,
    RtspStatusError,
    ServerSession,
    SessionState,
    TransportSpec,
    parse_transport,
    sdp,
)
from yimaporc.testing.pytest_plugin import LoggedFailures

URL = "rtsp://127.0.2.1:8554/sample"
TRACK = URL + "/trackID=0"
UDP = TransportSpec(client_port=(5000, 5001))
TCP = TransportSpec(lower="TCP")


@implementer(IRtspHandler)
class FakeHandler:
    """A minimal handler that records calls (the real one is the Yima session planner)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.slow: Deferred[bytes] | None = None
        self.frames: list[tuple[str, int, bytes]] = []

    def describe(self, url: str) -> Any:
        self.calls.append(("describe", url))
        if url.endswith("/missing"):
            raise RtspStatusError(404)
        if url.endswith("/slow"):
            self.slow = Deferred()
            return self.slow
        if url.endswith("/object"):
            return sdp.presentation_sdp("o", [sdp.mp2t_track("trackID=0")], 1.0)
        return b"v=0\r\ns=sample\r\n"

    def setup(self, url: str, transport: TransportSpec, session: ServerSession) -> Any:
        self.calls.append(("setup", url))
        if url.endswith("/refuse"):
            return _fail(RtspStatusError(453))
        if transport.is_tcp:
            return succeed(attrs.evolve(transport, ssrc=0x1234))
        return attrs.evolve(transport, server_port=(6970, 6971), ssrc=0x1234, source="127.0.2.1")

    def play(self, session: ServerSession, range: NptRange | None) -> Any:
        self.calls.append(("play", range))
        if any(t.is_tcp for t in session.streams.values()):
            session.send_interleaved(0, b"first")  # sent while the PLAY is being answered
        return PlayReply(range or NptRange(0.0, None), (RtpInfo(TRACK, 1, 0),))

    def pause(self, session: ServerSession) -> Any:
        self.calls.append(("pause", session.session_id))

    def teardown(self, session: ServerSession) -> Any:
        self.calls.append(("teardown", session.session_id))

    def get_parameter(self, session: ServerSession | None, body: bytes) -> Any:
        self.calls.append(("get_parameter", body))
        return b"position: 1\r\n" if body else b""

    def set_parameter(self, session: ServerSession | None, body: bytes) -> Any:
        self.calls.append(("set_parameter", body))
        if body == b"boom":
            raise ValueError("handler bug")

    def interleaved_received(self, session: ServerSession, channel: int, data: bytes) -> None:
        self.frames.append((session.session_id, channel, data))


def _fail(exc: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(exc))
    return d


@attrs.define
class Server:
    """A server protocol on a StringTransport, with a client connection to talk to it."""

    handler: FakeHandler
    clock: Clock
    factory: RtspServerFactory
    proto: RtspServerProtocol
    transport: StringTransport
    client: RtspClientConnection

    def send(self, data: bytes) -> list[Response | InterleavedFrame]:
        """Feed bytes to the server; return what it answered."""
        self.proto.dataReceived(data)
        return self.take()

    def take(self) -> list[Response | InterleavedFrame]:
        """Parse what the server wrote since last time."""
        out = self.transport.value()
        self.transport.clear()
        if out:
            self.client.receive_data(out)
        events: list[Response | InterleavedFrame] = []
        while True:
            ev = self.client.next_event()
            if isinstance(ev, InterleavedFrame):
                events.append(ev)
            elif hasattr(ev, "response"):
                events.append(ev.response)  # type: ignore[union-attr]
            else:
                return events

    def ask(self, pair: tuple[int, bytes]) -> Response:
        """Send one client request, return the one response."""
        (resp,) = self.send(pair[1])
        assert isinstance(resp, Response)
        return resp


def _server(timeout: float = 60.0, limits: Limits = Limits(max_buffer=4096)) -> Server:  # noqa: B008
    handler = FakeHandler()
    clock = Clock()
    factory = RtspServerFactory(
        handler, clock, random.Random(3), session_timeout=timeout, limits=limits
    )
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.9", 40000))
    transport = StringTransport()
    proto.makeConnection(transport)
    return Server(handler, clock, factory, proto, transport, RtspClientConnection())


def test_handler_provides_interface() -> None:
    """The test handler satisfies IRtspHandler (so the lead's can be verified the same way)."""
    assert verifyObject(IRtspHandler, FakeHandler())


def test_udp_session_full_flow() -> None:
    """OPTIONS, DESCRIBE, SETUP, PLAY, PAUSE, TEARDOWN over UDP give the right headers and state."""
    s = _server()
    c = s.client
    r = s.ask(c.options(URL))
    assert r.status == 200 and "DESCRIBE" in (r.headers.get("Public") or "")
    r = s.ask(c.describe(URL))
    assert r.headers.get("Content-Type") == "application/sdp"
    assert r.headers.get("Content-Base") == URL + "/"
    assert r.body == b"v=0\r\ns=sample\r\n"
    r = s.ask(c.setup(TRACK, UDP))
    assert r.status == 200
    sid = c.session_id
    assert sid is not None and r.headers.get("Session") == f"{sid};timeout=60"
    (reply,) = parse_transport(r.headers.get("Transport") or "")
    assert reply.server_port == (6970, 6971) and reply.client_port == (5000, 5001)
    session = s.factory.sessions.get(sid)
    assert (
        session is not None and session.state is SessionState.READY and session.peer == "127.0.0.9"
    )
    r = s.ask(c.play(URL, NptRange(2.0, None)))
    assert r.headers.get("Range") == "npt=2-"
    assert r.headers.get("RTP-Info") == f"url={TRACK};seq=1;rtptime=0"
    assert r.headers.get("Session") == sid
    assert session.state is SessionState.PLAYING
    assert s.ask(c.pause(URL)).status == 200
    assert session.state is SessionState.READY
    assert s.ask(c.teardown(URL)).status == 200
    assert s.factory.sessions.get(sid) is None
    assert [name for name, _ in s.handler.calls] == [
        "describe",
        "setup",
        "play",
        "pause",
        "teardown",
    ]


def test_describe_object_is_serialized() -> None:
    """A handler may return a SessionDescription; the server writes it as SDP."""
    s = _server()
    r = s.ask(s.client.describe(URL + "/object"))
    assert sdp.parse_sdp(r.body).media[0].control == "trackID=0"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"FROBNICATE rtsp://h/s RTSP/1.0\r\nCSeq: 1\r\n\r\n", 501),
        (b"RECORD rtsp://h/s RTSP/1.0\r\nCSeq: 1\r\nSession: X\r\n\r\n", 405),
        (b"PLAY rtsp://h/s RTSP/1.0\r\nCSeq: 1\r\n\r\n", 455),
        (b"PLAY rtsp://h/s RTSP/1.0\r\nCSeq: 1\r\nSession: NOPE\r\n\r\n", 454),
        (b"SETUP rtsp://h/s RTSP/1.0\r\nCSeq: 1\r\nTransport: RTP/AVP;multicast\r\n\r\n", 461),
        (b"SETUP rtsp://h/s RTSP/1.0\r\nCSeq: 1\r\n\r\n", 461),
        (b"DESCRIBE rtsp://h/missing RTSP/1.0\r\nCSeq: 1\r\n\r\n", 404),
        (b"SET_PARAMETER rtsp://h/s RTSP/1.0\r\nCSeq: 1\r\nContent-Length: 4\r\n\r\nboom", 500),
        (
            b"SETUP rtsp://h/refuse RTSP/1.0\r\nCSeq: 1\r\nTransport: RTP/AVP;client_port=1-2\r\n\r\n",
            453,
        ),
        (b"OPTIONS * RTSP/1.0\r\nCSeq: 1\r\nRequire: implicit-play\r\n\r\n", 551),
    ],
)
def test_request_errors_keep_the_connection(
    data: bytes, status: int, logged_failures: LoggedFailures
) -> None:
    """Per-request errors answer their status with the CSeq and leave the connection open."""
    s = _server()
    s.client._pending[1] = ("X", "x")
    (r,) = s.send(data)
    assert isinstance(r, Response) and r.status == status and r.cseq == 1
    assert not s.transport.disconnecting
    assert len(s.factory.sessions) == 0  # a refused SETUP leaves no session behind
    s.client._pending[2] = ("OPTIONS", "*")
    (r,) = s.send(b"OPTIONS * RTSP/1.0\r\nCSeq: 2\r\n\r\n")
    assert isinstance(r, Response) and r.status == 200
    # A handler that raises (the 500 case) is logged with its traceback.
    assert bool(logged_failures.take()) == (status == 500)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"this is not rtsp\r\n\r\n", 400),
        (b"OPTIONS * RTSP/1.0\r\n\r\n", 400),
        (b"OPTIONS * RTSP/2.0\r\nCSeq: 1\r\n\r\n", 505),
        (b"DESCRIBE rtsp://h/" + b"a" * 5000, 414),
        (b"SET_PARAMETER * RTSP/1.0\r\nCSeq: 1\r\nContent-Length: 999999\r\n\r\n", 413),
    ],
)
def test_malformed_input_answers_then_closes(data: bytes, status: int) -> None:
    """Broken framing or limits answer the status with Connection: close, then disconnect."""
    s = _server()
    s.proto.dataReceived(data)
    out = s.transport.value()
    assert out.startswith(f"RTSP/1.0 {status} ".encode())
    assert b"Connection: close" in out
    assert s.transport.disconnecting
    assert s.transport.producer is None  # unregistered, or a paused gate would block the close
    s.transport.clear()
    s.proto.dataReceived(b"OPTIONS * RTSP/1.0\r\nCSeq: 5\r\n\r\n")
    assert s.transport.value() == b""


def test_pipelined_requests_answered_in_order() -> None:
    """A slow DESCRIBE holds back the pipelined OPTIONS until it is answered."""
    s = _server()
    c = s.client
    _, d1 = c.describe(URL + "/slow")
    _, d2 = c.options(URL)
    assert s.send(d1 + d2) == []
    assert s.handler.slow is not None
    s.handler.slow.callback(b"v=0\r\n")
    r1, r2 = s.take()
    assert isinstance(r1, Response) and isinstance(r2, Response)
    assert (r1.cseq, r2.cseq) == (1, 2)


def test_reading_pauses_while_busy_with_a_big_backlog() -> None:
    """A client flooding requests behind a slow one gets its reads paused, then answered
    at most max_requests_per_turn per reactor turn, and its reads resumed."""
    s = _server()
    c = s.client
    _, first = c.describe(URL + "/slow")
    flood = b"".join(c.options(URL)[1] for _ in range(200))
    s.send(first + flood)
    assert s.transport.producerState == "paused"
    assert s.handler.slow is not None
    s.handler.slow.callback(b"")
    # This turn: the slow answer and max_requests_per_turn more; the rest is deferred
    # to a later turn (a callLater(0), so the reactor serves others in between).
    assert len(s.take()) == 1 + s.factory.max_requests_per_turn
    assert [c.getTime() for c in s.clock.getDelayedCalls()].count(0.0) == 1
    s.clock.advance(0)
    assert len(s.take()) == 200 - s.factory.max_requests_per_turn
    assert s.transport.producerState == "producing"


def test_interleaved_output_to_a_client_that_does_not_read_is_capped() -> None:
    """Once the transport is full, at most max_unread_output more bytes of frames are
    written; the rest is dropped (False, counted) until the client reads again."""
    s = _server(limits=Limits(max_buffer=4096, max_unread_output=10_000))
    c = s.client
    s.ask(c.setup(TRACK, TCP))
    s.send(c.play(URL)[1])
    session = s.factory.sessions.get(c.session_id or "")
    assert session is not None
    s.transport.producer.pauseProducing()
    sent = [session.send_interleaved(0, b"x" * 996) for _ in range(20)]  # 1000-byte frames
    assert sent == [True] * 10 + [False] * 10
    assert s.factory.stats()["interleaved_dropped"] == 10
    s.transport.producer.resumeProducing()
    assert session.send_interleaved(0, b"y")


def test_no_request_is_read_while_the_output_buffer_is_full() -> None:
    """A client that does not read its answers gets no more answered until it does."""
    s = _server()
    c = s.client
    s.transport.producer.pauseProducing()  # the transport's write buffer is full
    assert s.send(c.options(URL)[1] + c.options(URL)[1]) == []
    s.transport.producer.resumeProducing()
    s.clock.advance(0)
    assert [r.cseq for r in s.take() if isinstance(r, Response)] == [1, 2]


def test_interleaved_tcp_session() -> None:
    """RTP/AVP/TCP gets channels 0-1, frames flow both ways, and a lost connection tears down."""
    s = _server()
    c = s.client
    r = s.ask(c.setup(TRACK, TCP))
    (reply,) = parse_transport(r.headers.get("Transport") or "")
    assert reply.interleaved == (0, 1) and reply.ssrc == 0x1234
    sid = c.session_id
    assert sid is not None
    session = s.factory.sessions.get(sid)
    assert session is not None
    r, first = s.send(c.play(URL)[1])
    assert isinstance(r, Response) and r.status == 200
    assert first == InterleavedFrame(0, b"first")  # held back until after the PLAY response
    assert session.send_interleaved(0, b"rtp-packet")
    assert not s.proto.write_paused
    s.transport.producer.pauseProducing()  # the transport's buffer is full
    assert s.proto.write_paused
    s.transport.producer.resumeProducing()
    assert s.take() == [InterleavedFrame(0, b"rtp-packet")]
    s.proto.dataReceived(c.send_interleaved(1, b"rtcp-rr") + c.send_interleaved(7, b"unbound"))
    assert s.handler.frames == [(sid, 1, b"rtcp-rr")]
    # A second stream on the same connection gets the next pair.
    r = s.ask(c.setup(URL + "/trackID=1", TCP))
    assert parse_transport(r.headers.get("Transport") or "")[0].interleaved == (2, 3)
    s.proto.connectionLost(Failure(ConnectionError()))
    assert ("teardown", sid) in s.handler.calls
    assert s.factory.sessions.get(sid) is None
    assert not session.send_interleaved(0, b"late")


def test_udp_session_outlives_its_connection_only_briefly() -> None:
    """A played UDP session: keep-alives postpone reaping; once its connection closes
    it ends detached_timeout s later even if RTCP keeps arriving."""
    s = _server(timeout=30.0)
    c = s.client
    s.ask(c.setup(TRACK, UDP))
    sid = c.session_id
    assert sid is not None
    assert s.ask(c.play(URL)).status == 200
    s.clock.advance(20)
    assert s.ask(c.get_parameter(URL)).status == 200  # keep-alive at t=20
    s.clock.advance(20)
    assert s.factory.sessions.get(sid) is not None
    s.proto.connectionLost(Failure(ConnectionError()))
    assert s.factory.sessions.get(sid) is not None
    assert s.factory.touch(sid)  # RTCP seen at t=40
    s.clock.advance(9)
    assert s.factory.touch(sid)  # RTCP seen at t=49
    assert s.factory.sessions.get(sid) is not None
    s.clock.advance(1)
    assert s.factory.sessions.get(sid) is None
    assert ("teardown", sid) in s.handler.calls
    assert s.factory.stats()["reaped"] == 1
    assert s.clock.getDelayedCalls() == []


def test_detached_udp_session_is_taken_over_by_a_new_connection() -> None:
    """A request naming a detached session from another connection keeps it alive."""
    s = _server(timeout=30.0)
    s.ask(s.client.setup(TRACK, UDP))
    sid = s.client.session_id
    s.ask(s.client.play(URL))
    s.proto.connectionLost(Failure(ConnectionError()))
    s.clock.advance(5)
    other = s.factory.buildProtocol(IPv4Address("TCP", "127.0.0.9", 40001))
    transport = StringTransport()
    other.makeConnection(transport)
    other.dataReceived(
        f"GET_PARAMETER {URL} RTSP/1.0\r\nCSeq: 1\r\nSession: {sid}\r\n\r\n".encode()
    )
    assert transport.value().startswith(b"RTSP/1.0 200 OK")
    s.clock.advance(25)
    session = s.factory.sessions.get(sid or "")
    assert session is not None and session.sender is other
    s.clock.advance(5)
    assert s.factory.sessions.get(sid or "") is None  # 30 s after the last request


def test_session_controlled_from_a_second_connection() -> None:
    """A session set up on one connection can be played from another (RFC 2326 §12.37)."""
    s = _server()
    s.ask(s.client.setup(TRACK, UDP))
    sid = s.client.session_id
    other = s.factory.buildProtocol(IPv4Address("TCP", "127.0.0.9", 40001))
    transport = StringTransport()
    other.makeConnection(transport)
    other.dataReceived(f"PLAY {URL} RTSP/1.0\r\nCSeq: 1\r\nSession: {sid}\r\n\r\n".encode())
    assert transport.value().startswith(b"RTSP/1.0 200 OK\r\nCSeq: 1\r\n")


def test_get_parameter_body_and_teardown_without_session() -> None:
    """GET_PARAMETER returns the handler's body; a session-less TEARDOWN is a 200 no-op."""
    s = _server()
    r = s.ask(s.client.get_parameter(URL, b"position\r\n"))
    assert r.body == b"position: 1\r\n" and r.headers.get("Content-Type") == "text/parameters"
    assert s.ask(s.client.teardown(URL)).status == 200
    assert ("teardown", None) not in s.handler.calls


def _connect(factory: RtspServerFactory, host: str, port: int = 40000) -> Server:
    proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    proto.makeConnection(transport)
    handler = factory.handler
    assert isinstance(handler, FakeHandler) and isinstance(factory.clock, Clock)
    return Server(handler, factory.clock, factory, proto, transport, RtspClientConnection())


def _new_setups(s: Server, n: int) -> bytes:
    """``n`` pipelined SETUPs each creating a session (built before any answer is read,
    so none carries a Session header)."""
    transport = [("Transport", "RTP/AVP;unicast;client_port=5000-5001")]
    return b"".join(s.client.request("SETUP", TRACK, transport)[1] for _ in range(n))


class TurnClock(Clock):
    """A Clock whose turn() runs only the calls due when it starts, like one reactor turn
    (Clock.advance also runs calls scheduled for now by the calls it runs)."""

    def turn(self) -> int:
        due = [c for c in self.getDelayedCalls() if c.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)
        return len(due)


def test_setup_with_foreign_destination_is_refused() -> None:
    """SETUP naming another host as destination gets 461 (with a reason), creates no
    session, never reaches the handler, and is counted; its own address is fine."""
    s = _server()
    other = attrs.evolve(UDP, destination="127.0.103.99")
    r = s.ask(s.client.setup(TRACK, other))
    assert r.status == 461 and "destination" in r.reason
    assert len(s.factory.sessions) == 0 and not s.handler.calls
    assert s.factory.stats()["refused_destinations"] == 1
    own = attrs.evolve(UDP, destination="127.0.0.9")
    assert s.ask(s.client.setup(TRACK, own)).status == 200


def test_per_client_cap_answers_453_and_spares_other_clients() -> None:
    """One address hits max_sessions_per_client (453 with a reason phrase); another address
    still sets up; refusals appear in stats()."""
    factory = RtspServerFactory(
        FakeHandler(), Clock(), random.Random(1), max_sessions=10, max_sessions_per_client=3
    )
    a = _connect(factory, "127.0.103.10")
    answers = a.send(_new_setups(a, 4))
    assert [r.status for r in answers if isinstance(r, Response)] == [200, 200, 200, 453]
    r = answers[-1]
    assert isinstance(r, Response)
    assert r.status == 453 and r.reason.startswith("Not Enough Bandwidth (")
    b = _connect(factory, "127.0.103.11")
    assert b.ask(b.client.setup(TRACK, UDP)).status == 200
    assert factory.stats()["refused_sessions"] == 1 and factory.stats()["sessions"] == 4


def test_refusals_are_logged_once_per_interval() -> None:
    """A SETUP flood past the caps writes one log line, then one summary per interval."""
    from twisted.logger import globalLogPublisher

    factory = RtspServerFactory(
        FakeHandler(), Clock(), random.Random(1), max_sessions_per_client=1,
        max_requests_per_turn=1000,
    )  # fmt: skip
    s = _connect(factory, "127.0.103.10")
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        s.send(_new_setups(s, 500))
        s.clock.advance(10)
        s.client.session = None
        s.send(_new_setups(s, 3))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [e for e in seen if "refused" in e.get("log_format", "")]
    assert [e["n"] for e in lines] == [1, 499]  # the first, then the next 498 + 1
    assert factory.stats()["refused_sessions"] == 502


def test_unplayed_sessions_are_reaped_in_bounded_batches() -> None:
    """A burst of never-played SETUPs expires after setup_timeout, at most reap_batch
    sessions per reactor turn, all of them in the end, without RPC-free teardown stalls."""
    clock = TurnClock()
    factory = RtspServerFactory(
        FakeHandler(), clock, random.Random(2), max_sessions_per_client=None, reap_batch=50,
        setup_timeout=15.0, max_requests_per_turn=1000,
    )  # fmt: skip
    s = _connect(factory, "127.0.103.10")
    answers = s.send(_new_setups(s, 200))
    assert [r.status for r in answers if isinstance(r, Response)] == [200] * 200
    assert len(factory.sessions) == 200
    clock.advance(14.9)
    assert len(factory.sessions) == 200
    clock.rightNow = 15.0
    left = []
    while clock.turn():
        left.append(len(factory.sessions))
    assert left == [150, 100, 50, 0]
    assert factory.stats()["reaped"] == 200
    assert len([1 for name, _ in s.handler.calls if name == "teardown"]) == 200


def test_idle_connection_is_closed_but_one_with_a_live_session_is_kept() -> None:
    """No request for idle_timeout s and no live session: closed and counted; a connection
    whose played UDP session lives on (RTCP keep-alives) stays open."""
    factory = RtspServerFactory(FakeHandler(), Clock(), random.Random(3), idle_timeout=30.0)
    idle = _connect(factory, "127.0.103.10")
    busy = _connect(factory, "127.0.103.11")
    assert idle.ask(idle.client.options(URL)).status == 200
    assert busy.ask(busy.client.setup(TRACK, UDP)).status == 200
    sid = busy.client.session_id
    assert busy.ask(busy.client.play(URL)).status == 200
    for _ in range(6):
        idle.clock.advance(10)
        factory.touch(sid or "")
    assert idle.transport.disconnecting
    assert not busy.transport.disconnecting
    assert factory.stats()["idle_closed"] == 1
    busy.clock.advance(60)  # RTCP stops: the session times out, then the connection goes
    assert factory.sessions.get(sid or "") is None
    busy.clock.advance(30)
    assert busy.transport.disconnecting


def test_connections_in_all_are_capped_whatever_their_addresses() -> None:
    """Past max_connections open connections (each from its own address, under every
    per-client cap) the next one gets 503 with the reason and is closed, counted apart
    from the per-client refusals; the open ones and their sessions go on; a closed one
    frees its slot."""
    factory = RtspServerFactory(FakeHandler(), Clock(), random.Random(3), max_connections=3)
    held = [_connect(factory, f"127.0.191.{i}") for i in range(1, 4)]
    assert held[0].ask(held[0].client.setup(TRACK, UDP)).status == 200
    extra = _connect(factory, "127.0.191.4")
    assert extra.transport.value() == (
        b"RTSP/1.0 503 Service Unavailable: too many connections to this server\r\n"
        b"Server: " + factory.server_name.encode() + b"\r\nConnection: close\r\n\r\n"
    )
    assert extra.transport.disconnecting and not isinstance(extra.proto, RtspServerProtocol)
    assert all(h.ask(h.client.options(URL)).status == 200 for h in held)
    assert held[0].ask(held[0].client.play(URL)).status == 200
    assert len(factory.sessions) == 1
    held[1].proto.connectionLost()
    again = _connect(factory, "127.0.191.4")
    assert again.ask(again.client.options(URL)).status == 200
    stats = factory.stats()
    assert stats["refused_server_connections"] == 1 and stats["refused_connections"] == 0
    assert stats["max_connections"] == 3 and stats["connections"] == 3
    assert stats["refused"] == {"503": 1}


def test_default_connection_cap_follows_the_open_file_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without max_connections a factory (an embedder's too) takes half of the soft
    RLIMIT_NOFILE less 128 for other descriptors, at least 16; no limit counts as 65536."""
    import resource

    from yimaporc.rtsp._factory import default_max_connections

    assert default_max_connections(1024) == 448
    assert default_max_connections(65536) == 32704
    assert default_max_connections(100) == 16
    assert default_max_connections(resource.RLIM_INFINITY) == 32704
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    factory = RtspServerFactory(FakeHandler(), Clock(), random.Random(3))
    assert factory.max_connections == 448 and factory.stats()["max_connections"] == 448


def test_a_request_dribbled_in_does_not_keep_its_connection() -> None:
    """Slowloris: bytes of a request that never completes do not count as a request, so
    the connection is closed idle_timeout s after its last complete request (or its
    start), counted in idle_closed."""
    factory = RtspServerFactory(FakeHandler(), Clock(), random.Random(3), idle_timeout=30.0)
    slow = _connect(factory, "127.0.191.20")
    head = b"OPTIONS " + URL.encode() + b" RTSP/1.0\r\nCSeq: 1\r\n"
    for i in range(29):
        slow.proto.dataReceived(head[i : i + 1])
        slow.clock.advance(1)
    assert not slow.transport.disconnecting
    slow.proto.dataReceived(head[29:30])
    slow.clock.advance(1)
    assert slow.transport.disconnecting and slow.transport.value() == b""
    assert factory.stats()["idle_closed"] == 1
    assert factory.stats()["connections"] == 1  # until the transport reports the loss
    slow.proto.connectionLost()
    assert factory.stats()["connections"] == 0


def test_a_closed_connection_whose_client_does_not_read_is_aborted() -> None:
    """A connection the server closes (idle, or broken framing) is aborted CLOSE_LINGER s
    later if its client has not taken the output queued for it (loseConnection waits
    for that forever, holding the descriptor and a place under the caps), counted in
    aborted_unread; one whose transport finished closing in time is not."""
    from yimaporc.rtsp._protocol import CLOSE_LINGER

    factory = RtspServerFactory(FakeHandler(), Clock(), random.Random(3), idle_timeout=30.0)
    deaf = _connect(factory, "127.0.191.30")
    broken = _connect(factory, "127.0.191.31")
    polite = _connect(factory, "127.0.191.32")
    assert deaf.ask(deaf.client.describe(URL)).status == 200
    broken.proto.dataReceived(b"OPTIONS " + URL.encode() + b" RTSP/1.0\r\n\r\n")  # no CSeq
    assert broken.transport.disconnecting and broken.transport.value().startswith(b"RTSP/1.0 400")
    clock = deaf.clock
    clock.advance(CLOSE_LINGER - 0.5)
    assert not broken.transport.disconnected
    clock.advance(0.5)
    assert broken.transport.disconnected and factory.stats()["aborted_unread"] == 1
    clock.advance(30 - CLOSE_LINGER)
    assert deaf.transport.disconnecting and polite.transport.disconnecting
    assert factory.stats()["idle_closed"] == 2  # not the broken one again
    polite.proto.connectionLost()  # its output drained: the transport closed
    clock.advance(CLOSE_LINGER)
    assert deaf.transport.disconnected and not polite.transport.disconnected
    assert factory.stats()["aborted_unread"] == 2
    for s in (deaf, broken):
        s.proto.connectionLost()
    assert factory.stats()["connections"] == 0 and not factory.clock.getDelayedCalls()


# --- the Twisted client against the server -----------------------------------------------


def _pair() -> tuple[
    RtspClientProtocol,
    RtspServerProtocol,
    iosim.IOPump,
    FakeHandler,
    list[tuple[int, bytes]],
    Clock,
]:
    handler = FakeHandler()
    clock = Clock()
    factory = RtspServerFactory(handler, clock, random.Random(5))
    frames: list[tuple[int, bytes]] = []
    client, server, pump = iosim.connectedServerAndClient(
        lambda: factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)),
        lambda: RtspClientProtocol(
            lambda ch, data: frames.append((ch, data)), clock=clock, timeout=5.0
        ),
        clock=clock,
    )
    return client, server, pump, handler, frames, clock


def _result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def test_client_protocol_session() -> None:
    """The Twisted client sets up TCP, plays, receives interleaved RTP and tears down."""
    client, server, pump, handler, frames, _ = _pair()
    assert _result(client.ready) is client
    d = client.describe(URL)
    pump.flush()
    assert _result(d).body.startswith(b"v=0")
    d = client.setup(TRACK, TCP)
    pump.flush()
    assert _result(d).status == 200 and client.session_id is not None
    d = client.play(URL)
    pump.flush()
    assert _result(d).headers.get("Range") == "npt=0-"
    session = server.factory.sessions.get(client.session_id)
    assert session is not None
    session.send_interleaved(0, b"\x80\x21rtp")
    client.send_interleaved(1, b"rtcp")
    pump.flush()
    assert frames == [(0, b"first"), (0, b"\x80\x21rtp")]
    assert handler.frames == [(session.session_id, 1, b"rtcp")]
    d = client.teardown(URL)
    pump.flush()
    assert _result(d).status == 200 and client.session_id is None


def test_client_protocol_errors() -> None:
    """Non-2xx errbacks RtspStatusError; unanswered requests time out or fail on disconnect."""
    client, _server_proto, pump, _handler, _, clock = _pair()
    d = client.play(URL)
    pump.flush()
    failure = _result(d)
    assert isinstance(failure, Failure) and failure.check(RtspStatusError)
    assert failure.value.status == 455 and failure.value.response.status == 455
    d = client.describe(URL + "/slow")
    pump.flush()
    clock.advance(5.0)
    assert isinstance(_result(d), Failure)
    d = client.options(URL)
    client.connectionLost(Failure(ConnectionError("gone")))
    failure = _result(d)
    assert isinstance(failure, Failure) and failure.check(RtspConnectionLost)
    assert _result(client.options(URL)).check(RtspConnectionLost)


def test_client_protocol_drops_bad_server() -> None:
    """A garbled response fails the pending requests and closes the connection."""
    proto = RtspClientProtocol()
    transport = StringTransport()
    proto.makeConnection(transport)
    d = proto.request("OPTIONS", "*")
    proto.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    assert isinstance(_result(d), Failure)
    assert transport.disconnecting


def test_a_batch_of_interleaved_frames_is_one_write_with_the_same_bytes() -> None:
    """send_interleaved_many writes the frames of a tick in one transport write, the same
    bytes as frame by frame; a client that does not read gets them only up to the cap."""
    from yimaporc.rtsp._machine import send_interleaved_many

    s = _server(limits=Limits(max_buffer=4096, max_unread_output=3500))
    c = s.client
    s.ask(c.setup(TRACK, TCP))
    s.send(c.play(URL)[1])
    session = s.factory.sessions.get(c.session_id or "")
    assert session is not None
    writes: list[bytes] = []
    real = s.transport.write
    s.transport.write = lambda data: (writes.append(data), real(data))[1]  # type: ignore[method-assign]
    packets = [bytes([i]) * (996 + i) for i in range(3)]
    assert send_interleaved_many(session, 0, packets) == 3
    assert len(writes) == 1
    assert s.take() == [InterleavedFrame(0, p) for p in packets]
    s.transport.producer.pauseProducing()
    assert send_interleaved_many(session, 0, [b"x" * 996] * 5) == 3  # 3 x 1000 <= 3500
    assert s.factory.stats()["interleaved_dropped"] == 2
