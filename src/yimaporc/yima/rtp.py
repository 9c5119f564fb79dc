"""RTP and RTCP on the wire (RFC 3550, 8285, 4585, 2250, 3551): pure parse/serialize.

Yima sends one ordinary RTP stream per medium: the RTP header's sequence number
is the *global* one, so stock players see a normal stream.  Every packet also
carries an RFC 8285 one-byte header extension element (ID 1) with the index of
the node that sent it and that node's own 32-bit sequence number; players that
do not know it skip it.  See docs/wire.md for every byte.

* RTP: :class:`RtpPacket`, :func:`parse_rtp`, :func:`serialize_rtp`, and the hot
  path :class:`RtpHeaderTemplate` (one precompiled :class:`struct.Struct`).
* RTCP (construct at the control plane): :class:`SenderReport`,
  :class:`ReceiverReport`, :class:`SourceDescription`, :class:`Bye`,
  :class:`GenericNack` (RFC 4585), :class:`App` and its Yima flow-control form
  :class:`YimaFeedback`; :func:`parse_rtcp` splits compound packets.
* RFC 1982 serial arithmetic on 16-bit sequence numbers: :func:`seq_lt`,
  :func:`seq_diff`, :func:`unwrap_seq`, :class:`SeqUnwrapper`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence

import attrs
import construct as c

from ..rtp.payloads import (  # noqa: F401 (re-exported)
    MP2T_CLOCK,
    MP2T_PAYLOAD_SIZE,
    PT_DYNAMIC_FIRST,
    PT_DYNAMIC_LAST,
    PT_L16_MONO,
    PT_L16_STEREO,
    PT_MP2T,
    TS_PACKET_SIZE,
    TS_PER_RTP,
    l16_payload_type,
)


class MalformedPacket(ValueError):
    """The bytes are not a well-formed RTP or RTCP packet."""


# --- RFC 1982 serial arithmetic on 16-bit sequence numbers ---------------------------

SEQ_MOD = 1 << 16
SEQ_HALF = 1 << 15
SEQ_MASK = SEQ_MOD - 1


def seq_add(a: int, n: int) -> int:
    """``a + n`` in 16-bit sequence space (``n`` may be negative)."""
    return (a + n) & SEQ_MASK


def seq_diff(a: int, b: int) -> int:
    """Signed distance from ``a`` to ``b``: ``seq_add(a, seq_diff(a, b)) == b``.

    In ``[-32768, 32767]``; ``-32768`` means the order is undefined (RFC 1982 §3.2).
    """
    d = (b - a) & SEQ_MASK
    return d - SEQ_MOD if d >= SEQ_HALF else d


def seq_lt(a: int, b: int) -> bool:
    """True when ``a`` precedes ``b`` (RFC 1982 §3.2; false both ways at distance 2**15)."""
    return 0 < ((b - a) & SEQ_MASK) < SEQ_HALF


def seq_gt(a: int, b: int) -> bool:
    """True when ``a`` follows ``b``."""
    return seq_lt(b, a)


def unwrap_seq(reference: int, seq16: int) -> int:
    """The extended (unbounded) number congruent to ``seq16`` nearest ``reference``.

    ``reference`` is an already extended number (e.g. the highest seen), so
    ``unwrap_seq(65535, 0) == 65536`` and ``unwrap_seq(65536, 65535) == 65535``.
    """
    if not 0 <= seq16 <= SEQ_MASK:
        raise ValueError(f"not a 16-bit sequence number: {seq16}")
    return reference + seq_diff(reference & SEQ_MASK, seq16)


class SeqUnwrapper:
    """Extends the 16-bit sequence numbers of one source to 64-bit ones.

    The first number seen starts at ``cycles * 65536 + seq``; later numbers are
    placed nearest the highest seen, so a late packet from before a wrap keeps
    its order.  ``cycles`` defaults to 1 so a packet just before the first one
    (across 0 -> 65535) still extends to a non-negative number.
    """

    def __init__(self, cycles: int = 1) -> None:
        self._cycles = cycles
        self.highest: int | None = None

    def unwrap(self, seq16: int) -> int:
        """The extended number of ``seq16``; remembers the highest."""
        if self.highest is None:
            if not 0 <= seq16 <= SEQ_MASK:
                raise ValueError(f"not a 16-bit sequence number: {seq16}")
            self.highest = ext = (self._cycles << 16) | seq16
            return ext
        ext = unwrap_seq(self.highest, seq16)
        if ext > self.highest:
            self.highest = ext
        return ext


# --- payload formats -------------------------------------------------------------------

# Payload types and clocks: yimaporc.rtp.payloads (shared with SDP).


def l16_samples(payload_length: int, channels: int) -> int:
    """Sample frames in an L16 payload (the RTP timestamp step); rejects partial frames."""
    frame = 2 * channels
    if channels < 1 or payload_length % frame:
        raise MalformedPacket(f"L16 payload of {payload_length} bytes is not whole frames")
    return payload_length // frame


def l16_payload_size(rate: int, channels: int, ptime: float = 0.02, mtu_payload: int = 1400) -> int:
    """Bytes of L16 per packet for ``ptime`` seconds, whole frames, at most ``mtu_payload``."""
    frame = 2 * channels
    size = max(1, round(rate * ptime)) * frame
    return min(size, (mtu_payload // frame) * frame)


def check_mp2t_payload(payload: bytes) -> int:
    """Number of TS packets in an RFC 2250 payload; whole 188-byte packets with 0x47 sync."""
    n, rest = divmod(len(payload), TS_PACKET_SIZE)
    if rest or n == 0:
        raise MalformedPacket(f"MP2T payload of {len(payload)} bytes is not whole TS packets")
    for i in range(0, len(payload), TS_PACKET_SIZE):
        if payload[i] != 0x47:
            raise MalformedPacket(f"TS packet at offset {i} lacks the 0x47 sync byte")
    return n


def split_mp2t(data: bytes, per_packet: int = TS_PER_RTP) -> list[bytes]:
    """Cut MPEG-TS bytes into RTP payloads of ``per_packet`` TS packets (the last may be short)."""
    if len(data) % TS_PACKET_SIZE:
        raise MalformedPacket("MPEG-TS data is not whole 188-byte packets")
    size = per_packet * TS_PACKET_SIZE
    return [data[i : i + size] for i in range(0, len(data), size)]


def rtp_timestamp(media_time: float, clock_rate: int, base: int = 0) -> int:
    """The 32-bit RTP timestamp of ``media_time`` seconds after the stream's ``base``."""
    return (base + round(media_time * clock_rate)) & 0xFFFFFFFF


