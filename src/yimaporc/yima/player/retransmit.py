"""Selective retransmission requests (seed §4), sans-IO.

Each packet carries its node index and that node's own sequence number, so a
jump in one node's sequence names exactly the lost packets *and* the node that
holds them.  For each such gap the player sends one NACK, by unicast, to that
node only, and only if the retransmission can still arrive before the packet's
playout instant:

    now + srtt + 4 * rttvar + margin <= estimated playout instant

The playout instant of a lost packet is estimated by interpolating media time
between its node's neighbouring packets.  RTT is measured per node from NACK ->
retransmission delays and from probes (RFC 6298 smoothing); until measured, a
conservative ``initial_rtt`` applies.  A node_seq is never requested twice, and
a token bucket caps requested packets per second so burst loss cannot turn
into a NACK storm.  A gap that no later packet of the node reveals (the tail of
a node's run) is reported by the core after ``tail_timeout`` of silence.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs


@attrs.frozen
class RetransmitConfig:
    """Tunables of the NACK decision."""

    initial_rtt: float = 0.2
    margin: float = 0.01
    reorder_grace: float = 0.004
    rate: float = 60.0
    burst: float = 40.0
    max_per_nack: int = 64
    node_seq_start: int = 0
    remember: int = 65536


@attrs.define
class RttEstimator:
    """RFC 6298 smoothed RTT and variation from request/response samples."""

    initial: float = 0.2
    srtt: float | None = None
    rttvar: float = 0.0
    samples: int = 0

    def sample(self, rtt: float) -> None:
        """Add one measured round trip."""
        rtt = max(0.0, rtt)
        self.samples += 1
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def timeout(self) -> float:
        """How long a retransmission is expected to take at worst."""
        if self.srtt is None:
            return self.initial
        return self.srtt + 4 * self.rttvar


@attrs.frozen
class Gap:
    """One packet known lost: when it would play and when it may be requested."""

    deadline: float
    eligible: float


@attrs.define
class NodeState:
    """What the player tracks per serving node."""

    hi: int
    last_mt: float | None = None
    last_arrival: float | None = None
    missing: dict[int, Gap] = attrs.field(factory=dict)
    nacked: dict[int, float] = attrs.field(factory=dict)
    rtt: RttEstimator = attrs.field(factory=RttEstimator)


@attrs.define
class RetransmitStats:
    """Counters of the NACK machinery."""

    gaps: int = 0
    nacks_sent: int = 0
    nack_messages: int = 0
    given_up_late: int = 0
    deferred: int = 0
    recovered: int = 0


class Retransmitter:
    """Per-node gap detection and the one-NACK-per-packet, deadline-aware decision."""

    def __init__(
        self,
        playout_time: Callable[[float], float],
        config: RetransmitConfig | None = None,
        now: float = 0.0,
    ) -> None:
        self.config = config or RetransmitConfig()
        self.playout_time = playout_time
        self.nodes: dict[int, NodeState] = {}
        self.stats = RetransmitStats()
        self._tokens = self.config.burst
        self._refilled = now

    def node(self, node: int) -> NodeState:
        """State of ``node`` (created on first mention)."""
        st = self.nodes.get(node)
        if st is None:
            st = NodeState(self.config.node_seq_start - 1)
            st.rtt.initial = self.config.initial_rtt
            self.nodes[node] = st
        return st

    def on_packet(
        self, node: int, node_seq: int, media_time: float, now: float, retransmission: bool
    ) -> None:
        """Account one arriving packet: fill a gap, or open new ones."""
        st = self.node(node)
        if node_seq <= st.hi:
            st.missing.pop(node_seq, None)
            sent = st.nacked.get(node_seq)
            if sent is not None and retransmission:
                st.rtt.sample(now - sent)
                self.stats.recovered += 1
            return
        if node_seq > st.hi + 1:
            lo_mt = media_time if st.last_mt is None else st.last_mt
            span = node_seq - st.hi
            for k in range(st.hi + 1, node_seq):
                mt = lo_mt + (media_time - lo_mt) * (k - st.hi) / span
                self._open(st, k, self.playout_time(mt), now)
        st.hi = node_seq
        st.last_mt = media_time
        st.last_arrival = now

    def add_tail_gap(self, node: int, node_seq: int, media_time: float, now: float) -> bool:
        """A lost packet past the node's highest sequence, found by the core's timeout."""
        st = self.node(node)
        if node_seq <= st.hi or node_seq in st.missing or node_seq in st.nacked:
            return False
        self._open(st, node_seq, self.playout_time(media_time), now, grace=False)
        return True

    def _open(self, st: NodeState, k: int, deadline: float, now: float, grace: bool = True) -> None:
        if k in st.nacked or k in st.missing:
            return
        self.stats.gaps += 1
        st.missing[k] = Gap(deadline, now + (self.config.reorder_grace if grace else 0.0))

    def on_probe(self, node: int, rtt: float) -> None:
        """A probe round trip to ``node`` took ``rtt``."""
        self.node(node).rtt.sample(rtt)

    def poll(self, now: float) -> list[tuple[int, tuple[int, ...]]]:
        """NACKs to send now: (node, node_seqs), each node_seq at most once ever."""
        c = self.config
        self._tokens = min(c.burst, self._tokens + (now - self._refilled) * c.rate)
        self._refilled = now
        out: list[tuple[int, tuple[int, ...]]] = []
        for node, st in self.nodes.items():
            if not st.missing:
                continue
            need = st.rtt.timeout() + c.margin
            ask: list[int] = []
            for k in sorted(st.missing):
                gap = st.missing[k]
                if gap.eligible > now:
                    continue
                if now + need > gap.deadline:
                    del st.missing[k]
                    self.stats.given_up_late += 1
                    continue
                if self._tokens < 1 or len(ask) >= c.max_per_nack:
                    self.stats.deferred += 1
                    continue
                self._tokens -= 1
                del st.missing[k]
                st.nacked[k] = now
                ask.append(k)
            while len(st.nacked) > c.remember:
                del st.nacked[next(iter(st.nacked))]
            if ask:
                self.stats.nacks_sent += len(ask)
                self.stats.nack_messages += 1
                out.append((node, tuple(ask)))
        return out

    def next_timer(self, now: float) -> float | None:
        """When :meth:`poll` may have something to do."""
        times = [g.eligible for st in self.nodes.values() for g in st.missing.values()]
        if not times:
            return None
        t = min(times)
        if t <= now:
            return now + 1.0 / self.config.rate
        return t
