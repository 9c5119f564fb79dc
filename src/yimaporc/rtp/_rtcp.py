"""RTCP (RFC 3550, RFC 4585 Generic NACK, APP and its Yima flow-control form) as construct
structs converted to attrs values; NTP timestamps and NACK list helpers."""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence

import attrs
import construct as c

from ._errors import MalformedPacket
from ._serial import SEQ_MASK

# --- RTCP -----------------------------------------------------------------------------


class RtcpType(enum.IntEnum):
    """RTCP packet types."""

    SR = 200
    RR = 201
    SDES = 202
    BYE = 203
    APP = 204
    RTPFB = 205
    PSFB = 206


NACK_FMT = 1  # RTPFB FMT 1: Generic NACK (RFC 4585 §6.2.1)
YIMA_APP_NAME = b"YIMA"

_RtcpHead = struct.Struct("!BBH")
_U32 = struct.Struct("!I")

_ReportBlockS = c.Struct(
    "ssrc" / c.Int32ub,
    "fraction_lost" / c.Int8ub,
    "cumulative_lost" / c.Int24sb,
    "highest_seq" / c.Int32ub,
    "jitter" / c.Int32ub,
    "lsr" / c.Int32ub,
    "dlsr" / c.Int32ub,
)
_SenderReportS = c.Struct(
    "ssrc" / c.Int32ub,
    "ntp_timestamp" / c.Int64ub,
    "rtp_timestamp" / c.Int32ub,
    "packet_count" / c.Int32ub,
    "octet_count" / c.Int32ub,
    "reports" / c.Array(c.this._.count, _ReportBlockS),
    "extension" / c.GreedyBytes,
)
_ReceiverReportS = c.Struct(
    "ssrc" / c.Int32ub,
    "reports" / c.Array(c.this._.count, _ReportBlockS),
    "extension" / c.GreedyBytes,
)
_ByeS = c.Struct(
    "ssrcs" / c.Array(c.this._.count, c.Int32ub),
    "reason" / c.Optional(c.Prefixed(c.Int8ub, c.GreedyBytes)),
    "pad" / c.GreedyBytes,
)
_NackS = c.Struct(
    "sender_ssrc" / c.Int32ub,
    "media_ssrc" / c.Int32ub,
    "fci" / c.GreedyRange(c.Struct("pid" / c.Int16ub, "blp" / c.Int16ub)),
)
_AppS = c.Struct("ssrc" / c.Int32ub, "name" / c.Bytes(4), "data" / c.GreedyBytes)
_YimaAppData = c.Struct(
    "media_ssrc" / c.Int32ub,
    "feedback_seq" / c.Int32ub,
    "at_us" / c.Int64ub,
    "value" / c.Int32ub,
    "aux" / c.Int32ub,
)
YIMA_APP_DATA_SIZE = _YimaAppData.sizeof()  # 24


@attrs.frozen
class ReportBlock:
    """One reception report block (RFC 3550 §6.4.1)."""

    ssrc: int
    fraction_lost: int = 0
    cumulative_lost: int = 0
    highest_seq: int = 0
    jitter: int = 0
    lsr: int = 0
    dlsr: int = 0


@attrs.frozen
class SenderReport:
    """RTCP SR (PT 200): sender info and reception reports."""

    ssrc: int
    ntp_timestamp: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: tuple[ReportBlock, ...] = ()
    extension: bytes = b""


@attrs.frozen
class ReceiverReport:
    """RTCP RR (PT 201): reception reports of a receiver."""

    ssrc: int
    reports: tuple[ReportBlock, ...] = ()
    extension: bytes = b""


class SdesItem(enum.IntEnum):
    """SDES item types (RFC 3550 §6.5)."""

    CNAME = 1
    NAME = 2
    EMAIL = 3
    PHONE = 4
    LOC = 5
    TOOL = 6
    NOTE = 7
    PRIV = 8


@attrs.frozen
class SdesChunk:
    """One SDES chunk: a source and its ``(item type, value)`` items."""

    ssrc: int
    items: tuple[tuple[int, bytes], ...] = ()


@attrs.frozen
class SourceDescription:
    """RTCP SDES (PT 202)."""

    chunks: tuple[SdesChunk, ...]


@attrs.frozen
class Bye:
    """RTCP BYE (PT 203): sources leaving, with an optional reason."""

    ssrcs: tuple[int, ...]
    reason: bytes = b""


@attrs.frozen
class NackItem:
    """One Generic NACK FCI entry: lost ``pid`` and bitmask ``blp`` of the 16 following."""

    pid: int
    blp: int = 0


