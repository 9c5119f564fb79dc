"""RTP/RTCP wire formats: layouts, round-trips, serial arithmetic and NACK helpers."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yimaporc import rtp
from yimaporc.rtp import (
    App,
    Bye,
    GenericNack,
    MalformedPacket,
    NackItem,
    ReceiverReport,
    ReportBlock,
    RtpHeaderTemplate,
    RtpPacket,
    SdesChunk,
    SenderReport,
    SeqUnwrapper,
    SourceDescription,
    UnknownRtcp,
    YimaFeedback,
    YimaKind,
    YimaTag,
    lost_from_nack_items,
    nack_items_from_lost,
    parse_rtcp,
    parse_rtp,
    seq_diff,
    seq_lt,
    serialize_rtcp,
    serialize_rtp,
    unwrap_seq,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)

# --- serial arithmetic -------------------------------------------------------------


def test_seq_lt_across_wrap() -> None:
    """65535 precedes 0 and 0 follows 65535 (RFC 1982)."""
    assert seq_lt(65535, 0)
    assert not seq_lt(0, 65535)
    assert seq_lt(65500, 10)
    assert not seq_lt(5, 5)


def test_seq_lt_undefined_at_half() -> None:
    """At distance 2**15 neither number precedes the other."""
    assert not seq_lt(0, 32768)
    assert not seq_lt(32768, 0)


def test_seq_diff_wraps() -> None:
    """The signed distance crosses 65535 -> 0 both ways."""
    assert seq_diff(65535, 0) == 1
    assert seq_diff(0, 65535) == -1
    assert seq_diff(65530, 4) == 10
    assert rtp.seq_add(65535, 1) == 0
    assert rtp.seq_add(0, -1) == 65535


@given(u16, st.integers(-32767, 32767))
def test_seq_diff_inverts_add(a: int, n: int) -> None:
    """seq_diff(a, a + n) == n for every representable distance."""
    assert seq_diff(a, rtp.seq_add(a, n)) == n
    assert seq_lt(a, rtp.seq_add(a, n)) == (n > 0)


def test_unwrap_seq_near_reference() -> None:
    """Unwrapping picks the extended number nearest the reference, across the wrap."""
    assert unwrap_seq(65535, 0) == 65536
    assert unwrap_seq(65536, 65535) == 65535
    assert unwrap_seq(3 * 65536 + 10, 65530) == 3 * 65536 - 6
    with pytest.raises(ValueError):
        unwrap_seq(0, 70000)


def test_unwrapper_monotonic_through_several_wraps() -> None:
    """A stream counted through three wraps, with a late packet, extends to 64 bits."""
    u = SeqUnwrapper()
    first = u.unwrap(65000)
    exts = [u.unwrap((65000 + i) & 0xFFFF) for i in range(1, 3 * 65536)]
    assert exts == list(range(first + 1, first + 3 * 65536))
    late = u.unwrap((65000 + 3 * 65536 - 100) & 0xFFFF)
    assert late == first + 3 * 65536 - 100
    assert u.highest == first + 3 * 65536 - 1


def test_unwrapper_packet_before_first_is_non_negative() -> None:
    """A reordered packet just before the first one (0 then 65535) stays non-negative."""
    u = SeqUnwrapper()
    a = u.unwrap(0)
    b = u.unwrap(65535)
    assert b == a - 1 >= 0


# --- RTP --------------------------------------------------------------------------


def test_rtp_layout_by_hand() -> None:
    """A Yima packet's bytes match RFC 3550 §5.1 and RFC 8285 §4.2 field by field."""
    data = rtp.build_rtp(33, 0x1234, 0xDEADBEEF, 0x01020304, b"\x47" * 4, node_index=2, node_seq=7)
    expected = (
        bytes([0x90, 33])  # V=2 P=0 X=1 CC=0 | M=0 PT=33
        + b"\x12\x34\xde\xad\xbe\xef\x01\x02\x03\x04"
        + b"\xbe\xde\x00\x02"  # one-byte profile, 2 words
        + b"\x14\x02\x00\x00\x00\x07\x00\x00"  # ID=1 L=4 | node 2 | node seq 7 | padding
        + b"\x47" * 4
    )
    assert data == expected
    packet = parse_rtp(data)
    assert packet.yima == YimaTag(2, 7)
    assert packet.payload == b"\x47" * 4