# --- RTP ----------------------------------------------------------------------------

ONE_BYTE_PROFILE = 0xBEDE  # RFC 8285 §4.2
YIMA_EXT_ID = 1
_YIMA_ELEM_HEAD = (YIMA_EXT_ID << 4) | (5 - 1)  # ID 1, 5 data bytes -> 0x14
_YIMA_ELEM = struct.Struct("!BI")  # node index u8, per-node sequence u32

_FIXED = struct.Struct("!BBHII")
_EXT_HEAD = struct.Struct("!HH")
_U32 = struct.Struct("!I")
# Fixed header + one-byte extension header + the Yima element + 2 padding bytes.
_YIMA_HEADER = struct.Struct("!BBHIIHHBBIxx")
YIMA_HEADER_SIZE = _YIMA_HEADER.size  # 24


@attrs.frozen
class YimaTag:
    """The Yima header-extension element: which node sent a packet, and its own number."""

    node_index: int
    node_seq: int

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.node_index <= 0xFF:
            raise ValueError(f"node index out of range: {self.node_index}")
        if not 0 <= self.node_seq <= 0xFFFFFFFF:
            raise ValueError(f"per-node sequence out of range: {self.node_seq}")


@attrs.frozen
class RtpPacket:
    """One RTP packet (RFC 3550 §5.1).

    ``extension_profile`` is None when the X bit is clear; ``extension`` is the
    raw extension data (a multiple of 4 bytes).  ``padding`` counts the padding
    bytes including the final count byte (0 = no P bit).
    """

    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrcs: tuple[int, ...] = ()
    extension_profile: int | None = None
    extension: bytes = b""
    padding: int = 0

    @property
    def yima(self) -> YimaTag | None:
        """The Yima element (node index, per-node sequence), if the packet carries one."""
        if self.extension_profile != ONE_BYTE_PROFILE:
            return None
        ext = self.extension
        if len(ext) >= 6 and ext[0] == _YIMA_ELEM_HEAD:  # the layout Yima itself writes
            node, seq = _YIMA_ELEM.unpack_from(ext, 1)
            return YimaTag(node, seq)
        for ident, data in parse_one_byte_extension(ext):
            if ident == YIMA_EXT_ID and len(data) == 5:
                node, seq = _YIMA_ELEM.unpack(data)
                return YimaTag(node, seq)
        return None

    def with_yima(self, tag: YimaTag | None) -> RtpPacket:
        """This packet with its extension replaced by the Yima element (or none)."""
        if tag is None:
            return attrs.evolve(self, extension_profile=None, extension=b"")
        return attrs.evolve(
            self,
            extension_profile=ONE_BYTE_PROFILE,
            extension=yima_extension(tag.node_index, tag.node_seq),
        )


