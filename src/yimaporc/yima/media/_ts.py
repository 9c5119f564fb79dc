"""MPEG-TS scanning: packets, PCRs and the byte-offset -> media-time map (pure).

The PCR (ISO/IEC 13818-1 §2.4.2.2) stamps the arrival time of the byte holding
the last bit of ``program_clock_reference_base`` (byte 10 of the packet) on a
27 MHz clock; between two PCRs bytes arrive at a constant rate.  So the
transport stream itself defines, piecewise-linearly, the media time of every
byte: that is what VBR-correct pacing needs.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import attrs

TS_PACKET = 188
SYNC = 0x47
RTP_PAYLOAD = 7 * TS_PACKET  # 1316 bytes: one RTP packet of MPEG-TS (RFC 2250)
PCR_HZ = 27_000_000
PCR_WRAP = (1 << 33) * 300
PCR_BYTE = 10


class MalformedMedia(ValueError):
    """The file is not what it claims to be (message is user-facing)."""


def packet_pcr(data: bytes | bytearray | memoryview, at: int = 0) -> tuple[int, int] | None:
    """``(pid, pcr)`` of the packet at ``data[at:]`` if it carries a PCR."""
    if data[at + 3] & 0x20 and data[at + 4] >= 7 and data[at + 5] & 0x10:
        b = data[at + 6 : at + 12]
        base = (b[0] << 25) | (b[1] << 17) | (b[2] << 9) | (b[3] << 1) | (b[4] >> 7)
        ext = ((b[4] & 1) << 8) | b[5]
        pid = ((data[at + 1] & 0x1F) << 8) | data[at + 2]
        return pid, base * 300 + ext
    return None


def looks_like_ts(head: bytes) -> bool:
    """True if the first (up to three) packet boundaries carry the sync byte."""
    if len(head) < TS_PACKET:
        return False
    checks = min(3, len(head) // TS_PACKET)
    return all(head[k * TS_PACKET] == SYNC for k in range(checks))


def unwrap_near(raw: int, base: int, near: float) -> int:
    """``raw - base`` in 27 MHz ticks, unwrapped to lie closest to ``near`` ticks."""
    rel = (raw - base) % PCR_WRAP
    k = round((near - rel) / PCR_WRAP)
    return rel + k * PCR_WRAP


class TsScanner:
    """Feed a transport stream in chunks; collect PCRs of the first PCR PID."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.offset = 0
        self.pcr_pid: int | None = None
        self.points: list[tuple[int, int]] = []  # (byte offset, unwrapped PCR ticks)
        self._last_raw: int | None = None
        self._wraps = 0

    def feed(self, data: bytes) -> None:
        """Scan whole packets of ``data`` (a trailing partial packet waits)."""
        self._buf += data
        usable = len(self._buf) - len(self._buf) % TS_PACKET
        if not usable:
            return
        chunk = bytes(self._buf[:usable])
        syncs = chunk[0::TS_PACKET]
        if syncs != bytes([SYNC]) * len(syncs):
            bad = next(k for k, s in enumerate(syncs) if s != SYNC)
            raise MalformedMedia(f"MPEG-TS sync byte lost at byte {self.offset + bad * TS_PACKET}")
        flags = zip(chunk[3::TS_PACKET], chunk[4::TS_PACKET], chunk[5::TS_PACKET])
        for k, (afc, af_len, af_flags) in enumerate(flags):
            if afc & 0x20 and af_len >= 7 and af_flags & 0x10:
                found = packet_pcr(chunk, k * TS_PACKET)
                if found is not None:
                    self._note(self.offset + k * TS_PACKET, *found)
        del self._buf[:usable]
        self.offset += usable

    def _note(self, offset: int, pid: int, raw: int) -> None:
        if self.pcr_pid is None:
            self.pcr_pid = pid
        if pid != self.pcr_pid:
            return
        if self._last_raw is not None and raw < self._last_raw - PCR_WRAP // 2:
            self._wraps += 1
        self._last_raw = raw
        value = raw + self._wraps * PCR_WRAP
        if self.points and value <= self.points[-1][1]:
            return  # discontinuity or repeated PCR: keep the map monotonic
        self.points.append((offset + PCR_BYTE, value))

    def finish(self) -> TimeMap:
        """The time map of everything fed; raises on a truncated last packet."""
        if self._buf:
            raise MalformedMedia(
                f"MPEG-TS truncated: {len(self._buf)} bytes after the last whole packet"
            )
        if len(self.points) < 2:
            raise MalformedMedia("MPEG-TS has fewer than two PCRs: cannot time it")
        return TimeMap(tuple(self.points), self.offset)


