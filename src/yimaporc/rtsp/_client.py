"""Thin Twisted shell of an RTSP client connection: :class:`RtspClientProtocol` returns a
Deferred per request."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._connection import SERVER_NAME, RtspClientConnection
from ._errors import RemoteProtocolError, RtspError, RtspStatusError
from ._events import NEED_DATA, ConnectionClosed, ResponseReceived
from ._messages import (
    DEFAULT_LIMITS,
    InterleavedFrame,
    Limits,
    Response,
)
from ._protocol import _Shell
from ._wire import (
    NptRange,
    TransportSpec,
)


class RtspConnectionLost(RtspError):
    """The RTSP connection closed before the response came."""


class RtspClientProtocol(_Shell):
    """An RTSP client connection: one Deferred per request, interleaved frames to a callback.

    A non-2xx response errbacks with :class:`RtspStatusError` (``.response``
    holds it); a lost connection errbacks pending requests with
    :class:`RtspConnectionLost`; ``timeout`` (seconds, with ``clock``) cancels
    requests that get no answer.
    """

    log = Logger()

    def __init__(
        self,
        on_interleaved: Callable[[int, bytes], None] | None = None,
        *,
        clock: IReactorTime | None = None,
        timeout: float | None = None,
        limits: Limits = DEFAULT_LIMITS,
        user_agent: str = SERVER_NAME,
    ) -> None:
        self.conn = RtspClientConnection(limits, user_agent)
        self.on_interleaved = on_interleaved
        self.clock = clock
        self.timeout = timeout
        self._waiting: dict[int, Deferred[Response]] = {}
        self.ready: Deferred[RtspClientProtocol] = Deferred()
        self._lost = False

    @property
    def session_id(self) -> str | None:
        """The session the server gave at SETUP."""
        return self.conn.session_id

    def connectionMade(self) -> None:
        self.ready.callback(self)

    def _send(self, cseq: int, data: bytes) -> Deferred[Response]:
        d: Deferred[Response] = Deferred()
        if self._lost:
            d.errback(RtspConnectionLost("not connected"))
            return d
        self._waiting[cseq] = d
        self._t.write(data)
        if self.timeout is not None and self.clock is not None:
            d.addTimeout(self.timeout, self.clock)
        return d

    def request(
        self, method: str, url: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
    ) -> Deferred[Response]:
        """Send any request."""
        return self._send(*self.conn.request(method, url, headers, body))

    def options(self, url: str) -> Deferred[Response]:
        """OPTIONS."""
        return self._send(*self.conn.options(url))

    def describe(self, url: str) -> Deferred[Response]:
        """DESCRIBE (the SDP is the body; Content-Base is a header)."""
        return self._send(*self.conn.describe(url))

    def setup(
        self, url: str, transport: TransportSpec | Sequence[TransportSpec]
    ) -> Deferred[Response]:
        """SETUP."""
        return self._send(*self.conn.setup(url, transport))

    def play(self, url: str, rng: NptRange | None = None) -> Deferred[Response]:
        """PLAY."""
        return self._send(*self.conn.play(url, rng))

    def pause(self, url: str) -> Deferred[Response]:
        """PAUSE."""
        return self._send(*self.conn.pause(url))

    def teardown(self, url: str) -> Deferred[Response]:
        """TEARDOWN."""
        return self._send(*self.conn.teardown(url))

    def get_parameter(self, url: str, body: bytes = b"") -> Deferred[Response]:
        """GET_PARAMETER (keep-alive with an empty body)."""
        return self._send(*self.conn.get_parameter(url, body))

    def set_parameter(self, url: str, body: bytes) -> Deferred[Response]:
        """SET_PARAMETER."""
        return self._send(*self.conn.set_parameter(url, body))

    def send_interleaved(self, channel: int, data: bytes) -> None:
        """Send a frame (e.g. RTCP) on an interleaved channel."""
        if not self._lost:
            self._t.write(self.conn.send_interleaved(channel, data))

    def dataReceived(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                self.log.warn("rtsp client: {error}", error=exc)
                self._fail_all(exc)
                self._t.loseConnection()
                return
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return
            if isinstance(event, InterleavedFrame):
                if self.on_interleaved is not None:
                    try:
                        self.on_interleaved(event.channel, event.data)
                    except Exception:
                        self.log.failure("rtsp client: interleaved callback failed")
            elif isinstance(event, ResponseReceived):
                d = self._waiting.pop(event.cseq, None)
                if d is None:
                    continue
                if event.response.ok:
                    d.callback(event.response)
                else:
                    r = event.response
                    d.errback(RtspStatusError(r.status, r.reason, r.headers.fields, r))

    def _fail_all(self, exc: Exception) -> None:
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(exc)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._lost = True
        self._fail_all(RtspConnectionLost(str(reason.value)))
