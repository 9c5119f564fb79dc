"""RTP payload types and clocks (RFC 3551, RFC 2250) used in SDP and on the wire."""

from __future__ import annotations

from ._errors import MalformedPacket

PT_MP2T = 33  # RFC 3551: MPEG-2 transport stream, 90 kHz clock (RFC 2250)
MP2T_CLOCK = 90_000
TS_PACKET_SIZE = 188
TS_PER_RTP = 7
MP2T_PAYLOAD_SIZE = TS_PACKET_SIZE * TS_PER_RTP  # 1316
PT_L16_STEREO = 10  # RFC 3551: L16, 44100 Hz, 2 channels
PT_L16_MONO = 11  # RFC 3551: L16, 44100 Hz, 1 channel
PT_DYNAMIC_FIRST = 96
PT_DYNAMIC_LAST = 127


def l16_payload_type(rate: int, channels: int, dynamic: int = PT_DYNAMIC_FIRST) -> int:
    """The static L16 payload type for ``rate``/``channels`` (10, 11), else ``dynamic``."""
    if rate == 44_100 and channels == 2:
        return PT_L16_STEREO
    if rate == 44_100 and channels == 1:
        return PT_L16_MONO
    if not PT_DYNAMIC_FIRST <= dynamic <= PT_DYNAMIC_LAST:
        raise ValueError(f"not a dynamic payload type: {dynamic}")
    return dynamic


# --- payload formats -------------------------------------------------------------------


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
