"""Events the sans-IO RTSP connections hand to their callers."""

from __future__ import annotations

import attrs

from ._messages import (
    InterleavedFrame,
    Request,
    Response,
)


@attrs.frozen
class RequestReceived:
    """A whole request (head and body) arrived at a server connection."""

    request: Request


@attrs.frozen
class ResponseReceived:
    """A whole response arrived at a client connection, matched to its request."""

    response: Response
    cseq: int
    method: str


@attrs.frozen
class ConnectionClosed:
    """The peer closed the connection cleanly (between messages)."""


class NeedData:
    """Sentinel type: no whole event is buffered yet."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()

ServerEvent = RequestReceived | InterleavedFrame | ConnectionClosed
ClientEvent = ResponseReceived | InterleavedFrame | ConnectionClosed