@attrs.frozen
class TimeMap:
    """Piecewise-linear byte offset -> media time from PCR points; time 0 is byte 0."""

    points: tuple[tuple[int, int], ...]
    size: int

    def ticks_at(self, offset: float) -> float:
        """Unwrapped PCR ticks at byte ``offset`` (extrapolated beyond the ends)."""
        return interpolate(self.points, offset)

    def time_at(self, offset: float) -> float:
        """Media time in seconds of byte ``offset``."""
        return (self.ticks_at(offset) - self.ticks_at(0)) / PCR_HZ

    @property
    def duration(self) -> float:
        """Media time of the end of the file."""
        return self.time_at(self.size)

    @property
    def first_pcr(self) -> tuple[int, int]:
        """``(offset, ticks)`` of the first PCR."""
        return self.points[0]


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise-linear interpolation through sorted ``(x, y)`` points, extrapolating."""
    if len(points) == 1:
        return points[0][1]
    k = bisect_right(points, (x, float("inf")))
    k = min(max(k, 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[k - 1], points[k]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


PTS_WRAP = 1 << 33
PAT_PID = 0


@attrs.frozen
class PesStart:
    """A TS packet starting a PES packet: where it is and what it starts."""

    offset: int  # byte offset of the TS packet in the scanned data
    pts: int | None  # 90 kHz, as written (not unwrapped)
    key: bool  # random access point: RAI set, or an MPEG-2 sequence header / H.264 IDR or SPS


def _parse_pts(b: bytes | bytearray | memoryview) -> int:
    return ((b[0] >> 1) & 7) << 30 | b[1] << 22 | (b[2] >> 1) << 15 | b[3] << 7 | b[4] >> 1


def _starts_random_access(es: bytes | bytearray | memoryview) -> bool:
    """The elementary stream bytes begin a random access point (MPEG-2 video sequence
    header, or an H.264 IDR slice or SPS), for streams whose muxer set no RAI."""
    at = 0
    while True:
        at = bytes(es).find(b"\x00\x00\x01", at)
        if at < 0 or at + 3 >= len(es):
            return False
        code = es[at + 3]
        if code == 0xB3 or ((code & 0x1F) in (5, 7) and not code & 0x80):
            return True
        at += 3


def pes_starts(data: bytes | bytearray | memoryview, pid: int) -> list[PesStart]:
    """Every packet of ``pid`` in ``data`` (whole 188-byte packets from byte 0) that starts
    a PES packet, with its PTS and whether it is a random access point."""
    out = []
    for at in range(0, len(data) - TS_PACKET + 1, TS_PACKET):
        if data[at] != SYNC or not data[at + 1] & 0x40:
            continue
        if ((data[at + 1] & 0x1F) << 8) | data[at + 2] != pid:
            continue
        afc = data[at + 3] >> 4 & 3
        body = at + 4
        rai = False
        if afc & 2:
            af_len = data[at + 4]
            rai = af_len > 0 and bool(data[at + 5] & 0x40)
            body += 1 + af_len
        if not afc & 1 or body + 9 > at + TS_PACKET:
            continue
        pes = data[body : at + TS_PACKET]
        if pes[:3] != b"\x00\x00\x01":
            continue
        pts = _parse_pts(pes[9:14]) if pes[7] & 0x80 and len(pes) >= 14 else None
        key = rai or _starts_random_access(pes[9 + pes[8] :])
        out.append(PesStart(at, pts, key))
    return out


def last_pat_before(data: bytes | bytearray | memoryview, offset: int) -> int | None:
    """Byte offset of the last PAT packet (PID 0) before ``offset`` in ``data``."""
    for at in range(offset - offset % TS_PACKET - TS_PACKET, -1, -TS_PACKET):
        if data[at] == SYNC and data[at + 1] & 0x1F == 0 and data[at + 2] == PAT_PID:
            return at
    return None
