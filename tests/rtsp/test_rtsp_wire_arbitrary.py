"""Arbitrary bytes and text into the RTSP parsers: they answer with their own errors, nothing else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yimaporc.rtsp._errors import MalformedHeader, RemoteProtocolError
from yimaporc.rtsp._messages import (
    DEFAULT_LIMITS,
    MessageReader,
    ReceiveBuffer,
    _check_field,
    parse_cseq,
)
from yimaporc.rtsp._wire import (
    YimaNode,
    parse_range,
    parse_rtp_info,
    parse_session,
    parse_transport,
    parse_url,
)

SEED = (
    b"SETUP rtsp://h:8554/clip/track1 RTSP/1.0\r\nCSeq: 3\r\n"
    b"Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\nContent-Length: 4\r\n\r\nbody"
    b"$\x00\x00\x02ab"
)

# RTSP-ish bytes: fragments of real requests mixed with anything.
fragments = st.sampled_from(
    [SEED, b"\r\n", b"\n", b":", b" ", b"RTSP/1.0", b"$", b"Content-Length: ", b"CSeq: ",
     b"\xc2\xb2", b"\xd9\xa3", b"99999999999999999999", b"\x00", b"\xff"]
)  # fmt: skip
rtspish = st.lists(st.one_of(fragments, st.binary(max_size=40)), max_size=12).map(b"".join)


def _drain(role: str, chunks: list[bytes]) -> list[Any]:
    """Feed ``chunks`` one by one and read every message out; return them."""
    reader, buf, out = MessageReader(role, DEFAULT_LIMITS), ReceiveBuffer(), []
    for chunk in chunks:
        buf.append(chunk)
        while (msg := reader.read(buf)) is not None:
            out.append(msg)
    return out


@given(rtspish, st.sampled_from(["server", "client"]), st.data())
def test_reader_raises_only_remote_protocol_error(
    data: bytes, role: str, draw: st.DataObject
) -> None:
    """Any bytes, whole or cut anywhere, give messages, None or RemoteProtocolError; never another exception."""
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=6)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    for parts in ([data], chunks):
        try:
            _drain(role, parts)
        except RemoteProtocolError as e:
            assert 400 <= e.status < 600


@given(rtspish)
def test_split_feeding_gives_the_same_messages(data: bytes) -> None:
    """Bytewise feeding yields exactly what one whole read yields (or the same error status)."""

    def outcome(parts: list[bytes]) -> object:
        try:
            return _drain("server", parts)
        except RemoteProtocolError as e:
            return e.status

    assert outcome([data]) == outcome([data[i : i + 1] for i in range(len(data))])


HEADER_PARSERS: list[tuple[str, Callable[[str], object]]] = [
    ("cseq", parse_cseq),
    ("range", parse_range),
    ("session", parse_session),
    ("transport", parse_transport),
    ("rtp-info", parse_rtp_info),
    ("url", parse_url),
    ("yima-node", YimaNode.parse),
]

headerish = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "RTP/AVP",
                "/TCP",
                ";",
                ",",
                "=",
                "-",
                "npt",
                "clock",
                "client_port",
                "interleaved",
                "ssrc",
                "ttl",
                "url",
                "seq",
                "rtptime",
                "timeout",
                '"',
                "rtsp://",
                ":",
                "/",
                "0",
                "65536",
                "1e309",
                "nan",
                "²",
                "٣",
                " ",
            ]
        ),
        st.text(max_size=10),
    ),
    max_size=12,
).map("".join)


@pytest.mark.parametrize(("name", "parse"), HEADER_PARSERS, ids=[n for n, _ in HEADER_PARSERS])
@given(value=headerish)
def test_header_parsers_raise_only_malformed_header(
    name: str, parse: Callable[[str], object], value: str
) -> None:
    """Every header-value parser returns or raises MalformedHeader for any text."""
    try:
        parse(value)
    except MalformedHeader:
        pass


header_names = st.sampled_from(["CSeq", "Content-Length", "Session", "Transport", "Range", "X"])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request line and header fields whose values are anything text-like."""
    numbers = st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=3)
    fields = draw(st.lists(st.tuples(header_names, st.one_of(headerish, numbers)), max_size=5))
    head = "OPTIONS * RTSP/1.0\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields) + "\r\n"
    return head.encode("utf-8", "surrogatepass")


@given(requests())
def test_header_fields_raise_only_remote_protocol_error(data: bytes) -> None:
    """Any header values (Content-Length with non-ASCII digits too) give a request or RemoteProtocolError."""
    try:
        _drain("server", [data])
    except RemoteProtocolError as e:
        assert 400 <= e.status < 600


@given(requests(), st.sampled_from(["*", "rtsp://h/a", "rtsp://h/a\x00", "rtsp://h/\x1bb"]))
def test_accepted_values_can_be_echoed(data: bytes, url: str) -> None:
    """Every header value and URL the reader accepts passes the serializer's check (the server echoes some)."""
    data = data.replace(b"OPTIONS * ", f"OPTIONS {url} ".encode(), 1)
    try:
        messages = _drain("server", [data])
    except RemoteProtocolError:
        return
    for message in messages:
        for name, value in message.headers:
            _check_field(name, value)
        _check_field("Content-Base", message.url)


def test_control_character_in_a_header_value_is_400() -> None:
    """'Require: a<NUL>b' and a NUL in the URL (found by the fuzzer: their echoes in Unsupported and
    Content-Base raised out of the serializer) are 400."""
    for ctl in (b"\x00", b"\x1b", b"\x7f", b"\r"):
        data = b"OPTIONS * RTSP/1.0\r\nCSeq: 1\r\nRequire: a" + ctl + b"b\r\n\r\n"
        with pytest.raises(RemoteProtocolError) as e:
            _drain("server", [data])
        assert e.value.status == 400
    with pytest.raises(RemoteProtocolError) as e:  # the URL is echoed in Content-Base
        _drain("server", [b"DESCRIBE rtsp://h/a\x00b RTSP/1.0\r\nCSeq: 1\r\n\r\n"])
    assert e.value.status == 400
    (ok,) = _drain("server", [b"OPTIONS * RTSP/1.0\r\nCSeq: 1\r\nX: a\tb\r\n\r\n"])
    assert ok.headers.get("X") == "a\tb"
