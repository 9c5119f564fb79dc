"""The presentation player's sans-IO core: events in, actions out.

A shell (RTP/RTCP over UDP, RTSP) turns datagrams into events and performs the
actions (the simulator, :mod:`yimaporc.sim.player`, runs that shell on the kernel).  The
core never reads a clock: every call takes ``now`` in cluster time (the shell
converts with the cluster's time sync), and :meth:`StreamPlayer.get_timer`
says when :meth:`StreamPlayer.handle_timer` must run next.

Events and actions: :mod:`.events`.  One stream: :class:`StreamPlayer` (here);
several on one clock: :class:`~.presentation.Presentation`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any, Literal

import attrs

from ..control import StreamAction
from ..schedule import PAYLOAD
from .buffer import Buffered, PlayoutBuffer
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
from .flow import (
    BandsConfig,
    DeltaP,
    NodeTrim,
    PauseResume,
    PauseResumeConfig,
    ScheduleMirror,
    TrimConfig,
)
from .retransmit import RetransmitConfig, Retransmitter

#: The longest packet interval of a stream the silence checks make room for (seconds).
MAX_INTERVAL = 5.0

# --- configuration -----------------------------------------------------------------


@attrs.frozen
class PlayerConfig:
    """Everything tunable about one stream's player."""

    flow: Literal["delta-p", "pause-resume", "none"] = "delta-p"
    prebuffer: float = 2.0
    lead: float = 0.1
    level_unit: Literal["bytes", "seconds"] = "bytes"
    bands: BandsConfig | None = None
    pause: PauseResumeConfig | None = None
    retransmit: RetransmitConfig | None = attrs.field(factory=RetransmitConfig)
    trim: TrimConfig | None = attrs.field(factory=TrimConfig)
    packets_per_block: int | None = None
    tail_timeout: float = 0.1
    control_interval: float = 0.1
    trim_interval: float = 0.5
    probe_interval: float = 2.0
    sample_interval: float = 0.1
    speed_quantum: float = 0.001
    #: A hole this old (its NACK unanswered) whose node is this long silent asks for a
    #: hand-over; asked again after ``handover_retry`` while still overdue.
    handover_after: float = 0.3
    handover_retry: float = 1.0
    #: Media seconds between packets expected from the stream's mean rate (0: unknown),
    #: until packets measure it: a slow stream's next packet is not overdue before then.
    packet_interval: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self.flow == "delta-p" and self.bands is None:
            raise ValueError("delta-p flow control needs bands")
        if self.flow == "pause-resume" and self.pause is None:
            raise ValueError("pause-resume flow control needs thresholds")

    @classmethod
    def for_rate(
        cls,
        bytes_per_second: float,
        *,
        flow: Literal["delta-p", "pause-resume", "none"] = "delta-p",
        prebuffer: float = 2.0,
        **kw: Any,
    ) -> PlayerConfig:
        """Thresholds in bytes around ``prebuffer`` seconds of a stream of that mean rate.

        The NACK budget is at least 10% of the packet rate.
        """
        target = bytes_per_second * prebuffer
        retx = kw.pop("retransmit", RetransmitConfig())
        if retx is not None:
            retx = attrs.evolve(retx, rate=max(retx.rate, 0.1 * bytes_per_second / PAYLOAD))
        kw.setdefault("packet_interval", PAYLOAD / bytes_per_second if bytes_per_second else 0.0)
        return cls(
            flow=flow,
            prebuffer=prebuffer,
            bands=BandsConfig.around(target),
            pause=PauseResumeConfig(high=1.4 * target, low=0.8 * target),
            retransmit=retx,
            **kw,
        )


class Dropper:
    """``--drop RATE``: a seeded loss applied to arriving packets before the buffer."""

    def __init__(self, rate: float, rng: random.Random) -> None:
        if not 0.0 <= rate < 1.0:
            raise ValueError("drop rate must be in [0, 1)")
        self.rate = rate
        self.rng = rng
        self.dropped = 0

    def drop(self) -> bool:
        """True if this packet is to be dropped."""
        if self.rate and self.rng.random() < self.rate:
            self.dropped += 1
            return True
        return False


# --- one stream --------------------------------------------------------------------