def test_template_matches_generic_serializer() -> None:
    """The hot-path template writes the same bytes as serialize_rtp, with and without Yima."""
    t = RtpHeaderTemplate(33, 0xCAFEBABE, node_index=5)
    pkt = t.build(70000, (1 << 32) + 9, b"x" * 1316, node_seq=(1 << 32) + 3, marker=True)
    assert len(t.header(1, 2, 3)) == t.header_size == 24
    ref = RtpPacket(33, 70000 & 0xFFFF, 9, 0xCAFEBABE, b"x" * 1316, True).with_yima(YimaTag(5, 3))
    assert pkt == serialize_rtp(ref)
    plain = RtpHeaderTemplate(10, 1)
    assert plain.build(1, 2, b"ab") == serialize_rtp(RtpPacket(10, 1, 2, 1, b"ab"))
    assert plain.header_size == 12


def plain_run(
    t: RtpHeaderTemplate, block: bytes, j: int, count: int, payload: int, sequence: int,
    node_seq: int, ts_base: int, start: float, step: float, clock_rate: int, end: int,
) -> bytes:  # fmt: skip
    """pack_run's datagrams built one by one with the per-packet packer (header + payload)."""
    out = []
    for k in range(count):
        p = (j + k) * payload
        ts = ts_base + round((start + step * (j + k)) * clock_rate)
        out.append(t.header(sequence + k, ts, node_seq + k) + block[p : min(end, p + payload)])
    return b"".join(out)


@st.composite
def runs(draw: st.DrawFn) -> dict[str, object]:
    payload = draw(st.integers(1, 90))
    packets = draw(st.integers(1, 150))  # beyond 64: more than one struct call
    end = (packets - 1) * payload + draw(st.integers(1, payload))
    j = draw(st.integers(0, packets - 1))
    return {
        "node": draw(st.one_of(st.none(), u8)),
        "ssrc": draw(u32),
        "payload": payload,
        "end": end,
        "block": draw(st.binary(min_size=end, max_size=end)),
        "trailer": draw(st.binary(max_size=8)),  # bytes of a longer cached block past `end`
        "j": j,
        "count": draw(st.integers(1, packets - j)),
        "sequence": draw(st.integers(0, 1 << 20)),
        "node_seq": draw(st.integers(0, 1 << 34)),
        "ts_base": draw(u32),
        "start": draw(st.floats(0, 1e5)),
        "step": draw(st.floats(0, 0.1)),
        "clock_rate": draw(st.sampled_from([90000, 48000, 8000])),
        "kind": draw(st.sampled_from([bytes, bytearray, memoryview])),
    }


@given(runs())
def test_pack_run_writes_what_the_per_packet_packer_writes(r: dict[str, Any]) -> None:
    """pack_run (one struct call per 64 packets, or packet by packet for a memoryview
    block) writes byte for byte header() + payload per packet, over a dirty buffer."""
    t = RtpHeaderTemplate(33, r["ssrc"], r["node"])
    args = (r["j"], r["count"], r["payload"], r["sequence"], r["node_seq"], r["ts_base"],
            r["start"], r["step"], r["clock_rate"])  # fmt: skip
    want = plain_run(t, r["block"], *args, r["end"])
    cached = r["kind"](r["block"] + r["trailer"])
    buf = bytearray(b"\xa5" * 70000)  # what an earlier run left
    used = t.pack_run(buf, cached, *args, r["end"] if r["trailer"] else None)
    assert bytes(buf[:used]) == want


