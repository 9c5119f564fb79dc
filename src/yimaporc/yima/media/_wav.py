"""WAV (RIFF) header parsing and PCM -> RTP L16 conversion (pure).

RTP's L16 (RFC 3551 §4.5.11) is 16-bit signed big-endian ("network order");
WAV stores PCM little-endian (16/24-bit signed, 8-bit unsigned).
"""

from __future__ import annotations

import struct
import sys
from array import array

import attrs

from ._ts import MalformedMedia

WAVE_FORMAT_PCM = 1
WAVE_FORMAT_IEEE_FLOAT = 3
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# How much of a file's start may precede the data chunk.
MAX_HEADER = 1 << 20


def looks_like_wav(head: bytes) -> bool:
    """True if ``head`` starts a RIFF/WAVE file."""
    return len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WAVE"


@attrs.frozen
class WavFormat:
    """The PCM format and where the samples are."""

    channels: int
    sample_rate: int
    bits: int
    data_offset: int
    data_size: int
    #: "int" (PCM: 8-bit unsigned, 16/24/32-bit signed) or "float" (IEEE 32/64-bit).
    encoding: str = "int"

    @property
    def frame_size(self) -> int:
        """Bytes per sample frame (all channels)."""
        return self.channels * ((self.bits + 7) // 8)

    @property
    def byte_rate(self) -> int:
        """PCM bytes per second."""
        return self.frame_size * self.sample_rate

    @property
    def duration(self) -> float:
        """Seconds of audio."""
        return self.data_size / self.byte_rate


def parse_wav(head: bytes, file_size: int) -> WavFormat:
    """Parse the RIFF header in ``head`` (the file's start) of a ``file_size``-byte file.

    Raises :class:`MalformedMedia` if it is not uncompressed PCM or the data chunk
    does not start within ``head``.
    """
    if not looks_like_wav(head):
        raise MalformedMedia("not a RIFF/WAVE file")
    fmt: tuple[int, int, int, int] | None = None
    at = 12
    while at + 8 <= len(head):
        cid, size = struct.unpack_from("<4sI", head, at)
        body = at + 8
        if cid == b"fmt ":
            if size < 16 or body + 16 > len(head):
                raise MalformedMedia("WAV fmt chunk too short")
            tag, channels, rate, _byte_rate, _align, bits = struct.unpack_from(
                "<HHIIHH", head, body
            )
            if tag == WAVE_FORMAT_EXTENSIBLE and size >= 40 and body + 26 <= len(head):
                (tag,) = struct.unpack_from("<H", head, body + 24)
            if tag not in (WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT):
                raise MalformedMedia(f"WAV format tag {tag:#x} is not uncompressed PCM")
            floating = tag == WAVE_FORMAT_IEEE_FLOAT
            if channels < 1 or rate < 1 or bits not in ((32, 64) if floating else (8, 16, 24, 32)):
                kind = "float" if floating else "PCM"
                raise MalformedMedia(
                    f"WAV {kind} {channels} ch, {rate} Hz, {bits} bits unsupported"
                )
            fmt = (channels, rate, bits, int(floating))
        elif cid == b"data":
            if fmt is None:
                raise MalformedMedia("WAV data chunk before fmt chunk")
            available = file_size - body
            data_size = available if size in (0, 0xFFFFFFFF) else min(size, available)
            encoding = "float" if fmt[3] else "int"
            return WavFormat(fmt[0], fmt[1], fmt[2], body, max(0, data_size), encoding)
        at = body + size + (size & 1)
    raise MalformedMedia("WAV data chunk not found in the first MiB")


def packet_bytes(fmt: WavFormat, ptime: float = 0.02, max_out: int = 1400) -> int:
    """File bytes per RTP packet: ``ptime`` of whole frames, at most ``max_out`` bytes of L16."""
    frames = max(1, min(round(fmt.sample_rate * ptime), max_out // (2 * fmt.channels)))
    return frames * fmt.frame_size


def to_l16(pcm: bytes, bits: int = 16, encoding: str = "int") -> bytes:
    """WAV PCM samples as RTP L16 (16-bit big-endian); 8/24/32-bit are converted, and
    32/64-bit float as ffmpeg converts it (x * 32768 rounded to even, clipped)."""
    if encoding == "float":
        return _float_to_l16(pcm, bits)
    if bits == 16:
        if len(pcm) % 2:
            raise MalformedMedia("16-bit PCM with an odd number of bytes")
        out = bytearray(len(pcm))
        out[0::2] = pcm[1::2]
        out[1::2] = pcm[0::2]
        return bytes(out)
    if bits == 8:
        samples = array("h", ((b - 128) << 8 for b in pcm))
        if sys.byteorder == "little":
            samples.byteswap()
        return samples.tobytes()
    if bits in (24, 32):
        width = bits // 8
        if len(pcm) % width:
            raise MalformedMedia(f"{bits}-bit PCM with a partial sample")
        # Keep the two most significant bytes of each little-endian sample.
        out = bytearray(2 * (len(pcm) // width))
        out[0::2] = pcm[width - 1 :: width]
        out[1::2] = pcm[width - 2 :: width]
        return bytes(out)
    raise MalformedMedia(f"cannot convert {bits}-bit PCM to L16")


def _float_to_l16(pcm: bytes, bits: int) -> bytes:
    if bits not in (32, 64):
        raise MalformedMedia(f"cannot convert {bits}-bit float PCM to L16")
    width = bits // 8
    if len(pcm) % width:
        raise MalformedMedia(f"{bits}-bit float PCM with a partial sample")
    values = array("f" if bits == 32 else "d", pcm)
    if sys.byteorder == "big":
        values.byteswap()
    out = array("h")
    for x in values:
        v = round(x * 32768.0) if x == x else 0  # NaN is silence
        out.append(32767 if v > 32767 else -32768 if v < -32768 else v)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()
