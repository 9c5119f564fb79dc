"""Player scenario: the shipped player and the nodes' real send path on the kernel.

Every part that runs is shipped code on a :class:`~yimaporc.sim.reactor.SimReactor`:

- the client host runs the player shell as ``yimaporc play`` does
  (:class:`~yimaporc.yima.player.client.Client`): RTSP over a simulated stream link
  (DESCRIBE, SETUP with ``x-yima-fanout``, PLAY, TEARDOWN), its UDP port pair, the
  start-up ``YIMT`` probes, then :class:`~yimaporc.yima.player.shell.PlayerSession`
  with the player core, NACKs and flow-control feedback as RTCP datagrams;
- a front host runs the shipped RTSP server (:class:`~yimaporc.rtsp.RtspServerFactory`)
  with a small session planner (:class:`Planner`, the scenario's stand-in for the
  Yima storage: it places blocks and starts every node's share);
- each node host runs :class:`~yimaporc.yima.streaming.StreamingNode` (its
  :class:`~yimaporc.yima.engine.DeliveryEngine`, the batched
  :class:`~yimaporc.rtp.RtpHeaderTemplate` path, block reads on the host's simulated
  thread pool) and :class:`~yimaporc.yima.feedback.FeedbackReceiver` on one UDP port.

Faults: the kernel's (:class:`~yimaporc.sim.kernel.Faults`: latency, loss,
duplication, reordering of every datagram; a node crash or pause at a given time),
plus the path models the earlier core-only simulator had, applied where the node
sends (random ``loss`` and Gilbert-Elliott ``burst`` loss on each node's path to
the client, a ``slow_node`` pacing at ``slow_factor`` of what it is told or with
``slow_delay`` more on its path) and where it receives (``feedback_loss``), and the
player's own seeded ``--drop``.  One seed drives everything;
:meth:`PlayerSim.trace_digest` identifies a run (same seed, same digest).

``python -m yimaporc.sim.player`` prints the loss table of docs/player.md.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

from ..rtp import (
    PT_MP2T,
    TS_PACKET_SIZE,
    GenericNack,
    MalformedPacket,
    RtpHeaderTemplate,
    is_rtcp,
    parse_rtcp,
    unwrap_seq,
)
from ..rtsp import (
    IRtspHandler,
    NptRange,
    PlayReply,
    RtpInfo,
    RtspServerFactory,
    RtspStatusError,
    ServerSession,
    TransportSpec,
    YimaNode,
)
from ..rtsp.sdp import mp2t_track, presentation_sdp
from ..yima.control import StreamAction
from ..yima.feedback import FeedbackReceiver, mark_retransmission
from ..yima.player.client import Client
from ..yima.player.shell import ShellConfig
from ..yima.schedule import PAYLOAD, MediaTiming, Packet
from ..yima.streaming import Destination, StreamingNode
from .kernel import IO, Faults, SimHost, SimKernel
from .reactor import SimReactor, SimUDPPort

NODE_PORT = 5004
RTSP_PORT = 554


@attrs.frozen
class GilbertElliott:
    """Two-state burst loss: per-packet transition probabilities and loss in each state."""

    p_good_bad: float = 0.01
    p_bad_good: float = 0.25
    loss_good: float = 0.0
    loss_bad: float = 0.5

    @property
    def mean_loss(self) -> float:
        """Long-run loss rate."""
        bad = self.p_good_bad / (self.p_good_bad + self.p_bad_good)
        return bad * self.loss_bad + (1 - bad) * self.loss_good


@attrs.frozen
class SimConfig:
    """One simulated presentation (times in seconds of true time)."""

    seed: int = 0
    nodes: int = 3
    bitrates: tuple[float, ...] = (2e6,)
    vbr: float = 0.5
    scene: float = 2.0
    duration: float = 30.0
    block_packets: int = 16
    flow: Literal["delta-p", "pause-resume", "none"] = "delta-p"
    prebuffer: float = 2.0
    retransmit: bool = True
    trim: bool = True
    #: the player's ``--drop``
    drop: float = 0.0
    #: path models where a node sends (data) and receives (the player's RTCP)
    loss: float = 0.0
    burst: GilbertElliott | None = None
    feedback_loss: float = 0.0
    slow_node: int | None = None
    slow_factor: float = 1.0
    slow_delay: float = 0.0
    #: the kernel's fault model for every datagram and stream link
    latency: float = 0.02
    jitter: float = 0.002
    net_loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    #: (node, true time): the node's process is killed then
    crash: tuple[int, float] | None = None
    #: (node, true time, seconds): the node's process is stopped (SIGSTOP) then
    pause: tuple[int, float, float] | None = None
    #: the client host's clock offset from the cluster's (the probes estimate it)
    client_skew: float = 0.0
    session_lead: float = 0.3
    #: a run that takes more kernel events fails (a timer spinning at one instant)
    max_events: int = 2_000_000


def vbr_media(
    name: str,
    rng: random.Random,
    bitrate: float,
    duration: float,
    block_packets: int,
    vbr: float,
    scene: float,
) -> MediaTiming:
    """A synthetic VBR clip: scenes of ~``scene`` s at ``bitrate`` x U(1 - vbr, 1 + vbr)."""
    block = block_packets * PAYLOAD
    starts: list[float] = []
    t, factor, next_scene = 0.0, 1.0, 0.0
    while t < duration:
        if t >= next_scene:
            factor = rng.uniform(1 - vbr, 1 + vbr)
            next_scene = t + rng.expovariate(1 / scene)
        starts.append(t)
        t += block * 8 / (bitrate * factor)
    return MediaTiming(name, len(starts) * block, block, tuple(starts), t)


def block_bytes(name: str, block: int, size: int) -> bytes:
    """The content of one block: MPEG-TS packets (0x47 sync) of seeded bytes."""
    data = bytearray(random.Random(f"{name}:{block}").randbytes(size))
    data[::TS_PACKET_SIZE] = b"\x47" * len(range(0, size, TS_PACKET_SIZE))
    return bytes(data)


class _Link:
    """Loss state of one node's path to the client (random and burst loss)."""

    def __init__(self, cfg: SimConfig, rng: random.Random) -> None:
        self.cfg = cfg
        self.rng = rng
        self.bad = False

    def lost(self) -> bool:
        c, r = self.cfg, self.rng
        if c.burst is not None:
            ge = c.burst
            self.bad = (r.random() >= ge.p_bad_good) if self.bad else (r.random() < ge.p_good_bad)
            if r.random() < (ge.loss_bad if self.bad else ge.loss_good):
                return True
        return bool(c.loss) and r.random() < c.loss


