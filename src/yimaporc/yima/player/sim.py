"""Deterministic simulator: real node schedulers, a lossy network, the player core.

N nodes each run :class:`~yimaporc.yima.schedule.NodeScheduler` for their
(pseudorandomly placed) blocks of every stream; packets cross a network with
seeded latency, jitter, random loss and Gilbert-Elliott burst loss; one node
can be slow (its pacing runs at ``slow_factor`` of what it is told, and/or its
packets take ``slow_delay`` longer).  The player's feedback (pause, resume,
speed, NACK, probes) travels back with latency and is applied by the real
schedulers; retransmissions cross the network again.  One ``random.Random``
drives everything, so a seed replays exactly.

``python -m yimaporc.yima.player.sim`` prints the loss table of docs/player.md.
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs

from ..schedule import PAYLOAD, MediaTiming, NodeScheduler, Packet
from .core import (
    Action,
    Deliver,
    Dropper,
    PacketArrived,
    Pause,
    PlayerConfig,
    Presentation,
    ProbeAnswered,
    Resume,
    SendNack,
    SendProbe,
    SetSpeed,
    StreamPlayer,
)
from .flow import TrimConfig
from .retransmit import RetransmitConfig

#: Pause as a re-anchoring of the schedule at a common cluster instant: the
#: schedule's clock (nearly) stops, so every node stops at the same media
#: position and a later ``set_speed`` restarts them all from it.
#: ``NodeScheduler.pause``/``resume`` re-anchor each node at its *own* next
#: packet, which lets nodes drift apart over pause cycles (see docs/player.md).
STOPPED = 1e-9


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
    """One simulated presentation."""

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
    drop: float = 0.0
    loss: float = 0.0
    burst: GilbertElliott | None = None
    feedback_loss: float = 0.0
    latency: float = 0.02
    jitter: float = 0.002
    slow_node: int | None = None
    slow_factor: float = 1.0
    slow_delay: float = 0.0
    session_lead: float = 0.3
    timer_jitter: float = 0.001
    coarse_sync: bool = True


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


class _Link:
    """Loss state of one direction of one node's path."""

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