def parse_one_byte_extension(data: bytes) -> tuple[tuple[int, bytes], ...]:
    """The ``(id, data)`` elements of an RFC 8285 one-byte-header extension block."""
    out: list[tuple[int, bytes]] = []
    i = 0
    n = len(data)
    while i < n:
        head = data[i]
        if head == 0:  # padding
            i += 1
            continue
        ident = head >> 4
        if ident == 15:  # reserved: stop processing (RFC 8285 §4.2)
            break
        length = (head & 0x0F) + 1
        if i + 1 + length > n:
            raise MalformedPacket("header-extension element overruns the extension")
        out.append((ident, bytes(data[i + 1 : i + 1 + length])))
        i += 1 + length
    return tuple(out)


def serialize_one_byte_extension(elements: Iterable[tuple[int, bytes]]) -> bytes:
    """An RFC 8285 one-byte-header extension block, zero-padded to 32 bits."""
    out = bytearray()
    for ident, data in elements:
        if not 1 <= ident <= 14:
            raise ValueError(f"one-byte extension IDs are 1..14, not {ident}")
        if not 1 <= len(data) <= 16:
            raise ValueError("one-byte extension elements carry 1..16 bytes")
        out.append((ident << 4) | (len(data) - 1))
        out += data
    out += bytes(-len(out) % 4)
    return bytes(out)


def yima_extension(node_index: int, node_seq: int) -> bytes:
    """The 8-byte extension block Yima writes: element ID 1 (node, seq) and 2 padding bytes."""
    return bytes((_YIMA_ELEM_HEAD,)) + _YIMA_ELEM.pack(node_index, node_seq) + b"\0\0"