class _Datagrams(DatagramProtocol):
    def __init__(self, node: SimNode) -> None:
        self.node = node

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.node.received(data, addr)


class _SlowStreaming(StreamingNode):
    """A node whose pacing runs at ``factor`` of every speed it is told (a slow disk/CPU)."""

    factor: float = 1.0

    def _start(self, *args: Any) -> dict[str, Any]:
        out = super()._start(*args)
        self.scheduler.set_speed(args[0], self.factor, args[2])
        return out

    def control(
        self, session: str, action: StreamAction, at: float, value: float
    ) -> dict[str, Any]:
        if action == StreamAction.SPEED:
            value *= self.factor
        return super().control(session, action, at, value)


class SimNode:
    """One Yima node's streaming side on a simulated host."""

    def __init__(self, sim: PlayerSim, index: int, host: SimHost, reactor: SimReactor) -> None:
        self.sim = sim
        self.index = index
        self.host = host
        self.reactor = reactor
        cfg = sim.config
        self.link = _Link(cfg, sim.kernel.rng)
        slow = index == cfg.slow_node
        cls = _SlowStreaming if slow and cfg.slow_factor != 1.0 else StreamingNode
        self.streaming = cls(
            reactor,
            reactor.seconds,
            timing=sim.media.__getitem__,
            my_blocks=lambda name: [b for b, o in enumerate(sim.owner[name]) if o == index],
            read_block=self._read_block,
            packetize=self._packetize,
            send=self._send,
            template=lambda sid, dest: self._template(dest),
            send_segments=self._send_segments,
            retransmit_age=30.0,
        )
        if isinstance(self.streaming, _SlowStreaming):
            self.streaming.factor = cfg.slow_factor
        self.feedback = FeedbackReceiver(self.streaming, reactor.seconds, self._reply)
        self.port: SimUDPPort = reactor.listenUDP(NODE_PORT, _Datagrams(self))
        self._templates: dict[tuple[int, int], RtpHeaderTemplate] = {}

    # --- the send path (as YimaStreamingService wires it) -------------------------------

    def _read_block(self, name: str, block: int) -> Deferred[bytes]:
        size = self.sim.media[name].block_length(block)
        pool = self.reactor.getThreadPool()
        return deferToThreadPool(self.reactor, pool, block_bytes, name, block, size)  # type: ignore[arg-type]

    def _template(self, dest: Destination) -> RtpHeaderTemplate:
        key = (dest.ssrc, dest.node_index)
        tpl = self._templates.get(key)
        if tpl is None:
            tpl = self._templates[key] = RtpHeaderTemplate(PT_MP2T, dest.ssrc, dest.node_index)
        return tpl

    def _packetize(self, pkt: Packet, dest: Destination, payload: bytes) -> bytes:
        ts = dest.ts_base + round(pkt.media_time * dest.clock_rate)
        data = self._template(dest).build(dest.seq_base + pkt.gseq, ts, payload, pkt.node_seq)
        return mark_retransmission(data) if pkt.retransmission else data

    def _send_segments(self, view: memoryview, size: int, addr: tuple[str, int]) -> None:
        for at in range(0, len(view), size):
            self._send(bytes(view[at : at + size]), addr)

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        """One RTP datagram leaves the node: the path model, then the kernel."""
        sim, cfg = self.sim, self.sim.config
        node_seq = int.from_bytes(data[18:22], "big")
        stream = sim.stream_of.get(int.from_bytes(data[8:12], "big"), "?")
        key = (stream, self.index, node_seq)
        retx = data[22:24] != b"\0\0"
        sim.sent_by[key] = int.from_bytes(data[2:4], "big")
        if self.link.lost():
            sim.network_lost += 1
            if not retx:
                sim.lost.add(key)
            return
        if self.index == cfg.slow_node and cfg.slow_delay:
            self.reactor.callLater(cfg.slow_delay, self.port.write, data, addr)
        else:
            self.port.write(data, addr)

    # --- what the node hears -------------------------------------------------------------

    def received(self, data: bytes, addr: Any) -> None:
        sim, cfg = self.sim, self.sim.config
        if cfg.feedback_loss and sim.kernel.rng.random() < cfg.feedback_loss:
            return
        if is_rtcp(data):
            self._note_nacks(data)
        self.feedback.datagram(data, addr)

    def _note_nacks(self, data: bytes) -> None:
        try:
            parts = parse_rtcp(data)
        except MalformedPacket:
            return
        for part in parts:
            if not isinstance(part, GenericNack):
                continue
            stream = self.sim.stream_of.get(part.media_ssrc)
            for sid, d in self.streaming.destinations.items():
                s = self.streaming.scheduler.sessions.get(sid)
                if d.ssrc == part.media_ssrc and s is not None:
                    seqs = tuple(unwrap_seq(s.node_seq, p) for p in part.lost())
                    self.sim.nacks_by_node.append((self.index, stream or "?", seqs))

    def _reply(self, data: bytes, addr: Any) -> None:
        self.port.write(data, addr)


