"""RTP payload types and clocks (RFC 3551, RFC 2250) used in SDP and on the wire."""

from __future__ import annotations

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
