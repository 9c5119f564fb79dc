"""RTSP errors: the peer's fault (remote), our caller's fault (local), or a status to answer."""

from __future__ import annotations

from ._status import reason_phrase


class RtspError(Exception):
    """Base class of RTSP errors."""


class RtspStatusError(RtspError):
    """A request fails with an RTSP status.

    Raised (or errbacked) by an :class:`~yimaporc.rtsp.interfaces.IRtspHandler`
    to answer with ``status`` (e.g. 404 for unknown media), raised by the
    request checks of the server for per-request errors (454, 455, 461, ...),
    and errbacked by the client for a non-2xx response.
    """

    def __init__(
        self,
        status: int,
        reason: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        response: object | None = None,
    ) -> None:
        self.status = status
        self.reason = reason or reason_phrase(status)
        self.headers = headers
        self.response = response
        super().__init__(f"{status} {self.reason}")


class RemoteProtocolError(RtspStatusError):
    """The peer sent bytes that break RTSP framing or limits; answer ``status``, then close."""

    def __init__(self, status: int, detail: str, cseq: int | None = None) -> None:
        super().__init__(status)
        self.detail = detail
        self.cseq = cseq
        self.args = (f"{status} {self.reason}: {detail}",)


class LocalProtocolError(RtspError):
    """Our own caller tried to send something RTSP does not allow."""


class MalformedHeader(ValueError):
    """A header value (Transport, Range, Session, RTP-Info, CSeq) does not parse."""