@implementer(IRtspHandler)
class Planner:
    """The RTSP node's session planning, reduced to what the scenario needs: the media are
    the synthetic clips, blocks are placed at random, and PLAY starts each node's share
    (one RPC latency later, on that node's host: a crashed node never hears it)."""

    def __init__(self, sim: PlayerSim) -> None:
        self.sim = sim
        self.sessions: dict[str, tuple[str, str, int, int]] = {}

    def _media(self, url: str) -> str:
        name = urlsplit(url).path.strip("/").split("/")[0]
        if name not in self.sim.media:
            raise RtspStatusError(404, f"no media {name!r}")
        return name

    def describe(self, url: str) -> Any:
        name = self._media(url)
        m = self.sim.media[name]
        kbps = round(self.sim.bitrate[name] / 1000)
        return presentation_sdp(name, [mp2t_track("track1", bitrate_kbps=kbps)], m.duration)

    def setup(self, url: str, transport: TransportSpec, session: ServerSession) -> Any:
        if not transport.yima_fanout or transport.client_port is None or session.peer is None:
            raise RtspStatusError(461, "the scenario serves fan-out players only")
        name = self._media(url)
        ssrc = self.sim.kernel.rng.getrandbits(32)
        self.sim.stream_of[ssrc] = name
        self.sessions[session.session_id] = (name, session.peer, transport.client_port[0], ssrc)
        nodes = tuple(YimaNode(n.index, n.host.ip, NODE_PORT, NODE_PORT) for n in self.sim.nodes)
        return attrs.evolve(transport, ssrc=ssrc, yima_nodes=nodes)

    def play(self, session: ServerSession, range: NptRange | None) -> Any:
        name, host, port, ssrc = self.sessions[session.session_id]
        kernel = self.sim.kernel
        seq_base, ts_base = kernel.rng.getrandbits(16), kernel.rng.getrandbits(32)
        start_ct = kernel.now + self.sim.config.session_lead
        for n in self.sim.nodes:
            args = (session.session_id, name, start_ct, 0.0, host, port, ssrc, seq_base,
                    ts_base, n.index, False)  # fmt: skip
            self._rpc(n, lambda n=n, args=args: n.streaming.start(*args))
        m = self.sim.media[name]
        return PlayReply(NptRange(0.0, m.duration), (RtpInfo("track1", seq_base, ts_base),))

    def _rpc(self, node: SimNode, call: Any) -> None:
        kernel, host = self.sim.kernel, node.host
        kernel.at(kernel.now + kernel.latency(), call, host=host, kind=IO,
                  generation=host.generation)  # fmt: skip

    def pause(self, session: ServerSession) -> Any:
        raise RtspStatusError(455, "the scenario's player never pauses over RTSP")

    def teardown(self, session: ServerSession) -> Any:
        if self.sessions.pop(session.session_id, None) is None:
            return
        sid = session.session_id
        for n in self.sim.nodes:
            self._rpc(n, lambda n=n: n.streaming.control(sid, StreamAction.STOP, 0.0, 0.0))

    def get_parameter(self, session: ServerSession | None, body: bytes) -> Any:
        return b""

    def set_parameter(self, session: ServerSession | None, body: bytes) -> Any:
        return b""

    def interleaved_received(self, session: ServerSession, channel: int, data: bytes) -> None:
        """Fan-out players use UDP only."""


