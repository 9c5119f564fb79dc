"""Sans-IO RTSP connections: bytes in, events out, messages to bytes (h11-style)."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Sequence

from ._errors import LocalProtocolError, MalformedHeader, RemoteProtocolError
from ._events import (
    NEED_DATA,
    ClientEvent,
    ConnectionClosed,
    NeedData,
    RequestReceived,
    ResponseReceived,
    ServerEvent,
)
from ._messages import (
    DEFAULT_LIMITS,
    Headers,
    InterleavedFrame,
    Limits,
    MessageReader,
    ReceiveBuffer,
    Request,
    Response,
    serialize_interleaved,
    serialize_request,
    serialize_response,
)
from ._status import (
    reason_phrase,
)
from ._wire import (
    NptRange,
    SessionHeader,
    TransportSpec,
    parse_session,
    serialize_range,
    serialize_transport,
)

SERVER_NAME = "yimaporc"


class _Connection:
    def __init__(self, role: str, limits: Limits) -> None:
        self.limits = limits
        self._buf = ReceiveBuffer()
        self._reader = MessageReader(role, limits)
        self._eof = False
        self.closed = False

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes; ``b""`` means the peer closed its side."""
        if self._eof and data:
            raise LocalProtocolError("data after end of stream")
        if data:
            self._buf.append(data)
        else:
            self._eof = True

    def _read(self) -> Request | Response | InterleavedFrame | ConnectionClosed | None:
        if self.closed:
            return ConnectionClosed()
        try:
            msg = self._reader.read(self._buf)
        except RemoteProtocolError:
            self.closed = True
            raise
        if msg is None and self._eof:
            self.closed = True
            if self._buf or self._reader._pending is not None:
                raise RemoteProtocolError(400, "connection closed in the middle of a message")
            return ConnectionClosed()
        return msg