class StreamPlayer:
    """Reassembly, playout, flow control and retransmission of one stream."""

    def __init__(
        self,
        stream: str,
        nodes: Iterable[int],
        start_ct: float,
        config: PlayerConfig,
        *,
        total: int | None = None,
        start_mt: float = 0.0,
        dropper: Dropper | None = None,
    ) -> None:
        self.stream = stream
        self.nodes = sorted(set(nodes))
        self.start_ct = start_ct
        self.config = config
        self.playout_start = start_ct + config.prebuffer
        self.buffer = PlayoutBuffer(self.playout_start, start_mt=start_mt, total=total)
        self.retx = (
            Retransmitter(self.buffer.playout_time, config.retransmit, now=start_ct)
            if config.retransmit is not None
            else None
        )
        self.dropper = dropper
        self.pause_resume: PauseResume | None = None
        self.delta_p: DeltaP | None = None
        if config.flow == "pause-resume" and config.pause is not None:
            self.pause_resume = PauseResume(config.pause)
        if config.flow == "delta-p" and config.bands is not None:
            self.delta_p = DeltaP(config.bands)
            if 1.0 in config.bands.speeds:
                self.delta_p.band = config.bands.speeds.index(1.0)
        self.node_trim = NodeTrim(config.trim) if config.trim is not None else None
        self.sync_trim = 1.0
        self.mirror = ScheduleMirror(start_ct, start_mt)
        self.nodes_seen: set[int] = set()
        self.arrivals = 0
        self.retransmissions_received = 0
        self.buffer_levels: list[list[float]] = []
        self.speed_changes: list[tuple[float, int, float]] = []
        self._sent_speed: dict[int, float] = dict.fromkeys(self.nodes, 1.0)
        self._block_ref: dict[int, tuple[int, int, int, float]] = {}
        self._probes: dict[int, float] = {}
        self._token = 0
        self._next_control = start_ct
        self._next_trim = start_ct + config.trim_interval
        self._next_probe = start_ct
        self._next_sample = start_ct
        self._quiet_until = start_ct
        self._hole_seen: dict[int, float] = {}
        self._handover_sent: dict[tuple[int, int], float] = {}
        self._last_arrival: float | None = None
        #: Media seconds between consecutive packets of the stream (smoothed) and the
        #: highest (gseq, media time) seen: a low-bitrate stream (one packet per 0.4 s of
        #: a 25 kbit/s audio TS) is that quiet between packets without a node being dead.
        self._interval = min(MAX_INTERVAL, config.packet_interval)
        self._top: tuple[int, float] | None = None
        self.handovers_requested = 0

    # --- public face -------------------------------------------------------------

    @property
    def base_speed(self) -> float:
        """Stream-wide delivery speed chosen by flow control."""
        if self.pause_resume is not None:
            return self.pause_resume.config.speed
        if self.delta_p is not None:
            return self.delta_p.speed
        return 1.0

    def level(self, now: float) -> float:
        """Buffer level in the configured unit."""
        if self.config.level_unit == "seconds":
            return self.buffer.level_seconds(now)
        return float(self.buffer.level_bytes)

    def start(self, now: float) -> list[Action]:
        """Actions at session start (before ``start_ct``): probes, the initial speed."""
        out: list[Action] = self._probe_all(now)
        out.extend(self._speed_commands(max(now + self.config.lead, self.start_ct)))
        return out

    def receive(self, event: PacketArrived | ProbeAnswered, now: float) -> list[Action]:
        """Feed one event; returns what to do now."""
        if isinstance(event, ProbeAnswered):
            sent = self._probes.pop(event.token, None)
            if sent is not None and self.retx is not None:
                self.retx.on_probe(event.node, now - sent)
            return []
        if self.dropper is not None and self.dropper.drop():
            return []
        out: list[Action] = self._play(now)
        self.arrivals += 1
        self.nodes_seen.add(event.node)
        self._last_arrival = now
        top = self._top
        if top is None or event.gseq > top[0]:
            if top is not None and event.media_time > top[1]:
                step = min(MAX_INTERVAL, (event.media_time - top[1]) / (event.gseq - top[0]))
                i = self._interval
                self._interval = step if i == 0.0 else 0.875 * i + 0.125 * step
            self._top = (event.gseq, event.media_time)
        if event.node not in self.nodes:
            # A node index announced by its first packet (a share taken over): it gets
            # NACKs, probes and the stream's speed like the others.
            self.nodes = sorted({*self.nodes, event.node})
        if event.retransmission:
            self.retransmissions_received += 1
        elif self.node_trim is not None:
            due = self.mirror.deadline(event.media_time)
            if due is not None:
                self.node_trim.observe(event.node, due - now)
        if self.retx is not None:
            self.retx.on_packet(
                event.node, event.node_seq, event.media_time, now, event.retransmission
            )
        ppb = self.config.packets_per_block
        if ppb:
            self._block_ref.setdefault(
                event.gseq // ppb, (event.gseq, event.node, event.node_seq, event.media_time)
            )
        self.buffer.insert(
            Buffered(
                event.gseq,
                event.media_time,
                event.size,
                event.node,
                event.node_seq,
                event.payload,
            ),
            now,
        )
        if self.retx is not None:
            out.extend(self._nacks(now))
        return out

    def handle_timer(self, now: float) -> list[Action]:
        """Run whatever is due: playout, control, NACKs, probes, level samples."""
        out: list[Action] = self._play(now)
        if now >= self._next_sample:
            self.buffer_levels.append([round(now - self.start_ct, 3), self.buffer.level_bytes])
            self._next_sample = now + self.config.sample_interval
        if now >= self._next_control:
            self._next_control = now + self.config.control_interval
            out.extend(self._control(now))
        if self.retx is not None:
            if now >= self._next_probe:
                out.extend(self._probe_all(now))
            out.extend(self._nacks(now))
        return out

    def get_timer(self, now: float) -> float | None:
        """When :meth:`handle_timer` must run next (None: nothing pending)."""
        if self.buffer.done:
            return None
        times = [self._next_control, self._next_sample]
        if (t := self.buffer.next_playout()) is not None:
            times.append(t)
        if self.retx is not None:
            times.append(self._next_probe)
            if (t := self.retx.next_timer(now)) is not None:
                times.append(t)
        return min(times)

    def set_sync_trim(self, trim: float, now: float) -> list[Action]:
        """Coarse synchronisation: scale this stream's speed by ``trim``."""
        self.sync_trim = trim
        return self._speed_commands(now + self.config.lead)

    def finish(self) -> None:
        """End of the session: count what never played as missing."""
        self.buffer.finish()

    def stats(self) -> dict[str, Any]:
        """The CONTRACT §3 keys for this stream (skew is the presentation's)."""
        b = self.buffer.stats
        r = self.retx.stats if self.retx is not None else None
        expected = self.buffer.total if self.buffer.total is not None else b.played + b.missing
        return {
            "packets_expected": expected,
            "packets_received": b.received,
            "packets_dropped_simulated": self.dropper.dropped if self.dropper else 0,
            "nacks_sent": r.nacks_sent if r else 0,
            "nack_messages": r.nack_messages if r else 0,
            "nacks_given_up_late": r.given_up_late if r else 0,
            "retransmissions_received": self.retransmissions_received,
            "packets_missing_at_playout": b.missing,
            "late_packets": b.late,
            "duplicates": b.duplicates,
            "underflows": b.underflows,
            "max_sync_skew_ms": 0.0,
            "nodes_seen": sorted(self.nodes_seen),
            "buffer_levels": list(self.buffer_levels),
            "speed_changes": len(self.speed_changes),
            "pauses": self.pause_resume.pauses if self.pause_resume else 0,
            "band_changes": self.delta_p.changes if self.delta_p else 0,
            "handovers_requested": self.handovers_requested,
        }

    # --- internals ----------------------------------------------------------------

    def _play(self, now: float) -> list[Action]:
        return [
            Deliver(self.stream, p.gseq, p.media_time, p.payload) for p in self.buffer.play(now)
        ]

    def _probe_all(self, now: float) -> list[Action]:
        self._next_probe = now + self.config.probe_interval
        out: list[Action] = []
        for node in self.nodes:
            self._token += 1
            self._probes[self._token] = now
            while len(self._probes) > 8 * len(self.nodes):
                del self._probes[next(iter(self._probes))]
            out.append(SendProbe(self.stream, node, self._token))
        return out

    def _nacks(self, now: float) -> list[Action]:
        assert self.retx is not None
        return [SendNack(self.stream, n, seqs) for n, seqs in self.retx.poll(now)]

    def _control(self, now: float) -> list[Action]:
        out: list[Action] = []
        level = self.level(now)
        at = now + self.config.lead
        if self.pause_resume is not None:
            decision = self.pause_resume.update(level)
            if decision is StreamAction.PAUSE:
                where = self.mirror.position(at)
                out.extend(Pause(self.stream, n, at, where) for n in self.nodes)
                self.mirror.set_speed(0.0, at)
            elif decision is StreamAction.RESUME:
                self.mirror.set_speed(self._common_speed(), at)
                out.extend(Resume(self.stream, n, at) for n in self.nodes)
                self._quiet_until = at + self.config.tail_timeout
        elif self.delta_p is not None and now >= self.playout_start:
            self.delta_p.update(level, now)
        if self.node_trim is not None and now >= self._next_trim and now >= self.playout_start:
            self._next_trim = now + self.config.trim_interval
            self.node_trim.update(now)
        out.extend(self._speed_commands(at))
        paused = self.pause_resume is not None and self.pause_resume.paused
        if self.retx is not None and self.config.packets_per_block and not paused:
            if now >= self._quiet_until:
                self._find_tail_gaps(now)
                out.extend(self._handovers(now))
        return out

    def _handovers(self, now: float) -> list[Action]:
        """Overdue packets whose node is silent: ask for a hand-over of that share.

        Overdue: a hole in the global order older than ``handover_after`` (a plain
        loss is NACKed and back by then), the rest of the top block when its node went
        silent, or the next packet when no node sent anything for twice that.
        """
        assert self.retx is not None and self.config.packets_per_block
        after, ppb = self.config.handover_after, self.config.packets_per_block
        total = self.buffer.total

        slack = 2 * self._interval  # a slow stream's next packet is not due yet

        def silent(node: int) -> bool:
            st = self.retx.nodes.get(node) if self.retx is not None else None
            return st is None or st.last_arrival is None or now - st.last_arrival >= after + slack

        holes = self.buffer.holes(limit=256)
        seen = {g: self._hole_seen.get(g, now) for g in holes}
        self._hole_seen = seen
        overdue = [g for g in holes if now - seen[g] >= after]
        top = self.buffer.max_gseq
        if top >= 0 and (total is None or top + 1 < total) and self._last_arrival is not None:
            ref = self._block_ref.get(top // ppb)
            if ref is not None and silent(ref[1]) and (top + 1) % ppb:
                overdue.append(top + 1)  # the rest of a silent node's block
            elif now - self._last_arrival >= 2 * after + slack and now >= self.playout_start - 1.0:
                overdue.append(top + 1)  # nothing from anybody: whoever owns what comes next
        out: list[Action] = []
        for g in overdue:
            ref = self._block_ref.get(g // ppb)
            node = ref[1] if ref is not None else -1
            if node >= 0 and not silent(node):
                continue
            key = (node, g // ppb if node < 0 else -1)
            sent = self._handover_sent.get(key)
            if sent is not None and now - sent < self.config.handover_retry:
                continue
            self._handover_sent[key] = now
            self.handovers_requested += 1
            out.append(RequestHandover(self.stream, node, g))
        return out

    def _common_speed(self) -> float:
        q = self.config.speed_quantum
        return round(round(self.base_speed * self.sync_trim / q) * q, 6)

    def _speed_commands(self, at: float) -> list[Action]:
        if self.pause_resume is not None and self.pause_resume.paused:
            return []
        q = self.config.speed_quantum
        out: list[Action] = []
        if self._common_speed() != self.mirror.speed:
            self.mirror.set_speed(self._common_speed(), at)
        for node in self.nodes:
            f = self.node_trim.factor.get(node, 1.0) if self.node_trim is not None else 1.0
            speed = round(round(self.base_speed * self.sync_trim * f / q) * q, 6)
            if speed != self._sent_speed.get(node):
                self._sent_speed[node] = speed
                self.speed_changes.append((at, node, speed))
                out.append(SetSpeed(self.stream, node, speed, at))
        return out

    def _find_tail_gaps(self, now: float) -> None:
        """Map holes in the global order to (node, node_seq) through their block."""
        assert self.retx is not None and self.config.packets_per_block
        ppb = self.config.packets_per_block
        holes = self.buffer.holes(limit=4 * ppb)
        top = self.buffer.max_gseq
        if self.buffer.total is not None and top >= 0:
            holes.extend(range(top + 1, min(self.buffer.total, (top // ppb + 1) * ppb)))
        for g in holes:
            ref = self._block_ref.get(g // ppb)
            if ref is None:
                continue
            g0, node, ns0, mt0 = ref
            st = self.retx.node(node)
            quiet = self.config.tail_timeout + 2 * self._interval  # its next one not due yet
            if st.last_arrival is None or now - st.last_arrival < quiet:
                continue
            self.retx.add_tail_gap(node, ns0 + (g - g0), mt0, now)
        low = self.buffer.next_gseq // ppb - 1
        for b in [b for b in self._block_ref if b < low]:
            del self._block_ref[b]
