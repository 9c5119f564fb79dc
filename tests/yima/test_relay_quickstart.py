"""The relay's quick start on two nodes: gaps in the PLAY burst, seeks while playing.

The RTSP node ``a`` runs the real :class:`YimaStreamingService` on a
:class:`task.Clock` with in-memory UDP ports and serves the even blocks itself; node
``b`` (odd blocks) is a fake behind a recording RPC: the test builds its packets
exactly as a node does and hands them to the relay when (and in the order) it
chooses.  A quick start sends the whole lead at once, so the first packets of
``b``'s share may arrive after ``a``'s later ones: the relay must wait for them.
"""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import deferLater

from yimaporc.cluster.membership import Member
from yimaporc.cluster.rpc import RpcRegistry
from yimaporc.rtp import PT_MP2T, RtpHeaderTemplate
from yimaporc.rtsp._machine import ServerSession
from yimaporc.rtsp._wire import NptRange, TransportSpec
from yimaporc.testing.yima import UdpClock
from yimaporc.yima.feedback import mark_retransmission
from yimaporc.yima.media import KIND_TS, MediaInfo
from yimaporc.yima.placement import LogicalDisk
from yimaporc.yima.rtspservice import OVERDUE, RELAY_LEAD, YimaStreamingService
from yimaporc.yima.schedule import PAYLOAD
from yimaporc.yima.streaming import StreamControl, StreamNack, StreamStart

SIZE = 300 * PAYLOAD  # 30 blocks of 10 packets, 1 s each: 30 s
BLOCK = 10 * PAYLOAD
URL = "rtsp://127.0.0.1:8554/clip/track1"
CLIENT = 5000