def test_pack_run_grows_the_buffer_and_wraps_the_counters() -> None:
    """An empty buffer grows to the run; sequence, per-node sequence and timestamp wrap."""
    t = RtpHeaderTemplate(33, 7, node_index=2)
    block = bytes(range(200)) * 10
    buf = bytearray()
    args = (3, 5, 100, 65534, (1 << 32) - 2, (1 << 32) - 1, 0.0, 0.01, 90000)
    used = t.pack_run(buf, block, *args)
    assert used == len(buf) == 5 * 124
    seqs = [parse_rtp(bytes(buf[o : o + 124])) for o in range(0, used, 124)]
    assert [p.sequence for p in seqs] == [65534, 65535, 0, 1, 2]
    assert [p.yima.node_seq for p in seqs if p.yima] == [(1 << 32) - 2, (1 << 32) - 1, 0, 1, 2]
    assert seqs[0].timestamp == (2700 - 1) and seqs[0].payload == block[300:400]


def test_yima_element_among_others() -> None:
    """The Yima element is found after other elements and padding, and other IDs are kept."""
    ext = rtp.serialize_one_byte_extension([(3, b"\xaa\xbb"), (1, b"\x09\x00\x00\x01\x00")])
    pkt = parse_rtp(
        serialize_rtp(RtpPacket(96, 1, 2, 3, b"p", extension_profile=0xBEDE, extension=ext))
    )
    assert pkt.yima == YimaTag(9, 256)
    assert rtp.parse_one_byte_extension(pkt.extension) == (
        (3, b"\xaa\xbb"),
        (1, b"\x09\x00\x00\x01\x00"),
    )


def test_two_byte_profile_has_no_yima_tag() -> None:
    """A packet with another extension profile is parsed but carries no Yima tag."""
    pkt = RtpPacket(96, 1, 2, 3, b"", extension_profile=0x1000, extension=b"\x01\x01\xff\x00")
    assert parse_rtp(serialize_rtp(pkt)).yima is None


def test_extension_id_15_stops_parsing() -> None:
    """Element ID 15 ends extension processing (RFC 8285 §4.2)."""
    assert rtp.parse_one_byte_extension(b"\x10\x01\xf0\x33") == ((1, b"\x01"),)