class PlayerSim:
    """Nodes, an RTSP front and the player on one :class:`SimKernel`."""

    def __init__(self, config: SimConfig, kernel: SimKernel | None = None) -> None:
        c = self.config = config
        lat = (c.latency, c.latency + c.jitter)
        faults = Faults(latency=lat, loss=c.net_loss, duplicate=c.duplicate, reorder=c.reorder)
        self.kernel = kernel or SimKernel(config.seed, faults=faults)
        rng = self.kernel.rng
        self.media: dict[str, MediaTiming] = {}
        self.bitrate: dict[str, float] = {}
        self.owner: dict[str, list[int]] = {}
        for i, rate in enumerate(c.bitrates):
            name = f"s{i}"
            m = vbr_media(name, rng, rate, c.duration, c.block_packets, c.vbr, c.scene)
            self.media[name], self.bitrate[name] = m, rate
            self.owner[name] = [rng.randrange(c.nodes) for _ in range(m.blocks)]
        #: What the scenario observed: SSRC -> media name, every RTP datagram a node sent
        #: ((stream, node, node_seq) -> its 16-bit sequence number), the first
        #: transmissions lost on a node's path, and the NACKs each node received.
        self.stream_of: dict[int, str] = {}
        self.sent_by: dict[tuple[str, int, int], int] = {}
        self.lost: set[tuple[str, int, int]] = set()
        self.network_lost = 0
        self.nacks_by_node: list[tuple[int, str, tuple[int, ...]]] = []
        self.nodes: list[SimNode] = []
        for k in range(c.nodes):
            host = self.kernel.add_host(f"node{k}", f"10.0.0.{k + 1}")
            self.nodes.append(SimNode(self, k, host, self.kernel.boot(host)))
        front = self.kernel.add_host("front", "10.0.1.1")
        self.planner = Planner(self)
        factory = RtspServerFactory(self.planner, self.kernel.boot(front), random.Random(c.seed))
        self.kernel.hosts["front"].reactor.listenTCP(RTSP_PORT, factory)  # type: ignore[union-attr]
        client = self.kernel.add_host("client", "10.0.2.1", skew=c.client_skew)
        self.client_reactor = self.kernel.boot(client)
        self.delivered: dict[str, Any] = {}
        self.delivered_count = 0
        shell = ShellConfig(
            flow=c.flow, drop=c.drop, seed=c.seed, prebuffer=c.prebuffer,
            retransmit=c.retransmit, trim=c.trim,
        )  # fmt: skip
        urls = [f"rtsp://{front.ip}:{RTSP_PORT}/{name}" for name in self.media]
        self.client = Client(self.client_reactor, urls, shell, self._deliver)
        self.stats: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def _deliver(self, stream: str, payload: bytes) -> None:
        h = self.delivered.get(stream)
        if h is None:
            h = self.delivered[stream] = hashlib.sha256()
        h.update(payload)
        self.delivered_count += 1

    @property
    def player(self) -> Any:
        """The player's :class:`~yimaporc.yima.player.core.Presentation` (once playing)."""
        s = self.client.session
        return s.presentation if s is not None else None

    def source_digest(self, name: str) -> str:
        """SHA-256 of the whole clip ``name``, as the player delivers it when nothing is lost."""
        m, h = self.media[name], hashlib.sha256()
        for b in range(m.blocks):
            h.update(block_bytes(name, b, m.block_length(b)))
        return h.hexdigest()

    def delivered_digest(self, stream: str) -> str:
        """SHA-256 of what the player delivered of the stream named ``stream`` by the shell."""
        h = self.delivered.get(stream)
        return h.hexdigest() if h is not None else hashlib.sha256().hexdigest()

    def trace_digest(self) -> str:
        """The kernel's trace of the run: the same seed gives the same digest."""
        return self.kernel.trace_digest()

    def _faults(self) -> None:
        c, kernel = self.config, self.kernel
        if c.crash is not None:
            node, at = c.crash
            kernel.at(at, lambda: kernel.crash(self.nodes[node].host))
        if c.pause is not None:
            node, at, seconds = c.pause
            kernel.at(at, lambda: kernel.pause(self.nodes[node].host, seconds))

    def run(self) -> dict[str, Any]:
        """Play the whole presentation; the CONTRACT stats (plus the scenario's counts)."""
        self._faults()
        d = ensureDeferred(self.client.run())
        d.addCallbacks(self._done, self._failed)
        longest = max(m.duration for m in self.media.values())
        limit = self.kernel.now + longest * 1.5 + 15.0
        budget = self.kernel.events + self.config.max_events
        self.kernel.run_until(
            limit,
            lambda: self.stats is not None or self.error is not None or self.kernel.events > budget,
        )
        if self.kernel.events > budget:
            raise RuntimeError(f"more than {self.config.max_events} events by t={self.kernel.now}")
        self.kernel.run_for(1.0)  # the TEARDOWNs reach the front
        if self.error is not None:
            raise self.error
        if self.stats is None:
            raise RuntimeError(f"the player did not finish by t={limit:.1f} s")
        self.stats["sim"] = {
            "network_lost": self.network_lost,
            "nacks_received": sum(n.feedback.nacked for n in self.nodes),
            "feedback_applied": sum(n.feedback.feedback_applied for n in self.nodes),
            "resent": sum(n.streaming.resent for n in self.nodes),
            "delivered": self.delivered_count,
            "events": self.kernel.events,
            "trace": self.trace_digest(),
        }
        return self.stats

    def _done(self, stats: dict[str, Any]) -> None:
        self.stats = stats

    def _failed(self, failure: Failure) -> None:
        self.error = failure.value