class RtspServerConnection(_Connection):
    """The server side of one RTSP connection.

    ``next_event()`` returns :class:`RequestReceived`, :class:`InterleavedFrame`,
    :class:`ConnectionClosed` or ``NEED_DATA``, and raises
    :class:`RemoteProtocolError` on broken framing or a limit; answer it with
    :meth:`send_error` and close.  ``send(response)`` fills in the CSeq of the
    oldest unanswered request when the response has none.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__("server", limits)
        self._unanswered: deque[int] = deque()

    def next_event(self) -> ServerEvent | NeedData:
        """The next event; raises :class:`RemoteProtocolError`."""
        msg = self._read()
        if msg is None:
            return NEED_DATA
        if isinstance(msg, InterleavedFrame | ConnectionClosed):
            return msg
        if not isinstance(msg, Request):  # pragma: no cover - the reader's role guarantees it
            raise AssertionError(msg)
        cseq = msg.cseq
        if cseq is None:
            self.closed = True
            raise RemoteProtocolError(400, "request without a valid CSeq")
        self._unanswered.append(cseq)
        return RequestReceived(msg)

    def send(self, event: Response | InterleavedFrame) -> bytes:
        """The bytes of a response or an interleaved frame."""
        if isinstance(event, InterleavedFrame):
            return serialize_interleaved(event.channel, event.data)
        response = event
        cseq = response.cseq
        if cseq is None:
            if not self._unanswered:
                raise LocalProtocolError("response without CSeq and no request to answer")
            cseq = self._unanswered.popleft()
            response = Response(
                response.status,
                response.reason,
                Headers((("CSeq", str(cseq)), *response.headers.fields)),
                response.body,
                response.version,
            )
        elif cseq in self._unanswered:
            self._unanswered.remove(cseq)
        return serialize_response(response)

    def send_error(self, error: RemoteProtocolError) -> bytes:
        """The answer to a fatal error; the connection is closed afterwards."""
        self.closed = True
        fields: list[tuple[str, str]] = []
        if error.cseq is not None:
            fields.append(("CSeq", str(error.cseq)))
        fields += [("Server", SERVER_NAME), ("Connection", "close")]
        # Why, in the status line (players print it): printable ASCII only (a client's
        # bytes in the detail are escaped), at most 200 characters.
        detail = error.detail.encode("ascii", "backslashreplace").decode("ascii")
        detail = "".join(ch if " " <= ch < "\x7f" else "?" for ch in detail)
        reason = f"{error.reason}: {detail}" if detail else error.reason
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        return serialize_response(Response(error.status, reason, Headers(tuple(fields))))


class RtspClientConnection(_Connection):
    """The client side of one RTSP connection: builds requests, matches responses.

    It numbers requests (CSeq), adds the Session header once a SETUP answer
    gave one (and forgets it after an aggregate TEARDOWN), and returns
    :class:`ResponseReceived` with the method each response answers.
    """

    def __init__(
        self, limits: Limits = DEFAULT_LIMITS, user_agent: str = SERVER_NAME, first_cseq: int = 1
    ) -> None:
        super().__init__("client", limits)
        self.user_agent = user_agent
        self._cseq = itertools.count(first_cseq)
        self._pending: dict[int, tuple[str, str]] = {}
        self.session: SessionHeader | None = None

    @property
    def session_id(self) -> str | None:
        """The session identifier the server gave, if any."""
        return self.session.session_id if self.session is not None else None

    def request(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> tuple[int, bytes]:
        """A numbered request's CSeq and bytes."""
        cseq = next(self._cseq)
        fields = [("CSeq", str(cseq)), ("User-Agent", self.user_agent)]
        given = Headers(tuple(headers))
        if self.session is not None and method != "DESCRIBE" and "Session" not in given:
            fields.append(("Session", self.session.session_id))
        fields += given.fields
        data = serialize_request(Request(method, url, Headers(tuple(fields)), body))
        self._pending[cseq] = (method, url)
        return cseq, data

    def options(self, url: str) -> tuple[int, bytes]:
        """OPTIONS (a keep-alive once a session exists)."""
        return self.request("OPTIONS", url)

    def describe(self, url: str) -> tuple[int, bytes]:
        """DESCRIBE, accepting SDP."""
        return self.request("DESCRIBE", url, [("Accept", "application/sdp")])

    def setup(
        self, url: str, transport: TransportSpec | Sequence[TransportSpec]
    ) -> tuple[int, bytes]:
        """SETUP of one stream with the transport alternatives in order of preference."""
        return self.request("SETUP", url, [("Transport", serialize_transport(transport))])

    def play(self, url: str, rng: NptRange | None = None) -> tuple[int, bytes]:
        """PLAY, from ``rng`` if given."""
        headers = [("Range", serialize_range(rng))] if rng is not None else []
        return self.request("PLAY", url, headers)

    def pause(self, url: str) -> tuple[int, bytes]:
        """PAUSE."""
        return self.request("PAUSE", url)

    def teardown(self, url: str) -> tuple[int, bytes]:
        """TEARDOWN."""
        return self.request("TEARDOWN", url)

    def get_parameter(self, url: str, body: bytes = b"") -> tuple[int, bytes]:
        """GET_PARAMETER (empty body: a keep-alive)."""
        headers = [("Content-Type", "text/parameters")] if body else []
        return self.request("GET_PARAMETER", url, headers, body)

    def set_parameter(self, url: str, body: bytes) -> tuple[int, bytes]:
        """SET_PARAMETER with ``text/parameters``."""
        return self.request("SET_PARAMETER", url, [("Content-Type", "text/parameters")], body)

    def send_interleaved(self, channel: int, data: bytes) -> bytes:
        """An interleaved frame (e.g. RTCP over the RTSP connection)."""
        return serialize_interleaved(channel, data)

    def next_event(self) -> ClientEvent | NeedData:
        """The next event; raises :class:`RemoteProtocolError`."""
        msg = self._read()
        if msg is None:
            return NEED_DATA
        if isinstance(msg, InterleavedFrame | ConnectionClosed):
            return msg
        if not isinstance(msg, Response):  # pragma: no cover - the reader's role guarantees it
            raise AssertionError(msg)
        cseq = msg.cseq
        if cseq is None or cseq not in self._pending:
            self.closed = True
            raise RemoteProtocolError(400, f"response to no request (CSeq {cseq})")
        method, _url = self._pending.pop(cseq)
        if msg.ok and method == "SETUP":
            value = msg.headers.get("Session")
            if value is not None:
                try:
                    self.session = parse_session(value)
                except MalformedHeader:
                    self.closed = True
                    raise RemoteProtocolError(400, f"bad Session header {value!r}") from None
        if msg.ok and method == "TEARDOWN":
            self.session = None
        return ResponseReceived(msg, cseq, method)

    @property
    def unanswered(self) -> list[int]:
        """CSeqs of requests still waiting for their response."""
        return list(self._pending)


def status_response(status: int, headers: Iterable[tuple[str, str]] = ()) -> Response:
    """A bodiless response with the standard reason phrase."""
    return Response(status, reason_phrase(status), Headers(tuple(headers)))