class Simulation:
    """Nodes, network and player on one virtual clock."""

    def __init__(self, config: SimConfig, player_config: PlayerConfig | None = None) -> None:
        c = self.config = config
        self.rng = random.Random(config.seed)
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._n = 0
        self.start_ct = c.session_lead
        self.media: dict[str, MediaTiming] = {}
        self.owner: dict[str, list[int]] = {}
        self.nodes = [NodeScheduler(retransmit_window=8192) for _ in range(c.nodes)]
        self._tick_gen = [0] * c.nodes
        self._tick_at: list[float | None] = [None] * c.nodes
        self.down = [_Link(c, self.rng) for _ in range(c.nodes)]
        self.network_lost = 0
        self.feedback_sent = 0
        self.nacks_by_node: list[tuple[int, str, tuple[int, ...]]] = []
        self.sent_by: dict[tuple[str, int, int], int] = {}
        self.lost: set[tuple[str, int, int]] = set()
        self.node_late = [0] * c.nodes
        self.arrival_slack: list[list[tuple[float, float]]] = [[] for _ in range(c.nodes)]
        players = []
        for i, rate in enumerate(c.bitrates):
            sid = f"s{i}"
            m = vbr_media(sid, self.rng, rate, c.duration, c.block_packets, c.vbr, c.scene)
            self.media[sid] = m
            self.owner[sid] = [self.rng.randrange(c.nodes) for _ in range(m.blocks)]
            total = sum(m.packet_count(b) for b in range(m.blocks))
            pc = player_config or PlayerConfig.for_rate(
                rate / 8,
                flow=c.flow,
                prebuffer=c.prebuffer,
                packets_per_block=c.block_packets,
                retransmit=RetransmitConfig() if c.retransmit else None,
                trim=TrimConfig() if c.trim else None,
            )
            players.append(StreamPlayer(sid, range(c.nodes), self.start_ct, pc, total=total))
            for k, sched in enumerate(self.nodes):
                mine = [b for b, o in enumerate(self.owner[sid]) if o == k]
                sched.add(sid, m, mine, start_ct=self.start_ct)
                if k == c.slow_node:
                    sched.set_speed(sid, c.slow_factor, self.start_ct)
        self.player = Presentation(players, coarse_sync=c.coarse_sync)
        # Drawn last, so a seed gives the same clip and placement with or without --drop.
        drop_rng = random.Random(self.rng.getrandbits(64))
        if c.drop:
            dropper = Dropper(c.drop, drop_rng)
            for p in players:
                p.dropper = dropper
        self._client_gen = 0
        self._paused: dict[tuple[int, str], float] = {}
        self.delivered = 0

    # --- event loop ---------------------------------------------------------------

    def _at(self, t: float, fn: Callable[[], None]) -> None:
        self._n += 1
        heapq.heappush(self._queue, (t, self._n, fn))

    def run(self) -> dict[str, Any]:
        """Play the whole presentation; returns the CONTRACT stats (plus sim details)."""
        self._perform(self.player.start(self.now))
        for k in range(self.config.nodes):
            self._kick(k)
        self._arm_client()
        longest = max(m.duration for m in self.media.values())
        limit = self.player.playout_start + longest * 1.5 + 10.0
        while self._queue and not self.player.done:
            t, _, fn = heapq.heappop(self._queue)
            if t > limit:
                break
            self.now = max(self.now, t)
            fn()
        self.player.finish()
        stats = self.player.stats()
        stats["sim"] = {
            "network_lost": self.network_lost,
            "feedback_sent": self.feedback_sent,
            "node_late": list(self.node_late),
            "delivered": self.delivered,
        }
        return stats

    # --- nodes --------------------------------------------------------------------

    def _kick(self, k: int) -> None:
        t = self.nodes[k].next_deadline()
        if t is None:
            return
        t = max(t, self.now)
        if self._tick_at[k] is not None and self._tick_at[k] <= t:  # type: ignore[operator]
            return
        self._tick_gen[k] += 1
        gen = self._tick_gen[k]
        self._tick_at[k] = t
        self._at(t, lambda: self._node_tick(k, gen))

    def _node_tick(self, k: int, gen: int) -> None:
        if gen != self._tick_gen[k]:
            return
        self._tick_at[k] = None
        for pkt in self.nodes[k].tick(self.now):
            self._transmit(k, pkt)
        self._kick(k)

    def _transmit(self, k: int, pkt: Packet) -> None:
        c = self.config
        self.sent_by[(pkt.session, k, pkt.node_seq)] = pkt.gseq
        if self.down[k].lost():
            self.network_lost += 1
            if not pkt.retransmission:
                self.lost.add((pkt.session, k, pkt.node_seq))
            return
        delay = c.latency + self.rng.uniform(0, c.jitter)
        if k == c.slow_node:
            delay += c.slow_delay
        event = PacketArrived(
            pkt.session, k, pkt.gseq, pkt.node_seq, pkt.media_time, pkt.length, pkt.retransmission
        )
        self._at(self.now + delay, lambda: self._client(event))

    def _to_node(self, k: int, fn: Callable[[], None]) -> None:
        c = self.config
        self.feedback_sent += 1
        if c.feedback_loss and self.rng.random() < c.feedback_loss:
            return
        self._at(self.now + c.latency + self.rng.uniform(0, c.jitter), fn)

    def _apply(self, k: int, action: Action) -> None:
        sched = self.nodes[k]
        f = self.config.slow_factor if k == self.config.slow_node else 1.0
        key = (k, getattr(action, "stream", ""))
        if isinstance(action, Pause):
            if key not in self._paused:
                self._paused[key] = sched.sessions[action.stream].speed
                sched.set_speed(action.stream, STOPPED, action.at_ct)
        elif isinstance(action, Resume):
            speed = self._paused.pop(key, None)
            if speed is not None:
                sched.set_speed(action.stream, speed, action.at_ct)
        elif isinstance(action, SetSpeed):
            if key in self._paused:
                self._paused[key] = action.speed * f
            else:
                sched.set_speed(action.stream, action.speed * f, action.at_ct)
        elif isinstance(action, SendNack):
            for pkt in sched.retransmit(action.stream, action.node_seqs):
                self._transmit(k, pkt)
        elif isinstance(action, SendProbe):
            answer = ProbeAnswered(action.stream, k, action.token)
            self._at(
                self.now + self.config.latency + self.rng.uniform(0, self.config.jitter),
                lambda: self._client(answer),
            )
        self._kick(k)

    # --- client -------------------------------------------------------------------

    def _client(self, event: PacketArrived | ProbeAnswered) -> None:
        if isinstance(event, PacketArrived) and not event.retransmission:
            slack = self.player.players[event.stream].buffer.playout_time(event.media_time)
            if slack - self.now < 0:
                self.node_late[event.node] += 1
            self.arrival_slack[event.node].append((self.now, slack - self.now))
        self._perform(self.player.receive(event, self.now))
        self._arm_client()

    def _client_timer(self, gen: int) -> None:
        if gen != self._client_gen:
            return
        self._perform(self.player.handle_timer(self.now))
        self._arm_client()

    def _arm_client(self) -> None:
        t = self.player.get_timer(self.now)
        if t is None:
            return
        self._client_gen += 1
        gen = self._client_gen
        late = self.rng.uniform(0, self.config.timer_jitter) if self.config.timer_jitter else 0.0
        self._at(max(t, self.now) + late, lambda: self._client_timer(gen))

    def _perform(self, actions: Sequence[Action]) -> None:
        for a in actions:
            if isinstance(a, Deliver):
                self.delivered += 1
                continue
            if isinstance(a, SendNack):
                self.nacks_by_node.append((a.node, a.stream, a.node_seqs))
            self._to_node(a.node, lambda a=a: self._apply(a.node, a))  # type: ignore[misc]


def simulate(**kw: Any) -> dict[str, Any]:
    """Run one simulation with :class:`SimConfig` fields as keywords."""
    return Simulation(SimConfig(**kw)).run()


def _aggregate(seeds: Sequence[int], **kw: Any) -> tuple[float, float, float]:
    """(missing fraction, NACKed fraction, NACK messages per lost packet) over ``seeds``."""
    missing = expected = nacks = messages = lost = 0
    for seed in seeds:
        sim = Simulation(SimConfig(seed=seed, **kw))
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
    p = argparse.ArgumentParser(prog="python -m yimaporc.yima.player.sim")
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