def simulate(**kw: Any) -> dict[str, Any]:
    """Run one simulation with :class:`SimConfig` fields as keywords."""
    return PlayerSim(SimConfig(**kw)).run()


def _aggregate(seeds: Sequence[int], **kw: Any) -> tuple[float, float, float]:
    """(missing fraction, NACKed fraction, NACK messages per lost packet) over ``seeds``."""
    missing = expected = nacks = messages = lost = 0
    for seed in seeds:
        sim = PlayerSim(SimConfig(seed=seed, **kw))
        st = sim.run()
        missing += st["packets_missing_at_playout"]
        expected += st["packets_expected"]
        nacks += st["nacks_sent"]
        messages += st["nack_messages"]
        lost += len(sim.lost) + st["packets_dropped_simulated"]
    return missing / expected, nacks / expected, messages / max(1, lost)


def loss_table(seeds: Sequence[int], rates: Sequence[float], duration: float) -> list[list[Any]]:
    """Rows of (drop rate, missing without retransmission, missing with, NACKed fraction)."""
    rows = []
    for rate in rates:
        without, _, _ = _aggregate(seeds, drop=rate, retransmit=False, duration=duration)
        with_, nacked, _ = _aggregate(seeds, drop=rate, duration=duration)
        rows.append([rate, without, with_, nacked])
    return rows


