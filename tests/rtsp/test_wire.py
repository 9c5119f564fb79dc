"""RTSP messages and header values: parsing, serialization, limits and round-trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yimaporc.rtsp import (
    Headers,
    InterleavedFrame,
    Limits,
    LocalProtocolError,
    MalformedHeader,
    NptRange,
    RemoteProtocolError,
    Request,
    Response,
    RtpInfo,
    SessionHeader,
    TransportSpec,
    YimaNode,
    parse_range,
    parse_rtp_info,
    parse_session,
    parse_transport,
    parse_url,
    serialize_interleaved,
    serialize_range,
    serialize_request,
    serialize_response,
    serialize_rtp_info,
    serialize_session,
    serialize_transport,
)
from yimaporc.rtsp._messages import (
    DEFAULT_LIMITS,
    MessageReader,
    ReceiveBuffer,
)

SETUP = (
    b"SETUP rtsp://127.0.2.1:8554/sample/trackID=0 RTSP/1.0\r\n"
    b"CSeq: 3\r\n"
    b"Transport: RTP/AVP;unicast;client_port=5000-5001\r\n"
    b"\r\n"
)
SET_PARAM = b"SET_PARAMETER rtsp://h/s RTSP/1.0\r\nCSeq: 9\r\nContent-Length: 5\r\n\r\nab=cd"


def _read_all(
    chunks: list[bytes], role: str = "server", limits: Limits = DEFAULT_LIMITS
) -> list[Request | Response | InterleavedFrame]:
    buf = ReceiveBuffer()
    reader = MessageReader(role, limits)
    out: list[Request | Response | InterleavedFrame] = []
    for chunk in chunks:
        buf.append(chunk)
        while (msg := reader.read(buf)) is not None:
            out.append(msg)
    return out


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def test_request_whole_bytewise_and_trailing() -> None:
    """A request parses the same fed whole, byte by byte, and followed by more data."""
    expected = Request(
        "SETUP",
        "rtsp://127.0.2.1:8554/sample/trackID=0",
        Headers((("CSeq", "3"), ("Transport", "RTP/AVP;unicast;client_port=5000-5001"))),
    )
    assert _read_all([SETUP]) == [expected]
    assert _read_all(_bytewise(SETUP)) == [expected]
    frame = serialize_interleaved(1, b"rtcp")
    assert _read_all([SETUP + SET_PARAM + frame]) == [
        expected,
        Request(
            "SET_PARAMETER",
            "rtsp://h/s",
            Headers((("CSeq", "9"), ("Content-Length", "5"))),
            b"ab=cd",
        ),
        InterleavedFrame(1, b"rtcp"),
    ]
    assert _read_all(_bytewise(SET_PARAM + frame + SETUP))[1:] == [
        InterleavedFrame(1, b"rtcp"),
        expected,
    ]


def test_lf_only_and_folded_headers() -> None:
    """Bare LF line ends, leading blank lines and folded header lines are accepted."""
    data = b"\r\n\r\nOPTIONS * RTSP/1.0\nCSeq: 1\nX-Long: a\n  b\n\n"
    (req,) = _read_all([data])
    assert isinstance(req, Request)
    assert req.headers.get("x-long") == "a b"
    assert req.cseq == 1


def test_response_parse() -> None:
    """A response with a body parses on the client side, byte by byte."""
    data = serialize_response(Response(200, "OK", Headers((("CSeq", "2"),)), b"v=0\r\n"))
    assert data == b"RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Length: 5\r\n\r\nv=0\r\n"
    (resp,) = _read_all(_bytewise(data), role="client")
    assert resp == Response(
        200, "OK", Headers((("CSeq", "2"), ("Content-Length", "5"))), b"v=0\r\n"
    )


def test_interleaved_frames_many_in_one_read() -> None:
    """Thousands of small frames in one read are extracted in order (O(n) buffer)."""
    frames = [InterleavedFrame(i % 4, bytes([i % 256]) * (i % 50)) for i in range(5000)]
    data = b"".join(serialize_interleaved(f.channel, f.data) for f in frames)
    assert _read_all([data]) == frames


def test_empty_interleaved_frame_and_max_frame() -> None:
    """A zero-length frame and a 65535-byte frame both parse."""
    big = b"x" * 65535
    assert _read_all([serialize_interleaved(0, b"") + serialize_interleaved(255, big)]) == [
        InterleavedFrame(0, b""),
        InterleavedFrame(255, big),
    ]
    with pytest.raises(LocalProtocolError):
        serialize_interleaved(0, big + b"x")
    with pytest.raises(LocalProtocolError):
        serialize_interleaved(256, b"")


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"PLAY rtsp://h/s RTSP/2.0\r\nCSeq: 1\r\n\r\n", 505),
        (b"PLAY rtsp://h/s HTTP/1.1\r\nCSeq: 1\r\n\r\n", 505),
        (b"PLAY rtsp://h/s RTSP/1.0\r\nno colon\r\n\r\n", 400),
        (b"PLAY rtsp://h/s RTSP/1.0\r\nBad Name: x\r\n\r\n", 400),
        (b"PLAY rtsp://h/s RTSP/1.0\r\nCSeq: 1\r\nContent-Length: x\r\n\r\n", 400),
        (b"PLAY rtsp://h/s RTSP/1.0\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"PLAY rtsp://h/s RTSP/1.0\r\nCSeq: 1\r\nContent-Length: 70000\r\n\r\n", 413),
        (b"PLAY rtsp://h/\xff RTSP/1.0\r\n\r\n", 400),
        (b"DESCRIBE rtsp://h/" + b"a" * 5000 + b" RTSP/1.0\r\n\r\n", 414),
        (b"DESCRIBE rtsp://h/" + b"a" * 5000, 414),
        (b"OPTIONS * RTSP/1.0\r\n" + b"X-A: b\r\n" * 65 + b"\r\n", 400),
        (
            b"OPTIONS * RTSP/1.0\r\n" + b"X-A: " + b"b" * 3000 + b"\r\n" * 1 + b"X-B: c\r\n" * 2000,
            400,
        ),
    ],
)
def test_request_errors(data: bytes, status: int) -> None:
    """Malformed or oversized requests raise RemoteProtocolError with the status to answer."""
    with pytest.raises(RemoteProtocolError) as info:
        _read_all([data])
    assert info.value.status == status
    with pytest.raises(RemoteProtocolError) as info:
        _read_all(_bytewise(data))
    assert info.value.status == status


def test_error_keeps_cseq_when_known() -> None:
    """A 413 names the CSeq of the offending request so the answer can carry it."""
    with pytest.raises(RemoteProtocolError) as info:
        _read_all([b"SET_PARAMETER * RTSP/1.0\r\nCSeq: 7\r\nContent-Length: 99999\r\n\r\n"])
    assert (info.value.status, info.value.cseq) == (413, 7)


def test_status_line_errors_on_client() -> None:
    """A client rejects a garbled status line and another RTSP version."""
    with pytest.raises(RemoteProtocolError):
        _read_all([b"HTTP/1.0 200 OK\r\n\r\n"], role="client")
    with pytest.raises(RemoteProtocolError):
        _read_all([b"RTSP/1.0 OK\r\n\r\n"], role="client")
    with pytest.raises(RemoteProtocolError):
        _read_all([b"RTSP/1.0 200 " + b"x" * 5000 + b"\r\n\r\n"], role="client")


def test_custom_limits() -> None:
    """Limits are configurable: a 10-byte body cap answers 413."""
    with pytest.raises(RemoteProtocolError) as info:
        _read_all([SET_PARAM.replace(b"5", b"11") + b"x" * 6], limits=Limits(max_body=10))
    assert info.value.status == 413


def test_serializer_refuses_injection() -> None:
    """Header values with line breaks, bad names, methods or URLs are local errors."""
    with pytest.raises(LocalProtocolError):
        serialize_request(Request("OPTIONS", "*", Headers((("X", "a\r\nB: c"),))))
    with pytest.raises(LocalProtocolError):
        serialize_request(Request("OPTIONS", "*", Headers((("Bad Name", "a"),))))
    with pytest.raises(LocalProtocolError):
        serialize_request(Request("OP TIONS", "*"))
    with pytest.raises(LocalProtocolError):
        serialize_request(Request("OPTIONS", "rtsp://h/a b"))
    with pytest.raises(LocalProtocolError):
        serialize_response(Response(200, "OK", Headers((("Content-Length", "3"),)), b"ab"))
    with pytest.raises(LocalProtocolError):
        serialize_response(Response(42))


def test_headers_helpers() -> None:
    """Headers are case-insensitive, ordered, and can be replaced or removed."""
    h = Headers.of(("CSeq", "1"), content_type="application/sdp")
    assert h.get("content-TYPE") == "application/sdp"
    assert "cseq" in h and "Session" not in h and len(h) == 2
    h2 = h.with_field("cseq", "2").without("Content-Type")
    assert list(h2) == [("cseq", "2")]
    assert Headers((("A", "1"), ("a", "2"))).get_all("A") == ["1", "2"]


token = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
    min_size=1,
    max_size=12,
)
values = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 =;/:,.-", max_size=30).map(
    str.strip
)


@given(
    st.sampled_from(["OPTIONS", "DESCRIBE", "SETUP", "PLAY", "SET_PARAMETER"]),
    token.map(lambda t: f"rtsp://h/{t}"),
    st.lists(st.tuples(token, values), max_size=6),
    st.binary(max_size=100),
    st.integers(0, 2**31),
)
def test_request_round_trip(
    method: str, url: str, fields: list[tuple[str, str]], body: bytes, cseq: int
) -> None:
    """Any request survives serialize -> parse, fed whole and byte by byte."""
    fields = [(n, v) for n, v in fields if n.lower() != "content-length"]
    headers = [("CSeq", str(cseq)), *fields]
    if body:
        headers.append(("Content-Length", str(len(body))))
    req = Request(method, url, Headers(tuple(headers)), body)
    data = serialize_request(req)
    assert _read_all([data]) == [req]
    assert _read_all([data[: len(data) // 2], data[len(data) // 2 :]]) == [req]


@given(
    st.integers(100, 599), st.lists(st.tuples(token, values), max_size=5), st.binary(max_size=50)
)
def test_response_round_trip(status: int, fields: list[tuple[str, str]], body: bytes) -> None:
    """Any response survives serialize -> parse."""
    fields = [(n, v) for n, v in fields if n.lower() != "content-length"]
    headers = [("CSeq", "1"), *fields]
    if body:
        headers.append(("Content-Length", str(len(body))))
    resp = Response(status, "Some Reason", Headers(tuple(headers)), body)
    assert _read_all([serialize_response(resp)], role="client") == [resp]


# --- header values -----------------------------------------------------------------------


def test_transport_alternatives_from_players() -> None:
    """Transport headers as ffmpeg and GStreamer send them parse into alternatives."""
    ffmpeg = "RTP/AVP/UDP;unicast;client_port=21000-21001"
    gst = 'RTP/AVP;unicast;client_port=5000-5001;mode="PLAY",RTP/AVP/TCP;unicast;interleaved=0-1'
    assert parse_transport(ffmpeg) == (TransportSpec(client_port=(21000, 21001)),)
    udp, tcp = parse_transport(gst)
    assert udp == TransportSpec(client_port=(5000, 5001), mode="play")
    assert tcp == TransportSpec(lower="TCP", interleaved=(0, 1))
    assert tcp.is_tcp and not udp.is_tcp


def test_transport_server_reply_and_yima_opt_in() -> None:
    """A fan-out reply carries the Yima flag, the node list, ssrc and unknown parameters."""
    spec = TransportSpec(
        client_port=(5000, 5001),
        server_port=(6970, 6971),
        source="127.0.2.1",
        ssrc=0x1A2B,
        yima_fanout=True,
        yima_nodes=(YimaNode(0, "127.0.2.1", 6970, 6971), YimaNode(1, "::1", 6972, 6973)),
        params=(("x-other", "1"), ("x-flag", None)),
    )
    text = serialize_transport(spec)
    assert text == (
        "RTP/AVP;unicast;source=127.0.2.1;client_port=5000-5001;server_port=6970-6971;"
        'ssrc=00001A2B;x-yima-fanout;x-yima-nodes="0@127.0.2.1:6970-6971 1@[::1]:6972-6973";'
        "x-other=1;x-flag"
    )
    assert parse_transport(text) == (spec,)
    assert parse_transport("RTP/AVP;unicast;client_port=5000;x-yima-fanout=1")[0] == TransportSpec(
        client_port=(5000, 5001), yima_fanout=True
    )


@pytest.mark.parametrize(
    "value",
    [
        "",
        "RTP",
        "RTP/AVP;client_port=a-b",
        "RTP/AVP;client_port=70000-70001",
        "RTP/AVP/TCP;interleaved=300-301",
        "RTP/AVP;ssrc=XYZ",
        "RTP/AVP;ttl=x",
        'RTP/AVP;x-yima-nodes="0@h"',
        'RTP/AVP;mode="PLAY',
        "RTP/AVP;bad name=1",
    ],
)
def test_transport_malformed(value: str) -> None:
    """Unparseable Transport values raise MalformedHeader."""
    with pytest.raises(MalformedHeader):
        parse_transport(value)


ports = st.tuples(st.integers(0, 65535), st.integers(0, 65535))
transports = st.builds(
    TransportSpec,
    profile=st.sampled_from(["RTP/AVP", "RTP/AVPF"]),
    lower=st.sampled_from(["UDP", "TCP"]),
    unicast=st.booleans(),
    client_port=st.one_of(st.none(), ports),
    server_port=st.one_of(st.none(), ports),
    interleaved=st.one_of(st.none(), st.tuples(st.integers(0, 255), st.integers(0, 255))),
    destination=st.one_of(st.none(), st.just("10.0.0.1")),
    source=st.one_of(st.none(), st.just("10.0.0.2")),
    ssrc=st.one_of(st.none(), st.integers(0, 0xFFFFFFFF)),
    mode=st.one_of(st.none(), st.just("play")),
    ttl=st.one_of(st.none(), st.integers(0, 255)),
    yima_fanout=st.booleans(),
    yima_nodes=st.lists(
        st.builds(
            YimaNode,
            st.integers(0, 255),
            st.sampled_from(["h1", "10.1.2.3", "fe80::1"]),
            st.integers(0, 65535),
            st.integers(0, 65535),
        ),
        max_size=3,
    ).map(tuple),
)


@given(st.lists(transports, min_size=1, max_size=3))
def test_transport_round_trip(specs: list[TransportSpec]) -> None:
    """Any list of transport alternatives survives serialize -> parse."""
    back = parse_transport(serialize_transport(specs))
    # UDP with interleaved= is written as RTP/AVP/UDP and comes back unchanged.
    assert back == tuple(specs)


def test_range_forms() -> None:
    """npt ranges: open, now, closed, hh:mm:ss, suffix-only and a time= parameter."""
    assert parse_range("npt=10-") == NptRange(10.0, None)
    assert parse_range("npt=now-") == NptRange(None, None)
    assert parse_range("npt=0.000-12.5") == NptRange(0.0, 12.5)
    assert parse_range("npt=1:02:03.5-") == NptRange(3723.5, None)
    assert parse_range("npt=-20") == NptRange(0.0, 20.0)
    assert parse_range("npt=5-;time=19970123T143720Z") == NptRange(5.0, None)
    assert serialize_range(NptRange(None, None)) == "npt=now-"
    assert serialize_range(NptRange(1.5, 10)) == "npt=1.5-10"


@pytest.mark.parametrize(
    "value",
    [
        "smpte=0:10:20-",
        "clock=19961108T142300Z-",
        "npt=",
        "npt=-",
        "npt=5",
        "npt=a-",
        "npt=10-5",
        "npt=1:99:00-",
    ],
)
def test_range_malformed(value: str) -> None:
    """Other units and malformed npt ranges raise MalformedHeader."""
    with pytest.raises(MalformedHeader):
        parse_range(value)


@given(
    st.one_of(st.none(), st.integers(0, 10**6).map(lambda n: n / 1000)),
    st.one_of(st.none(), st.integers(0, 10**6).map(lambda n: n / 1000)),
)
def test_range_round_trip(start: float | None, end: float | None) -> None:
    """Any npt range with millisecond times survives serialize -> parse."""
    if start is not None and end is not None and end < start:
        start, end = end, start
    rng = NptRange(start, end)
    assert parse_range(serialize_range(rng)) == rng


def test_session_header() -> None:
    """Session ids with a timeout parse, serialize, and bad ids are refused."""
    assert parse_session("12345678;timeout=60") == SessionHeader("12345678", 60)
    assert parse_session(" abc.DEF-$_+ ") == SessionHeader("abc.DEF-$_+")
    assert serialize_session(SessionHeader("AB", 30)) == "AB;timeout=30"
    for bad in ["", "a b", "x" * 65, "a;timeout=x"]:
        with pytest.raises(MalformedHeader):
            parse_session(bad)
    with pytest.raises(LocalProtocolError):
        serialize_session(SessionHeader("a b"))


def test_rtp_info_round_trip() -> None:
    """RTP-Info lists per-stream seq and rtptime; a comma inside a URL is glued back."""
    infos = (RtpInfo("rtsp://h/s/trackID=0", 100, 9000), RtpInfo("rtsp://h/s/trackID=1"))
    text = serialize_rtp_info(infos)
    assert text == "url=rtsp://h/s/trackID=0;seq=100;rtptime=9000,url=rtsp://h/s/trackID=1"
    assert parse_rtp_info(text) == infos
    assert parse_rtp_info("url=rtsp://h/a,b;seq=1") == (RtpInfo("rtsp://h/a,b", 1),)
    with pytest.raises(MalformedHeader):
        parse_rtp_info("seq=1")
    with pytest.raises(MalformedHeader):
        parse_rtp_info("url=x;seq=y")


def test_parse_url() -> None:
    """rtsp:// URLs split into host, port (default 554) and path; others are refused."""
    assert parse_url("rtsp://127.0.2.1:8554/sample").port == 8554
    assert parse_url("rtsp://h").path == "/"
    assert parse_url("rtsp://h/a").port == 554
    assert parse_url("rtsp://[::1]:9/x").host == "::1"
    for bad in ["http://h/", "rtsp://h:99999/", "rtsp:///x"]:
        with pytest.raises(MalformedHeader):
            parse_url(bad)


@given(
    st.text(alphabet="abcdefABCDEF0123456789$-_.+", min_size=1, max_size=64),
    st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_session_round_trip(sid: str, timeout: int | None) -> None:
    """Any valid session id and timeout survive serialize -> parse."""
    header = SessionHeader(sid, timeout)
    assert parse_session(serialize_session(header)) == header


@given(
    st.lists(
        st.builds(
            RtpInfo,
            token.map(lambda t: f"rtsp://h/s/{t}"),
            st.one_of(st.none(), st.integers(0, 65535)),
            st.one_of(st.none(), st.integers(0, 2**32 - 1)),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_rtp_info_hypothesis_round_trip(infos: list[RtpInfo]) -> None:
    """Any RTP-Info list survives serialize -> parse."""
    assert parse_rtp_info(serialize_rtp_info(infos)) == tuple(infos)
