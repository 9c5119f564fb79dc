"""The Twisted shell of the presentation player: RTP/RTCP over UDP, a reactor timer.

:class:`PlayerSession` is the datagram half (testable with a ``Clock`` and a
fake ``send``): it decodes RTP (header + Yima extension) into
:class:`~.core.PacketArrived`, answers probes, drives a
:class:`~.core.Presentation` with one timer and performs its actions:
``SendNack`` -> RTCP Generic NACK to that node's RTCP address, ``Pause`` /
``Resume`` / ``SetSpeed`` -> APP ``YIMA``, ``SendProbe`` -> APP ``YIMT``.

:class:`~.client.Client` (``yimaporc play``) is the RTSP half around it.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ...rtp import (
    App,
    GenericNack,
    MalformedPacket,
    YimaFeedback,
    YimaKind,
    is_rtcp,
    nack_items_from_lost,
    parse_rtcp,
    parse_rtp,
    serialize_rtcp,
)
from ..feedback import RETRANSMISSION_MARK, ProbeReply, parse_probe, probe_request
from ..schedule import PAYLOAD
from .core import (
    Dropper,
    PlayerConfig,
    StreamPlayer,
)
from .events import (
    Action,
    Deliver,
    PacketArrived,
    Pause,
    ProbeAnswered,
    RequestHandover,
    Resume,
    SendNack,
    SendProbe,
    SetSpeed,
)
from .presentation import (
    Presentation,
)
from .seq import SeqExtender

Addr = tuple[str, int]
_U32 = struct.Struct("!I")
_RTP = struct.Struct("!BBHII")
STARTUP_TOKEN = 0x8000_0000  # probe tokens of the start-up burst (the core counts from 1)


class PlayError(Exception):
    """Something the user must be told in one ``error:`` line."""


@attrs.define
class StreamInfo:
    """One stream as RTSP set it up."""

    name: str
    url: str
    ssrc: int
    seq_base: int
    rtptime: int
    clock_rate: int
    nodes: dict[int, Addr]
    start_mt: float = 0.0
    duration: float | None = None
    bitrate: float | None = None
    # From the YIMT probe answers:
    start_ct: float = 0.0
    total: int = 0
    packets_per_block: int = 0


@attrs.frozen
class ShellConfig:
    """What the command line chooses."""

    flow: Literal["delta-p", "pause-resume", "none"] = "delta-p"
    drop: float = 0.0
    seed: int | None = None
    prebuffer: float = 2.0
    duration: float | None = None
    idle_timeout: float = 10.0
    probe_wait: float = 1.0
    #: NACK what is lost (selective retransmission) and trim per-node pacing; off only
    #: to measure what they save (the simulator's control runs)
    retransmit: bool = True
    trim: bool = True


class PacketDropper(Dropper):
    """``--drop`` decided per packet: a hash of (seed, stream, gseq, retransmission).

    The same packets are lost whatever order they arrive in from the nodes,
    so a seed reproduces a run; a retransmission draws apart from its original.
    Without a seed the decisions are random.
    """

    def __init__(self, rate: float, seed: int | None, stream: str) -> None:
        super().__init__(rate, random.Random())
        self.key = None if seed is None else f"{seed}:{stream}:"
        self.current = (0, False)

    def drop(self) -> bool:
        """True if the packet the shell is about to deliver (``current``) is lost."""
        if not self.rate:
            return False
        if self.key is None:
            return super().drop()
        gseq, retx = self.current
        h = hashlib.blake2b(f"{self.key}{gseq}:{int(retx)}".encode(), digest_size=8).digest()
        if int.from_bytes(h, "big") / 2**64 < self.rate:
            self.dropped += 1
            return True
        return False


class ClockEstimate:
    """NTP-style offset of the cluster clock from the local clock; the smallest RTT wins."""

    def __init__(self) -> None:
        self.offset: float | None = None
        self.rtt: float | None = None
        self.samples = 0

    def add(self, sent: float, received: float, cluster: float) -> None:
        """One exchange: local send and receive instants, the node's cluster time."""
        rtt = received - sent
        self.samples += 1
        if self.rtt is None or rtt < self.rtt:
            self.rtt = rtt
            self.offset = cluster - (sent + received) / 2


