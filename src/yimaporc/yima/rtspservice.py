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

The session planner (PLAY, seek, PAUSE), the relay and RTCP live in mixins of
:class:`YimaStreamingService` (``_rtsp_play``, ``_rtsp_relay``, ``_rtsp_rtcp``), the
per-session record and tunables in ``_rtsp_plan``; this module is the service's face.
"""

from __future__ import annotations

import random
import socket
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._reactor import INodeReactor
from ..cluster.membership import IMembershipListener, Member
from ..cluster.node import CannotStart, ClusterNode, IReady
from ..rtp import RtpHeaderTemplate
from ..rtsp import IRtspHandler, RtspServerFactory, RtspStatusError, YimaNode
from ..rtsp._machine import ServerSession, same_host
from ..rtsp._wire import TransportSpec
from ..rtsp.sdp import l16_track, mp2t_track, presentation_sdp, serialize_sdp
from ._relay_clock import RelayClock
from ._rtsp_plan import (
    OVERDUE,
    RELAY_LEAD,
    SEND_AHEAD,
    TRACK,
    _big_buffers,
    _Plan,
    _Udp,
    lavf_npt,
    lavf_quirk,
    media_timing,
    rtp_time,
)
from ._rtsp_play import PlayMixin
from ._rtsp_relay import RELAY_BATCH, RelayMixin
from ._rtsp_rtcp import RtcpMixin
from ._rtsp_send import SendMixin
from .control import StreamAction
from .feedback import FeedbackReceiver, StreamPorts
from .interfaces import IMediaStorage
from .media import (
    KIND_TS,
    KIND_WAV,
    PTS_WRAP,
    MediaInfo,
    WavFormat,
    pes_starts,
)
from .relay import RelayStats
from .sendpath import DatagramSender
from .store import BlockKey
from .streaming import DEFAULT_CACHE_BYTES, StreamingNode
from .workers import ShardedStreamingNode, make_pool

if TYPE_CHECKING:
    from ._rtsp_host import StreamingHost

# The names tests and embedders import from here (they live in _rtsp_plan).
__all__ = [
    "OVERDUE",
    "RELAY_LEAD",
    "YimaStreamingService",
    "lavf_npt",
    "lavf_quirk",
    "media_timing",
    "rtp_time",
]


@implementer(IRtspHandler, IMembershipListener, IReady)
class YimaStreamingService(PlayMixin, RelayMixin, RtcpMixin, SendMixin, Service):
    """RTSP + RTP delivery of one node (every node runs one)."""

    log = Logger()

    def __init__(
        self,
        node: ClusterNode,
        reactor: INodeReactor,
        storage: IMediaStorage,
        *,
        rtsp_endpoint: str | None,
        mode: str = "bipartite",
        rng: random.Random | None = None,
        rtsp_guards: dict[str, Any] | None = None,
        send_path: str = "auto",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        send_ahead: float = SEND_AHEAD,
        relay_send_ahead: float = SEND_AHEAD,
        relay_batch: float = RELAY_BATCH,
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
        #: A relay release takes what falls due within this (``--relay-send-ahead-ms``);
        #: the relayed sessions' releases share one reactor timer (._relay_clock).
        self.relay_send_ahead = relay_send_ahead
        #: Seconds of a relayed session's packets the nodes send at once
        #: (``--relay-batch-ms``, told them in StreamStart); 0: their own send-ahead.
        self.relay_batch = relay_batch
        self.relay_clock = RelayClock(
            reactor,
            lambda: self.node.cluster_time(),
            lambda sid: self._relay_tick(sid),
            relay_send_ahead,
        )
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
        #: StreamPorts answers per member (:meth:`_node_ports`), and how often one
        #: was used instead of asking again.
        self._member_ports: dict[Member, dict[str, int]] = {}
        self.port_answers_reused = 0
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

    def _cannot_listen(self, failure: Failure) -> None:
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
        self.relay_clock.stop()
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
                                             "engine_ticks": self.streaming.engine.ticks,
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
            late_starts_dropped=self.streaming.late_starts_dropped,
            port_answers_reused=self.port_answers_reused,
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

    def _ports(self) -> dict[str, int]:
        """StreamPorts: this node's RTP source port and RTCP port."""
        rtp = self.data_port.getHost().port if self.data_port is not None else 0  # type: ignore[attr-defined]
        rtcp = self.rtcp_port.getHost().port if self.rtcp_port is not None else 0  # type: ignore[attr-defined]
        return {"rtp": rtp, "rtcp": rtcp}

    def _node_ports(self) -> Deferred[list[YimaNode]]:
        """Every member's index, host and RTP/RTCP ports (asked over RPC, 2 s at most).

        A member's answer is kept for that member (id, address and boot number: its
        ports do not change while it runs), so a fan-out SETUP asks only members not
        asked yet, instead of every node once per session.
        """
        members = list(self.node.view.members)
        known = self._member_ports
        if len(known) > 4 * len(members) + 16:  # members gone or rebooted
            for old in set(known) - set(members):
                del known[old]
        calls: list[Deferred[Any]] = []
        for m in members:
            if m.node_id == self.node.node_id:
                calls.append(maybeDeferred(self._ports))
            elif m in known:
                self.port_answers_reused += 1
                calls.append(succeed(known[m]))
            else:
                d = self.node.rpc.call(m.address, StreamPorts)
                d.addTimeout(2.0, self.reactor)
                d.addCallback(self._keep_ports, m)
                calls.append(d)

        def done(results: list[tuple[bool, Any]]) -> list[YimaNode]:
            out = []
            for i, (m, (ok, r)) in enumerate(zip(members, results, strict=True)):
                rtp, rtcp = (r["rtp"], r["rtcp"]) if ok else (0, 0)
                out.append(YimaNode(i, m.address.rpartition(":")[0], rtp, rtcp))
            return out

        return DeferredList(calls, consumeErrors=True).addCallback(done)

    def _keep_ports(self, answer: dict[str, int], member: Member) -> dict[str, int]:
        if answer.get("rtp"):  # a node without its data port yet is asked again
            self._member_ports[member] = answer
        return answer

    # --- client RTCP of relayed sessions (feedback.Relay) ---------------------------

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
        stream = _stream_of(url)
        if stream not in ("", TRACK):
            raise RtspStatusError(404, f"{info.name} has no stream {stream!r}")
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
            if self._cluster_port(session.peer, transport.client_port):
                # A client on a member's host would aim the stream at that member's
                # membership socket (a flood of datagrams it must check and drop).
                raise RtspStatusError(461, "Unsupported Transport (client_port is a cluster port)")
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

    def _cluster_port(self, host: str, ports: tuple[int, int]) -> bool:
        """True if ``host`` at one of ``ports`` is a member's cluster (membership/RPC)
        address."""
        for m in self.node.view.members:
            mhost, _, mport = m.address.rpartition(":")
            if mport.isdigit() and int(mport) in ports and same_host(mhost.strip("[]"), host):
                return True
        return False

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
            self.streaming.control(
                local, StreamAction.STOP, 0.0, 0.0
            )  # shares served here for others
        if plan is not None:
            for timer in (plan.sr_timer, plan.bye_timer, plan.watch_timer):
                if timer is not None and timer.active():
                    timer.cancel()
            if not plan.played:
                return succeed(None)  # never played: no node has anything to stop
        return self._control(session.session_id, StreamAction.STOP, 0.0)

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


def _stream_of(url: str) -> str:
    """What follows the media name in a request URL (no query, no trailing slash): "" for
    the presentation, ``track1`` for its one stream."""
    path = url.split("://", 1)[-1].split("/", 1)[-1] if "://" in url else url
    return path.split("?")[0].partition("/")[2].rstrip("/")


if TYPE_CHECKING:

    def _provides_host(service: YimaStreamingService) -> StreamingHost:
        """mypy checks here that the service is what its mixins expect."""
        return service
