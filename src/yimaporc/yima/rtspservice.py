"""Yima's RTSP front: the session planner behind :class:`~yimaporc.rtsp.RtspServerFactory`.

DESCRIBE answers from the replicated media catalog.  PLAY picks a start
instant a little ahead on the cluster clock, a random SSRC, sequence and
timestamp base, and tells every member (over RPC) to serve its own blocks
(bipartite, Yima-2) or, in master-slave mode (Yima-1), tells only itself to
serve every block (reading the others' blocks over RPC).

Where the packets go:

- clients that opt in (``x-yima-fanout`` in the Transport) get RTP straight
  from every node (the reply lists the nodes in ``x-yima-nodes``);
- standard players get one in-order stream from this node: the other nodes
  send to a relay port here, which puts packets in global order
  (:class:`~yimaporc.yima.relay.Reorderer`) and forwards them over UDP or,
  for ``RTP/AVP/TCP``, interleaved on the RTSP connection.
"""

from __future__ import annotations

import random
import socket
from bisect import bisect_right
from collections.abc import Generator
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..cluster.membership import IMembershipListener, View
from ..cluster.node import CannotStart, ClusterNode, IReady
from ..rtp import (
    PT_MP2T,
    Bye,
    RtpHeaderTemplate,
    SdesChunk,
    SdesItem,
    SenderReport,
    SourceDescription,
    l16_payload_type,
    ntp_timestamp,
    serialize_rtcp,
)
from ..rtsp import IRtspHandler, RtspServerFactory, RtspStatusError, YimaNode
from ..rtsp._machine import ServerSession, send_interleaved_many
from ..rtsp._wire import NptRange, RtpInfo, TransportSpec
from ..rtsp.interfaces import PlayReply
from ..rtsp.sdp import l16_track, mp2t_track, presentation_sdp, serialize_sdp
from .feedback import RETRANSMISSION_MARK, FeedbackReceiver, StreamPorts, mark_retransmission
from .interfaces import IMediaStorage
from .media import (
    KIND_TS,
    KIND_WAV,
    PCR_HZ,
    PCR_WRAP,
    PTS_WRAP,
    TS_PACKET,
    MediaInfo,
    WavFormat,
    last_pat_before,
    packet_bytes,
    packet_pcr,
    pes_starts,
    to_l16,
)
from .relay import RelayStats, Reorderer, rewrite
from .schedule import MediaTiming, Packet
from .sendpath import DatagramSender
from .store import BlockKey
from .streaming import (
    DEFAULT_CACHE_BYTES,
    Destination,
    StreamControl,
    StreamingNode,
    StreamNack,
    StreamStart,
)
from .workers import ShardedStreamingNode, make_pool

START_LEAD = 0.5
# A delivery tick also takes what falls due within this many seconds: a session's
# packets then leave in batches of several per system call (one GSO send) instead of
# one wake-up each; players buffer far more than this (docs/benchmarks.md).
SEND_AHEAD = 0.01
# Relayed sessions: the nodes send this far ahead of the playout instant and the relay
# holds each packet until it is due, so an overdue packet can be asked again of its
# owner or, the owner being silent, its share served from parity here before the
# player misses it (docs/wire.md, "Lead, overdue packets and early takeover").
RELAY_LEAD = 1.5
# The relay looks for overdue packets this often; a packet is overdue this long after
# its node should have sent it; the owner's share is taken over when a NACK went
# unanswered this long and nothing came from that node for SILENT seconds.
WATCH_INTERVAL = 0.05
OVERDUE = 0.15
RETRY = 0.25
SILENT = 0.3
# A node that went silent is read around (parity) for this long, unless it is heard again.
SUSPECT_FOR = 30.0
# A TS seek looks this many blocks back for a keyframe (GOPs longer than this many
# blocks' worth of media start at the packet playing at the requested time).
KEYFRAME_SEARCH_BLOCKS = 32
# The end-of-stream BYE waits this long after the last packet: a player ends on
# BYE, and one whose RTP socket still holds the last packets (a busy receiver,
# GStreamer's udpsrc) would drop them.
BYE_GRACE = 1.0
SR_INTERVAL = 5.0  # RFC 3550's minimum interval; the first SR goes 1 s after PLAY
TRACK = "track1"


_TIMINGS: dict[int, tuple[MediaInfo, MediaTiming]] = {}


def media_timing(info: MediaInfo) -> MediaTiming:
    """What the scheduler needs of a catalog entry (computed once per catalog entry:
    the time index with its per-block packet counts, ready for bisection)."""
    got = _TIMINGS.get(id(info))
    if got is not None and got[0] is info:
        return got[1]
    timing = _media_timing(info)
    if len(_TIMINGS) >= 256:
        _TIMINGS.clear()
    _TIMINGS[id(info)] = (info, timing)
    return timing