@attrs.frozen
class GenericNack:
    """RTCP RTPFB Generic NACK (PT 205, FMT 1; RFC 4585 §6.2.1)."""

    sender_ssrc: int
    media_ssrc: int
    items: tuple[NackItem, ...]

    def lost(self) -> list[int]:
        """The 16-bit sequence numbers this NACK names, in wire order."""
        return lost_from_nack_items(self.items)


@attrs.frozen
class App:
    """RTCP APP (PT 204): application-defined, 4-character ``name``."""

    subtype: int
    ssrc: int
    name: bytes
    data: bytes = b""


class YimaKind(enum.IntEnum):
    """Subtypes of the Yima flow-control APP packet (docs/wire.md)."""

    PAUSE = 0
    RESUME = 1
    SPEED = 2
    DELTA_P = 3
    BUFFER = 4
    #: Nothing came from node ``value`` while its packets are overdue: serve its
    #: share from ``at`` (a media time in microseconds) elsewhere (docs/wire.md).
    HANDOVER = 5


@attrs.frozen
class YimaFeedback:
    """APP "YIMA": the player's flow-control feedback to the nodes serving a stream.

    ``at_us`` is the cluster-clock instant (microseconds) from which the change
    applies (0: on receipt).  ``value``: PAUSE -- the media position to stop at in
    milliseconds (0: the node's own position at ``at_us``); SPEED -- speed in millionths (1_000_000
    = real time); DELTA_P -- inter-packet delay in microseconds; BUFFER -- the
    buffer level in bytes (``aux``: buffered media in milliseconds).
    """

    kind: YimaKind
    ssrc: int
    media_ssrc: int
    feedback_seq: int
    at_us: int = 0
    value: int = 0
    aux: int = 0

    @property
    def speed(self) -> float:
        """``value`` of a SPEED message as a factor (1.0 = real time)."""
        return self.value / 1_000_000

    @classmethod
    def set_speed(
        cls, ssrc: int, media_ssrc: int, feedback_seq: int, speed: float, at_us: int = 0
    ) -> YimaFeedback:
        """A SPEED message for ``speed`` (> 1 speeds up, < 1 slows down)."""
        return cls(YimaKind.SPEED, ssrc, media_ssrc, feedback_seq, at_us, round(speed * 1_000_000))


@attrs.frozen
class UnknownRtcp:
    """An RTCP packet of a type this module does not interpret, kept as raw body."""

    packet_type: int
    count: int
    body: bytes


RtcpPacket = (
    SenderReport
    | ReceiverReport
    | SourceDescription
    | Bye
    | GenericNack
    | App
    | YimaFeedback
    | UnknownRtcp
)


def _report(r: c.Container) -> ReportBlock:
    return ReportBlock(
        r.ssrc, r.fraction_lost, r.cumulative_lost, r.highest_seq, r.jitter, r.lsr, r.dlsr
    )


def _parse_sdes(count: int, body: bytes) -> SourceDescription:
    chunks = []
    i = 0
    for _ in range(count):
        if i + 4 > len(body):
            raise MalformedPacket("SDES chunk overruns the packet")
        (ssrc,) = _U32.unpack_from(body, i)
        i += 4
        items = []
        while True:
            if i >= len(body):
                raise MalformedPacket("SDES item list is not terminated")
            kind = body[i]
            if kind == 0:
                i += 1
                i += -i % 4  # skip to the next 32-bit boundary
                break
            if i + 2 > len(body) or i + 2 + body[i + 1] > len(body):
                raise MalformedPacket("SDES item overruns the packet")
            length = body[i + 1]
            items.append((kind, bytes(body[i + 2 : i + 2 + length])))
            i += 2 + length
        chunks.append(SdesChunk(ssrc, tuple(items)))
    return SourceDescription(tuple(chunks))


def _serialize_sdes(sdes: SourceDescription) -> bytes:
    out = bytearray()
    for chunk in sdes.chunks:
        out += _U32.pack(chunk.ssrc)
        for kind, value in chunk.items:
            if not 1 <= kind <= 255 or len(value) > 255:
                raise ValueError("SDES item type 1..255 with at most 255 bytes")
            out += bytes((kind, len(value))) + value
        out.append(0)
        out += bytes(-len(out) % 4)
    return bytes(out)