rtp_packets = st.builds(
    RtpPacket,
    payload_type=st.integers(0, 127),
    sequence=u16,
    timestamp=u32,
    ssrc=u32,
    payload=st.binary(max_size=64),
    marker=st.booleans(),
    csrcs=st.lists(u32, max_size=15).map(tuple),
    extension_profile=st.one_of(st.none(), u16),
    extension=st.binary(max_size=40).map(lambda b: b[: len(b) // 4 * 4]),
    padding=st.integers(0, 255),
).filter(lambda p: p.extension_profile is not None or not p.extension)


@given(rtp_packets)
def test_rtp_round_trip(packet: RtpPacket) -> None:
    """Any RTP packet survives serialize -> parse."""
    assert parse_rtp(serialize_rtp(packet)) == packet


@given(u8, u32, u16, u32, st.binary(max_size=32))
def test_yima_tag_round_trip(node: int, node_seq: int, seq: int, ts: int, payload: bytes) -> None:
    """The node index and per-node sequence survive the hot-path template and the parser."""
    data = RtpHeaderTemplate(33, 77, node).build(seq, ts, payload, node_seq)
    p = parse_rtp(data)
    assert (p.sequence, p.timestamp, p.payload, p.yima) == (
        seq,
        ts,
        payload,
        YimaTag(node, node_seq),
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80\x21" + b"\0" * 9,  # short header
        b"\x40\x21" + b"\0" * 10,  # version 1
        b"\x83\x21" + b"\0" * 14,  # 3 CSRCs missing
        b"\x90\x21" + b"\0" * 10 + b"\xbe\xde",  # short extension header
        b"\x90\x21" + b"\0" * 10 + b"\xbe\xde\x00\x05",  # extension overruns
        b"\xa0\x21" + b"\0" * 10 + b"\x00",  # zero padding count
        b"\xa0\x21" + b"\0" * 10 + b"\x20",  # padding beyond the packet
    ],
)
def test_rtp_malformed(data: bytes) -> None:
    """Truncated or inconsistent RTP packets raise MalformedPacket."""
    with pytest.raises(MalformedPacket):
        parse_rtp(data)


def test_element_overrun_is_malformed() -> None:
    """A one-byte element claiming more bytes than the block holds is rejected."""
    with pytest.raises(MalformedPacket):
        rtp.parse_one_byte_extension(b"\x1f\x00\x00\x00")


def test_rtp_mux_demux() -> None:
    """RTCP is told apart from RTP by its packet type byte (RFC 5761)."""
    assert rtp.is_rtcp(serialize_rtcp(Bye((1,))))
    assert not rtp.is_rtcp(rtp.build_rtp(33, 1, 2, 3, b""))
    assert not rtp.is_rtcp(rtp.build_rtp(96, 1, 2, 3, b"", marker=True))


# --- payload formats -------------------------------------------------------------


def test_mp2t_payload_checks() -> None:
    """RFC 2250 payloads are whole 188-byte TS packets with sync bytes; 7 make 1316 bytes."""
    ts = (b"\x47" + b"\0" * 187) * 15
    chunks = rtp.split_mp2t(ts)
    assert [len(x) for x in chunks] == [1316, 1316, 188]
    assert rtp.check_mp2t_payload(chunks[0]) == 7
    with pytest.raises(MalformedPacket):
        rtp.check_mp2t_payload(b"\x47" * 100)
    with pytest.raises(MalformedPacket):
        rtp.check_mp2t_payload(b"\x00" * 188)
    with pytest.raises(MalformedPacket):
        rtp.split_mp2t(b"\x47" * 189)


def test_l16_types_and_sizes() -> None:
    """L16 uses static PT 10/11 at 44.1 kHz, dynamic otherwise; sizes are whole frames."""
    assert rtp.l16_payload_type(44100, 2) == 10
    assert rtp.l16_payload_type(44100, 1) == 11
    assert rtp.l16_payload_type(48000, 2) == 96
    with pytest.raises(ValueError):
        rtp.l16_payload_type(48000, 2, dynamic=50)
    assert rtp.l16_payload_size(8000, 1) == 320  # 20 ms
    size = rtp.l16_payload_size(48000, 2)
    assert size % 4 == 0 and size <= 1400
    assert rtp.l16_samples(1400, 2) == 350
    with pytest.raises(MalformedPacket):
        rtp.l16_samples(1402, 2)
    assert rtp.rtp_timestamp(1.0, 90000, base=(1 << 32) - 10) == 89990


# --- RTCP --------------------------------------------------------------------------


def test_sender_report_layout_by_hand() -> None:
    """An SR with one report block matches the RFC 3550 §6.4.1 layout byte by byte."""
    sr = SenderReport(
        ssrc=0x11111111,
        ntp_timestamp=0x0102030405060708,
        rtp_timestamp=0x22222222,
        packet_count=3,
        octet_count=4,
        reports=(ReportBlock(0x33333333, 5, -1, 0x10002, 6, 7, 8),),
    )
    expected = (
        b"\x81\xc8\x00\x0c"  # V=2 RC=1 PT=200 length=12 words
        + struct.pack("!IQIII", 0x11111111, 0x0102030405060708, 0x22222222, 3, 4)
        + struct.pack("!IB", 0x33333333, 5)
        + b"\xff\xff\xff"  # cumulative lost -1 (24-bit signed)
        + struct.pack("!IIII", 0x10002, 6, 7, 8)
    )
    assert serialize_rtcp(sr) == expected
    assert parse_rtcp(expected) == (sr,)


def test_generic_nack_layout_rfc4585() -> None:
    """A Generic NACK is PT 205, FMT 1, sender and media SSRC, then PID/BLP pairs (RFC 4585 §6.2.1)."""
    nack = GenericNack(1, 2, (NackItem(65535, 0b101),))
    data = serialize_rtcp(nack)
    assert data == b"\x81\xcd\x00\x03" + struct.pack("!IIHH", 1, 2, 65535, 5)
    assert parse_rtcp(data) == (nack,)
    assert nack.lost() == [65535, 0, 2]


def test_yima_app_layout() -> None:
    """The YIMA APP packet is 36 bytes: header, SSRC, name, then the 24-byte body of docs/wire.md."""
    fb = YimaFeedback.set_speed(0xA, 0xB, 7, 1.25, at_us=123)
    data = serialize_rtcp(fb)
    assert data == (
        b"\x82\xcc\x00\x08"
        + struct.pack("!I", 0xA)
        + b"YIMA"
        + struct.pack("!IIQII", 0xB, 7, 123, 1_250_000, 0)
    )
    (back,) = parse_rtcp(data)
    assert back == fb and isinstance(back, YimaFeedback) and back.speed == 1.25


def test_app_with_yima_name_but_unknown_subtype_stays_raw() -> None:
    """A YIMA APP with an unknown subtype or length is kept as a generic App."""
    raw = App(20, 1, b"YIMA", b"\0" * 24)
    assert parse_rtcp(serialize_rtcp(raw)) == (raw,)
    short = App(0, 1, b"YIMA", b"\0" * 8)
    assert parse_rtcp(serialize_rtcp(short)) == (short,)


def test_compound_with_sdes_and_bye_reason() -> None:
    """RR + SDES(CNAME) + BYE with a reason parse as a compound packet, in order."""
    parts = (
        ReceiverReport(9, (ReportBlock(4, 1, 2, 3, 4, 5, 6),)),
        SourceDescription((SdesChunk(9, ((1, b"player@host"), (6, b"yimaporc"))),)),
        Bye((9, 10), b"done"),
    )
    data = serialize_rtcp(parts)
    assert len(data) % 4 == 0
    assert parse_rtcp(data) == parts


def test_padding_on_last_packet_is_removed() -> None:
    """A padded final RTCP packet parses; padding on an earlier one is refused."""
    bye = serialize_rtcp(Bye((5,)))
    padded = b"\xa1\xcb\x00\x02" + bye[4:] + b"\0\0\0\x04"
    assert parse_rtcp(padded) == (Bye((5,)),)
    with pytest.raises(MalformedPacket):
        parse_rtcp(padded + bye)


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\xc8",
        b"\x40\xc9\x00\x01\0\0\0\0",  # version 1
        b"\x80\xc9\x00\x05\0\0\0\0",  # length overruns
        b"\x81\xc9\x00\x01\0\0\0\0",  # RC=1 but no report block
        b"\x81\xcd\x00\x02\0\0\0\0\0\0\0\0",  # NACK without an FCI entry
        b"\x80\xc9\x00\x01\0\0\0\0\x80",  # trailing byte
        b"\x81\xca\x00\x01\0\0\0\1",  # SDES chunk without terminator
    ],
)
def test_rtcp_malformed(data: bytes) -> None:
    """Truncated or inconsistent RTCP raises MalformedPacket."""
    with pytest.raises(MalformedPacket):
        parse_rtcp(data)