def rtp_time(info: MediaInfo, timing: MediaTiming, gseq: int, ts_base: int) -> int:
    """The RTP timestamp of global packet ``gseq``, as :meth:`YimaStreamingService._packetize`
    stamps it (media time for MPEG-TS; the first sample frame for L16)."""
    if info.kind == KIND_WAV and info.wav is not None:
        ppb = timing.packets_per_block
        at = (gseq // ppb) * info.block_size + (gseq % ppb) * timing.payload
        frames = max(0, max(at, info.wav.data_offset) - info.wav.data_offset) // info.wav.frame_size
        return (ts_base + frames) & 0xFFFFFFFF
    return (ts_base + round(timing.gseq_time(gseq) * timing.clock_rate)) & 0xFFFFFFFF


def lavf_quirk(user_agent: str) -> bool:
    """libavformat's RTSP client (ffmpeg, ffplay, mpv, players built on it) names its
    MPEG-TS seek positions on the stream's own PTS clock: ``-ss T`` asks for
    ``npt=(first PTS + T)``, in seconds, not for npt T (RFC 2326 §3.6)."""
    return user_agent.startswith("Lavf")


def lavf_npt(info: MediaInfo, npt: float) -> float:
    """The media time a libavformat client means by ``npt`` (its PTS clock in seconds):
    that PTS less the first PCR's, unwrapped; 0 for anything before the start."""
    if info.pcr_origin is None:
        return npt
    rel = (round(npt * 90000) - info.pcr_origin // 300) % PTS_WRAP
    return 0.0 if rel >= PTS_WRAP // 2 else rel / 90000


def _media_timing(info: MediaInfo) -> MediaTiming:
    if info.index_digest and not info.block_times:
        # Never guess the timing: the index is loaded (off the reactor) before any use.
        raise RtspStatusError(503, f"{info.name}: time index not loaded yet")
    starts = tuple(t / 1e6 for t in info.block_times) or tuple(float(i) for i in range(info.blocks))
    if info.kind == KIND_WAV and info.wav is not None:
        return MediaTiming(info.name, info.size, info.block_size, starts, info.duration or 0.0,
                           packet_bytes(info.wav), info.wav.sample_rate)  # fmt: skip
    return MediaTiming(info.name, info.size, info.block_size, starts, info.duration or 0.0)


def _last_keyframe(info: MediaInfo, data: bytes, target: float) -> tuple[int, float] | None:
    """(offset, media time) of the last random access point of ``info``'s PCR PID in the
    block ``data`` whose PTS (on the media timeline) is at or before ``target``
    (blocking: a scan of the block's packets, run in a thread)."""
    assert info.pcr_pid is not None and info.pcr_origin is not None
    origin = info.pcr_origin // 300
    for pes in reversed(pes_starts(data, info.pcr_pid)):
        if not pes.key or pes.pts is None:
            continue
        t = ((pes.pts - origin + PTS_WRAP // 2) % PTS_WRAP - PTS_WRAP // 2) / 90000
        if t <= target + 1e-6:
            return pes.offset, max(0.0, t)
    return None


def _big_buffers(port: Any, size: int = 4 << 20) -> None:
    """A few MB of socket buffer: the default 208 KB is ~0.2 s of one stream (bench finding)."""
    sock = getattr(port, "socket", None)
    if sock is None:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass


def _header_length(data: bytes) -> int:
    """Bytes of RTP header (fixed part, CSRCs, extension) in front of the payload."""
    n = 12 + 4 * (data[0] & 0x0F)
    if data[0] & 0x10 and len(data) >= n + 4:
        n += 4 + 4 * int.from_bytes(data[n + 2 : n + 4], "big")
    return min(n, len(data))


class _Udp(DatagramProtocol):
    def __init__(self, on_datagram: Any = None) -> None:
        self.on_datagram = on_datagram

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self.on_datagram is not None:
            self.on_datagram(data, addr)


@attrs.define
class _Plan:
    """One RTSP session as this (RTSP) node planned it."""

    media: str
    dest_host: str
    dest_port: int
    fanout: bool
    tcp_channel: int | None
    ssrc: int
    seq_base: int
    ts_base: int
    relay: Reorderer | None = None
    relay_port: IListeningPort | None = None
    relay_addr: tuple[str, int] = ("", 0)  # where the nodes send this session's packets
    relay_timer: IDelayedCall | None = None
    bye_timer: IDelayedCall | None = None
    # The client opted in to the Yima extension (x-yima-fanout): relayed packets keep it.
    extension: bool = False
    # The SSRC the nodes stamp on this session's packets: the client's for fan-out;
    # for a relayed session a fresh one per seek, so the relay tells a packet of the
    # new position from one of the old that was still on its way.
    node_ssrc: int = 0
    # Relayed: the sequence number the client sees is gseq + seq_offset (mod 2^16),
    # re-based at each seek so that it goes on by one (RTP-Info names the first).
    seq_offset: int = 0
    # Media position at cluster time started_ct (the last PLAY or resume).
    position: float = 0.0
    started_ct: float = 0.0
    # A PLAY started the nodes (started_ct holds then).
    played: bool = False
    playing: bool = False
    # Node ids in node-index order at PLAY; local sessions serving departed nodes' shares.
    members: tuple[str, ...] = ()
    takeovers: dict[str, str] = attrs.field(factory=dict)
    session: ServerSession | None = None
    total: int = 0
    bye_sent: bool = False
    clock_rate: int = 90000
    # Sender statistics of the relayed stream, for RTCP sender reports.
    packets: int = 0
    octets: int = 0
    last_rtp_ts: int | None = None
    last_sent_at: float = 0.0
    sr_timer: IDelayedCall | None = None
    # Relayed: how far ahead of playout the nodes send (RELAY_LEAD), the media's timing
    # (packet times), the overdue watch, NACKs sent for overdue packets (gseq -> when),
    # when each node index was last heard, and block -> owning node (primary place).
    lead: float = 0.0
    # The overdue watch starts here (a relayed PLAY: once every node has started).
    watch_from: float = 0.0
    # A relayed PLAY's burst: a missing packet is waited for until this instant at
    # least (the nodes' start plus the lead), however due the packets after it are.
    hold_gaps_until: float = 0.0
    paused_ct: float = 0.0
    # Delivery speed of a relayed session (YIMA feedback from a client that opted in).
    speed: float = 1.0
    timing: MediaTiming | None = None
    watch_timer: IDelayedCall | None = None
    relay_timer_at: float | None = None
    nacked: dict[int, float] = attrs.field(factory=dict)
    heard: dict[int, float] = attrs.field(factory=dict)
    owners: dict[int, str] = attrs.field(factory=dict)
    # Node index of each taken-over share: a new one (past the members'), so the player's
    # per-node gap detection starts afresh and its NACKs and speed changes reach the node
    # that now sends (docs/wire.md).
    takeover_index: dict[str, int] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.node_ssrc, self.seq_offset = self.ssrc, self.seq_base


@implementer(IRtspHandler, IMembershipListener, IReady)
class YimaStreamingService(Service):
    """RTSP + RTP delivery of one node (every node runs one)."""

    log = Logger()

    def __init__(
        self,
        node: ClusterNode,
        reactor: Any,
        storage: IMediaStorage,
        *,
        rtsp_endpoint: str | None,
        mode: str = "bipartite",
        rng: random.Random | None = None,
        rtsp_guards: dict[str, Any] | None = None,
        send_path: str = "auto",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        send_ahead: float = SEND_AHEAD,
        workers: int = 0,
    ) -> None:
        self.node = node
        #: How RTP leaves the data socket (sendpath.SEND_PATHS); the sender is made
        #: when the socket is bound.
        self.send_path = send_path
        self.sender: DatagramSender | None = None
        self.reactor = reactor
        self.storage = storage
        self.rtsp_endpoint = rtsp_endpoint
        self.mode = mode
        self.rng = rng or random.SystemRandom()
        self.plans: dict[str, _Plan] = {}
        self.lost_sessions = 0
        #: Nodes that went silent on a relayed session (node id -> until when, cluster
        #: time): their blocks are rebuilt from parity instead of asked of them.
        self.suspects: dict[str, float] = {}
        #: Relay counters of sessions already torn down (the live ones are added).
        self.relay_totals = RelayStats()
        #: Shares this node stopped because the session's RTSP node left.
        self.orphans_stopped = 0
        #: Shares taken over at a fan-out player's HANDOVER request.
        self.early_handovers = 0
        self.data_port: IListeningPort | None = None
        self.rtsp_port: IListeningPort | None = None
        self._listen_done: Deferred[Any] = succeed(None)
        self._start_error: CannotStart | None = None
        # Session caps and timeouts (RtspServerFactory keywords; --rtsp-* options).
        self.factory = RtspServerFactory(self, reactor, self.rng, **(rtsp_guards or {}))
        # --workers N (N >= 2): delivery sharded over N processes (yima/workers.py).
        self.workers = make_pool(self, workers, send_path, send_ahead, cache_bytes)
        extra: dict[str, Any] = {}
        if self.workers is not None:
            extra = dict(pool=self.workers, eligible=self._worker_eligible)
        self.streaming = (StreamingNode if self.workers is None else ShardedStreamingNode)(
            reactor,
            node.cluster_time,
            timing=lambda name: media_timing(self.storage.media_info(name)),
            ready=self._timing_ready,
            my_blocks=self._my_blocks,
            read_block=self._read_block,
            packetize=self._packetize_marked,
            send=self._send,
            template=self._template,
            send_segments=self._send_segments,
            flush=self._flush,
            send_ahead=send_ahead,
            cache_bytes=cache_bytes,
            **extra,
        )
        self.streaming.register(node.registry)
        self.rtcp_port: IListeningPort | None = None
        self.feedback = FeedbackReceiver(
            self.streaming, node.cluster_time, self._send_rtcp_reply, relay=self
        )
        node.registry.register(StreamPorts, self._ports)
        self._templates: dict[tuple[int, int], tuple[RtpHeaderTemplate, WavFormat | None, int]] = {}
        # Per media name: (catalog entry, end of its presentation), see _presentation_end.
        self._ends: dict[str, tuple[MediaInfo, float]] = {}
        node.add_status(self.status)
        node.subscribe(self)

    # --- lifecycle ----------------------------------------------------------------

    def startService(self) -> None:
        """Bind the RTP socket (cluster host, any port) and the RTSP endpoint."""
        super().startService()
        host = self.node.config.cluster_host
        # RTCP from players: on its own port (data port + 1 when free), and muxed on the data port.
        self.data_port = self.reactor.listenUDP(0, _Udp(self.feedback.datagram), interface=host)
        _big_buffers(self.data_port)
        sock = getattr(self.data_port, "socket", None)
        if isinstance(sock, socket.socket):
            self.sender = DatagramSender(sock, self.send_path)
            if self.workers is not None:
                self.reactor.callWhenRunning(self.workers.start, sock.fileno())
        try:
            self.rtcp_port = self.reactor.listenUDP(
                self.data_port.getHost().port + 1,  # type: ignore[union-attr]
                _Udp(self.feedback.datagram),
                interface=host,
            )
        except CannotListenError:
            self.rtcp_port = self.reactor.listenUDP(0, _Udp(self.feedback.datagram), interface=host)
        if self.rtsp_endpoint:
            from twisted.internet.endpoints import serverFromString

            d = serverFromString(self.reactor, self.rtsp_endpoint).listen(self.factory)
            d.addCallbacks(self._listening, self._cannot_listen)
            self._listen_done = d

    def _listening(self, port: IListeningPort) -> None:
        self.rtsp_port = port

    def _cannot_listen(self, failure: Any) -> None:
        error = CannotStart(
            f"cannot listen on --rtsp {self.rtsp_endpoint}: {failure.getErrorMessage()}"
        )
        self.log.error("{error}", error=error)
        self._start_error = error

    def when_ready(self) -> Deferred[None]:
        """Fires once the RTSP port listens; errbacks with CannotStart if it cannot."""
        done: Deferred[None] = Deferred()

        def relay(result: object) -> object:
            if self._start_error is not None:
                done.errback(self._start_error)
            else:
                done.callback(None)
            return result

        self._listen_done.addCallback(relay)
        return done

    def stopService(self) -> Any:
        """Stop sending and listening."""
        super().stopService()
        self.streaming.engine.stop()
        if self.workers is not None:
            self.workers.stop()
        self.streaming.local.clear()
        self.streaming.local_batch.clear()
        self.factory.stop()
        ports = [p for p in (self.data_port, self.rtcp_port, self.rtsp_port) if p is not None]
        for plan in self.plans.values():
            if plan.relay_port is not None:
                ports.append(plan.relay_port)
            for timer in (plan.relay_timer, plan.sr_timer, plan.bye_timer, plan.watch_timer):
                if timer is not None and timer.active():
                    timer.cancel()
        return DeferredList([maybeDeferred(p.stopListening) for p in ports], consumeErrors=True)

    def status(self) -> dict[str, Any]:
        """``services.rtsp`` (a URL prefix) once listening, and live session counts."""
        out: dict[str, Any] = {"streaming": {"mode": self.mode, "sessions": len(self.plans),
                                             "packets_sent": self.streaming.engine.sent,
                                             "bytes_sent": self.streaming.engine.sent_bytes,
                                             "handed_to_relay": self.streaming.handed_over,
                                             "block_reads": self.streaming.engine.block_reads,
                                             "block_read_bytes":
                                                 self.streaming.engine.block_read_bytes,
                                             "block_read_errors": self.streaming.engine.read_errors,
                                             "late_waits":
                                                 self.streaming.scheduler.late_waits,
                                             "ended_share_lost": self.lost_sessions}}  # fmt: skip
        out["streaming"].update(self._delivery_status())
        out["streaming"]["send"] = self._send_status()
        if isinstance(self.streaming, ShardedStreamingNode):
            self.streaming.merge_status(out["streaming"])
        relays = sum(1 for p in self.plans.values() if p.relay_port is not None)
        out["rtsp"] = {**self.factory.stats(), "relay_ports": relays}
        fb = self.feedback
        out["streaming"]["rtcp"] = {"received": fb.received, "malformed": fb.malformed,
                                    "nacked": fb.nacked, "resent": self.streaming.resent,
                                    "feedback_applied": fb.feedback_applied}  # fmt: skip
        # A lost share: what the relays did about it, early takeovers, orphaned shares.
        out["streaming"].update(
            relay=self.relay_stats(),
            orphans_stopped=self.orphans_stopped,
            early_handovers=self.early_handovers,
            shares_served=len(self.streaming.scheduler.sessions),
        )
        if self.rtsp_port is not None:
            h = self.rtsp_port.getHost()
            out["services"] = {"rtsp": f"rtsp://{h.host}:{h.port}/sample"}  # type: ignore[attr-defined]
        return out

    def _send_status(self) -> dict[str, Any]:
        """The data socket's send path and what it did (docs/operations.md)."""
        snd, engine = self.sender, self.streaming.engine
        out: dict[str, Any] = {"path": snd.path if snd is not None else "port",
                               "cache_blocks": len(engine.cache),
                               "cache_limit": engine.cache_limit,
                               "cache_bytes": engine.cached_bytes}  # fmt: skip
        if snd is not None:
            out.update(datagrams=snd.datagrams, syscalls=snd.syscalls, dropped=snd.dropped,
                       eagain=snd.eagain, errors=snd.errors, pending_bytes=snd.pending)  # fmt: skip
        return out

    def _delivery_status(self) -> dict[str, Any]:
        """Late packets, block-cache hits/misses and the sessions this node serves."""
        engine, sessions = self.streaming.engine, self.streaming.scheduler.sessions
        stats = engine.stats
        return {
            "late_packets": stats.late_packets,
            "cache_hits": stats.cache_hits,
            "cache_misses": engine.block_reads,
            "running": stats.running(sessions, lambda sid: sessions[sid].media.name),
        }

    # --- helpers -----------------------------------------------------------------

    def _read_block(self, name: str, index: int) -> Deferred[bytes]:
        """A block for delivery; around a node that went silent (from parity), if any."""
        now = self.node.cluster_time()
        for node_id, until in list(self.suspects.items()):
            if until < now:
                del self.suspects[node_id]
        if not self.suspects:
            return self.storage.read_block(name, index)  # type: ignore[no-any-return]
        return self.storage.read(name, BlockKey(index), avoid=frozenset(self.suspects))  # type: ignore[no-any-return]

    def _media(self, url: str) -> MediaInfo:
        path = url.split("://", 1)[-1].split("/", 1)[-1] if "://" in url else url
        name = path.split("/")[0].split("?")[0]
        try:
            info: MediaInfo = self.storage.media_info(name)
        except KeyError:
            raise RtspStatusError(404, f"no media named {name!r}") from None
        if not info.streamable:
            raise RtspStatusError(415, f"{name} cannot be streamed: {info.message}")
        if info.kind == KIND_WAV and info.wav is not None:
            if info.block_size % info.wav.frame_size:
                raise RtspStatusError(415, f"{name}: WAV blocks are not whole sample frames")
        elif info.kind != KIND_TS:
            raise RtspStatusError(415, f"{name}: only MPEG-TS and WAV are streamed ({info.kind})")
        return info

    def _worker_eligible(self, name: str) -> bool:
        """A session of ``name`` may run in a worker (MPEG-TS: packed in runs)."""
        try:
            return self.storage.media_info(name).kind == KIND_TS
        except KeyError:
            return False

    def _my_blocks(self, name: str) -> Deferred[list[int]]:
        # From the storage's cached layout (computed off the reactor on a miss).
        d: Deferred[list[int]] = self.storage.blocks_of_node(name, self.node.node_id)
        return d

    def _template_for(
        self, session: str, dest: Destination
    ) -> tuple[RtpHeaderTemplate, WavFormat | None, int]:
        key = (dest.ssrc, dest.node_index)
        got = self._templates.get(key)
        if got is None:
            if len(self._templates) >= 1024:  # relayed sessions get a new SSRC per seek
                self._templates.clear()
            s = self.streaming.scheduler.sessions.get(session)
            info = self.storage.media_info(s.media.name) if s is not None else None
            wav = info.wav if info is not None and info.kind == KIND_WAV else None
            pt = PT_MP2T if wav is None else l16_payload_type(wav.sample_rate, wav.channels)
            got = self._templates[key] = (RtpHeaderTemplate(pt, dest.ssrc, dest.node_index), wav,
                                          info.block_size if info is not None else 0)  # fmt: skip
        return got

    def _template(self, session: str, dest: Destination) -> RtpHeaderTemplate | None:
        """The batched path's header template; None for L16 (converted packet by packet)."""
        tpl, wav, _ = self._template_for(session, dest)
        return tpl if wav is None else None

    def _packetize(self, pkt: Packet, dest: Destination, payload: bytes) -> bytes:
        tpl, wav, block_size = self._template_for(pkt.session, dest)
        if wav is None:
            ts = dest.ts_base + round(pkt.media_time * dest.clock_rate)
            return tpl.build(dest.seq_base + pkt.gseq, ts, payload, pkt.node_seq)
        # L16: only the data chunk's samples, big-endian; timestamp = first sample frame.
        at = pkt.block * block_size + pkt.offset
        lo = max(at, wav.data_offset)
        hi = min(at + len(payload), wav.data_offset + wav.data_size)
        pcm = payload[lo - at : hi - at] if hi > lo else b""
        ts = dest.ts_base + (max(0, lo - wav.data_offset) // wav.frame_size)
        return tpl.build(dest.seq_base + pkt.gseq, ts & 0xFFFFFFFF, to_l16(pcm, wav.bits, wav.encoding),
                         pkt.node_seq)  # fmt: skip

    def _packetize_marked(self, pkt: Packet, dest: Destination, payload: bytes) -> bytes:
        data = self._packetize(pkt, dest, payload)
        return mark_retransmission(data) if pkt.retransmission else data

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.sender is not None:
            self.sender.send(data, addr)
        elif self.data_port is not None:
            self.data_port.write(data, addr)  # type: ignore[attr-defined]

    def _send_batch(self, packets: list[bytes], addr: tuple[str, int]) -> None:
        """Several datagrams to one address: one batch when they are equal-size (the
        last may be shorter), else one by one."""
        size = len(packets[0])
        if (
            self.sender is None
            or len(packets) == 1
            or len(packets[-1]) > size
            or any(len(d) != size for d in packets[1:-1])
        ):
            for data in packets:
                self._send(data, addr)
            return
        self.sender.send_segments(b"".join(packets), size, addr)

    def _send_segments(self, buf: memoryview, size: int, addr: tuple[str, int]) -> None:
        if self.sender is not None:
            self.sender.send_segments(buf, size, addr)
        elif self.data_port is not None:  # a test's memory port: one write per datagram
            for at in range(0, len(buf), size):
                self.data_port.write(bytes(buf[at : at + size]), addr)  # type: ignore[attr-defined]

    def _flush(self) -> None:
        if self.sender is not None:
            self.sender.flush()

    def _send_rtcp_reply(self, data: bytes, addr: Any) -> None:
        if self.rtcp_port is not None and addr is not None:
            self.rtcp_port.write(data, addr)  # type: ignore[attr-defined]

    def _ports(self) -> dict[str, int]:
        """StreamPorts: this node's RTP source port and RTCP port."""
        rtp = self.data_port.getHost().port if self.data_port is not None else 0  # type: ignore[attr-defined]
        rtcp = self.rtcp_port.getHost().port if self.rtcp_port is not None else 0  # type: ignore[attr-defined]
        return {"rtp": rtp, "rtcp": rtcp}

    def _node_ports(self) -> Deferred[list[YimaNode]]:
        """Every member's index, host and RTP/RTCP ports (asked over RPC, 2 s at most)."""
        members = list(self.node.view.members)
        calls: list[Deferred[Any]] = []
        for m in members:
            if m.node_id == self.node.node_id:
                calls.append(maybeDeferred(self._ports))
            else:
                d = self.node.rpc.call(m.address, StreamPorts)
                d.addTimeout(2.0, self.reactor)
                calls.append(d)

        def done(results: list[tuple[bool, Any]]) -> list[YimaNode]:
            out = []
            for i, (m, (ok, r)) in enumerate(zip(members, results, strict=True)):
                rtp, rtcp = (r["rtp"], r["rtcp"]) if ok else (0, 0)
                out.append(YimaNode(i, m.address.rpartition(":")[0], rtp, rtcp))
            return out

        return DeferredList(calls, consumeErrors=True).addCallback(done)

    # --- client RTCP of relayed sessions (feedback.Relay) ---------------------------

    def session_for(self, media_ssrc: int) -> str | None:
        """The relayed session (client did not opt in to fan-out) with this SSRC."""
        for sid, plan in self.plans.items():
            if plan.ssrc == media_ssrc and not plan.fanout:
                return sid
        return None

    def nack(self, session: str, gseqs: list[int]) -> None:
        """Forward a NACK of 16-bit global seqs to the nodes (each resends what it sent)."""
        plan = self.plans.get(session)
        if plan is None or plan.relay is None:
            return
        base = plan.relay.next
        full = []
        for seq16 in gseqs[:512]:
            g = (seq16 - plan.seq_offset) & 0xFFFF
            full.append(base + ((g - base + 0x8000) & 0xFFFF) - 0x8000)
        self._nack_owners(session, plan, full)

    def _nack_owners(self, session: str, plan: _Plan, gseqs: list[int]) -> None:
        """Ask each packet's owner (the node whose share holds its block; this node for
        a share it took over) to resend it; nobody else is bothered."""
        by_owner: dict[str | None, list[int]] = {}
        for g in gseqs:
            by_owner.setdefault(self._owner(plan, g), []).append(g)
        members = {m.node_id: m.address for m in self.node.view.members}
        for owner, some in by_owner.items():
            if owner is None or (owner not in plan.takeovers and owner not in members):
                # Unknown owner (no layout) or gone and not taken over: every member.
                targets = [n for n in members if n not in plan.takeovers]
            else:
                targets = [owner]
            for node_id in targets:
                if node_id in plan.takeovers:
                    self.streaming.nack(plan.takeovers[node_id], [], some)
                elif node_id == self.node.node_id:
                    self.streaming.nack(session, [], some)
                else:
                    d = self.node.rpc.call(members[node_id], StreamNack, session=session,
                                           node_seqs=[], gseqs=some)  # fmt: skip
                    d.addErrback(lambda f: None)

    def _owner(self, plan: _Plan, gseq: int) -> str | None:
        """The node whose share holds global packet ``gseq`` (its block's first place)."""
        if plan.timing is None or self.mode != "bipartite":
            return self.node.node_id if self.mode != "bipartite" else None
        block = gseq // plan.timing.packets_per_block
        got = plan.owners.get(block)
        if got is None:
            try:
                places = self.storage.places(self.storage.media_info(plan.media), BlockKey(block))
            except Exception:
                places = []
            got = places[0].node_id if places else ""
            if len(plan.owners) >= 4096:
                plan.owners.clear()
            plan.owners[block] = got
        return got or None

    def control(self, session: str, action: str, at: float, value: float) -> None:
        """Forward flow-control feedback to every node of the session (and its takeovers)."""
        plan = self.plans.get(session)
        for local in plan.takeovers.values() if plan is not None else ():
            self.streaming.control(local, action, at, value)
        if plan is not None and plan.relay is not None:
            # The relay plays out on the nodes' schedule: it follows the same change.
            if action == "speed" and value > 0 and plan.playing:
                plan.position, plan.started_ct = self._media_position(plan, at), at
                plan.speed = value
            elif action == "pause" and plan.playing:
                plan.position = self._media_position(plan, at)
                plan.playing, plan.paused_ct = False, at
            elif action == "resume" and not plan.playing and plan.played:
                plan.started_ct, plan.playing = at, True
        for m in self.node.view.members:
            if m.node_id == self.node.node_id:
                self.streaming.control(session, action, at, value)
            elif self.mode == "bipartite":
                d = self.node.rpc.call(m.address, StreamControl, session=session, action=action,
                                       at=at, value=value)  # fmt: skip
                d.addErrback(lambda f: None)

    def touch(self, session: str) -> None:
        """Client RTCP keeps its RTSP session alive."""
        self.factory.touch(session)

    # --- IRtspHandler -------------------------------------------------------------

    def describe(self, url: str) -> Deferred[bytes]:
        """SDP of the presentation (for MPEG-TS its range ends with the last frame's
        presentation, which follows the last PCR by the mux delay)."""
        info = self._media(url)
        return self._presentation_end(info).addCallback(lambda end: self._sdp(info, end))

    def _presentation_end(self, info: MediaInfo) -> Deferred[float]:
        """Media time at which the last video frame (PCR PID) of an MPEG-TS has been
        shown: its PTS plus one frame interval, from the last two blocks (cached); the
        PCR duration when later, or for other media."""
        duration = info.duration or 0.0
        got = self._ends.get(info.name)
        if got is not None and got[0] is info:
            return succeed(got[1])
        if info.kind != KIND_TS or info.pcr_pid is None or info.pcr_origin is None:
            return succeed(duration)
        origin, pid = info.pcr_origin // 300, info.pcr_pid

        def found(data: bytes) -> float:
            pts = sorted(
                ((p.pts - origin + PTS_WRAP // 2) % PTS_WRAP - PTS_WRAP // 2) / 90000
                for p in pes_starts(data, pid)
                if p.pts is not None
            )
            end = duration
            if len(pts) >= 2:
                end = max(duration, pts[-1] + (pts[-1] - pts[-2]))
            if len(self._ends) >= 256:
                self._ends.clear()
            self._ends[info.name] = (info, end)
            return end

        # The last block may be a short tail with no video PES start: read two.
        reads = [self.storage.read_block(info.name, b)
                 for b in range(max(0, info.blocks - 2), info.blocks)]  # fmt: skip
        d: Deferred[Any] = DeferredList(reads, fireOnOneErrback=True, consumeErrors=True)
        d.addCallback(lambda results: found(b"".join(r for _, r in results)))
        d.addErrback(lambda _: duration)
        return d

    def _sdp(self, info: MediaInfo, end: float) -> bytes:
        kbps = int(info.bitrate / 1000) if info.bitrate else None
        if info.kind == KIND_WAV and info.wav is not None:
            track = l16_track(TRACK, info.wav.sample_rate, info.wav.channels)
        else:
            track = mp2t_track(TRACK, bitrate_kbps=kbps)
        desc = presentation_sdp(info.name, [track], end or info.duration,
                                origin_address=self.node.config.cluster_host)  # fmt: skip
        return serialize_sdp(desc)

    def setup(
        self, url: str, transport: TransportSpec, session: ServerSession
    ) -> Deferred[TransportSpec]:
        """Record where this session's packets go (the relay opens at PLAY)."""
        info = self._media(url)
        old = self.plans.get(session.session_id)
        if old is not None and (old.played or old.relay_port is not None):
            # Re-planning a started stream would orphan its relay socket and node shares.
            raise RtspStatusError(455, headers=(("Allow", "PLAY, PAUSE, TEARDOWN"),))
        ssrc = self.rng.getrandbits(32)
        if transport.is_tcp:
            channel = transport.interleaved[0] if transport.interleaved else 0
            plan = _Plan(info.name, "", 0, False, channel, ssrc,
                         self.rng.getrandbits(16), self.rng.getrandbits(32))  # fmt: skip
        else:
            if transport.client_port is None:
                raise RtspStatusError(461, "UDP transport needs client_port")
            # Media goes only to the RTSP client's own address (the server already
            # refused a foreign ``destination``): never to a host that did not ask.
            if session.peer is None:
                raise RtspStatusError(461, "UDP transport needs the client's address")
            plan = _Plan(info.name, session.peer, transport.client_port[0],
                         transport.yima_fanout, None, ssrc, self.rng.getrandbits(16),
                         self.rng.getrandbits(32))  # fmt: skip
        plan.extension = transport.yima_fanout  # over TCP relayed, but the client opted in
        # The relay socket is opened at the first PLAY: SETUPs never played cost no fd.
        plan.session = session
        self.plans[session.session_id] = plan
        ports = self._ports()
        reply = attrs.evolve(transport, server_port=(ports["rtp"], ports["rtcp"]), ssrc=ssrc,
                             source=self.node.config.cluster_host)  # fmt: skip
        if not plan.fanout:
            return succeed(reply)
        return self._node_ports().addCallback(
            lambda nodes: attrs.evolve(reply, yima_fanout=True, yima_nodes=tuple(nodes))
        )

    def _open_relay(self, session_id: str, plan: _Plan) -> None:
        proto = _Udp(lambda data, addr: self._relayed(session_id, data))
        try:
            listening = self.reactor.listenUDP(0, proto, interface=self.node.config.cluster_host)
        except CannotListenError as exc:
            raise RtspStatusError(503, f"no relay port: {exc}") from None
        plan.relay = Reorderer(first=0, hold=0.3, due=lambda g: self._relay_due(plan, g),
                               hold_until=lambda g: plan.hold_gaps_until)  # fmt: skip
        plan.relay_port = listening
        _big_buffers(listening)
        # This node's own packets skip the socket (two syscalls and a copy each).
        plan.relay_addr = (self.node.config.cluster_host, listening.getHost().port)  # type: ignore[attr-defined]
        self.streaming.local[plan.relay_addr] = lambda data: self._relayed(session_id, data)
        self.streaming.local_batch[plan.relay_addr] = lambda view, size: self._relayed_many(
            session_id, view, size
        )

    @staticmethod
    def _destination(plan: _Plan) -> tuple[str, int]:
        """Where the nodes send a session's packets: its relay here, or the client."""
        return plan.relay_addr if plan.relay_port is not None else (plan.dest_host, plan.dest_port)

    def relay_stats(self) -> dict[str, int]:
        """What the relays did (sessions torn down and live): forwarded, given up
        (``skipped``), asked again, shares taken over early, duplicates, late, stale."""
        total = attrs.asdict(self.relay_totals)
        for plan in self.plans.values():
            if plan.relay is not None:
                for k, v in attrs.asdict(plan.relay.stats).items():
                    total[k] += v
        return {"forwarded": total["forwarded"], "skipped": total["gaps_skipped"],
                "overdue_nacked": total["overdue_nacked"],
                "early_takeovers": total["early_takeovers"],
                "duplicates": total["duplicates"], "too_late": total["too_late"],
                "stale": total["stale"]}  # fmt: skip

    @staticmethod
    def _relay_due(plan: _Plan, gseq: int) -> float:
        """Cluster instant at which the relay forwards packet ``gseq`` (inf while paused)."""
        if plan.timing is None:
            return float("inf")
        t = plan.timing.gseq_time(gseq)
        if plan.playing:
            return plan.started_ct + (t - plan.position) / plan.speed
        # Paused (at paused_ct, at media position ``position``): what played before goes.
        return plan.paused_ct + (t - plan.position) if t < plan.position else float("inf")

    def _relayed(self, session_id: str, data: bytes) -> None:
        plan = self.plans.get(session_id)
        if plan is None or plan.relay is None:
            return
        self._forward(session_id, plan, self._relay_one(plan, data, self.node.cluster_time()))

    def _relayed_many(self, session_id: str, view: memoryview, size: int) -> None:
        """A run of this node's own packets for a relayed session, handed over in one
        call (``size``-byte datagrams, the last may be shorter): pushed in order, then
        whatever they release is forwarded as one batch."""
        plan = self.plans.get(session_id)
        if plan is None or plan.relay is None:
            return
        now = self.node.cluster_time()
        released: list[bytes] = []
        for at in range(0, len(view), size):
            released.extend(self._relay_one(plan, bytes(view[at : at + size]), now))
        self._forward(session_id, plan, released)

    def _relay_one(self, plan: _Plan, data: bytes, now: float) -> list[bytes]:
        """One node packet into the session's relay; the packets it releases."""
        assert plan.relay is not None
        if len(data) < 12:
            return []
        if int.from_bytes(data[8:12], "big") != plan.node_ssrc:
            plan.relay.stats.stale += 1  # sent for the position before a seek
            return []
        if len(data) >= 24 and data[12:14] == b"\xbe\xde" and data[16] == 0x14:
            plan.heard[data[17]] = now  # the node index in the Yima extension
        seq16 = int.from_bytes(data[2:4], "big")
        gseq = (seq16 - plan.seq_base) & 0xFFFF
        # Unwrap against what the relay expects next.
        base = plan.relay.next
        gseq = base + ((gseq - base + 0x8000) & 0xFFFF) - 0x8000
        if gseq < base and data[22:24] == RETRANSMISSION_MARK:
            self._forward_late(plan, data)  # a NACKed packet the relay gave up on
            return []
        return plan.relay.push(gseq, data, now)

    def _to_client(self, plan: _Plan, data: bytes) -> bytes:
        """A node's packet as this session's client gets it: its own sequence numbers
        and SSRC; the Yima extension only if it opted in."""
        seq = int.from_bytes(data[2:4], "big") - plan.seq_base + plan.seq_offset
        return rewrite(data, seq, plan.ssrc.to_bytes(4, "big"), plan.extension)

    def _forward_late(self, plan: _Plan, data: bytes) -> None:
        data = self._to_client(plan, data)
        if plan.tcp_channel is not None:
            if plan.session is not None:
                plan.session.send_interleaved(plan.tcp_channel, data)
        else:
            self._send(data, (plan.dest_host, plan.dest_port))

    def _forward(self, session_id: str, plan: _Plan, packets: list[bytes]) -> None:
        packets = [self._to_client(plan, d) for d in packets]
        if packets:
            last = packets[-1]
            plan.packets += len(packets)
            plan.octets += sum(len(d) - _header_length(d) for d in packets)
            plan.last_rtp_ts = int.from_bytes(last[4:8], "big")
            plan.last_sent_at = self.reactor.seconds()
        if packets:
            if plan.tcp_channel is not None:
                if plan.session is not None:  # one transport write for the batch
                    send_interleaved_many(plan.session, plan.tcp_channel, packets)
            else:
                self._send_batch(packets, (plan.dest_host, plan.dest_port))
        done = plan.relay is not None and plan.total and plan.relay.next >= plan.total
        if done and plan.bye_timer is None and not plan.bye_sent:
            plan.bye_timer = self.reactor.callLater(BYE_GRACE, self._bye, plan)
        if plan.relay is not None:
            deadline = plan.relay.next_deadline()
            active = plan.relay_timer is not None and plan.relay_timer.active()
            if active and deadline is not None and plan.relay_timer_at is not None:
                if plan.relay_timer_at <= deadline:
                    return  # the timer set runs first anyway
            if active:
                plan.relay_timer.cancel()  # type: ignore[union-attr]
            plan.relay_timer = plan.relay_timer_at = None
            if deadline is not None:
                delay = max(0.0, deadline - self.node.cluster_time())
                plan.relay_timer_at = deadline
                plan.relay_timer = self.reactor.callLater(delay, self._relay_tick, session_id)

    def _relay_tick(self, session_id: str) -> None:
        plan = self.plans.get(session_id)
        if plan is None or plan.relay is None:
            return
        plan.relay_timer = plan.relay_timer_at = None
        # Packets due within SEND_AHEAD go together (one wake-up and one send, not
        # one per packet).
        self._forward(session_id, plan, plan.relay.tick(self.node.cluster_time() + SEND_AHEAD))

    def _watch(self, session_id: str) -> None:
        """Look for overdue packets of a relayed session: ask their owner again at once;
        an owner still silent after that has its share served here, from parity, before
        the membership notices it is gone (and it is told to stop, should it wake up)."""
        plan = self.plans.get(session_id)
        if plan is None or plan.relay is None or plan.bye_sent:
            return
        plan.watch_timer = self.reactor.callLater(WATCH_INTERVAL, self._watch, session_id)
        now = self.node.cluster_time()
        if not plan.playing or plan.timing is None or now < plan.watch_from:
            return
        # Every packet the nodes should have sent more than OVERDUE ago.
        horizon = plan.position + plan.lead + (now - plan.started_ct - OVERDUE) * plan.speed
        upto = min(plan.timing.first_gseq_at(horizon), plan.total)
        missing = plan.relay.missing(upto)
        for g in [g for g in plan.nacked if g < plan.relay.next]:
            del plan.nacked[g]
        if not missing:
            return
        fresh = [g for g in missing if g not in plan.nacked]
        if fresh:
            for g in fresh:
                plan.nacked[g] = now
            plan.relay.stats.overdue_nacked += len(fresh)
            self._nack_owners(session_id, plan, fresh)
        if self.mode != "bipartite":
            return
        info = self.storage.media_info(plan.media)
        if not info.parity_group:
            return  # nothing to rebuild from: the membership decides (BYE)
        for g in missing:
            if now - plan.nacked[g] < RETRY:
                continue
            node_id = self._owner(plan, g)
            if node_id is None or node_id == self.node.node_id or node_id in plan.takeovers:
                continue
            if node_id not in plan.members:
                continue
            heard = plan.heard.get(plan.members.index(node_id))
            if heard is not None and now - heard < SILENT:
                continue
            self.log.warn("rtsp: {n} is silent on {s} ({k} packets overdue): serving its "
                          "share from parity", n=node_id, s=session_id, k=len(missing))  # fmt: skip
            self.suspects[node_id] = now + SUSPECT_FOR
            plan.relay.stats.early_takeovers += 1
            self._take_over(session_id, plan, node_id, early=True)

    def _send_rtcp(self, plan: _Plan, data: bytes) -> None:
        if plan.tcp_channel is not None:
            if plan.session is not None:
                plan.session.send_interleaved(plan.tcp_channel + 1, data)
        else:
            self._send(data, (plan.dest_host, plan.dest_port + 1))

    def _sender_report(self, plan: _Plan) -> bytes:
        """SR + SDES CNAME (a compound packet, RFC 3550 §6.1) for the relayed stream.

        The RTP timestamp is the last forwarded packet's, advanced by the wall
        time since it was sent while playing, so players can map RTP to NTP time.
        """
        now = self.reactor.seconds()
        rtp_ts = plan.last_rtp_ts or plan.ts_base
        if plan.playing and plan.last_rtp_ts is not None:
            rtp_ts += round((now - plan.last_sent_at) * plan.clock_rate)
        cname = f"yima@{self.node.config.cluster_host}".encode()
        return serialize_rtcp((
            SenderReport(plan.ssrc, ntp_timestamp(now), rtp_ts & 0xFFFFFFFF,
                         plan.packets & 0xFFFFFFFF, plan.octets & 0xFFFFFFFF),
            SourceDescription((SdesChunk(plan.ssrc, ((SdesItem.CNAME, cname),)),)),
        ))  # fmt: skip

    def _sr_tick(self, session_id: str) -> None:
        plan = self.plans.get(session_id)
        if plan is None or plan.bye_sent:
            return
        if plan.packets:
            try:
                self._send_rtcp(plan, self._sender_report(plan))
            except Exception:
                self.log.failure("rtsp: sender report for {s} failed", s=session_id)
        plan.sr_timer = self.reactor.callLater(SR_INTERVAL, self._sr_tick, session_id)

    def _bye(self, plan: _Plan, reason: bytes = b"end of stream") -> None:
        """RTCP BYE (after the last packet, or when the stream cannot go on), so
        players end the stream."""
        if plan.bye_sent:
            return
        plan.bye_sent = True
        data = self._sender_report(plan) + serialize_rtcp(Bye((plan.ssrc,), reason[:255]))
        self._send_rtcp(plan, data)

    def _share_lost(self, sid: str, plan: _Plan, node_id: str) -> None:
        """A node left and its blocks have no parity: say so (RTCP BYE with the reason,
        so players end the stream rather than play one with holes) and stop every node."""
        self.lost_sessions += 1
        self.log.warn("rtsp: {n} left and {m} has no parity: ending {s}",
                      n=node_id, m=plan.media, s=sid)  # fmt: skip
        self._bye(plan, f"node {node_id} left; {plan.media} has no parity".encode())
        self._control(sid, "stop", 0.0)

    def _timing_ready(self, name: str) -> Deferred[MediaTiming]:
        """The media's time index loaded (from disk or a peer) and its timing computed,
        both off the reactor (the timing is computed once per catalog entry)."""

        def computed(info: MediaInfo) -> MediaTiming | Deferred[MediaTiming]:
            got = _TIMINGS.get(id(info))
            if got is not None and got[0] is info:
                return got[1]
            d: Deferred[MediaTiming] = self.storage.run_blocking(_media_timing, info)

            def keep(timing: MediaTiming) -> MediaTiming:
                if len(_TIMINGS) >= 256:
                    _TIMINGS.clear()
                _TIMINGS[id(info)] = (info, timing)
                return timing

            return d.addCallback(keep)

        loaded: Deferred[MediaInfo] = maybeDeferred(self.storage.time_index, name)
        return loaded.addCallback(computed)

    def play(self, session: ServerSession, range: NptRange | None) -> Deferred[PlayReply]:
        """Start, resume, or seek (a Range with a start, in Ready or Playing) on every node.

        The first packet is found by bisection in the media's time index (loaded
        and prepared off the reactor); the reply's RTP-Info names that packet's
        sequence number and timestamp.
        """
        plan = self.plans[session.session_id]
        self._media(plan.media)  # 404/415 at once
        ready = self._timing_ready(plan.media)
        now: list[Any] = []

        def grab(result: Any) -> Any:
            now.append(result)
            return result

        ready.addBoth(grab)
        if not now:  # being loaded: answer when it is
            return ready.addCallback(lambda timing: self._play(session, range, timing))
        # Loaded already (the usual case: loaded when the catalog record arrived): go on
        # in this call, so a refusal is raised here.
        ready.addErrback(lambda _: None)
        if isinstance(now[0], Failure):
            now[0].raiseException()
        return self._play(session, range, now[0])

    def _play(
        self, session: ServerSession, range: NptRange | None, timing: MediaTiming
    ) -> Deferred[PlayReply]:
        sid = session.session_id
        plan = self.plans.get(sid)
        if plan is None:
            raise RtspStatusError(454, "session torn down while loading the time index")
        info = self._media(plan.media)
        if not plan.fanout and plan.relay_port is None:
            self._open_relay(sid, plan)
        at = self.node.cluster_time() + START_LEAD
        seek = range is not None and range.start is not None
        if plan.played and not seek:
            d: Deferred[Any] = succeed(None)
            if not plan.playing:  # resume where PAUSE stopped
                plan.started_ct, plan.playing = at, True
                # (A PAUSE that overtook a PLAY's start left the overdue watch waiting.)
                plan.watch_from = min(plan.watch_from, at + OVERDUE)
                d = self._control(sid, "resume", at)
            if plan.relay is not None:
                # The next packet the relay forwards (it stopped at PAUSE, or goes on);
                # its timer, idle while paused, is armed for it (the nodes may have
                # nothing more to send: the rest of the title is held already).
                first = plan.relay.next
                self._forward(sid, plan, [])
            else:
                first = timing.first_gseq_at(self._media_position(plan, at))
            return d.addCallback(lambda _: self._play_reply(plan, info, timing, first))
        start_mt = range.start if range is not None and range.start is not None else 0.0
        if info.kind == KIND_TS and lavf_quirk(session.user_agent):
            start_mt = lavf_npt(info, start_mt)
        duration = info.duration or timing.duration
        if duration > 0 and start_mt > duration:
            raise RtspStatusError(
                457, f"Invalid Range: npt={start_mt:g}- starts past the end ({duration:.3f} s)"
            )
        if plan.played and plan.relay is not None:
            # Seeking a started stream: the client gets nothing more of the old position
            # while the keyframe is looked up (its numbers go on from relay.next).
            plan.node_ssrc = (plan.node_ssrc + 1 + self.rng.getrandbits(31)) & 0xFFFFFFFF
            plan.relay.reset(plan.relay.next)
            if plan.relay_timer is not None and plan.relay_timer.active():
                plan.relay_timer.cancel()
            # Nor is anything of it overdue: the watch waits for the new position's
            # nodes (it would otherwise ask the owners for the whole old lead, and take
            # over every node it no longer hears, the old packets being stale now).
            plan.watch_from = float("inf")
            plan.nacked.clear()
        if info.kind == KIND_TS and start_mt > 0:
            found = self._keyframe_start(info, timing, start_mt)
        else:
            found = succeed(None)
        return found.addCallback(lambda kf: self._seek(sid, plan, info, timing, start_mt, kf))

    def _seek(
        self,
        sid: str,
        plan: _Plan,
        info: MediaInfo,
        timing: MediaTiming,
        start_mt: float,
        keyframe: tuple[int, float] | None,
    ) -> Deferred[PlayReply]:
        """Start every node from ``start_mt`` or, for MPEG-TS, from the packet
        ``keyframe`` names (``(gseq, media time of the keyframe)``)."""
        if self.plans.get(sid) is not plan:
            raise RtspStatusError(454, "session torn down while seeking")
        now = self.node.cluster_time()
        at = now + START_LEAD
        shown: float | None = None
        if keyframe is not None:
            first, shown = keyframe
            start_mt = timing.gseq_time(first)  # the nodes' first packet is exactly ``first``
        else:
            first = timing.first_gseq_at(start_mt)
        seeking = plan.played
        if plan.relay is not None:
            # Quick start with the full lead: the nodes' schedule is anchored RELAY_LEAD
            # in the past, so they send the first RELAY_LEAD seconds at once (a burst to
            # the relay) and the rest RELAY_LEAD ahead of playout; the relay plays out
            # from the PLAY reply (``started`` moves the playout instant there: every
            # node has started by then), not RELAY_LEAD + START_LEAD after it.  Until
            # the reply, the playout instant is the latest it can be (``at``) and the
            # overdue watch waits (``watch_from``).
            plan.lead = at - (now - RELAY_LEAD)
            plan.watch_from = float("inf")
            # A gap in the burst (a share still on its way) is held the whole lead,
            # never given up because the packets after it are all due at once.
            plan.hold_gaps_until = at + plan.lead
        plan.position, plan.started_ct, plan.playing, plan.played = start_mt, at, True, True
        plan.speed = 1.0  # the nodes start the new position at real time
        plan.total = timing.total
        plan.clock_rate = timing.clock_rate
        plan.timing = timing
        plan.nacked.clear()
        plan.owners.clear()
        if plan.relay is not None:
            if plan.watch_timer is None or not plan.watch_timer.active():
                plan.watch_timer = self.reactor.callLater(WATCH_INTERVAL, self._watch, sid)
            if seeking:
                # The client's numbers go on by one from the last the relay handed it.
                plan.seq_offset += plan.relay.next - first
                if plan.last_rtp_ts is not None:
                    # Its RTP timestamps go on with wall time (as live555's and
                    # gst-rtsp-server's do), never back: a packet of the old position
                    # read after the player's flush (UDP) then precedes the new clock
                    # base, where GStreamer would take it as media played past the new
                    # start and end the stream that much early (its NPT-stop estimate).
                    since = max(0.0, self.reactor.seconds() - plan.last_sent_at)
                    step = max(1, round(since * timing.clock_rate))
                    now_first = rtp_time(info, timing, first, plan.ts_base)
                    plan.ts_base = (plan.ts_base + plan.last_rtp_ts + step - now_first) & 0xFFFFFFFF
                plan.node_ssrc = (plan.node_ssrc + 1 + self.rng.getrandbits(31)) & 0xFFFFFFFF
                if plan.relay_timer is not None and plan.relay_timer.active():
                    plan.relay_timer.cancel()
                if plan.bye_timer is not None and plan.bye_timer.active():
                    plan.bye_timer.cancel()
                plan.bye_timer, plan.bye_sent = None, False
            plan.relay.reset(first)
            if plan.sr_timer is None or not plan.sr_timer.active():
                plan.sr_timer = self.reactor.callLater(1.0, self._sr_tick, sid)
            if first >= plan.total:  # a seek to the very end: nothing to send, say so
                self._forward(sid, plan, [])
        d = DeferredList(self._start_everywhere(sid, plan, at, start_mt), consumeErrors=True)

        def started(results: list[tuple[bool, Any]]) -> PlayReply:
            failed = [r for ok, r in results if not ok]
            if len(failed) == len(results):
                raise RtspStatusError(503, "no node could start the stream")
            for f in failed:
                self.log.warn("rtsp: a node did not start {s}: {e}", s=sid,
                              e=f.getErrorMessage())  # fmt: skip
            if plan.relay is not None and plan.started_ct == at and plan.playing:
                self._play_out_now(sid, plan)
            return self._play_reply(plan, info, timing, first, shown)

        return d.addCallback(started)

    def _play_out_now(self, sid: str, plan: _Plan) -> None:
        """Every node has started a relayed PLAY: the relay's playout starts now (the
        lead shrinks by what is left of the provisional wait, to RELAY_LEAD plus the
        time the nodes took to start) and the overdue watch begins.  The relay's next
        release is a timer, so it follows the PLAY reply."""
        now = self.node.cluster_time()
        if now < plan.started_ct:
            plan.lead -= plan.started_ct - now
            plan.started_ct = now
        # A gap in the burst is waited for as long as any packet: the lead from now.
        plan.hold_gaps_until = now + plan.lead
        # The burst (everything the nodes' schedule has due by now) is overdue OVERDUE
        # after the nodes started, like any packet OVERDUE after its send time.
        plan.watch_from = now + OVERDUE
        self._forward(sid, plan, [])  # re-arms the relay timer for the new deadline

    @inlineCallbacks
    def _keyframe_start(
        self, info: MediaInfo, timing: MediaTiming, target: float
    ) -> Generator[Deferred[Any], Any, tuple[int, float] | None]:
        """The packet to start an MPEG-TS seek to ``target`` from: the last PAT before the
        last random access point of the PCR PID whose PTS is at or before ``target``
        (both on the media timeline: PTS less the first PCR), and that keyframe's time.

        Reads blocks backwards from the one playing at ``target`` (a keyframe's bytes
        arrive before it is presented), at most :data:`KEYFRAME_SEARCH_BLOCKS` of them;
        None when there is no such keyframe (the plain time seek is used).
        """
        if info.pcr_pid is None or info.pcr_origin is None or not timing.blocks:
            return None
        run = self.storage.run_blocking
        block = max(0, bisect_right(timing.block_starts, target) - 1)  # O(log blocks)
        found: tuple[int, int, float] | None = None
        data = prev = b""
        for b in range(block, max(-1, block - KEYFRAME_SEARCH_BLOCKS), -1):
            try:
                data = yield self.storage.read_block(info.name, b)
            except Exception:
                self.log.failure("rtsp: seek in {m}: block {b} unreadable", m=info.name, b=b)
                return None
            # Scanning a block's packets is CPU work: in the pool, never on the reactor.
            hit = yield run(_last_keyframe, info, data, target)
            if hit is not None:
                found = (b, *hit)
                break
        if found is None:
            return None
        b, offset, shown = found
        pat = yield run(last_pat_before, data, offset)
        if pat is None and b > 0:  # the PAT/PMT went out at the end of the previous block
            try:
                prev = yield self.storage.read_block(info.name, b - 1)
            except Exception:
                prev = b""
            before = (yield run(last_pat_before, prev, len(prev))) if prev else None
            if before is not None:
                b, pat, data = b - 1, before, prev  # time it from that block's PCRs
        start = offset if pat is None else pat
        shown = yield run(self._pcr_time, info, data, start - start % timing.payload, shown)
        return b * timing.packets_per_block + start // timing.payload, shown

    @staticmethod
    def _pcr_time(info: MediaInfo, data: bytes, at: int, default: float) -> float:
        """Media time of byte ``at`` of ``data`` from the next PCR after it (exact,
        where the time index interpolates over a whole block); ``default`` if none."""
        assert info.pcr_origin is not None
        for k in range(at, len(data) - TS_PACKET + 1, TS_PACKET):
            found = packet_pcr(data, k)
            if found is not None and found[0] == info.pcr_pid:
                rel = (found[1] - info.pcr_origin) % PCR_WRAP
                return 0.0 if rel >= PCR_WRAP // 2 else rel / PCR_HZ
        return default

    def _start_everywhere(
        self, sid: str, plan: _Plan, at: float, start_mt: float
    ) -> list[Deferred[Any]]:
        """StreamStart on every node of the session (and its local takeovers), from ``start_mt``.

        Node indices are those of the first PLAY, so a seek after a takeover keeps
        every node's (and the taken share's) number.
        """
        members = {m.node_id: m for m in self.node.view.members}
        if not plan.members:
            plan.members = tuple(members)
        me = self.node.node_id
        dest_host, dest_port = self._destination(plan)
        common: dict[str, Any] = dict(media=plan.media, start_ct=at - plan.lead,
                                      start_mt=start_mt, host=dest_host, port=dest_port,
                                      ssrc=plan.node_ssrc, seq_base=plan.seq_base,
                                      ts_base=plan.ts_base)  # fmt: skip
        calls: list[Deferred[Any]] = []
        for i, node_id in enumerate(plan.members):
            m = members.get(node_id)
            if m is None or (self.mode == "master-slave" and node_id != me):
                continue
            if node_id in plan.takeovers:
                continue  # taken over early (silent, not yet gone): served here
            kwargs = dict(common, session=sid, node_index=i,
                          all_blocks=self.mode == "master-slave")  # fmt: skip
            if node_id == me:
                calls.append(maybeDeferred(self.streaming.start, **kwargs))
            else:
                # The RTSP node's id: should it leave, the node stops this share.
                calls.append(self.node.rpc.call(m.address, StreamStart, origin=me, **kwargs))
        for node_id, local in plan.takeovers.items():
            served = self.streaming.scheduler.sessions.get(local)
            if served is not None:
                blocks = list(served.my_blocks)
            else:
                info = self.storage.media_info(plan.media)
                blocks = [i for i in range(info.blocks)
                          if (p := self.storage.places(info, BlockKey(i))) and p[0].node_id == node_id]  # fmt: skip
            index = plan.takeover_index.setdefault(
                node_id, len(plan.members) + len(plan.takeover_index)
            )
            kwargs = dict(common, session=local, node_index=index,
                          all_blocks=False, blocks=blocks)  # fmt: skip
            calls.append(maybeDeferred(self.streaming.start, **kwargs))
        return calls

    def _play_reply(
        self,
        plan: _Plan,
        info: MediaInfo,
        timing: MediaTiming,
        first: int,
        shown: float | None = None,
    ) -> PlayReply:
        """Range from the first packet's media time (for an MPEG-TS seek ``shown``, that
        of the PAT before the keyframe by the next PCR: players such as GStreamer time
        the stream from it); RTP-Info with the absolute URL and that packet's sequence
        number (as the client gets it) and timestamp."""
        duration = info.duration or timing.duration
        start = min(timing.gseq_time(first), duration) if first < timing.total else duration
        end = self._ends.get(info.name)
        if end is not None and end[0] is info:
            duration = end[1]
        if shown is not None:
            start = min(shown, duration)
        offset = plan.seq_base if plan.relay is None else plan.seq_offset
        rtptime = rtp_time(info, timing, first, plan.ts_base)
        return PlayReply(NptRange(round(start, 3), duration),
                         (RtpInfo(self._track_url(plan), (first + offset) & 0xFFFF, rtptime),))  # fmt: skip

    def _track_url(self, plan: _Plan) -> str:
        """The stream's absolute URL as the client set it up (players match RTP-Info
        against their control URL and ignore a relative one)."""
        if plan.session is not None and plan.session.streams:
            return next(iter(plan.session.streams))
        host, port = self.node.config.cluster_host, 554
        if self.rtsp_port is not None:
            port = self.rtsp_port.getHost().port  # type: ignore[attr-defined]
        host = f"[{host}]" if ":" in host else host
        return f"rtsp://{host}:{port}/{plan.media}/{TRACK}"

    def _control(self, session_id: str, action: str, at: float) -> Deferred[Any]:
        plan = self.plans.get(session_id)
        for local in plan.takeovers.values() if plan is not None else ():
            self.streaming.control(local, action, at, 0.0)
        calls = []
        for m in self.node.view.members:
            if m.node_id == self.node.node_id:
                self.streaming.control(session_id, action, at, 0.0)
            elif self.mode == "bipartite":
                calls.append(self.node.rpc.call(m.address, StreamControl, session=session_id,
                                                action=action, at=at, value=0.0))  # fmt: skip
        return DeferredList(calls, consumeErrors=True)

    def pause(self, session: ServerSession) -> Deferred[NptRange | None]:
        """Pause on every node at one cluster instant; answers the Range from the pause point."""
        plan = self.plans.get(session.session_id)
        now = self.node.cluster_time()
        at = now + 0.05
        if plan is not None and plan.playing:
            if plan.relay is not None:
                # The relay stops now, before the reply (RFC 2326 §10.6: a PAUSE without
                # Range halts delivery at once): a player flushes at PAUSE, and GStreamer
                # takes a frame of the old position that follows the reply as the timing
                # base of the next PLAY's, corrupting what it decodes after a seek.  What
                # fell due by now goes first; the nodes stop at ``at`` (the relay holds
                # what they send meanwhile, a slightly longer lead on resume).
                plan.position = self._media_position(plan, now)
                plan.playing, plan.paused_ct = False, now
                self._forward(session.session_id, plan, plan.relay.tick(now))
            else:
                plan.position = self._media_position(plan, at)
                plan.playing, plan.paused_ct = False, at

        def paused(_: Any) -> NptRange | None:
            if plan is None:
                return None
            duration = self.storage.media_info(plan.media).duration
            return NptRange(round(plan.position, 3), duration)

        return self._control(session.session_id, "pause", at).addCallback(paused)

    @staticmethod
    def _media_position(plan: _Plan, at: float) -> float:
        """Media time playing at cluster time ``at`` (ignoring client speed feedback)."""
        if not plan.playing:
            return plan.position
        return plan.position + max(0.0, at - plan.started_ct) * plan.speed

    # --- sessions follow membership ----------------------------------------------

    def membership_changed(self, old: View, new: View) -> None:
        """Serve the remaining share of every node that left a session this node planned.

        Bipartite mode only (a master reads a lost slave's blocks through parity
        anyway): this node schedules the departed node's blocks from the current
        media position, reading them with parity recovery, under the departed
        node's index.  Packets it would have sent between its death and the new
        view are lost (the player's retransmission cannot reach a dead node).
        """
        gone = {m.node_id for m in old.members} - {m.node_id for m in new.members}
        if not gone:
            return
        for node_id in gone:
            self.suspects.pop(node_id, None)  # gone for good: reads skip it anyway
        # Shares of sessions whose RTSP node left: nobody relays or plans them any more.
        for session, origin in list(self.streaming.origins.items()):
            if origin in gone:
                self.orphans_stopped += 1
                self.log.info("rtsp: {o} left; stopping its session {s} here", o=origin,
                              s=session)  # fmt: skip
                self.streaming.control(session, "stop", 0.0, 0.0)
        for sid, plan in list(self.plans.items()):
            if not plan.played or plan.bye_sent:
                continue
            for node_id in sorted(gone & set(plan.members)):
                if self.mode != "bipartite":
                    # The master reads a lost slave's blocks through parity; without
                    # parity the stream cannot go on whole: the same BYE as bipartite.
                    if not self.storage.media_info(plan.media).parity_group:
                        self._share_lost(sid, plan, node_id)
                        break
                    continue
                if node_id not in plan.takeovers:
                    try:
                        self._take_over(sid, plan, node_id)
                    except Exception:
                        self.log.failure("rtsp: taking over {n}'s share of {s} failed",
                                         n=node_id, s=sid)  # fmt: skip

    def handover(self, media_ssrc: int, node_index: int, gseq: int) -> None:
        """A fan-out player hears nothing from the node holding global packet ``gseq``
        (node ``node_index``; 0xFFFFFFFF: it does not know) while it is overdue (YIMA
        HANDOVER): serve that node's share here, from parity, from that packet on,
        without waiting for the membership to notice."""
        for sid, plan in list(self.plans.items()):
            if plan.ssrc != media_ssrc or not plan.fanout or not plan.played:
                continue
            if plan.bye_sent or plan.timing is None or not 0 <= gseq < plan.timing.total:
                continue
            node_id = self._owner(plan, gseq)
            if node_id is None and 0 <= node_index < len(plan.members):
                node_id = plan.members[node_index]
            if node_id is None or node_id == self.node.node_id or node_id in plan.takeovers:
                continue
            if node_id not in plan.members:
                continue
            if self.mode != "bipartite" or not self.storage.media_info(plan.media).parity_group:
                continue
            self.log.warn("rtsp: the player of {s} hears nothing from {n}: serving its share "
                          "from parity", s=sid, n=node_id)  # fmt: skip
            self.suspects[node_id] = self.node.cluster_time() + SUSPECT_FOR
            self.early_handovers += 1
            self._take_over(sid, plan, node_id, early=True,
                            from_mt=plan.timing.gseq_time(gseq))  # fmt: skip

    def _take_over(
        self, sid: str, plan: _Plan, node_id: str, early: bool = False,
        from_mt: float | None = None,
    ) -> None:  # fmt: skip
        info = self.storage.media_info(plan.media)
        if info.parity_group == 0:
            self._share_lost(sid, plan, node_id)
            return
        # The taken share gets a node index of its own (past the members' and earlier
        # takeovers'), so its per-node numbering starts afresh for the player.
        plan.takeover_index.setdefault(node_id, len(plan.members) + len(plan.takeover_index))
        plan.takeovers[node_id] = f"{sid}+{node_id}"
        if early:
            # Silent, not (yet) gone: should it wake up, it stops sending this share.
            for m in self.node.view.members:
                if m.node_id == node_id:
                    d = self.node.rpc.call(m.address, StreamControl, session=sid,
                                           action="stop", at=0.0, value=0.0)  # fmt: skip
                    d.addErrback(lambda f: None)
        # The dead node's blocks, from the cached layout (computed off the reactor on a miss).
        d = self.storage.blocks_of_node(plan.media, node_id)
        d.addCallback(lambda blocks: self._serve_share(sid, plan, node_id, blocks, from_mt))
        d.addErrback(lambda f: self.log.failure("rtsp: taking over {n}'s share of {s} failed",
                                                f, n=node_id, s=sid))  # fmt: skip

    def _serve_share(
        self, sid: str, plan: _Plan, node_id: str, blocks: list[int],
        from_mt: float | None = None,
    ) -> None:  # fmt: skip
        """Schedule ``node_id``'s blocks here, on the session's own schedule, from the
        first packet the relay (or the fan-out player) still lacks: what is overdue goes
        at once (rebuilt from parity), the rest when due."""
        if self.plans.get(sid) is not plan or plan.bye_sent:
            return  # torn down meanwhile
        now = self.node.cluster_time()
        if from_mt is not None:
            mt = from_mt
        elif plan.relay is not None and plan.timing is not None:
            mt = plan.timing.gseq_time(plan.relay.next)
        else:
            # A fan-out player buffers ahead: resend a little of what was lost.
            mt = max(0.0, self._media_position(plan, now) - (0.5 if plan.fanout else 0.0))
        own = self.streaming.scheduler.sessions.get(sid)
        if own is not None and not own.paused:
            start_ct, speed = own.deadline(mt), own.speed  # this node's live schedule
        else:
            start_ct, speed = plan.started_ct - plan.lead + (mt - plan.position), 1.0
        host, port = self._destination(plan)
        local = f"{sid}+{node_id}"
        plan.takeovers[node_id] = local
        self.streaming.start(session=local, media=plan.media, start_ct=start_ct, start_mt=mt,
                             host=host, port=port, ssrc=plan.node_ssrc, seq_base=plan.seq_base,
                             ts_base=plan.ts_base, node_index=plan.takeover_index[node_id],
                             all_blocks=False, blocks=blocks)  # fmt: skip
        if speed != 1.0:
            self.streaming.control(local, "speed", now, speed)
        if not plan.playing:
            self.streaming.control(local, "pause", 0.0, 0.0)
        self.log.info("rtsp: {me} serves {n}'s {k} blocks of {s} from {mt:.1f} s as node {i}",
                      n=node_id, me=self.node.node_id, k=len(blocks), s=sid, mt=mt,
                      i=plan.takeover_index[node_id])  # fmt: skip

    def teardown(self, session: ServerSession) -> Deferred[Any]:
        """Stop every node's share and free the relay."""
        plan = self.plans.pop(session.session_id, None)
        if plan is not None and plan.relay_port is not None:
            self.streaming.local.pop(plan.relay_addr, None)
            self.streaming.local_batch.pop(plan.relay_addr, None)
            plan.relay_port.stopListening()
            if plan.relay_timer is not None and plan.relay_timer.active():
                plan.relay_timer.cancel()
        if plan is not None and plan.relay is not None:
            for k, v in attrs.asdict(plan.relay.stats).items():
                setattr(self.relay_totals, k, getattr(self.relay_totals, k) + v)
        for local in plan.takeovers.values() if plan is not None else ():
            self.streaming.control(local, "stop", 0.0, 0.0)  # shares served here for others
        if plan is not None:
            for timer in (plan.sr_timer, plan.bye_timer, plan.watch_timer):
                if timer is not None and timer.active():
                    timer.cancel()
            if not plan.played:
                return succeed(None)  # never played: no node has anything to stop
        return self._control(session.session_id, "stop", 0.0)

    def get_parameter(self, session: ServerSession | None, body: bytes) -> bytes:
        """Keep-alive."""
        return b""

    def set_parameter(self, session: ServerSession | None, body: bytes) -> bytes:
        """Accepted and ignored."""
        return b""

    def interleaved_received(self, session: ServerSession, channel: int, data: bytes) -> None:
        """Client RTCP over TCP: keeps the session alive; NACKs and feedback as over UDP."""
        if channel % 2:
            self.feedback.datagram(data, None)