class PlayerSession:
    """The datagram half: RTP in, Presentation driven on a timer, RTCP out."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        streams: Sequence[StreamInfo],
        config: ShellConfig,
        send: Callable[[bytes, Addr], None],
        deliver: Callable[[str, bytes], None],
        *,
        ssrc: int = 0x59494D41,
    ) -> None:
        self.clock = clock
        self.streams = {s.name: s for s in streams}
        self.by_ssrc = {s.ssrc: s for s in streams}
        self.config = config
        self.send = send
        self.deliver = deliver
        self.ssrc = ssrc
        self.time = ClockEstimate()
        self.presentation: Presentation | None = None
        self.done: Deferred[dict[str, Any]] = Deferred()
        self.pending: list[tuple[StreamInfo, bytes, Any]] = []
        self.droppers: dict[str, PacketDropper] = {}
        self.extenders = {s.name: SeqExtender() for s in streams}
        self.feedback_seq = 0
        self.malformed = 0
        self.rtcp_sent = 0
        self.startup: dict[int, tuple[str, int, float]] = {}
        self.probe_nodes: dict[tuple[str, int], int] = {}
        self.answered: set[tuple[str, int]] = set()
        self.last_arrival = clock.seconds()
        self.finished = False
        self.stopped_early = False
        self._timer: IDelayedCall | None = None
        self._timer_at: float | None = None
        self._token = STARTUP_TOKEN

    # --- time ------------------------------------------------------------------------

    def now(self) -> float:
        """Cluster time (local clock + the estimated offset)."""
        return self.clock.seconds() + (self.time.offset or 0.0)

    # --- start-up: probe every node of every stream -------------------------------------

    def probe_all(self) -> None:
        """Send one start-up probe to every node of every stream."""
        for s in self.streams.values():
            for node, addr in s.nodes.items():
                self._token += 1
                self.startup[self._token] = (s.name, node, self.clock.seconds())
                self._rtcp(probe_request(self.ssrc, s.ssrc, self._token, 0), addr)

    @property
    def ready(self) -> bool:
        """Every stream knows its start instant and length, and the clock has a sample."""
        return self.time.offset is not None and all(
            s.start_ct and s.total for s in self.streams.values()
        )

    def start(self) -> None:
        """Create the players on the common playout clock and start them."""
        if not self.ready:
            raise PlayError("no node answered the time probe (is fan-out RTCP reachable?)")
        start_ct = max(s.start_ct for s in self.streams.values())
        players = []
        for i, s in enumerate(self.streams.values()):
            duration = s.duration or max(1.0, s.total * 0.01)
            rate = s.bitrate / 8 if s.bitrate else s.total * PAYLOAD / duration
            cfg = PlayerConfig.for_rate(
                rate,
                flow=self.config.flow,
                prebuffer=self.config.prebuffer,
                packets_per_block=s.packets_per_block or None,
                **({} if self.config.retransmit else {"retransmit": None}),
                **({} if self.config.trim else {"trim": None}),
            )
            dropper = PacketDropper(self.config.drop, self.config.seed, str(i))
            self.droppers[s.name] = dropper
            players.append(
                StreamPlayer(
                    s.name,
                    s.nodes,
                    start_ct,
                    cfg,
                    total=s.total,
                    start_mt=s.start_mt,
                    dropper=dropper,
                )
            )
        self.presentation = Presentation(players)
        self._run(self.presentation.start(self.now()))
        pending, self.pending = self.pending, []
        for s, data, addr in pending:
            self._rtp(s, data, addr)
        self._reschedule()

    # --- datagrams in ------------------------------------------------------------------

    def datagram(self, data: bytes, addr: Any) -> None:
        """One UDP datagram on the RTP or RTCP port."""
        try:
            if is_rtcp(data):
                self._rtcp_in(data)
                return
            if len(data) < 12:
                raise MalformedPacket("short RTP packet")
            s = self.by_ssrc.get(_U32.unpack_from(data, 8)[0])
            if s is None:
                return
            if self.presentation is None:
                if len(self.pending) < 100_000:
                    self.pending.append((s, data, addr))
                return
            self._rtp(s, data, addr)
            self._reschedule()
        except MalformedPacket:
            self.malformed += 1

    def _rtp(self, s: StreamInfo, data: bytes, addr: Any = None) -> None:
        assert self.presentation is not None
        b0, _, seq16, ts, _ = _RTP.unpack_from(data)
        if b0 >> 6 != 2:
            raise MalformedPacket("not RTP version 2")
        if b0 == 0x90 and len(data) >= 24 and data[12:14] == b"\xbe\xde" and data[16] == 0x14:
            node, node_seq = data[17], _U32.unpack_from(data, 18)[0]
            retx = data[22:24] == RETRANSMISSION_MARK
            payload = data[24:]
        else:
            pkt = parse_rtp(data)
            tag = pkt.yima
            node, node_seq = (tag.node_index, tag.node_seq) if tag else (0, -1)
            retx, payload = False, pkt.payload
        if node not in s.nodes and isinstance(addr, tuple) and len(addr) >= 2:
            # A new node index (a share taken over, docs/wire.md): it takes RTCP on the
            # port it sends from, so NACKs, probes and speed changes go there.
            s.nodes[node] = (addr[0], addr[1])
        gseq = self.extenders[s.name].extend((seq16 - s.seq_base) & 0xFFFF)
        if node_seq < 0:
            node_seq = gseq
        d = (ts - s.rtptime) & 0xFFFFFFFF
        if d >= 0x80000000:
            d -= 0x1_0000_0000
        mt = s.start_mt + d / s.clock_rate
        self.last_arrival = self.clock.seconds()
        ev = PacketArrived(s.name, node, gseq, node_seq, mt, len(payload), retx, payload)
        if (dropper := self.droppers.get(s.name)) is not None:
            dropper.current = (gseq, retx)
        self._run(self.presentation.receive(ev, self.now()))

    def _rtcp_in(self, data: bytes) -> None:
        received = self.clock.seconds()
        for part in parse_rtcp(data):
            if not isinstance(part, App):
                continue
            reply = parse_probe(part)
            if not isinstance(reply, ProbeReply):
                continue
            s = self.by_ssrc.get(reply.media_ssrc)
            if s is None:
                continue
            if reply.token in self.startup:
                name, node, sent = self.startup.pop(reply.token)
                self.time.add(sent, received, reply.cluster_us / 1e6)
                self.answered.add((name, node))
                if reply.start_ct_us and reply.total:
                    s.start_ct = reply.start_ct_us / 1e6
                    s.start_mt = reply.start_mt_us / 1e6
                    s.total, s.packets_per_block = reply.total, reply.packets_per_block
            elif self.presentation is not None:
                key = (s.name, reply.token)
                if key in self.probe_nodes:
                    ev = ProbeAnswered(s.name, self.probe_nodes.pop(key), reply.token)
                    self._run(self.presentation.receive(ev, self.now()))

    # --- actions out -------------------------------------------------------------------

    def _rtcp(self, data: bytes, addr: Addr) -> None:
        self.rtcp_sent += 1
        self.send(data, addr)

    def _run(self, actions: Sequence[Action]) -> None:
        for a in actions:
            if isinstance(a, Deliver):
                self.deliver(a.stream, a.payload)
                continue
            s = self.streams[a.stream]
            if isinstance(a, RequestHandover):
                self.feedback_seq += 1
                value = a.node & 0xFFFFFFFF  # -1: the owner is not known
                fb = YimaFeedback(YimaKind.HANDOVER, self.ssrc, s.ssrc, self.feedback_seq, 0,
                                  value, a.gseq & 0xFFFFFFFF)  # fmt: skip
                for node, other in s.nodes.items():
                    if node != a.node:
                        self._rtcp(serialize_rtcp(fb), other)
                continue
            addr = s.nodes.get(a.node)
            if addr is None:
                continue
            if isinstance(a, SendNack):
                items = nack_items_from_lost(n & 0xFFFF for n in a.node_seqs)
                self._rtcp(serialize_rtcp(GenericNack(self.ssrc, s.ssrc, items)), addr)
            elif isinstance(a, SendProbe):
                self.probe_nodes[(s.name, a.token)] = a.node
                if len(self.probe_nodes) > 1024:
                    del self.probe_nodes[next(iter(self.probe_nodes))]
                self._rtcp(probe_request(self.ssrc, s.ssrc, a.token, 0), addr)
            elif isinstance(a, Pause | Resume | SetSpeed):
                self.feedback_seq += 1
                kind, value = YimaKind.PAUSE, 0
                if isinstance(a, Pause):
                    value = max(0, round(a.media_time * 1000)) & 0xFFFFFFFF
                elif isinstance(a, Resume):
                    kind = YimaKind.RESUME
                elif isinstance(a, SetSpeed):
                    kind, value = YimaKind.SPEED, round(a.speed * 1_000_000)
                fb = YimaFeedback(kind, self.ssrc, s.ssrc, self.feedback_seq,
                                  round(a.at_ct * 1e6), value)  # fmt: skip
                self._rtcp(serialize_rtcp(fb), addr)

    # --- the timer ---------------------------------------------------------------------

    def _reschedule(self) -> None:
        if self.presentation is None or self.finished:
            return
        now = self.now()
        t = self.presentation.get_timer(now)
        if self.config.duration is not None:
            end = self.presentation.playout_start + self.config.duration
            t = end if t is None else min(t, end)
        if t is None:
            t = now + 0.5
        t = min(t, now + 0.5)  # also watch for an idle session
        if self._timer is not None and self._timer.active():
            if self._timer_at is not None and self._timer_at <= t:
                return
            self._timer.cancel()
        self._timer_at = t
        self._timer = self.clock.callLater(max(0.0, t - now), self._tick)

    def _tick(self) -> None:
        armed_for = self._timer_at
        self._timer = None
        self._timer_at = None
        assert self.presentation is not None
        now = self.now()
        if armed_for is not None and now < armed_for:
            # Due now: local clock + offset may round a few ulps short of the instant the
            # timer was armed for, and re-arming for it would spin until the clock moves.
            now = armed_for
        self._run(self.presentation.handle_timer(now))
        if self.presentation.done:
            self.finish()
        elif (
            self.config.duration is not None
            and now >= self.presentation.playout_start + self.config.duration
        ):
            self.stopped_early = True
            self.finish()
        elif self.clock.seconds() - self.last_arrival > self.config.idle_timeout:
            self.log.warn("player: no packet for {t} s, ending", t=self.config.idle_timeout)
            self.finish()
        else:
            self._reschedule()

    # --- the end -----------------------------------------------------------------------

    def finish(self) -> None:
        """End the session and fire :attr:`done` with the stats."""
        if self.finished:
            return
        self.finished = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        stats = self.stats()
        self.done.callback(stats)

    def stats(self) -> dict[str, Any]:
        """CONTRACT §3 keys (``nodes_seen`` is a count; ``node_indices`` lists them)."""
        pres = self.presentation
        if pres is None:
            return {}
        if not self.stopped_early:
            pres.finish()
        out = pres.stats()
        if self.stopped_early:  # --duration: what was due by then
            out["packets_expected"] = sum(
                p.buffer.stats.played + p.buffer.stats.missing for p in pres.players.values()
            )
        out["node_indices"] = out["nodes_seen"]
        out["nodes_seen"] = len(out["nodes_seen"])
        out["clock_offset_s"] = round(self.time.offset or 0.0, 6)
        out["clock_rtt_ms"] = round((self.time.rtt or 0.0) * 1000, 3)
        out["malformed"] = self.malformed
        out["rtcp_sent"] = self.rtcp_sent
        return out