def _parse_body(pt: int, count: int, body: bytes) -> RtcpPacket:
    if pt == RtcpType.SR:
        sr = _SenderReportS.parse(body, count=count)
        return SenderReport(
            sr.ssrc,
            sr.ntp_timestamp,
            sr.rtp_timestamp,
            sr.packet_count,
            sr.octet_count,
            tuple(_report(r) for r in sr.reports),
            sr.extension,
        )
    if pt == RtcpType.RR:
        rr = _ReceiverReportS.parse(body, count=count)
        return ReceiverReport(rr.ssrc, tuple(_report(r) for r in rr.reports), rr.extension)
    if pt == RtcpType.SDES:
        return _parse_sdes(count, body)
    if pt == RtcpType.BYE:
        bye = _ByeS.parse(body, count=count)
        return Bye(tuple(bye.ssrcs), bye.reason or b"")
    if pt == RtcpType.RTPFB and count == NACK_FMT:
        if len(body) < 12 or len(body) % 4:
            raise MalformedPacket("Generic NACK needs two SSRCs and at least one FCI entry")
        nack = _NackS.parse(body)
        return GenericNack(
            nack.sender_ssrc, nack.media_ssrc, tuple(NackItem(i.pid, i.blp) for i in nack.fci)
        )
    if pt == RtcpType.APP:
        app = _AppS.parse(body)
        if app.name == YIMA_APP_NAME and len(app.data) == YIMA_APP_DATA_SIZE:
            try:
                kind = YimaKind(count)
            except ValueError:
                return App(count, app.ssrc, app.name, app.data)
            y = _YimaAppData.parse(app.data)
            return YimaFeedback(
                kind, app.ssrc, y.media_ssrc, y.feedback_seq, y.at_us, y.value, y.aux
            )
        return App(count, app.ssrc, app.name, app.data)
    return UnknownRtcp(pt, count, body)


def parse_rtcp(data: bytes) -> tuple[RtcpPacket, ...]:
    """Parse a (compound) RTCP packet into its parts; raises :class:`MalformedPacket`.

    Tolerant of reduced-size RTCP (RFC 5506): any packet type may come first.
    Padding is accepted on the last packet only.
    """
    out: list[RtcpPacket] = []
    pos = 0
    n = len(data)
    if n < 4:
        raise MalformedPacket("RTCP packet shorter than its 4-byte header")
    while pos < n:
        if pos + 4 > n:
            raise MalformedPacket("trailing bytes after the last RTCP packet")
        b0, pt, words = _RtcpHead.unpack_from(data, pos)
        if b0 >> 6 != 2:
            raise MalformedPacket(f"RTCP version {b0 >> 6}, expected 2")
        end = pos + 4 * (words + 1)
        if end > n:
            raise MalformedPacket("RTCP length overruns the datagram")
        body_end = end
        if b0 & 0x20:
            if end != n:
                raise MalformedPacket("RTCP padding before the last packet")
            pad = data[end - 1]
            if pad == 0 or pad > end - pos - 4:
                raise MalformedPacket("bad RTCP padding count")
            body_end = end - pad
        body = bytes(data[pos + 4 : body_end])
        try:
            out.append(_parse_body(pt, b0 & 0x1F, body))
        except c.ConstructError as exc:
            raise MalformedPacket(f"bad RTCP packet type {pt}: {exc}") from None
        pos = end
    return tuple(out)


def _report_dicts(reports: Sequence[ReportBlock]) -> list[dict[str, int]]:
    return [attrs.asdict(r) for r in reports]


