"""PLAY/PAUSE answers of the RTSP server: PAUSE's Range, Scale/Speed, refusals with a reason."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from yimaporc.rtsp import (
    IRtspHandler,
    NptRange,
    PlayReply,
    Response,
    RtspClientConnection,
    RtspServerFactory,
    RtspStatusError,
    ServerSession,
    TransportSpec,
)

URL = "rtsp://127.0.2.1:8554/sample"
TRACK = URL + "/track1"


@implementer(IRtspHandler)
class _Handler:
    def __init__(self) -> None:
        self.plays = 0

    def describe(self, url: str) -> Any:
        if url.endswith("/broken"):
            raise RtspStatusError(415, "broken cannot be streamed: not MPEG-TS\r\nor WAV")
        raise RtspStatusError(404)

    def setup(self, url: str, transport: TransportSpec, session: ServerSession) -> Any:
        return transport

    def play(self, session: ServerSession, range: NptRange | None) -> Any:
        self.plays += 1
        return PlayReply(NptRange(0.0, 30.0))

    def pause(self, session: ServerSession) -> Any:
        return NptRange(12.5, 30.0)

    def teardown(self, session: ServerSession) -> Any:
        return None

    def get_parameter(self, session: ServerSession | None, body: bytes) -> Any:
        return b""

    def set_parameter(self, session: ServerSession | None, body: bytes) -> Any:
        return b""

    def interleaved_received(self, session: ServerSession, channel: int, data: bytes) -> None:
        pass


class _Server:
    """A server protocol on a StringTransport, a client connection to talk to it."""

    def __init__(self) -> None:
        self.handler = _Handler()
        factory = RtspServerFactory(self.handler, Clock(), random.Random(5))
        self.proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.9", 40000))
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.client = RtspClientConnection()

    def ask(self, pair: tuple[int, bytes]) -> Response:
        self.proto.dataReceived(pair[1])
        self.client.receive_data(self.transport.value())
        self.transport.clear()
        return self.client.next_event().response  # type: ignore[union-attr]


def _ready() -> _Server:
    s = _Server()
    assert s.ask(s.client.setup(TRACK, TransportSpec(client_port=(5000, 5001)))).status == 200
    return s


def test_pause_answers_the_range_the_handler_paused_at() -> None:
    """PAUSE's answer carries Range from the pause point (RFC 2326 §10.6)."""
    s = _ready()
    s.ask(s.client.play(URL))
    r = s.ask(s.client.pause(URL))
    assert r.status == 200 and r.headers.get("Range") == "npt=12.5-30"


def test_scale_and_speed_other_than_one_are_456_with_a_reason() -> None:
    """Scale or Speed other than 1 is refused with 456 saying so; 1 is played and echoed."""
    s = _ready()
    c = s.client
    for header, value in (("Scale", "2.0"), ("Speed", "-1"), ("Scale", "fast")):
        r = s.ask(c.request("PLAY", URL, [(header, value)]))
        assert r.status == 456, (header, value)
        assert f"only normal play ({header}: 1)" in r.reason
        assert b"not served" in r.body
    assert s.handler.plays == 0
    r = s.ask(c.request("PLAY", URL, [("Scale", "1.0"), ("Speed", "1")]))
    assert r.status == 200 and r.headers.get("Scale") == "1" and r.headers.get("Speed") == "1"


def test_refusals_carry_their_reason_in_the_status_line_and_body() -> None:
    """415 from the handler and 457 for a bad Range say why (one line; whole in the body)."""
    s = _ready()
    r = s.ask(s.client.describe(URL + "/broken"))
    assert r.status == 415
    assert r.reason == "Unsupported Media Type: broken cannot be streamed: not MPEG-TS or WAV"
    assert r.headers.get("Content-Type") == "text/plain; charset=utf-8"
    assert r.body == b"broken cannot be streamed: not MPEG-TS or WAV\r\n"
    r = s.ask(s.client.request("PLAY", URL, [("Range", "smpte=0:10:00-")]))
    assert r.status == 457 and "npt=START-[END]" in r.reason
    r = s.ask(s.client.describe(URL + "/missing"))
    assert r.status == 404 and r.reason == "Not Found" and r.body == b""
