"""The player asks for a hand-over when a node goes silent, and adopts the node index that
then serves the share (its NACKs, probes and speed changes go where it sends from)."""

from __future__ import annotations

from typing import Any

from test_shell import ADDRS, LATENCY, FakeNodes, pump
from twisted.internet.task import Clock

from yimaporc.rtp import GenericNack, RtpHeaderTemplate, YimaFeedback, YimaKind, parse_rtcp
from yimaporc.yima.player.core import (
    PlayerConfig,
    StreamPlayer,
)
from yimaporc.yima.player.events import (
    PacketArrived,
    RequestHandover,
    SetSpeed,
)
from yimaporc.yima.player.shell import PlayerSession, ShellConfig


def arrive(g: int, node: int | None = None, ns: int | None = None) -> PacketArrived:
    block = g // 4  # blocks of 4 round-robin over 3 nodes, 100 packets per media second
    node = block % 3 if node is None else node
    ns = (block // 3) * 4 + g % 4 if ns is None else ns
    return PacketArrived("s", node, g, ns, g * 0.01, 1000)


def player() -> StreamPlayer:
    cfg = PlayerConfig(flow="none", prebuffer=1.0, packets_per_block=4)
    return StreamPlayer("s", [0, 1, 2], start_ct=10.0, config=cfg, total=400)


def test_silent_node_with_overdue_packets_gets_one_handover_request() -> None:
    """Node 1 stops mid-block (after gseq 5): after handover_after of silence the player
    asks once for the share of gseq 6 (node 1's), again only after handover_retry."""
    p = player()
    p.start(9.0)
    t = 10.0
    for g in range(6):
        p.receive(arrive(g), t)
    asked: list[Any] = []
    while t < 10.5:
        t += 0.05
        asked += [a for a in p.handle_timer(t) if isinstance(a, RequestHandover)]
    assert asked == [RequestHandover("s", 1, 6)]
    while t < 11.6:
        t += 0.05
        asked += [a for a in p.handle_timer(t) if isinstance(a, RequestHandover)]
    assert asked == [RequestHandover("s", 1, 6)] * 2
    assert p.stats()["handovers_requested"] == 2


def test_no_handover_while_every_node_delivers() -> None:
    """A lossless run over 3 nodes never asks for a hand-over."""
    p = player()
    p.start(9.0)
    acts: list[Any] = []
    for g in range(300):
        now = 10.0 + g * 0.01
        acts += p.receive(arrive(g), now)
        acts += p.handle_timer(now)
    assert not [a for a in acts if isinstance(a, RequestHandover)]


def test_a_new_node_index_is_adopted_and_gets_the_stream_speed() -> None:
    """The first packet from node 3 makes it a node of the stream: it gets a SetSpeed."""
    p = player()
    p.start(9.0)
    acts = p.receive(arrive(4, node=3, ns=0), 10.0)
    acts += p.handle_timer(10.2)
    assert 3 in p.nodes
    assert [a.node for a in acts if isinstance(a, SetSpeed)] == [3]


class _DyingNode1(FakeNodes):
    """Node 1 sends nothing from gseq 16 on; a HANDOVER makes node 0's address send node
    1's remaining packets as node 3 (its own numbering from 0)."""

    NEW = ("127.0.0.1", 7011)

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock, total=60)
        self.handovers: list[tuple[YimaFeedback, tuple[str, int]]] = []
        self.taken = False

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr == self.NEW:
            for part in parse_rtcp(data):
                self.rtcp.append((part, addr))
            return
        parts = parse_rtcp(data)
        if any(isinstance(p, YimaFeedback) and p.kind == YimaKind.HANDOVER for p in parts):
            for part in parts:
                self.handovers.append((part, addr))  # type: ignore[arg-type]
            self._take_over(parts[0].aux)  # type: ignore[union-attr]
            return
        super().send(data, addr)

    def _take_over(self, gseq: int) -> None:
        if self.taken:
            return
        self.taken = True
        tpl = RtpHeaderTemplate(33, self.ssrc, 3)
        ns = 0
        for g in range(gseq, self.total):
            if (g // self.ppb) % 3 != 1:
                continue
            ts = self.rtptime + round(g * self.step * 90000)
            self.deliver_later(tpl.build(self.seq_base + g, ts, bytes([g % 256]) * 188, ns),
                               self.NEW, LATENCY)  # fmt: skip
            ns += 1


def test_shell_hands_over_a_dead_nodes_share_and_plays_everything() -> None:
    """End to end on a fake clock: node 1 dies between blocks; the player asks for the
    share of its first missing packet, which comes back as node 3 from a new address;
    nothing is missing at playout."""
    clock = Clock()
    nodes = _DyingNode1(clock)
    out: list[bytes] = []
    s = PlayerSession(clock, [nodes.info()], ShellConfig(prebuffer=1.0), nodes.send,
                      lambda st, p: out.append(p))  # fmt: skip
    nodes.session = s
    s.probe_all()
    pump(clock, 0.01)
    s.start()
    nodes.schedule(skip=frozenset(g for g in range(16, 60) if (g // 4) % 3 == 1))
    stats: dict[str, Any] = {}
    s.done.addCallback(stats.update)
    for _ in range(20000):
        if stats:
            break
        clock.advance(0.001)
    assert stats["packets_missing_at_playout"] == 0
    assert out == [bytes([g % 256]) * 188 for g in range(60)]
    # Block 4 (node 1's) never arrived at all: the owner is unknown to the player, so
    # the request names packet 16 and goes to every node (the RTSP node knows the owner).
    fb = nodes.handovers[0][0]
    assert fb.value == 0xFFFFFFFF and fb.aux == 16
    assert {a for _, a in nodes.handovers} == set(ADDRS.values())
    assert s.streams["0:clip"].nodes[3] == _DyingNode1.NEW
    assert 3 in stats["node_indices"]
    assert not [a for p, a in nodes.rtcp if isinstance(p, GenericNack) and a == _DyingNode1.NEW]


def test_a_slow_stream_is_not_taken_for_a_silent_node() -> None:
    """A low-bitrate stream (a 25 kbit/s audio TS: one packet per 0.4 s of media) from one
    node, on time: neither a hand-over nor a NACK for the packet not yet due."""
    cfg = PlayerConfig.for_rate(1316 / 0.4, flow="none", prebuffer=1.0, packets_per_block=40)
    p = StreamPlayer("s", [0, 1, 2], start_ct=10.0, config=cfg, total=40)
    p.start(9.0)
    acts: list[Any] = []
    t = 9.0
    for g in range(40):
        arrival = 10.0 + g * 0.4  # the first one at the start: no interval measured yet
        while t < arrival:
            acts += p.handle_timer(t)
            t += 0.05
        acts += p.receive(PacketArrived("s", 0, g, g, g * 0.4, 1316), arrival)
    assert not [a for a in acts if isinstance(a, RequestHandover)]
    assert p.stats()["nacks_sent"] == 0
