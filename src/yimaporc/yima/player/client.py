"""The RTSP half of the player: :class:`Client` is ``yimaporc play``.

One UDP port pair, per URL an RTSP connection (DESCRIBE, SETUP with
``x-yima-fanout``, PLAY, keep-alive, TEARDOWN), then a burst of ``YIMT`` probes
that give the cluster clock offset (smallest-RTT sample), the session's start
instant and its packet count; the datagrams then go to a
:class:`~.shell.PlayerSession`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IReactorTime,
)
from twisted.internet.protocol import ClientFactory, DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..._reactor import INodeReactor
from ...rtsp import (
    RtspClientProtocol,
    RtspStatusError,
    TransportSpec,
    parse_rtp_info,
    parse_transport,
    parse_url,
)
from ...rtsp.sdp import parse_sdp
from .shell import Addr, PlayError, PlayerSession, ShellConfig, StreamInfo


class _Udp(DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Any], None]) -> None:
        self.on_datagram = on_datagram

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr)


class _RtspFactory(ClientFactory):
    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.connected: Deferred[RtspClientProtocol] = Deferred()

    def buildProtocol(self, addr: IAddress | None) -> RtspClientProtocol:
        proto = RtspClientProtocol(clock=self.clock, timeout=10.0)
        proto.ready.chainDeferred(self.connected)
        return proto

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.connected.errback(reason)


def _status(url: str, what: str) -> Callable[[Any], Any]:
    def fail(f: Any) -> Any:
        if f.check(RtspStatusError):
            raise PlayError(f"{url}: {what} answered {f.value.status} {f.value.reason}")
        if f.check(PlayError):
            return f
        raise PlayError(f"{url}: {what} failed: {f.getErrorMessage()}")

    return fail


class Client:
    """RTSP for every URL plus the UDP port pair; :meth:`run` plays and returns the stats."""

    log = Logger()

    def __init__(
        self,
        reactor: INodeReactor,
        urls: Sequence[str],
        config: ShellConfig,
        deliver: Callable[[str, bytes], None],
        bind: str = "",
    ) -> None:
        self.reactor = reactor
        self.urls = list(urls)
        self.config = config
        self.deliver = deliver
        self.bind = bind
        self.conns: list[tuple[str, RtspClientProtocol]] = []
        self.rtp_port: Any = None
        self.rtcp_port: Any = None
        self.session: PlayerSession | None = None
        self._keepalive: IDelayedCall | None = None
        self.closed: Deferred[None] = Deferred()

    def _bind_pair(self, host: str) -> None:
        from twisted.internet.error import CannotListenError

        for _ in range(20):
            port = self.reactor.listenUDP(0, _Udp(self._datagram), interface=host)
            p = port.getHost().port
            if p % 2 == 0 and p < 65535:
                try:
                    self.rtcp_port = self.reactor.listenUDP(
                        p + 1, _Udp(self._datagram), interface=host
                    )
                    self.rtp_port = port
                    break
                except CannotListenError:
                    pass
            port.stopListening()
        else:
            raise PlayError("cannot bind a UDP port pair")
        for port in (self.rtp_port, self.rtcp_port):
            sock = getattr(port, "socket", None)
            if sock is not None:
                import socket

                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                except OSError:
                    pass

    def _datagram(self, data: bytes, addr: Any) -> None:
        if self.session is not None:
            self.session.datagram(data, addr)

    def _send(self, data: bytes, addr: Addr) -> None:
        if self.rtcp_port is not None:
            self.rtcp_port.write(data, addr)

    async def _setup_one(self, i: int, url: str) -> StreamInfo:
        try:
            u = parse_url(url)
        except Exception as e:
            raise PlayError(str(e)) from None
        factory = _RtspFactory(self.reactor)
        kw = {"bindAddress": (self.bind, 0)} if self.bind else {}
        self.reactor.connectTCP(u.host, u.port, factory, timeout=5, **kw)
        try:
            proto = await factory.connected
        except Exception as e:
            raise PlayError(f"cannot connect to {u.host}:{u.port}: {e}") from None
        self.conns.append((url, proto))
        if self.rtp_port is None:
            self._bind_pair(self.bind or proto.transport.getHost().host)  # type: ignore[union-attr]
        resp = await proto.describe(url).addErrback(_status(url, "DESCRIBE"))
        try:
            sdp = parse_sdp(resp.body)
        except Exception as e:
            raise PlayError(f"{url}: bad SDP: {e}") from None
        if not sdp.media:
            raise PlayError(f"{url}: the presentation has no media")
        m = sdp.media[0]
        maps = m.rtpmaps
        clock_rate = next(iter(maps.values())).clock_rate if maps else 90000
        bitrate = None
        for b in (*m.bandwidth, *sdp.bandwidth):
            if b.upper().startswith("AS:") and b[3:].strip().isdigit():
                bitrate = int(b[3:]) * 1000.0
        base = resp.headers.get("Content-Base") or url.rstrip("/") + "/"
        control = m.control or ""
        track = control if "://" in control else base + control if control else url
        rtp = self.rtp_port.getHost().port
        spec = TransportSpec(client_port=(rtp, rtp + 1), yima_fanout=True)
        resp = await proto.setup(track, spec).addErrback(_status(url, "SETUP"))
        transports = parse_transport(resp.headers.get("Transport") or "")
        if not transports or not transports[0].yima_fanout or not transports[0].yima_nodes:
            raise PlayError(f"{url}: the server did not grant x-yima-fanout")
        t = transports[0]
        nodes: dict[int, Addr] = {}
        for n in t.yima_nodes:
            port = n.rtcp_port or n.rtp_port
            if port:
                nodes[n.index] = (n.host, port)
        if not nodes:
            raise PlayError(f"{url}: no node RTCP address in x-yima-nodes")
        return StreamInfo(
            f"{i}:{u.path.strip('/')}", url, t.ssrc or 0, 0, 0, clock_rate, nodes,
            duration=sdp.duration, bitrate=bitrate,
        )  # fmt: skip

    async def _play_one(self, s: StreamInfo, proto: RtspClientProtocol) -> None:
        resp = await proto.play(s.url).addErrback(_status(s.url, "PLAY"))
        infos = parse_rtp_info(resp.headers.get("RTP-Info") or "")
        if not infos or infos[0].seq is None or infos[0].rtptime is None:
            raise PlayError(f"{s.url}: PLAY answered no RTP-Info seq/rtptime")
        s.seq_base, s.rtptime = infos[0].seq, infos[0].rtptime

    async def run(self) -> dict[str, Any]:
        """Set up, play to the end (or ``--duration``), tear down; the stats."""
        try:
            streams = []
            for i, url in enumerate(self.urls):
                streams.append(await self._setup_one(i, url))
            self.session = PlayerSession(self.reactor, streams, self.config, self._send,
                                         self.deliver)  # fmt: skip
            plays = [
                ensureDeferred(self._play_one(s, p))
                for s, (_, p) in zip(streams, self.conns, strict=True)
            ]
            for d in plays:
                await d
            await self._probe()
            self.session.start()
            self._keepalive = self.reactor.callLater(20.0, self._keep_alive)
            stats = await self.session.done
        except GeneratorExit:
            # Abandoned mid-session (the caller dropped it, garbage collection closes
            # it): a closing coroutine may not wait, so the teardown goes on alone.
            ensureDeferred(self._teardown()).addErrback(lambda f: None)
            raise
        except BaseException:
            await self._teardown()
            raise
        await self._teardown()
        return stats

    async def _probe(self) -> None:
        assert self.session is not None
        deadline = self.reactor.seconds() + self.config.probe_wait
        tries = 0
        while self.reactor.seconds() < deadline:
            if tries < 5:
                self.session.probe_all()
                tries += 1
            await _sleep(self.reactor, 0.02)
            if self.session.ready and tries >= 3:
                return
        if not self.session.ready:
            raise PlayError("no node answered the time probe within "
                            f"{self.config.probe_wait} s")  # fmt: skip

    def _keep_alive(self) -> None:
        for url, proto in self.conns:
            proto.get_parameter(url).addErrback(lambda f: None)
        self._keepalive = self.reactor.callLater(20.0, self._keep_alive)

    async def _teardown(self) -> None:
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        ds = []
        for url, proto in self.conns:
            if proto.session_id is not None:
                ds.append(proto.teardown(url).addErrback(lambda f: None))
        if ds:
            await DeferredList(ds, consumeErrors=True)
        for _, proto in self.conns:
            if proto.transport is not None:
                proto.transport.loseConnection()
        for port in (self.rtp_port, self.rtcp_port):
            if port is not None:
                port.stopListening()
        self.rtp_port = self.rtcp_port = None
        self.conns = []
        if not self.closed.called:
            self.closed.callback(None)

    def interrupt(self) -> Deferred[None]:
        """Ctrl-C: end playback now (stats so far), then tear down; fires when closed."""
        s = self.session
        if s is not None and s.presentation is not None and not s.finished:
            s.stopped_early = True
            s.finish()
        elif not self.closed.called:  # still setting up: tear down what exists
            ensureDeferred(self._teardown()).addErrback(lambda f: None)
        out: Deferred[None] = Deferred()

        def closed(_: object = None) -> None:
            if timer.active():
                timer.cancel()
            if not out.called:
                out.callback(None)

        timer = self.reactor.callLater(3.0, closed)  # do not hang the shutdown
        self.closed.addBoth(closed)
        return out


def _sleep(clock: IReactorTime, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    clock.callLater(seconds, d.callback, None)
    return d
