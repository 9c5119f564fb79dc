"""RTP packets (RFC 3550, RFC 8285 one-byte extensions, the Yima tag): pure parse/serialize,
and the hot path's precompiled header template."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import attrs

from ._errors import MalformedPacket
from ._serial import SEQ_MASK

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

    __slots__ = (
        "_b0",
        "_b1",
        "_c2",
        "_hsz",
        "_node",
        "_tail",
        "node_index",
        "payload_type",
        "ssrc",
    )

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
        self._hsz = YIMA_HEADER_SIZE if node_index is not None else 12
        # pack_run's constant header bytes (see _RUN_YIMA, _RUN_PLAIN)
        self._c2 = bytes((self._b0, self._b1))
        self._tail = (
            _U32.pack(ssrc)
            + _EXT_HEAD.pack(ONE_BYTE_PROFILE, 2)
            + bytes((_YIMA_ELEM_HEAD, self._node))
            if node_index is not None
            else _U32.pack(ssrc)
        )

    @property
    def header_size(self) -> int:
        """Bytes of header this template writes."""
        return self._hsz

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
        block: bytes | bytearray | memoryview,
        j: int,
        count: int,
        payload: int,
        sequence: int,
        node_seq: int,
        ts_base: int,
        start: float,
        step: float,
        clock_rate: int,
        length: int | None = None,
    ) -> int:
        """Packets ``j .. j+count-1`` of a cached ``block`` into ``buf`` (from 0), each
        header packed in place and followed by its ``payload``-byte slice (the last
        slice ends at the block's end, ``length`` bytes when given): equal-size
        datagrams, only the last may be shorter.  Packet ``k`` carries ``sequence + k``,
        ``node_seq + k`` and the timestamp of media time ``start + step * (j + k)``
        (``ts_base`` + that many seconds at ``clock_rate``, rounded).  Grows ``buf`` if
        needed; returns the bytes used.

        With ``block`` as ``bytes``/``bytearray`` (the block cache's), up to 64 packets,
        headers and payloads, are written by one precompiled ``struct`` call (the
        constant header bytes as two ``s`` fields, the payloads as ``s`` fields): the
        Python work left per packet is one timestamp and one argument tuple.  A
        ``memoryview`` block is packed packet by packet; both write the same bytes as
        :meth:`header` followed by the payload.
        """
        hsz = self._hsz
        stride = hsz + payload
        first = j * payload
        end = first + count * payload
        size = len(block)
        if length is not None and length < size:
            size = length
        if end > size:
            end = size
        last = end - (first + (count - 1) * payload)
        total = (count - 1) * stride + hsz + last
        if len(buf) < total:
            buf.extend(bytes(total - len(buf)))
        if isinstance(block, memoryview):  # struct's s fields take only bytes
            return self._pack_each(buf, block, j, first, end, payload, sequence, node_seq,
                                   ts_base, start, step, clock_rate, total)  # fmt: skip
        return self._pack_chunks(buf, block, j, first, end, payload, sequence, node_seq,
                                 ts_base, start, step, clock_rate, total)  # fmt: skip

    def _pack_chunks(
        self,
        buf: bytearray,
        block: bytes | bytearray | memoryview,
        j: int,
        first: int,
        end: int,
        payload: int,
        sequence: int,
        node_seq: int,
        ts_base: int,
        start: float,
        step: float,
        clock_rate: int,
        total: int,
    ) -> int:
        """:meth:`pack_run` of a ``bytes``/``bytearray`` block: one struct call per 64
        packets (one for the common short run)."""
        hsz = self._hsz
        stride = hsz + payload
        c2, tail = self._c2, self._tail
        i, o, p = j, 0, first
        while p < end:
            n = min(_RUN_CHUNK, -(-(end - p) // payload))
            q = p + n * payload
            last = min(q, end) - (q - payload)
            pack = _run_packer(hsz, n, payload, last)
            args: list[object] = []
            add = args.extend
            if hsz == YIMA_HEADER_SIZE:
                for at in range(p, q, payload):
                    add((c2, sequence & 0xFFFF,
                         (ts_base + round((start + step * i) * clock_rate)) & 0xFFFFFFFF,
                         tail, node_seq & 0xFFFFFFFF, block[at : at + payload]))  # fmt: skip
                    sequence += 1
                    node_seq += 1
                    i += 1
            else:
                for at in range(p, q, payload):
                    add((c2, sequence & 0xFFFF,
                         (ts_base + round((start + step * i) * clock_rate)) & 0xFFFFFFFF,
                         tail, block[at : at + payload]))  # fmt: skip
                    sequence += 1
                    i += 1
            pack(buf, o, *args)
            o += n * stride
            p = q
        return total

    def _pack_each(
        self,
        buf: bytearray,
        block: memoryview,
        j: int,
        first: int,
        end: int,
        payload: int,
        sequence: int,
        node_seq: int,
        ts_base: int,
        start: float,
        step: float,
        clock_rate: int,
        total: int,
    ) -> int:
        """:meth:`pack_run` one packet at a time (a ``memoryview`` block: ``struct``'s
        ``s`` fields take only ``bytes``)."""
        hsz = self._hsz
        stride = hsz + payload
        c2, tail = self._c2, self._tail
        yima = self.node_index is not None
        pack = (_RUN_YIMA if yima else _RUN_PLAIN).pack_into
        o, k = 0, 0
        for p in range(first, end, payload):
            ts = (ts_base + round((start + step * (j + k)) * clock_rate)) & 0xFFFFFFFF
            if yima:
                pack(buf, o, c2, (sequence + k) & 0xFFFF, ts, tail, (node_seq + k) & 0xFFFFFFFF)
            else:
                pack(buf, o, c2, (sequence + k) & 0xFFFF, ts, tail)
            q = min(end, p + payload)
            buf[o + hsz : o + hsz + q - p] = block[p:q]
            o += stride
            k += 1
        return total


#: Packets per ``struct`` call of :meth:`RtpHeaderTemplate.pack_run` (GSO's segment limit).
_RUN_CHUNK = 64
# One header with its constant bytes as ``s`` fields: the first two bytes, then (Yima)
# SSRC + extension header + element head + node index (10 bytes) before the per-node
# sequence and 2 padding bytes, or (plain) the SSRC (4 bytes).
_RUN_YIMA = struct.Struct(">2sHI10sI2x")
_RUN_PLAIN = struct.Struct(">2sHI4s")
_run_packers: dict[tuple[int, int, int, int], Callable[..., None]] = {}


def _run_packer(hsz: int, count: int, payload: int, last: int) -> Callable[..., None]:
    """``pack_into`` of a ``struct`` for ``count`` packets (headers and payloads, the
    last payload ``last`` bytes), compiled once per shape."""
    key = (hsz, count, payload, last)
    pack = _run_packers.get(key)
    if pack is None:
        if len(_run_packers) >= 512:
            _run_packers.clear()
        one = (_RUN_YIMA if hsz == YIMA_HEADER_SIZE else _RUN_PLAIN).format[1:]
        fmt = ">" + f"{one}{payload}s" * (count - 1) + f"{one}{last}s"
        pack = _run_packers[key] = struct.Struct(fmt).pack_into
    return pack


def is_rtcp(data: bytes) -> bool:
    """True when a datagram on a muxed port is RTCP, not RTP (RFC 5761 §4: PT 192..223)."""
    return len(data) >= 2 and 192 <= data[1] <= 223
