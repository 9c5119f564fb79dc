"""The one error of the RTP/RTCP codecs."""

from __future__ import annotations


class MalformedPacket(ValueError):
    """The bytes are not a well-formed RTP or RTCP packet."""
