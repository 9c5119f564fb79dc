"""The sans-IO RTSP server and client connections: events, CSeq matching, errors."""

from __future__ import annotations

import pytest

from yimaporc.rtsp import (
    NEED_DATA,
    ConnectionClosed,
    Headers,
    InterleavedFrame,
    LocalProtocolError,
    NptRange,
    RemoteProtocolError,
    RequestReceived,
    Response,
    ResponseReceived,
    RtspClientConnection,
    RtspServerConnection,
    TransportSpec,
)

OPTIONS = b"OPTIONS * RTSP/1.0\r\nCSeq: 1\r\n\r\n"


def _events(conn: RtspServerConnection | RtspClientConnection) -> list[object]:
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            break
    return out


def test_server_events_and_cseq_filled_in() -> None:
    """Requests and frames come out as events; responses get the oldest unanswered CSeq."""
    conn = RtspServerConnection()
    conn.receive_data(OPTIONS + b"$\x01\x00\x02hi" + OPTIONS.replace(b"CSeq: 1", b"CSeq: 2"))
    events = _events(conn)
    assert [type(e) for e in events] == [RequestReceived, InterleavedFrame, RequestReceived]
    assert conn.send(Response(200)) == b"RTSP/1.0 200 OK\r\nCSeq: 1\r\n\r\n"
    assert conn.send(Response(200, "OK", Headers((("CSeq", "2"),)))).startswith(
        b"RTSP/1.0 200 OK\r\nCSeq: 2"
    )
    with pytest.raises(LocalProtocolError):
        conn.send(Response(200))
    assert conn.send(InterleavedFrame(3, b"x")) == b"$\x03\x00\x01x"


def test_server_needs_data_then_clean_close() -> None:
    """A partial request waits; EOF between messages is a clean ConnectionClosed."""
    conn = RtspServerConnection()
    conn.receive_data(OPTIONS[:10])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(OPTIONS[10:])
    assert isinstance(conn.next_event(), RequestReceived)
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)
    assert isinstance(conn.next_event(), ConnectionClosed)
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")


def test_server_eof_mid_message_is_an_error() -> None:
    """EOF inside a request (or its body) is a remote error."""
    conn = RtspServerConnection()
    conn.receive_data(b"SET_PARAMETER * RTSP/1.0\r\nCSeq: 1\r\nContent-Length: 4\r\n\r\nab")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_server_missing_cseq_and_error_answer() -> None:
    """A request without CSeq is fatal; the answer says why and Connection: close."""
    conn = RtspServerConnection()
    conn.receive_data(b"OPTIONS * RTSP/1.0\r\n\r\n")
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    data = conn.send_error(info.value)
    assert data.startswith(b"RTSP/1.0 400 Bad Request: request without a valid CSeq\r\n")
    assert b"Connection: close" in data
    assert conn.closed
    assert isinstance(conn.next_event(), ConnectionClosed)


def test_error_answer_carries_cseq() -> None:
    """A 505 answer echoes the CSeq of the request it refuses."""
    conn = RtspServerConnection()
    conn.receive_data(b"OPTIONS * RTSP/2.0\r\nCSeq: 4\r\n\r\n")
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert conn.send_error(info.value).startswith(
        b"RTSP/1.0 505 RTSP Version not supported: version RTSP/2.0\r\nCSeq: 4\r\n"
    )


def test_error_answer_detail_is_printable_ascii_and_bounded() -> None:
    """The detail of a framing error goes in the status line only as printable ASCII
    (a client's bytes are escaped), at most 200 characters."""
    conn = RtspServerConnection()
    conn.receive_data("OPTIONS * RTSP/1.0\r\nCSeq: 1\r\nb\u00e9d header\r\n\r\n".encode())
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    line = conn.send_error(info.value).split(b"\r\n")[0]
    assert line == b"RTSP/1.0 400 Bad Request: bad header line 'b\\xe9d header'"
    err = RemoteProtocolError(400, "x" * 500)
    line = RtspServerConnection().send_error(err).split(b"\r\n")[0]
    assert len(line) == len(b"RTSP/1.0 400 ") + 200 and line.endswith(b"...")


def test_client_requests_and_session_tracking() -> None:
    """The client numbers requests, learns the Session at SETUP and forgets it at TEARDOWN."""
    c = RtspClientConnection(user_agent="test")
    cseq, data = c.describe("rtsp://h/s")
    assert cseq == 1
    assert (
        data
        == b"DESCRIBE rtsp://h/s RTSP/1.0\r\nCSeq: 1\r\nUser-Agent: test\r\nAccept: application/sdp\r\n\r\n"
    )
    c.receive_data(b"RTSP/1.0 200 OK\r\nCSeq: 1\r\nContent-Length: 3\r\n\r\nv=0")
    (ev,) = _events(c)
    assert (
        isinstance(ev, ResponseReceived) and ev.method == "DESCRIBE" and ev.response.body == b"v=0"
    )
    cseq, data = c.setup("rtsp://h/s/t0", TransportSpec(lower="TCP", interleaved=(0, 1)))
    assert b"Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n" in data
    c.receive_data(b"RTSP/1.0 200 OK\r\nCSeq: 2\r\nSession: ABC;timeout=30\r\n\r\n")
    _events(c)
    assert c.session_id == "ABC" and c.session is not None and c.session.timeout == 30
    _, data = c.play("rtsp://h/s", NptRange(5.0, None))
    assert b"Session: ABC\r\n" in data and b"Range: npt=5-\r\n" in data
    _, data = c.get_parameter("rtsp://h/s", b"position\r\n")
    assert b"Content-Type: text/parameters" in data
    c.set_parameter("rtsp://h/s", b"a: b\r\n")
    c.pause("rtsp://h/s")
    c.options("rtsp://h/s")
    cseq, _ = c.teardown("rtsp://h/s")
    assert c.unanswered == [3, 4, 5, 6, 7, 8]
    c.receive_data(b"$\x01\x00\x01z" + f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\n\r\n".encode())
    events = _events(c)
    assert events[0] == InterleavedFrame(1, b"z")
    assert c.session_id is None
    assert c.send_interleaved(1, b"rr") == b"$\x01\x00\x02rr"


def test_client_refuses_unmatched_response() -> None:
    """A response with an unknown CSeq, or a bad Session at SETUP, is a remote error."""
    c = RtspClientConnection()
    c.receive_data(b"RTSP/1.0 200 OK\r\nCSeq: 9\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        c.next_event()
    c2 = RtspClientConnection()
    c2.setup("rtsp://h/s", TransportSpec(client_port=(1, 2)))
    c2.receive_data(b"RTSP/1.0 200 OK\r\nCSeq: 1\r\nSession: bad id\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        c2.next_event()


def test_client_byte_by_byte() -> None:
    """Responses and frames fed one byte at a time come out whole."""
    c = RtspClientConnection()
    c.options("*")
    data = b"RTSP/1.0 200 OK\r\nCSeq: 1\r\nPublic: OPTIONS\r\n\r\n$\x00\x00\x03abc"
    events: list[object] = []
    for i in range(len(data)):
        c.receive_data(data[i : i + 1])
        events += _events(c)
    assert [type(e) for e in events] == [ResponseReceived, InterleavedFrame]
