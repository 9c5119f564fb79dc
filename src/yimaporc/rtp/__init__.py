"""RTP and RTCP on the wire (RFC 3550, 8285, 4585, 2250, 3551): pure parse/serialize.

Yima sends one ordinary RTP stream per medium: the RTP header's sequence number
is the *global* one, so stock players see a normal stream.  Every packet also
carries an RFC 8285 one-byte header extension element (ID 1) with the index of
the node that sent it and that node's own 32-bit sequence number; players that
do not know it skip it.  See docs/wire.md for every byte.

* RTP (:mod:`._packet`): :class:`RtpPacket`, :func:`parse_rtp`, :func:`serialize_rtp`,
  and the hot path :class:`RtpHeaderTemplate` (one precompiled :class:`struct.Struct`).
* RTCP (:mod:`._rtcp`, construct at the control plane): :class:`SenderReport`,
  :class:`ReceiverReport`, :class:`SourceDescription`, :class:`Bye`,
  :class:`GenericNack` (RFC 4585), :class:`App` and its Yima flow-control form
  :class:`YimaFeedback`; :func:`parse_rtcp` splits compound packets.
* RFC 1982 serial arithmetic on 16-bit sequence numbers (:mod:`._serial`):
  :func:`seq_lt`, :func:`seq_diff`, :func:`unwrap_seq`, :class:`SeqUnwrapper`.
* Payload types, clocks and payload checks (:mod:`.payloads`, shared with SDP).

This module only re-exports.
"""

from __future__ import annotations

from ._errors import (
    MalformedPacket,
)
from ._packet import (
    ONE_BYTE_PROFILE,
    YIMA_EXT_ID,
    YIMA_HEADER_SIZE,
    RtpHeaderTemplate,
    RtpPacket,
    YimaTag,
    build_rtp,
    is_rtcp,
    parse_one_byte_extension,
    parse_rtp,
    serialize_one_byte_extension,
    serialize_rtp,
    yima_extension,
)
from ._rtcp import (
    NACK_FMT,
    NTP_UNIX_OFFSET,
    YIMA_APP_DATA_SIZE,
    YIMA_APP_NAME,
    App,
    Bye,
    GenericNack,
    NackItem,
    ReceiverReport,
    ReportBlock,
    RtcpPacket,
    RtcpType,
    SdesChunk,
    SdesItem,
    SenderReport,
    SourceDescription,
    UnknownRtcp,
    YimaFeedback,
    YimaKind,
    lost_from_nack_items,
    nack_items_from_lost,
    ntp_middle32,
    ntp_timestamp,
    ntp_to_unix,
    parse_rtcp,
    serialize_rtcp,
)
from ._serial import (
    SEQ_HALF,
    SEQ_MASK,
    SEQ_MOD,
    SeqUnwrapper,
    seq_add,
    seq_diff,
    seq_gt,
    seq_lt,
    unwrap_seq,
)
from .payloads import (
    MP2T_CLOCK,
    MP2T_PAYLOAD_SIZE,
    PT_DYNAMIC_FIRST,
    PT_DYNAMIC_LAST,
    PT_L16_MONO,
    PT_L16_STEREO,
    PT_MP2T,
    TS_PACKET_SIZE,
    TS_PER_RTP,
    check_mp2t_payload,
    l16_payload_size,
    l16_payload_type,
    l16_samples,
    rtp_timestamp,
    split_mp2t,
)

__all__ = [
    "MP2T_CLOCK",
    "MP2T_PAYLOAD_SIZE",
    "NACK_FMT",
    "NTP_UNIX_OFFSET",
    "ONE_BYTE_PROFILE",
    "PT_DYNAMIC_FIRST",
    "PT_DYNAMIC_LAST",
    "PT_L16_MONO",
    "PT_L16_STEREO",
    "PT_MP2T",
    "SEQ_HALF",
    "SEQ_MASK",
    "SEQ_MOD",
    "TS_PACKET_SIZE",
    "TS_PER_RTP",
    "YIMA_APP_DATA_SIZE",
    "YIMA_APP_NAME",
    "YIMA_EXT_ID",
    "YIMA_HEADER_SIZE",
    "App",
    "Bye",
    "GenericNack",
    "MalformedPacket",
    "NackItem",
    "ReceiverReport",
    "ReportBlock",
    "RtcpPacket",
    "RtcpType",
    "RtpHeaderTemplate",
    "RtpPacket",
    "SdesChunk",
    "SdesItem",
    "SenderReport",
    "SeqUnwrapper",
    "SourceDescription",
    "UnknownRtcp",
    "YimaFeedback",
    "YimaKind",
    "YimaTag",
    "build_rtp",
    "check_mp2t_payload",
    "is_rtcp",
    "l16_payload_size",
    "l16_payload_type",
    "l16_samples",
    "lost_from_nack_items",
    "nack_items_from_lost",
    "ntp_middle32",
    "ntp_timestamp",
    "ntp_to_unix",
    "parse_one_byte_extension",
    "parse_rtcp",
    "parse_rtp",
    "rtp_timestamp",
    "seq_add",
    "seq_diff",
    "seq_gt",
    "seq_lt",
    "serialize_one_byte_extension",
    "serialize_rtcp",
    "serialize_rtp",
    "split_mp2t",
    "unwrap_seq",
    "yima_extension",
]
