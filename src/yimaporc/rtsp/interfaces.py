"""What the RTSP server asks of the application: the :class:`IRtspHandler`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from zope.interface import Interface

from ._wire import NptRange, RtpInfo

if TYPE_CHECKING:
    from ._machine import ServerSession
    from ._wire import TransportSpec


@attrs.frozen
class PlayReply:
    """What a PLAY answers with: the range actually played and the RTP-Info of each stream."""

    range: NptRange | None = None
    rtp_info: tuple[RtpInfo, ...] = ()


class IRtspHandler(Interface):
    """The application behind an RTSP server (for Yima: the session planner).

    Every method may return a value or a Deferred of it.  To answer with an
    RTSP status, raise or errback :class:`~yimaporc.rtsp.RtspStatusError`
    (e.g. ``RtspStatusError(404)`` for unknown media); any other failure is
    logged and answered with 500.  The server has already checked methods,
    headers and the session state (RFC 2326 state table) before calling, and
    applies the state transition only after success.
    """

    def describe(url: str) -> Any:
        """The presentation at ``url``: SDP bytes or a ``SessionDescription``.

        The server adds Content-Type and a Content-Base ending with ``/``.
        """

    def setup(url: str, transport: TransportSpec, session: ServerSession) -> Any:
        """Set up the stream ``url`` in ``session`` with the client's chosen ``transport``.

        Returns the Transport to answer with (e.g. with ``server_port``,
        ``ssrc``, ``source``; echo ``yima_fanout`` with ``yima_nodes`` to grant
        fan-out).  For RTP/AVP/TCP the server has assigned ``interleaved``;
        send frames with ``session.send_interleaved(channel, data)``.
        """

    def play(session: ServerSession, range: NptRange | None) -> Any:
        """Start or resume ``session`` (from ``range.start`` if given): a :class:`PlayReply` or None."""

    def pause(session: ServerSession) -> Any:
        """Pause ``session``; it stays set up.  May return the :class:`NptRange` from the
        pause point (answered as ``Range``, RFC 2326 §10.6)."""

    def teardown(session: ServerSession) -> Any:
        """Stop ``session`` and free it; also called when it times out or its TCP connection drops."""

    def get_parameter(session: ServerSession | None, body: bytes) -> Any:
        """GET_PARAMETER (an empty body is a keep-alive): the response body bytes."""

    def set_parameter(session: ServerSession | None, body: bytes) -> Any:
        """SET_PARAMETER with ``body`` (``text/parameters``)."""

    def interleaved_received(session: ServerSession, channel: int, data: bytes) -> None:
        """A frame the client sent on an interleaved channel of ``session`` (its RTCP)."""