def parse_rtp(data: bytes) -> RtpPacket:
    """Parse one RTP packet; raises :class:`MalformedPacket`."""
    n = len(data)
    if n < 12:
        raise MalformedPacket("RTP packet shorter than its 12-byte header")
    b0, b1, seq, ts, ssrc = _FIXED.unpack_from(data)
    if b0 >> 6 != 2:
        raise MalformedPacket(f"RTP version {b0 >> 6}, expected 2")
    pos = 12
    cc = b0 & 0x0F
    csrcs: tuple[int, ...] = ()
    if cc:
        if n < pos + 4 * cc:
            raise MalformedPacket("CSRC list overruns the packet")
        csrcs = struct.unpack_from(f"!{cc}I", data, pos)
        pos += 4 * cc
    profile: int | None = None
    ext = b""
    if b0 & 0x10:
        if n < pos + 4:
            raise MalformedPacket("extension header overruns the packet")
        profile, words = _EXT_HEAD.unpack_from(data, pos)
        pos += 4
        end = pos + 4 * words
        if end > n:
            raise MalformedPacket("header extension overruns the packet")
        ext = bytes(data[pos:end])
        pos = end
    padding = 0
    end = n
    if b0 & 0x20:
        padding = data[-1]
        if padding == 0 or pos + padding > n:
            raise MalformedPacket("bad RTP padding count")
        end = n - padding
    return RtpPacket(
        b1 & 0x7F,
        seq,
        ts,
        ssrc,
        bytes(data[pos:end]),
        bool(b1 & 0x80),
        csrcs,
        profile,
        ext,
        padding,
    )