reports = st.builds(
    ReportBlock, u32, u8, st.integers(-(1 << 23), (1 << 23) - 1), u32, u32, u32, u32
)
words = st.binary(max_size=16).map(lambda b: b[: len(b) // 4 * 4])
rtcp_packets = st.one_of(
    st.builds(
        SenderReport,
        u32,
        st.integers(0, (1 << 64) - 1),
        u32,
        u32,
        u32,
        st.lists(reports, max_size=3).map(tuple),
        words,
    ),
    st.builds(ReceiverReport, u32, st.lists(reports, max_size=3).map(tuple), words),
    st.builds(
        SourceDescription,
        st.lists(
            st.builds(
                SdesChunk,
                u32,
                st.lists(st.tuples(st.integers(1, 8), st.binary(max_size=20)), max_size=3).map(
                    tuple
                ),
            ),
            max_size=3,
        ).map(tuple),
    ),
    st.builds(Bye, st.lists(u32, max_size=4).map(tuple), st.binary(max_size=30)),
    st.builds(
        GenericNack,
        u32,
        u32,
        st.lists(st.builds(NackItem, u16, u16), min_size=1, max_size=5).map(tuple),
    ),
    st.builds(App, st.integers(5, 31), u32, st.binary(min_size=4, max_size=4), words),
    st.builds(
        YimaFeedback,
        st.sampled_from(YimaKind),
        u32,
        u32,
        u32,
        st.integers(0, (1 << 64) - 1),
        u32,
        u32,
    ),
    st.builds(UnknownRtcp, st.integers(207, 223), st.integers(0, 31), words),
)


@given(st.lists(rtcp_packets, min_size=1, max_size=4))
def test_rtcp_compound_round_trip(packets: list[rtp.RtcpPacket]) -> None:
    """Any compound RTCP packet survives serialize -> parse."""
    assert parse_rtcp(serialize_rtcp(packets)) == tuple(packets)


# --- Generic NACK helpers --------------------------------------------------------------


def test_nack_items_across_wrap() -> None:
    """Losses 65534..1 make one FCI entry anchored before the wrap."""
    assert nack_items_from_lost([0, 1, 65534, 65535]) == (NackItem(65534, 0b111),)
    assert lost_from_nack_items([NackItem(65534, 0b111)]) == [65534, 65535, 0, 1]


def test_nack_items_minimal() -> None:
    """17 consecutive losses fit one entry; an 18th needs a second."""
    assert nack_items_from_lost(range(100, 117)) == (NackItem(100, 0xFFFF),)
    assert nack_items_from_lost(range(100, 118)) == (NackItem(100, 0xFFFF), NackItem(117, 0))
    assert nack_items_from_lost([]) == ()
    assert nack_items_from_lost([5, 5, 5]) == (NackItem(5, 0),)


def test_nack_items_extended_numbers() -> None:
    """Extended (unbounded) numbers are reduced to 16 bits before grouping."""
    assert nack_items_from_lost([65536 * 3 + 65535, 65536 * 4]) == (NackItem(65535, 1),)


@given(st.integers(0, 0xFFFF), st.sets(st.integers(0, 2000), max_size=200))
def test_nack_helpers_round_trip(base: int, offsets: set[int]) -> None:
    """Lost seqs -> FCI -> lost seqs gives the same set in serial order, with at most one entry per 17-window."""
    lost = [(base + o) & 0xFFFF for o in sorted(offsets)]
    items = nack_items_from_lost(lost)
    assert lost_from_nack_items(items) == lost
    # Optimal greedy cover: never more entries than windows needed.
    assert len(items) <= len(lost)
    for a, b in itertools.pairwise(items):
        assert seq_diff(a.pid, b.pid) > 16


def test_ntp_helpers() -> None:
    """NTP timestamps convert to and from Unix time; LSR is the middle 32 bits."""
    ntp = rtp.ntp_timestamp(1_700_000_000.5)
    assert ntp >> 32 == 1_700_000_000 + rtp.NTP_UNIX_OFFSET
    assert ntp & 0xFFFFFFFF == 1 << 31
    assert abs(rtp.ntp_to_unix(ntp) - 1_700_000_000.5) < 1e-6
    assert rtp.ntp_middle32(0x0011223344556677) == 0x22334455