class _Rpc:
    """Node ``b`` as the RTSP node sees it: every call recorded, answered at once (or
    by ``answer``, a Deferred the test fires)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []
        self.answer: Deferred[Any] | None = None

    def call(self, address: str, command: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls.append((address, command, kwargs))
        if command is StreamStart and self.answer is not None:
            return self.answer
        return succeed({})

    def of(self, command: Any) -> list[dict[str, Any]]:
        return [kw for _, c, kw in self.calls if c is command]


class TwoNodes:
    """``a`` (the RTSP node, even blocks) and the fake ``b`` (odd blocks)."""

    def __init__(
        self, parity_group: int = 0, solo: bool = False, block_us: int = 1_000_000
    ) -> None:
        self.reactor = UdpClock()
        self.rpc = _Rpc()
        a = Member("a", "127.0.0.1:7946")
        b = Member("b", "127.0.0.2:7946")
        node = SimpleNamespace(
            registry=RpcRegistry(), cluster_time=self.reactor.seconds,
            add_status=lambda f: None, subscribe=lambda s: None, node_id="a",
            view=SimpleNamespace(members=[a] if solo else [a, b]), rpc=self.rpc,
            config=SimpleNamespace(cluster_host="127.0.0.1"),
        )  # fmt: skip
        self.info = MediaInfo("clip", KIND_TS, SIZE, BLOCK, 1, parity_group=parity_group,
                              streamable=True, duration=30.0,
                              block_times=tuple(i * block_us for i in range(30)))  # fmt: skip
        self.data = bytes(range(256)) * (SIZE // 256 + 1)
        info = self.info

        def owner(block: int) -> str:
            return "a" if solo or block % 2 == 0 else "b"

        storage = SimpleNamespace(
            media_info=lambda name: info,
            read_block=lambda name, b: succeed(self.data[b * BLOCK : (b + 1) * BLOCK]),
            read=lambda name, key, avoid=frozenset(): succeed(
                self.data[key.index * BLOCK : (key.index + 1) * BLOCK]
            ),
            time_index=lambda name: succeed(info), run_blocking=maybeDeferred,
            places=lambda info, key: [LogicalDisk(f"d{owner(key.index)}", owner(key.index), "p")],
            blocks_of_node=lambda name, node_id: succeed(
                [i for i in range(info.blocks) if owner(i) == node_id]
            ),
        )  # fmt: skip
        self.svc = YimaStreamingService(node, self.reactor, storage, rtsp_endpoint=None)  # type: ignore[arg-type]
        #: What the client got, in order.
        self.out: list[bytes] = []
        self.svc._send = self._capture  # type: ignore[method-assign]
        self.session = ServerSession("S1", 60.0, 0.0, peer="127.0.0.1")
        spec = TransportSpec(client_port=(CLIENT, CLIENT + 1))
        self.session.streams[URL] = spec
        self.svc.setup(URL, spec, self.session)
        self.plan = self.svc.plans["S1"]
        self._b_seq = 0

    def _capture(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[1] == CLIENT:
            self.out.append(data)

    def play(self, start: float | None) -> Any:
        """PLAY (with ``Range: npt=start-`` unless None); the reply, answered at once."""
        got: list[Any] = []
        rng = None if start is None else NptRange(start, None)
        self.svc.play(self.session, rng).addBoth(got.append)
        assert got, "answered at once"
        if hasattr(got[0], "raiseException"):
            got[0].raiseException()
        return got[0]

    def b_packets(self, gseqs: range | list[int], retransmission: bool = False) -> list[bytes]:
        """``b``'s packets ``gseqs`` as it sends them after its last StreamStart."""
        start = self.rpc.of(StreamStart)[-1]
        tpl = RtpHeaderTemplate(PT_MP2T, start["ssrc"], start["node_index"])
        timing = self.plan.timing
        assert timing is not None
        out = []
        for g in gseqs:
            ts = (start["ts_base"] + round(timing.gseq_time(g) * 90000)) & 0xFFFFFFFF
            payload = self.data[g * PAYLOAD : (g + 1) * PAYLOAD]
            data = tpl.build(start["seq_base"] + g, ts, payload, self._b_seq)
            self._b_seq += 1
            out.append(mark_retransmission(data) if retransmission else data)
        return out

    def from_b(self, gseqs: range | list[int], retransmission: bool = False) -> None:
        for data in self.b_packets(gseqs, retransmission):
            self.svc._relayed("S1", data)

    def run(self, seconds: float, step: float = 0.01) -> None:
        for _ in range(round(seconds / step)):
            self.reactor.advance(step)


def _seq(p: bytes) -> int:
    return int.from_bytes(p[2:4], "big")


def _continuous(out: list[bytes]) -> bool:
    return all((_seq(b) - _seq(a)) & 0xFFFF == 1 for a, b in itertools.pairwise(out))


