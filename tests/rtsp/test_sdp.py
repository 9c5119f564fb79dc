"""SDP generation for presentations and the tolerant player-side parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yimaporc.rtsp import sdp
from yimaporc.rtsp.sdp import (
    MalformedSdp,
    MediaDescription,
    Origin,
    RtpMap,
    SessionDescription,
    parse_sdp,
    serialize_sdp,
)


def _presentation() -> SessionDescription:
    return sdp.presentation_sdp(
        "sample",
        [sdp.mp2t_track("trackID=0", bitrate_kbps=4000), sdp.l16_track("trackID=1", 48000, 2)],
        12.5,
        origin_address="127.0.2.1",
        session_id=42,
    )


def test_presentation_text() -> None:
    """A presentation has aggregate control, its npt range and one m= section per track."""
    text = serialize_sdp(_presentation()).decode()
    assert text == (
        "v=0\r\n"
        "o=- 42 1 IN IP4 127.0.2.1\r\n"
        "s=sample\r\n"
        "c=IN IP4 0.0.0.0\r\n"
        "t=0 0\r\n"
        "a=tool:yimaporc\r\n"
        "a=control:*\r\n"
        "a=range:npt=0-12.5\r\n"
        "m=video 0 RTP/AVP 33\r\n"
        "b=AS:4000\r\n"
        "a=rtpmap:33 MP2T/90000\r\n"
        "a=control:trackID=0\r\n"
        "m=audio 0 RTP/AVP 96\r\n"
        "a=rtpmap:96 L16/48000/2\r\n"
        "a=control:trackID=1\r\n"
    )


def test_presentation_round_trip_and_accessors() -> None:
    """The parser reads back the presentation, its controls, rtpmaps and duration."""
    desc = _presentation()
    back = parse_sdp(serialize_sdp(desc))
    assert back == desc
    assert back.control == "*"
    assert back.duration == 12.5
    assert [m.control for m in back.media] == ["trackID=0", "trackID=1"]
    assert back.media[0].rtpmaps == {33: RtpMap(33, "MP2T", 90000)}
    assert back.media[1].rtpmaps == {96: RtpMap(96, "L16", 48000, 2)}


def test_static_l16_payload_type() -> None:
    """44.1 kHz stereo L16 uses the static PT 10 whose rtpmap is known without a=rtpmap."""
    track = sdp.l16_track("t", 44100, 2)
    assert track.formats == ("10",)
    bare = MediaDescription("audio", 0, "RTP/AVP", ("10", "11", "33"))
    assert bare.rtpmaps == {
        10: RtpMap(10, "L16", 44100, 2),
        11: RtpMap(11, "L16", 44100, 1),
        33: RtpMap(33, "MP2T", 90000),
    }


def test_tolerant_parse_of_foreign_sdp() -> None:
    """LF endings, junk lines, unknown types, ports with counts and hh:mm:ss ranges are accepted."""
    text = (
        b"v=0\n"
        b"junk line\n"
        b"o=user 1 2 IN IP4 10.0.0.1\n"
        b"s=Other server\n"
        b"z=0 0\n"
        b"a=range:npt=0-0:01:02.5\n"
        b"a=recvonly\n"
        b"m=video 5004/2 RTP/AVP 96\n"
        b"c=IN IP4 232.0.0.1/16\n"
        b"a=rtpmap:96 H264/90000\n"
        b"a=rtpmap:bad\n"
        b"a=control:rtsp://10.0.0.1/x/track1\n"
        b"m=broken\n"
    )
    desc = parse_sdp(text)
    assert desc.origin == Origin("user", "1", "2", "IN", "IP4", "10.0.0.1")
    assert desc.duration == 62.5
    assert desc.attribute("recvonly") == ""
    assert desc.attribute("missing") is None
    (m,) = desc.media
    assert (m.port, m.connection) == (5004, "IN IP4 232.0.0.1/16")
    assert m.rtpmaps == {96: RtpMap(96, "H264", 90000)}
    assert sdp.resolve_control("rtsp://10.0.0.1/x/", m.control) == "rtsp://10.0.0.1/x/track1"


def test_open_range_has_no_duration() -> None:
    """A live range npt=0- or a missing range gives no duration."""
    assert sdp.presentation_sdp("live", [], None).duration is None
    assert parse_sdp(b"v=0\r\ns=x\r\n").duration is None


def test_unusable_text_is_malformed() -> None:
    """Text with neither a version line nor media raises MalformedSdp."""
    with pytest.raises(MalformedSdp):
        parse_sdp(b"hello world\r\n")
    with pytest.raises(MalformedSdp):
        parse_sdp(b"v=0\r\n" + b"a=x\r\n" * 20000)


def test_line_breaks_in_values_are_refused() -> None:
    """A value with a line break cannot be serialized (it would inject SDP lines)."""
    with pytest.raises(ValueError):
        serialize_sdp(SessionDescription(name="a\r\nm=video 1 RTP/AVP 0"))


def test_resolve_control() -> None:
    """Control URLs resolve against the Content-Base: '*', absolute and relative forms."""
    assert sdp.resolve_control("rtsp://h/s/", "*") == "rtsp://h/s/"
    assert sdp.resolve_control("rtsp://h/s", None) == "rtsp://h/s"
    assert sdp.resolve_control("rtsp://h/s", "trackID=0") == "rtsp://h/s/trackID=0"
    assert sdp.resolve_control("rtsp://h/s/", "rtsp://o/t") == "rtsp://o/t"


def test_format_npt() -> None:
    """npt values are written with at most 3 decimals and no trailing zeros."""
    assert sdp.format_npt(0) == "0"
    assert sdp.format_npt(10.0) == "10"
    assert sdp.format_npt(1.23456) == "1.235"


token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=10)
values = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 /:=*-.", max_size=20).map(str.strip)
attributes = st.lists(st.tuples(token, st.one_of(st.none(), values)), max_size=4).map(tuple)
media = st.builds(
    MediaDescription,
    st.sampled_from(["video", "audio", "application"]),
    st.integers(0, 65535),
    st.sampled_from(["RTP/AVP", "RTP/AVPF"]),
    st.lists(st.integers(0, 127).map(str), min_size=1, max_size=3).map(tuple),
    attributes,
    st.one_of(st.none(), st.just("IN IP4 10.0.0.1")),
    st.lists(st.integers(1, 9999).map(lambda n: f"AS:{n}"), max_size=1).map(tuple),
    st.one_of(st.none(), token),
)


@given(token, attributes, st.lists(media, max_size=3).map(tuple))
def test_sdp_round_trip(
    name: str, attrs_: tuple[sdp.Attribute, ...], tracks: tuple[MediaDescription, ...]
) -> None:
    """Any description made of plain tokens survives serialize -> parse."""
    desc = SessionDescription(
        origin=Origin("-", "1", "2", "IN", "IP4", "127.0.0.1"),
        name=name,
        connection="IN IP4 0.0.0.0",
        attributes=attrs_,
        media=tracks,
    )
    assert parse_sdp(serialize_sdp(desc)) == desc
