"""Serve MPEG-TS files over RTSP from your own Twisted application, with yimaporc's RTSP.

    python examples/rtsp_file_server.py DIR [HOST] [PORT]
    ffplay rtsp://127.0.0.1:8554/NAME            # DIR/NAME.ts, over UDP
    ffmpeg -rtsp_transport tcp -i rtsp://127.0.0.1:8554/NAME -c copy out.ts

The library (``yimaporc.rtsp``) does the protocol: parsing with limits, the RFC 2326
session state table, session ids and timeouts, TCP interleaving, error statuses.
The application implements :class:`~yimaporc.rtsp.IRtspHandler`: what DESCRIBE
answers, where SETUP sends, when PLAY starts.  Here: one file per session, RTP
MP2T (RFC 2250) paced by the file's own PCR time index (``yimaporc.yima.media``),
an RTCP BYE at the end.  No cluster: a Yima node is this plus SCADDAR placement,
bipartite scheduling across nodes and retransmission.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from yimaporc.rtp import MP2T_CLOCK, PT_MP2T, Bye, build_rtp, serialize_rtcp
from yimaporc.rtsp import IRtspHandler, RtspServerFactory, RtspStatusError, ServerSession
from yimaporc.rtsp._wire import NptRange, RtpInfo, TransportSpec
from yimaporc.rtsp.interfaces import PlayReply
from yimaporc.rtsp.sdp import mp2t_track, presentation_sdp, serialize_sdp
from yimaporc.yima.media import RTP_PAYLOAD, MediaInfo, analyse_bytes


@attrs.define
class Stream:
    """One session's playback state."""

    data: bytes
    info: MediaInfo
    ssrc: int
    seq: int
    transport: TransportSpec
    host: str
    next: int = 0
    started: float = 0.0
    timer: IDelayedCall | None = None


@implementer(IRtspHandler)
class FileStreamer:
    """An IRtspHandler serving ``DIR/NAME.ts`` at ``rtsp://HOST:PORT/NAME``."""

    def __init__(self, reactor: Any, root: Path) -> None:
        self.reactor = reactor
        self.root = root
        self.rng = random.SystemRandom()
        self.streams: dict[str, Stream] = {}
        self.udp = reactor.listenUDP(0, DatagramProtocol())

    def _load(self, url: str) -> tuple[bytes, MediaInfo]:
        name = url.split("://", 1)[-1].split("/")[1] if url.count("/") >= 3 else ""
        path = self.root / f"{name}.ts"
        if not name.isidentifier() or not path.is_file():
            raise RtspStatusError(404, f"no file {name!r}")
        data = path.read_bytes()
        # One "block" per RTP payload: block_times is then the send time of each packet.
        info = analyse_bytes(name, data, seed=0, block_size=RTP_PAYLOAD)
        if not info.streamable:
            raise RtspStatusError(415, info.message)
        return data, info

    def describe(self, url: str) -> bytes:
        _, info = self._load(url)
        return serialize_sdp(presentation_sdp(info.name, [mp2t_track("track1")], info.duration))

    def setup(self, url: str, transport: TransportSpec, session: ServerSession) -> TransportSpec:
        data, info = self._load(url.rsplit("/track1", 1)[0])
        if not transport.is_tcp and transport.client_port is None:
            raise RtspStatusError(461, "UDP needs client_port")
        ssrc = self.rng.getrandbits(32)
        # Only ever to the requesting address (the server refused any other destination).
        if not transport.is_tcp and session.peer is None:
            raise RtspStatusError(461, "UDP needs the client's address")
        host = session.peer or ""
        self.streams[session.session_id] = Stream(
            data, info, ssrc, self.rng.getrandbits(16), transport, host
        )
        port = self.udp.getHost().port
        return attrs.evolve(
            transport, ssrc=ssrc, server_port=None if transport.is_tcp else (port, port + 1)
        )

    def play(self, session: ServerSession, range: NptRange | None) -> PlayReply:
        s = self.streams[session.session_id]
        s.started = self.reactor.seconds() - s.info.block_times[s.next] / 1e6
        self._pump(session)
        rtp_info = RtpInfo("track1", (s.seq + s.next) & 0xFFFF, 0)
        return PlayReply(NptRange(s.info.block_times[s.next] / 1e6, s.info.duration), (rtp_info,))

    def _send(self, session: ServerSession, s: Stream, data: bytes, rtcp: bool) -> None:
        if s.transport.is_tcp:
            assert s.transport.interleaved is not None
            session.send_interleaved(s.transport.interleaved[int(rtcp)], data)
        else:
            assert s.transport.client_port is not None
            self.udp.write(data, (s.host, s.transport.client_port[int(rtcp)]))

    def _pump(self, session: ServerSession) -> None:
        s = self.streams.get(session.session_id)
        if s is None:
            return
        now = self.reactor.seconds() - s.started
        times = s.info.block_times
        while s.next < len(times) and times[s.next] / 1e6 <= now:
            payload = s.data[s.next * RTP_PAYLOAD : (s.next + 1) * RTP_PAYLOAD]
            ts = round(times[s.next] / 1e6 * MP2T_CLOCK)
            self._send(session, s, build_rtp(PT_MP2T, s.seq + s.next, ts, s.ssrc, payload), False)
            s.next += 1
        if s.next >= len(times):
            self._send(session, s, serialize_rtcp(Bye((s.ssrc,), b"end")), True)
            return
        s.timer = self.reactor.callLater(max(0.0, times[s.next] / 1e6 - now), self._pump, session)

    def pause(self, session: ServerSession) -> None:
        s = self.streams.get(session.session_id)
        if s is not None and s.timer is not None and s.timer.active():
            s.timer.cancel()

    def teardown(self, session: ServerSession) -> None:
        self.pause(session)
        self.streams.pop(session.session_id, None)

    def get_parameter(self, session: ServerSession | None, body: bytes) -> bytes:
        return b""

    def set_parameter(self, session: ServerSession | None, body: bytes) -> bytes:
        return b""

    def interleaved_received(self, session: ServerSession, channel: int, data: bytes) -> None:
        """Client RTCP over TCP: nothing to do here."""


def main(argv: list[str]) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    root = Path(argv[1])
    host = argv[2] if len(argv) > 2 else "127.0.0.1"
    port = int(argv[3]) if len(argv) > 3 else 8554
    handler = FileStreamer(reactor, root)
    factory = RtspServerFactory(handler, reactor, random.SystemRandom())
    serverFromString(reactor, f"tcp:{port}:interface={host}").listen(factory)
    print(f"serving {root}/*.ts at rtsp://{host}:{port}/NAME", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv)