def _b_gseqs(first: int, upto: int) -> list[int]:
    """``b``'s packets (odd blocks of 10) in [first, upto)."""
    return [g for g in range(first, upto) if (g // 10) % 2 == 1]


def test_a_gap_at_the_head_of_the_burst_is_held_until_the_share_arrives() -> None:
    """PLAY Range whose first packet is b's: a's later share of the burst arrives at
    once, b's 0.7 s later (after a's first packet falls due); the first packet the client
    gets is still the one RTP-Info names, and nothing is skipped."""
    t = TwoNodes()
    reply = t.play(3.5)  # 3.5 s: gseq 35, block 3, b's
    (info,) = reply.rtp_info
    t.run(0.7)
    assert t.out == [] and t.plan.relay is not None and t.plan.relay.stats.gaps_skipped == 0
    t.from_b(_b_gseqs(35, 52))  # b's burst, late: 35-39, 50, 51
    t.run(0.3)
    assert t.out, "released once the gap is filled"
    assert (_seq(t.out[0]), int.from_bytes(t.out[0][4:8], "big")) == (info.seq, info.rtptime)
    t.from_b(_b_gseqs(52, 80))
    t.run(3.0)
    assert _continuous(t.out) and len(t.out) > 30
    assert t.plan.relay.stats.gaps_skipped == 0


def test_a_gap_inside_the_burst_is_held_and_asked_of_its_owner_only() -> None:
    """PLAY from a's block: a's packets go, then b's block is missing; it is asked
    again of b alone (once overdue), held while b answers the re-request, and the
    client's numbers go on by one."""
    t = TwoNodes()
    reply = t.play(2.0)  # gseq 20, a's block 2; b's 30-39 follow
    t.run(OVERDUE + 0.5)  # b's whole block is overdue (the burst went at the reply)
    nacks = [(addr, kw["gseqs"]) for addr, c, kw in t.rpc.calls if c is StreamNack]
    assert nacks and {addr for addr, _ in nacks} == {"127.0.0.2:7946"}
    asked = sorted(g for _, gs in nacks for g in gs)
    assert asked[:10] == list(range(30, 40))
    t.run(1.0)  # b's block 3 is due 1 s after the reply: still held
    t.from_b(asked, retransmission=True)  # b answers the re-request
    t.from_b(_b_gseqs(40, 80))
    t.run(3.0)
    assert _seq(t.out[0]) == reply.rtp_info[0].seq and _continuous(t.out)
    assert t.plan.relay is not None and t.plan.relay.stats.gaps_skipped == 0


def test_a_share_that_never_comes_is_given_up_within_the_lead_not_stalled() -> None:
    """b never sends (no parity to rebuild from): the relay gives the gap up one lead
    after the reply at the latest, counts it, and a's packets flow on."""
    t = TwoNodes()
    t.play(3.5)
    t.run(RELAY_LEAD + 0.2)
    assert t.out, "not stalled"
    assert t.plan.relay is not None and t.plan.relay.stats.gaps_skipped >= 5
    assert _seq(t.out[0]) == (t.plan.seq_offset + 40) & 0xFFFF
    n = len(t.out)
    t.run(2.0)
    assert len(t.out) > n


@pytest.mark.parametrize("start", [None, 12.0])
def test_first_packet_after_every_play_is_the_one_rtp_info_names(start: float | None) -> None:
    """PLAY, PAUSE, then PLAY with or without Range, and PLAY without Range while
    playing: the first packet the client gets after each reply is the one RTP-Info
    names, with b's share arriving after a's."""
    t = TwoNodes()
    marks = [0]
    replies = [t.play(2.0)]
    t.from_b(_b_gseqs(20, 40))
    t.run(1.0)
    t.from_b(_b_gseqs(40, 60))
    t.run(1.0)
    t.svc.pause(t.session)
    t.run(0.5)
    marks.append(len(t.out))
    replies.append(t.play(start))
    first = replies[-1].rtp_info[0].seq - t.plan.seq_offset & 0xFFFF
    t.run(0.6)
    t.from_b(_b_gseqs(first, first + 40))
    t.run(1.0)
    marks.append(len(t.out))
    replies.append(t.play(None))  # while playing: the stream goes on
    t.from_b(_b_gseqs(first + 40, first + 80))
    t.run(1.0)
    for mark, reply in zip(marks, replies, strict=True):
        (info,) = reply.rtp_info
        assert (_seq(t.out[mark]), int.from_bytes(t.out[mark][4:8], "big")) == (
            info.seq,
            info.rtptime,
        )
    assert _continuous(t.out)


def test_a_slow_keyframe_lookup_while_playing_asks_for_nothing_and_takes_over_nobody() -> None:
    """A seek while playing whose keyframe lookup takes 1 s (a loaded disk): the old
    position's packets are stale from the PLAY on, yet no node is asked for them nor
    taken over as silent (b, the media having parity, would be stopped and read
    around); the new position starts on both nodes and plays from RTP-Info's packet."""
    t = TwoNodes(parity_group=2)
    t.play(2.0)
    t.from_b(_b_gseqs(20, 60))
    t.run(1.5)
    calls = len(t.rpc.calls)
    t.svc._keyframe_start = lambda info, timing, target: deferLater(  # type: ignore[method-assign]
        t.reactor, 1.0, lambda: None
    )
    got: list[Any] = []
    marks: list[int] = []
    d = t.svc.play(t.session, NptRange(12.0, None)).addBoth(got.append)
    d.addCallback(lambda _: marks.append(len(t.out)))
    t.run(1.2)
    assert got and not hasattr(got[0], "raiseException"), got
    during = [c for _, c, _ in t.rpc.calls[calls:]]
    assert StreamStart in during, f"b not restarted: {during}"
    during = during[: during.index(StreamStart)]  # before the new position started
    assert StreamNack not in during and StreamControl not in during, during
    assert not t.plan.takeovers and not t.svc.suspects
    assert t.rpc.of(StreamStart)[-1]["start_mt"] == pytest.approx(12.0)
    t.from_b(_b_gseqs(120, 160))
    t.run(2.0)
    (info,) = got[0].rtp_info
    assert _seq(t.out[marks[0]]) == info.seq and _continuous(t.out)


@pytest.mark.parametrize("phase", [k / 2000 for k in range(8)])
def test_play_after_pause_names_a_packet_not_yet_forwarded(phase: float) -> None:
    """PAUSE lands just after a relay tick that forwarded packets falling due within
    SEND_AHEAD (dense media: a packet every 5 ms); PLAY resumes, and RTP-Info names the
    next packet the client gets, never one it already got before the PAUSE (a client
    waiting for that packet would wait until its session timed out)."""
    t = TwoNodes(solo=True, block_us=50_000)  # 10 packets per 50 ms block, 1.5 s
    t.play(0.0)
    t.run(0.5, step=0.001)
    t.run(phase, step=0.0005)
    t.svc.pause(t.session)
    t.run(0.2)
    mark = len(t.out)
    reply = t.play(None)
    t.run(0.6, step=0.001)
    (info,) = reply.rtp_info
    assert info.seq not in [_seq(p) for p in t.out[:mark]]
    assert (_seq(t.out[mark]), int.from_bytes(t.out[mark][4:8], "big")) == (
        info.seq,
        info.rtptime,
    )
    assert _continuous(t.out)


def test_a_pause_overtaking_a_plays_start_leaves_the_overdue_watch_working() -> None:
    """A PAUSE handled while b has not yet answered the PLAY's start: after PLAY resumes,
    b's missing block is still asked of b (the watch runs again) and the client gets
    the packet RTP-Info names first."""
    t = TwoNodes()
    t.rpc.answer = Deferred()
    got: list[Any] = []
    t.svc.play(t.session, NptRange(2.0, None)).addBoth(got.append)
    t.svc.pause(t.session)
    t.rpc.answer.callback({})
    t.rpc.answer = None
    assert got and not hasattr(got[0], "raiseException"), got
    t.run(0.3)
    before = len(t.rpc.of(StreamNack))
    mark = len(t.out)
    reply = t.play(None)
    t.run(1.5)
    assert len(t.rpc.of(StreamNack)) > before  # b's block 3 is overdue: asked of b
    assert _seq(t.out[mark]) == reply.rtp_info[0].seq


def _relay_port_protocol(t: TwoNodes) -> Any:
    return t.reactor.protocols[t.plan.relay_addr[1]]


def test_the_relay_takes_a_run_in_one_read_as_it_takes_its_datagrams() -> None:
    """b's share handed to the relay socket's protocol as GRO runs (one per block) gives
    the client the same packets, in order, as one datagram per read; the relay counts
    each run as one read of its datagrams."""
    outs = []
    for batched in (False, True):
        t = TwoNodes()
        t.play(2.0)
        proto = _relay_port_protocol(t)
        for block in range(3, 8, 2):  # b's blocks 3, 5, 7: one run each
            packets = t.b_packets(_b_gseqs(block * 10, block * 10 + 10))
            if batched:
                proto.datagramsReceived(b"".join(packets), len(packets[0]), ("127.0.0.2", 1))
            else:
                for p in packets:
                    proto.datagramReceived(p, ("127.0.0.2", 1))
        t.run(5.0)
        assert t.plan.relay is not None
        stats = t.svc.relay_stats()
        assert stats["received"] == 30
        assert stats["receive_reads"] == (3 if batched else 30)
        assert stats["skipped"] == 0
        assert _continuous(t.out)
        outs.append([p[12:] for p in t.out])  # the payloads (SSRC, numbers are random)
    assert outs[0] == outs[1] and len(outs[0]) >= 50


class _Sender:
    """A DatagramSender's batch call as the relay uses it, recorded (single datagrams
    go through the service's ``_send``, which TwoNodes captures)."""

    def __init__(self) -> None:
        self.batches: list[tuple[bytes, int]] = []

    def send_segments(self, buf: Any, size: int, addr: tuple[str, int]) -> None:
        self.batches.append((bytes(buf), size))

    def flush(self) -> bool:
        return True


def test_a_release_of_n_packets_is_one_segmented_send_of_the_rewritten_run() -> None:
    """The relay forwards what one release gives as one send_segments call (one GSO
    sendmsg) of the packets rewritten back to back, byte for byte what the per-packet
    rewrite gave; packets of mixed sizes go one by one."""
    t = TwoNodes()
    t.play(2.0)
    sender = _Sender()
    t.svc.sender = sender  # type: ignore[assignment]
    packets = t.b_packets(range(30, 36))
    t.svc._forward("S1", t.plan, packets)
    want = [t.svc._to_client(t.plan, p) for p in packets]
    assert sender.batches == [(b"".join(want), len(want[0]))]
    assert t.plan.packets >= 6
    short = [*packets[:2], packets[2][:-100], packets[3]]  # a short one in the middle
    mark = len(t.out)
    t.svc._forward("S1", t.plan, short)
    assert len(sender.batches) == 1  # no batch: one _send (captured in t.out) each
    assert t.out[mark:] == [t.svc._to_client(t.plan, p) for p in short]


@pytest.mark.parametrize("playing", [True, False])
@pytest.mark.parametrize("position", [0.0, 3.3, 7.0])
def test_due_upto_is_the_first_packet_due_says_is_not_due(playing: bool, position: float) -> None:
    """_relay_due_upto(plan, now) is exactly the first gseq for which _relay_due(plan, g)
    > now (all of them once the end is due), playing (at two speeds) and paused, at
    every instant around the packets'."""
    t = TwoNodes()
    t.play(position)
    plan = t.plan
    timing = plan.timing
    assert timing is not None
    for speed in (1.0, 1.37):
        plan.speed = speed
        if not playing:
            plan.playing, plan.paused_ct = False, plan.started_ct + 1.5
        # past the last packet (gseq total and on) due() is the end's instant
        due = [t.svc._relay_due(plan, g) for g in range(timing.total + 1)]
        instants = {d + e for d in due if d != float("inf") for e in (-1e-9, 0.0, 1e-9)}
        for now in sorted(instants | {-5.0, 1e9}):
            want = next((g for g, d in enumerate(due) if d > now), None)
            got = t.svc._relay_due_upto(plan, now)
            assert got == (want if want is not None else 1 << 62), (speed, now)


@pytest.mark.parametrize("seed", range(12))
def test_runs_with_duplicates_stale_and_late_packets_come_out_as_one_by_one(seed: int) -> None:
    """b's share in shuffled runs with duplicates, packets of a stale SSRC, late
    retransmissions and some never sent, at random instants: handed to the relay as
    GRO runs, the client gets the same packets (numbers relative to the first, payloads)
    and the relay counts the same as with one datagram per read."""
    outs, stats = [], []
    for batched in (False, True):
        rng = random.Random(seed)
        t = TwoNodes()
        t.play(2.0)
        proto = _relay_port_protocol(t)

        def give(packets: list[bytes], proto: Any = proto, batched: bool = batched) -> None:
            if packets and batched:
                proto.datagramsReceived(b"".join(packets), len(packets[0]), ("127.0.0.2", 1))
            elif packets:
                for p in packets:
                    proto.datagramReceived(p, ("127.0.0.2", 1))

        upto, dropped = 20, []
        while upto < 300:
            t.run(rng.choice([0.0, 0.01, 0.3, 0.8]))
            gseqs = _b_gseqs(upto, upto + rng.randint(1, 12))
            upto += 12
            dropped += [g for g in gseqs if rng.random() < 0.1]
            gseqs = [g for g in gseqs if g not in dropped]
            rng.shuffle(gseqs) if rng.random() < 0.3 else None
            if gseqs and rng.random() < 0.3:
                gseqs.insert(rng.randrange(len(gseqs)), rng.choice(gseqs))  # a duplicate
            again = rng.random() < 0.3  # some dropped ones resent: in time, or too late
            if again:
                gseqs, dropped = dropped[:3], dropped[3:]
            packets = t.b_packets(gseqs, retransmission=again)
            if packets and rng.random() < 0.2:  # one with another SSRC (before a seek)
                k = rng.randrange(len(packets))
                packets[k] = packets[k][:8] + b"\x00\x00\x00\x01" + packets[k][12:]
            give(packets)
        t.run(30.0)
        give(t.b_packets(dropped, retransmission=True))  # answers to NACKs given up on
        t.run(1.0)
        first = _seq(t.out[0])
        outs.append([((_seq(p) - first) & 0xFFFF, p[12:]) for p in t.out])
        got = t.svc.relay_stats()
        del got["receive_reads"]
        stats.append(got)
    assert outs[0] == outs[1] and len(outs[0]) > 100
    assert stats[0] == stats[1]
    assert stats[0]["stale"] and stats[0]["duplicates"] and stats[0]["skipped"]


@pytest.mark.parametrize("ahead", [0.01, 0.04])
def test_a_release_takes_what_falls_due_within_the_relay_send_ahead_and_no_more(
    ahead: float,
) -> None:
    """With --relay-send-ahead-ms 10 or 40, every packet reaches the client no earlier
    than that before it is due and no later than one clock step after; 40 ms sends the
    same packets in fewer, larger batches."""
    t = TwoNodes(block_us=100_000)  # 100 packets/s
    t.svc.relay_send_ahead = t.svc.relay_clock.slack = ahead
    sent: list[tuple[float, bytes, int]] = []

    class _Timed:
        def send_segments(self, buf: Any, size: int, addr: tuple[str, int]) -> None:
            sent.extend((t.reactor.seconds(), bytes(buf[i : i + size]), len(buf) // size)
                        for i in range(0, len(buf), size))  # fmt: skip

        def send(self, data: bytes, addr: tuple[str, int]) -> None:
            if addr[1] == CLIENT:  # not RTCP
                sent.append((t.reactor.seconds(), bytes(data), 1))

        def flush(self) -> bool:
            return True

    t.svc.sender = _Timed()  # type: ignore[assignment]
    t.svc._send = lambda data, addr: t.svc.sender.send(data, addr)  # type: ignore[method-assign,union-attr]
    t.play(0.0)
    t.from_b(_b_gseqs(0, 300))
    t.run(6.0, step=0.001)
    plan = t.plan
    assert len(sent) >= 250
    for at, p, _ in sent:
        gseq = (_seq(p) - plan.seq_offset) & 0xFFFF
        due = t.svc._relay_due(plan, gseq)
        assert due - ahead - 1e-6 <= at <= due + 0.0011, (gseq, at, due)
    batch = sum(n for _, _, n in sent) / len(sent)
    assert batch > (3.0 if ahead == 0.04 else 1.0)