def _serialize_one(packet: RtcpPacket) -> bytes:
    p = packet
    pt: int
    if isinstance(p, SenderReport):
        count, pt = len(p.reports), RtcpType.SR
        body = _SenderReportS.build(
            {
                "ssrc": p.ssrc,
                "ntp_timestamp": p.ntp_timestamp,
                "rtp_timestamp": p.rtp_timestamp,
                "packet_count": p.packet_count,
                "octet_count": p.octet_count,
                "reports": _report_dicts(p.reports),
                "extension": p.extension,
            },
            count=count,
        )
    elif isinstance(p, ReceiverReport):
        count, pt = len(p.reports), RtcpType.RR
        body = _ReceiverReportS.build(
            {"ssrc": p.ssrc, "reports": _report_dicts(p.reports), "extension": p.extension},
            count=count,
        )
    elif isinstance(p, SourceDescription):
        count, pt = len(p.chunks), RtcpType.SDES
        body = _serialize_sdes(p)
    elif isinstance(p, Bye):
        count, pt = len(p.ssrcs), RtcpType.BYE
        body = _ByeS.build(
            {"ssrcs": list(p.ssrcs), "reason": p.reason or None, "pad": b""}, count=count
        )
        if p.reason:
            if len(p.reason) > 255:
                raise ValueError("BYE reason is at most 255 bytes")
            body += bytes(-len(body) % 4)
    elif isinstance(p, GenericNack):
        if not p.items:
            raise ValueError("a Generic NACK names at least one packet")
        count, pt = NACK_FMT, RtcpType.RTPFB
        body = _NackS.build(
            {
                "sender_ssrc": p.sender_ssrc,
                "media_ssrc": p.media_ssrc,
                "fci": [{"pid": i.pid, "blp": i.blp} for i in p.items],
            }
        )
    elif isinstance(p, YimaFeedback):
        count, pt = int(p.kind), RtcpType.APP
        data = _YimaAppData.build(
            {
                "media_ssrc": p.media_ssrc,
                "feedback_seq": p.feedback_seq,
                "at_us": p.at_us,
                "value": p.value,
                "aux": p.aux,
            }
        )
        body = _AppS.build({"ssrc": p.ssrc, "name": YIMA_APP_NAME, "data": data})
    elif isinstance(p, App):
        if len(p.data) % 4:
            raise ValueError("APP data must be whole 32-bit words")
        count, pt = p.subtype, RtcpType.APP
        body = _AppS.build({"ssrc": p.ssrc, "name": p.name, "data": p.data})
    else:
        if len(p.body) % 4:
            raise ValueError("RTCP body must be whole 32-bit words")
        count, pt, body = p.count, p.packet_type, p.body
    if not 0 <= count <= 31:
        raise ValueError(f"RTCP count/subtype out of range: {count}")
    if len(body) % 4:
        raise ValueError("RTCP body must be whole 32-bit words")
    return _RtcpHead.pack(0x80 | count, pt, len(body) // 4) + body


def serialize_rtcp(packets: RtcpPacket | Iterable[RtcpPacket]) -> bytes:
    """One RTCP packet, or a compound packet of several, as bytes."""
    if isinstance(packets, RtcpPacket):
        packets = (packets,)
    try:
        return b"".join(_serialize_one(p) for p in packets)
    except c.ConstructError as exc:
        raise ValueError(f"cannot serialize RTCP: {exc}") from None


# --- NTP timestamps and Generic NACK helpers -----------------------------------------

NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01


def ntp_timestamp(unix_time: float) -> int:
    """The 64-bit NTP timestamp (32.32 fixed point since 1900) of a Unix time."""
    return round((unix_time + NTP_UNIX_OFFSET) * (1 << 32)) & 0xFFFFFFFFFFFFFFFF


def ntp_to_unix(ntp: int) -> float:
    """The Unix time of a 64-bit NTP timestamp."""
    return ntp / (1 << 32) - NTP_UNIX_OFFSET


def ntp_middle32(ntp: int) -> int:
    """The middle 32 bits of an NTP timestamp: the LSR field of a report block."""
    return (ntp >> 16) & 0xFFFFFFFF


def _serial_order(seqs: Iterable[int]) -> list[int]:
    values = sorted({s & SEQ_MASK for s in seqs})
    if len(values) < 2:
        return values
    # Start right after the widest circular gap, so a run across 65535 -> 0 stays together.
    gaps = [(values[(i + 1) % len(values)] - values[i]) & SEQ_MASK for i in range(len(values))]
    start = (max(range(len(values)), key=gaps.__getitem__) + 1) % len(values)
    return values[start:] + values[:start]


def nack_items_from_lost(seqs: Iterable[int]) -> tuple[NackItem, ...]:
    """The fewest Generic NACK entries naming exactly the lost 16-bit ``seqs``.

    Wrap-safe: ``[65534, 65535, 0, 1]`` is one entry (PID 65534, BLP 0b111).
    Greedy from the earliest in serial order is optimal for fixed 17-wide windows.
    """
    items: list[NackItem] = []
    pid: int | None = None
    blp = 0
    for s in _serial_order(seqs):
        if pid is not None:
            d = (s - pid) & SEQ_MASK
            if 1 <= d <= 16:
                blp |= 1 << (d - 1)
                continue
            items.append(NackItem(pid, blp))
        pid, blp = s, 0
    if pid is not None:
        items.append(NackItem(pid, blp))
    return tuple(items)


def lost_from_nack_items(items: Iterable[NackItem]) -> list[int]:
    """The 16-bit sequence numbers named by Generic NACK entries, in order, no duplicates."""
    out: list[int] = []
    seen: set[int] = set()
    for item in items:
        for k in range(17):
            if k == 0 or item.blp & (1 << (k - 1)):
                s = (item.pid + k) & SEQ_MASK
                if s not in seen:
                    seen.add(s)
                    out.append(s)
    return out