def serialize_rtp(packet: RtpPacket) -> bytes:
    """The bytes of ``packet``; raises ValueError for out-of-range fields."""
    p = packet
    if not 0 <= p.payload_type <= 127:
        raise ValueError(f"payload type out of range: {p.payload_type}")
    if len(p.csrcs) > 15:
        raise ValueError("at most 15 CSRCs")
    if len(p.extension) % 4 or len(p.extension) > 4 * 0xFFFF:
        raise ValueError("extension data must be whole 32-bit words")
    if not 0 <= p.padding <= 255:
        raise ValueError("padding is 0..255 bytes")
    b0 = 0x80 | len(p.csrcs)
    if p.padding:
        b0 |= 0x20
    if p.extension_profile is not None:
        b0 |= 0x10
    parts = [
        _FIXED.pack(b0, (0x80 if p.marker else 0) | p.payload_type, p.sequence, p.timestamp, p.ssrc)
    ]
    if p.csrcs:
        parts.append(struct.pack(f"!{len(p.csrcs)}I", *p.csrcs))
    if p.extension_profile is not None:
        parts.append(_EXT_HEAD.pack(p.extension_profile, len(p.extension) // 4))
        parts.append(p.extension)
    parts.append(p.payload)
    if p.padding:
        parts.append(bytes(p.padding - 1) + bytes((p.padding,)))
    return b"".join(parts)


def build_rtp(
    payload_type: int,
    sequence: int,
    timestamp: int,
    ssrc: int,
    payload: bytes,
    *,
    marker: bool = False,
    node_index: int | None = None,
    node_seq: int = 0,
) -> bytes:
    """One RTP packet, with the Yima element when ``node_index`` is given (not the hot path)."""
    packet = RtpPacket(
        payload_type, sequence & SEQ_MASK, timestamp & 0xFFFFFFFF, ssrc, payload, marker
    )
    if node_index is not None:
        packet = packet.with_yima(YimaTag(node_index, node_seq & 0xFFFFFFFF))
    return serialize_rtp(packet)


class RtpHeaderTemplate:
    """The per-packet hot path: a stream's constant header fields, precomputed.

    Only sequence number, timestamp, per-node sequence and marker change from
    packet to packet; :meth:`header` packs them with one precompiled
    :class:`struct.Struct` (24 bytes with the Yima element, 12 without).
    Numbers are reduced modulo their field size, so callers may pass the
    unbounded global and per-node counters.
    """

    __slots__ = ("_b0", "_b1", "_node", "node_index", "payload_type", "ssrc")

    def __init__(self, payload_type: int, ssrc: int, node_index: int | None = None) -> None:
        if not 0 <= payload_type <= 127:
            raise ValueError(f"payload type out of range: {payload_type}")
        if not 0 <= ssrc <= 0xFFFFFFFF:
            raise ValueError(f"SSRC out of range: {ssrc}")
        if node_index is not None and not 0 <= node_index <= 0xFF:
            raise ValueError(f"node index out of range: {node_index}")
        self.payload_type = payload_type
        self.ssrc = ssrc
        self.node_index = node_index
        self._b0 = 0x90 if node_index is not None else 0x80
        self._b1 = payload_type
        self._node = node_index or 0

    @property
    def header_size(self) -> int:
        """Bytes of header this template writes."""
        return YIMA_HEADER_SIZE if self.node_index is not None else 12

    def header(
        self, sequence: int, timestamp: int, node_seq: int = 0, marker: bool = False
    ) -> bytes:
        """The header of one packet (send it with the payload, e.g. via ``sendmsg``)."""
        b1 = self._b1 | 0x80 if marker else self._b1
        if self.node_index is None:
            return _FIXED.pack(self._b0, b1, sequence & 0xFFFF, timestamp & 0xFFFFFFFF, self.ssrc)
        return _YIMA_HEADER.pack(
            self._b0,
            b1,
            sequence & 0xFFFF,
            timestamp & 0xFFFFFFFF,
            self.ssrc,
            ONE_BYTE_PROFILE,
            2,
            _YIMA_ELEM_HEAD,
            self._node,
            node_seq & 0xFFFFFFFF,
        )

    def build(
        self, sequence: int, timestamp: int, payload: bytes, node_seq: int = 0, marker: bool = False
    ) -> bytes:
        """One whole packet: :meth:`header` followed by ``payload``."""
        return self.header(sequence, timestamp, node_seq, marker) + payload

    def pack_run(
        self,
        buf: bytearray,
        block: memoryview,
        j: int,
        count: int,
        payload: int,
        sequence: int,
        node_seq: int,
        ts_base: int,
        start: float,
        step: float,
        clock_rate: int,
    ) -> int:
        """Packets ``j .. j+count-1`` of a cached ``block`` into ``buf`` (from 0), each
        header packed in place and followed by its ``payload``-byte slice (the last
        slice ends at the block's end): equal-size datagrams, only the last may be
        shorter.  Packet ``k`` carries ``sequence + k``, ``node_seq + k`` and the
        timestamp of media time ``start + step * (j + k)`` (``ts_base`` + that many
        seconds at ``clock_rate``, rounded).  Grows ``buf`` if needed; returns the
        bytes used.
        """
        hsz = self.header_size
        stride = hsz + payload
        first = j * payload
        end = min(len(block), first + count * payload)
        total = (count - 1) * stride + hsz + end - (first + (count - 1) * payload)
        if len(buf) < total:
            buf.extend(bytes(total - len(buf)))
        b0, b1, ssrc, node = self._b0, self._b1, self.ssrc, self._node
        if self.node_index is None:
            pack12 = _FIXED.pack_into
            for k in range(count):
                o = k * stride
                ts = ts_base + round((start + step * (j + k)) * clock_rate)
                pack12(buf, o, b0, b1, (sequence + k) & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
                p = first + k * payload
                q = min(end, p + payload)
                buf[o + hsz : o + hsz + q - p] = block[p:q]
            return total
        pack = _YIMA_HEADER.pack_into
        for k in range(count):
            o = k * stride
            ts = ts_base + round((start + step * (j + k)) * clock_rate)
            pack(buf, o, b0, b1, (sequence + k) & 0xFFFF, ts & 0xFFFFFFFF, ssrc,
                 ONE_BYTE_PROFILE, 2, _YIMA_ELEM_HEAD, node, (node_seq + k) & 0xFFFFFFFF)  # fmt: skip
            p = first + k * payload
            q = min(end, p + payload)
            buf[o + hsz : o + hsz + q - p] = block[p:q]
        return total


def is_rtcp(data: bytes) -> bool:
    """True when a datagram on a muxed port is RTCP, not RTP (RFC 5761 §4: PT 192..223)."""
    return len(data) >= 2 and 192 <= data[1] <= 223


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
    applies (0: on receipt).  ``value``: SPEED -- speed in millionths (1_000_000
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
