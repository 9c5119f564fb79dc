"""The player shell on a fake clock with fake nodes: RTP in, RTCP bytes out to the right node."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from yimaporc.rtp import (
    App,
    GenericNack,
    RtpHeaderTemplate,
    YimaFeedback,
    YimaKind,
    parse_rtcp,
)
from yimaporc.yima.feedback import ProbeReply, mark_retransmission, parse_probe, probe_reply
from yimaporc.yima.player.shell import (
    PacketDropper,
    PlayError,
    PlayerSession,
    ShellConfig,
    StreamInfo,
)

OFFSET = 1000.0  # cluster time = local time + OFFSET
LATENCY = 0.002
ADDRS = {0: ("127.0.0.1", 7001), 1: ("127.0.0.2", 7003), 2: ("127.0.0.3", 7005)}


class FakeNodes:
    """Three nodes: block b is node b % 3's; they answer probes and NACKs after LATENCY."""

    def __init__(
        self,
        clock: Clock,
        *,
        total: int = 40,
        ppb: int = 4,
        step: float = 0.05,
        ssrc: int = 0x1234,
        seq_base: int = 65530,
        rtptime: int = 5000,
        start_local: float = 1.0,
    ) -> None:
        self.clock = clock
        self.ssrc, self.seq_base, self.rtptime = ssrc, seq_base, rtptime
        self.total, self.ppb, self.step = total, ppb, step
        self.start_local = start_local
        self.session: PlayerSession | None = None
        self.rtcp: list[tuple[Any, tuple[str, int]]] = []
        self.resent = 0
        self.packets: dict[tuple[int, int], bytes] = {}  # (node, node_seq) -> RTP
        self.by_gseq: dict[int, tuple[int, bytes]] = {}
        counters = [0, 0, 0]
        for g in range(total):
            node = (g // ppb) % 3
            ns = counters[node]
            counters[node] += 1
            tpl = RtpHeaderTemplate(33, ssrc, node)
            ts = rtptime + round(g * step * 90000)
            data = tpl.build(seq_base + g, ts, bytes([g % 256]) * 188, ns)
            self.packets[(node, ns)] = data
            self.by_gseq[g] = (node, data)

    def info(self, name: str = "0:clip") -> StreamInfo:
        return StreamInfo(name, "rtsp://x/clip", self.ssrc, self.seq_base, self.rtptime, 90000,
                          dict(ADDRS), duration=self.total * self.step)  # fmt: skip

    def deliver_later(self, data: bytes, addr: tuple[str, int], delay: float = LATENCY) -> None:
        assert self.session is not None
        self.clock.callLater(delay, self.session.datagram, data, addr)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        """What the player sends: parsed and recorded, probes and NACKs answered."""
        node = next(n for n, a in ADDRS.items() if a == addr)
        for part in parse_rtcp(data):
            self.rtcp.append((part, addr))
            if isinstance(part, App):
                req = parse_probe(part)
                assert req is not None and not isinstance(req, ProbeReply)
                now_ct = self.clock.seconds() + LATENCY / 2 + OFFSET
                reply = ProbeReply(9, req.media_ssrc, req.token, req.client_us,
                                   round(now_ct * 1e6), round((self.start_local + OFFSET) * 1e6),
                                   0, self.total, self.ppb)  # fmt: skip
                self.deliver_later(probe_reply(reply), addr)
            elif isinstance(part, GenericNack):
                assert part.media_ssrc == self.ssrc
                for ns in part.lost():
                    pkt = self.packets.get((node, ns))
                    assert pkt is not None, f"node {node} asked for a seq it never sent: {ns}"
                    self.resent += 1
                    self.deliver_later(mark_retransmission(pkt), addr)

    def schedule(self, skip: frozenset[int] = frozenset(), order: list[int] | None = None) -> None:
        """Send every packet at its media time after the start (except ``skip``)."""
        for g in order if order is not None else range(self.total):
            if g in skip:
                continue
            node, data = self.by_gseq[g]
            at = self.start_local + g * self.step + LATENCY - self.clock.seconds()
            self.deliver_later(data, ADDRS[node], max(0.0, at))


def pump(clock: Clock, seconds: float) -> None:
    for _ in range(round(seconds / 0.001)):
        clock.advance(0.001)


def run_session(
    nodes: FakeNodes, config: ShellConfig, skip: frozenset[int] = frozenset(), **kw: Any
) -> tuple[PlayerSession, list[bytes], dict[str, Any]]:
    clock = nodes.clock
    out: list[bytes] = []
    s = PlayerSession(clock, [nodes.info()], config, nodes.send, lambda st, p: out.append(p))
    nodes.session = s
    s.probe_all()
    pump(clock, 0.01)
    assert s.ready
    s.start()
    nodes.schedule(skip, **kw)
    stats: dict[str, Any] = {}
    s.done.addCallback(stats.update)
    for _ in range(20000):
        if stats:
            break
        clock.advance(0.001)
    assert stats, "the session ended"
    return s, out, stats


def test_probes_give_offset_start_and_length() -> None:
    """The start-up probes go to every node; the clock offset and start instant follow."""
    clock = Clock()
    nodes = FakeNodes(clock)
    s = PlayerSession(clock, [nodes.info()], ShellConfig(), nodes.send, lambda st, p: None)
    nodes.session = s
    s.probe_all()
    assert {a for _, a in nodes.rtcp} == set(ADDRS.values())
    assert not s.ready
    pump(clock, 0.01)
    assert s.ready
    assert s.time.offset == pytest.approx(OFFSET, abs=1e-6)
    info = s.streams["0:clip"]
    assert (info.start_ct, info.total, info.packets_per_block) == (1.0 + OFFSET, 40, 4)


def test_no_probe_answer_is_a_clear_error() -> None:
    """Without any answer the session cannot start."""
    clock = Clock()
    s = PlayerSession(clock, [FakeNodes(clock).info()], ShellConfig(), lambda d, a: None,
                      lambda st, p: None)  # fmt: skip
    with pytest.raises(PlayError, match="time probe"):
        s.start()


def test_lossless_run_delivers_everything_in_order() -> None:
    """Every payload is delivered once, in global order, across the 16-bit wrap."""
    nodes = FakeNodes(Clock())
    _, out, stats = run_session(nodes, ShellConfig(prebuffer=0.5))
    assert out == [bytes([g % 256]) * 188 for g in range(40)]
    assert stats["packets_expected"] == 40 and stats["packets_missing_at_playout"] == 0
    assert stats["nodes_seen"] == 3 and stats["underflows"] == 0 and stats["nacks_sent"] == 0
    assert stats["clock_offset_s"] == pytest.approx(OFFSET, abs=1e-6)


def test_reordered_arrival_is_reassembled() -> None:
    """Packets arriving out of order (within the buffer) still play in order."""
    nodes = FakeNodes(Clock())
    order = list(range(40))
    order[5], order[6] = order[6], order[5]
    _, out, _stats = run_session(nodes, ShellConfig(prebuffer=0.5), order=order)
    assert out == [bytes([g % 256]) * 188 for g in range(40)]


def test_lost_packet_is_nacked_to_its_own_node_and_recovered() -> None:
    """A gap in node 1's sequence: one NACK, to node 1's RTCP address, naming node 1's seq."""
    nodes = FakeNodes(Clock())
    lost = 5  # block 1 -> node 1, its node_seq 1
    _, out, stats = run_session(nodes, ShellConfig(prebuffer=0.5), skip=frozenset({lost}))
    nacks = [(p, a) for p, a in nodes.rtcp if isinstance(p, GenericNack)]
    assert len(nacks) == 1
    nack, addr = nacks[0]
    assert addr == ADDRS[1] and nack.lost() == [1] and nack.media_ssrc == 0x1234
    assert stats["nacks_sent"] == 1 and stats["retransmissions_received"] == 1
    assert stats["packets_missing_at_playout"] == 0
    assert out == [bytes([g % 256]) * 188 for g in range(40)]


def test_lost_tail_of_the_stream_is_recovered() -> None:
    """The last packet (no later packet reveals the gap) is NACKed after the node falls silent."""
    nodes = FakeNodes(Clock())
    _, out, stats = run_session(nodes, ShellConfig(prebuffer=0.5), skip=frozenset({39}))
    assert [a for p, a in nodes.rtcp if isinstance(p, GenericNack)] == [ADDRS[0]]
    assert stats["packets_missing_at_playout"] == 0 and len(out) == 40


def test_pause_resume_speed_goes_to_every_node_on_the_cluster_clock() -> None:
    """Pause-resume streams at 1.25x: a YIMA SPEED to each node, at a cluster-clock instant."""
    nodes = FakeNodes(Clock())
    run_session(nodes, ShellConfig(prebuffer=0.5, flow="pause-resume"))
    speeds = [(p, a) for p, a in nodes.rtcp if isinstance(p, YimaFeedback)]
    first = [(p, a) for p, a in speeds if p.kind == YimaKind.SPEED][:3]
    assert {a for _, a in first} == set(ADDRS.values())
    for p, _ in first:
        assert p.speed == 1.25 and p.media_ssrc == 0x1234
        assert p.at_us / 1e6 >= OFFSET + 1.0, "at_ct is cluster time, not local time"
    seqs = [p.feedback_seq for p, _ in speeds]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_core_probes_measure_rtt() -> None:
    """The core's RTT probes (YIMT with its tokens) are answered and reach the retransmitter."""
    nodes = FakeNodes(Clock())
    s, _, _ = run_session(nodes, ShellConfig(prebuffer=0.5))
    assert s.presentation is not None
    p = s.presentation.players["0:clip"]
    assert p.retx is not None
    srtt = p.retx.node(1).rtt.srtt
    assert srtt is not None and srtt == pytest.approx(LATENCY, abs=0.003)


def test_simulated_drop_is_per_packet_and_counted() -> None:
    """--drop: the same packets drop whatever the arrival order; retransmissions recover them."""
    d1, d2 = PacketDropper(0.2, 7, "0"), PacketDropper(0.2, 7, "0")
    a = []
    for g in range(200):
        d1.current = (g, False)
        a.append(d1.drop())
    b = {}
    for g in reversed(range(200)):
        d2.current = (g, False)
        b[g] = d2.drop()
    assert a == [b[g] for g in range(200)] and 20 < sum(a) < 60
    nodes = FakeNodes(Clock(), total=120)
    _, _out, stats = run_session(nodes, ShellConfig(prebuffer=0.5, drop=0.1, seed=3))
    assert stats["packets_dropped_simulated"] > 0 and stats["nacks_sent"] > 0
    assert stats["retransmissions_received"] > 0
    assert stats["packets_received"] + stats["packets_missing_at_playout"] >= 120


def test_duration_stops_early_and_counts_only_what_was_due() -> None:
    """--duration ends the session after that much playout; expected = what was due."""
    nodes = FakeNodes(Clock(), total=200)
    _, out, stats = run_session(nodes, ShellConfig(prebuffer=0.5, duration=1.0))
    assert 15 <= stats["packets_expected"] <= 25 and stats["packets_missing_at_playout"] == 0
    assert len(out) == stats["packets_expected"]


def test_garbage_and_strangers_are_ignored() -> None:
    """Short, non-RTP and unknown-SSRC datagrams change nothing and crash nothing."""
    nodes = FakeNodes(Clock())
    clock = nodes.clock
    s = PlayerSession(clock, [nodes.info()], ShellConfig(prebuffer=0.5), nodes.send,
                      lambda st, p: None)  # fmt: skip
    nodes.session = s
    s.probe_all()
    clock.advance(0.01)
    s.start()
    for junk in (b"", b"\x80", b"\x40" * 20, b"\x81\xcc\x00\x05" + bytes(8),
                 RtpHeaderTemplate(33, 999, 0).build(1, 1, b"x")):  # fmt: skip
        s.datagram(junk, ("127.0.0.1", 1))
    assert s.malformed >= 1
    assert s.presentation is not None
    assert s.presentation.players["0:clip"].arrivals == 0


def test_packets_before_start_are_kept() -> None:
    """RTP that arrives while the probes are still out is played once the players exist."""
    nodes = FakeNodes(Clock())
    clock = nodes.clock
    out: list[bytes] = []
    s = PlayerSession(clock, [nodes.info()], ShellConfig(prebuffer=0.5), nodes.send,
                      lambda st, p: out.append(p))  # fmt: skip
    nodes.session = s
    node, data = nodes.by_gseq[0]
    s.datagram(data, ADDRS[node])
    s.probe_all()
    clock.advance(0.01)
    s.start()
    nodes.schedule(skip=frozenset({0}))
    for _ in range(1000):
        clock.advance(0.005)
    assert out[0] == bytes([0]) * 188 and len(out) == 40


def test_plot_draws_a_png(tmp_path: Any) -> None:
    """--plot: buffer level, thresholds and delta p of a finished session as a PNG."""
    pytest.importorskip("matplotlib")
    from yimaporc.yima.player.plot import plot_session

    for flow in ("delta-p", "pause-resume"):
        nodes = FakeNodes(Clock())
        s, _, _ = run_session(nodes, ShellConfig(prebuffer=0.5, flow=flow))  # type: ignore[arg-type]
        path = tmp_path / f"{flow}.png"
        plot_session(s, str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
