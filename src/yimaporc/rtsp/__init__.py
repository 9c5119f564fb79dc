"""RTSP 1.0 (RFC 2326) for Yima: sans-IO connections, the session state table, Twisted shells.

See docs/wire.md ("RTSP") for the limits, the state table and the Yima opt-in.
"""

from ._client import RtspClientProtocol, RtspConnectionLost
from ._connection import RtspClientConnection, RtspServerConnection, status_response
from ._errors import (
    LocalProtocolError,
    MalformedHeader,
    RemoteProtocolError,
    RtspError,
    RtspStatusError,
)
from ._events import (
    NEED_DATA,
    ConnectionClosed,
    NeedData,
    RequestReceived,
    ResponseReceived,
)
from ._factory import RtspServerFactory
from ._machine import (
    PUBLIC,
    TRANSITIONS,
    Prepared,
    ServerSession,
    SessionState,
    SessionTable,
    abort,
    choose_transport,
    complete,
    prepare,
)
from ._messages import (
    Headers,
    InterleavedFrame,
    Limits,
    Request,
    Response,
    serialize_interleaved,
    serialize_request,
    serialize_response,
)
from ._protocol import RtspServerProtocol
from ._status import (
    reason_phrase,
)
from ._wire import (
    NptRange,
    RtpInfo,
    RtspUrl,
    SessionHeader,
    TransportSpec,
    YimaNode,
    parse_range,
    parse_rtp_info,
    parse_session,
    parse_transport,
    parse_url,
    serialize_range,
    serialize_rtp_info,
    serialize_session,
    serialize_transport,
)
from .interfaces import IRtspHandler, PlayReply

__all__ = [
    "NEED_DATA",
    "PUBLIC",
    "TRANSITIONS",
    "ConnectionClosed",
    "Headers",
    "IRtspHandler",
    "InterleavedFrame",
    "Limits",
    "LocalProtocolError",
    "MalformedHeader",
    "NeedData",
    "NptRange",
    "PlayReply",
    "Prepared",
    "RemoteProtocolError",
    "Request",
    "RequestReceived",
    "Response",
    "ResponseReceived",
    "RtpInfo",
    "RtspClientConnection",
    "RtspClientProtocol",
    "RtspConnectionLost",
    "RtspError",
    "RtspServerConnection",
    "RtspServerFactory",
    "RtspServerProtocol",
    "RtspStatusError",
    "RtspUrl",
    "ServerSession",
    "SessionHeader",
    "SessionState",
    "SessionTable",
    "TransportSpec",
    "YimaNode",
    "abort",
    "choose_transport",
    "complete",
    "parse_range",
    "parse_rtp_info",
    "parse_session",
    "parse_transport",
    "parse_url",
    "prepare",
    "reason_phrase",
    "serialize_interleaved",
    "serialize_range",
    "serialize_request",
    "serialize_response",
    "serialize_rtp_info",
    "serialize_session",
    "serialize_transport",
    "status_response",
]