BURSTS = {
    "GE 1.9% (bursts ~4)": GilbertElliott(p_good_bad=0.01, p_bad_good=0.25, loss_bad=0.5),
    "GE 13% (bursts ~10)": GilbertElliott(p_good_bad=0.02, p_bad_good=0.1, loss_bad=0.8),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the loss table (``--drop`` semantics, 3 nodes, delta p), bursts and sync skew."""
    p = argparse.ArgumentParser(prog="python -m yimaporc.sim.player")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--rates", default="0.01,0.03,0.05,0.10")
    p.add_argument("--extra", action="store_true", help="also bursts and two-stream skew")
    a = p.parse_args(argv)
    seeds = range(a.seeds)
    rates = [float(x) for x in a.rates.split(",")]
    print(f"{'drop':>6} {'missing w/o retx':>17} {'missing with retx':>18} {'NACKed':>8}")
    for rate, without, with_, nacked in loss_table(seeds, rates, a.duration):
        print(f"{rate:6.2%} {without:17.4%} {with_:18.4%} {nacked:8.3%}")
    if not a.extra:
        return 0
    print()
    print(f"{'burst loss':<22} {'w/o retx':>9} {'with retx':>10} {'NACK msgs/loss':>15}")
    for name, ge in BURSTS.items():
        without, _, _ = _aggregate(seeds, burst=ge, retransmit=False, duration=a.duration)
        with_, _, per = _aggregate(seeds, burst=ge, duration=a.duration)
        print(f"{name:<22} {without:9.4%} {with_:10.4%} {per:15.3f}")
    print()
    print(f"{'two streams (2 Mb/s + 300 kb/s)':<34} {'max skew ms':>12} {'mean skew ms':>13}")
    for flow in ("delta-p", "pause-resume"):
        worst = mean = 0.0
        for seed in seeds:
            st = simulate(seed=seed, bitrates=(2e6, 3e5), flow=flow, loss=0.01, duration=a.duration)
            worst = max(worst, st["max_sync_skew_ms"])
            mean += st["mean_sync_skew_ms"] / len(seeds)
        print(f"{flow + ', 1% loss':<34} {worst:12.3f} {mean:13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
