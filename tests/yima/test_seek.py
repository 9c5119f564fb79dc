"""Seeking: the time index searched by bisection, and RTSP PLAY/PAUSE on one node's relay.

The RTSP tests run the real :class:`YimaStreamingService` of a one-node cluster on a
:class:`task.Clock`, with in-memory UDP ports: its engine hands every packet to the
session's relay, which forwards it to the client (captured instead of sent).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import maybeDeferred, succeed

from yimaporc.cluster.membership import Member
from yimaporc.cluster.rpc import RpcRegistry
from yimaporc.rtp import RtpHeaderTemplate
from yimaporc.rtsp import RtspStatusError
from yimaporc.rtsp._machine import ServerSession
from yimaporc.rtsp._wire import NptRange, TransportSpec, parse_rtp_info
from yimaporc.testing.yima import UdpClock
from yimaporc.yima.media import KIND_TS, MediaInfo
from yimaporc.yima.placement import LogicalDisk
from yimaporc.yima.relay import Reorderer, rewrite
from yimaporc.yima.rtspservice import RELAY_LEAD, YimaStreamingService
from yimaporc.yima.schedule import PAYLOAD, MediaTiming, NodeScheduler

# --- the time index -------------------------------------------------------------------


def brute_first(m: MediaTiming, t: float) -> int:
    """The first global packet at or after ``t``, by walking every packet."""
    g = 0
    for b in range(m.blocks):
        for j in range(m.packet_count(b)):
            if m.packet_time(b, j) >= t:
                return b * m.packets_per_block + j
            g = b * m.packets_per_block + j + 1
    return g


@st.composite
def timings(draw: st.DrawFn) -> MediaTiming:
    """Media with 1-5 payloads per block, VBR durations (some zero), a short last block."""
    ppb = draw(st.integers(1, 5))
    blocks = draw(st.integers(1, 12))
    tail = draw(st.integers(0, ppb * PAYLOAD - 1))
    durations = draw(st.lists(st.sampled_from([0.0, 0.1, 0.25, 1.0, 1 / 3, 2.7]),
                              min_size=blocks, max_size=blocks))  # fmt: skip
    starts, t = [], draw(st.sampled_from([0.0, 0.5]))
    for d in durations:
        starts.append(t)
        t += d
    size = blocks * ppb * PAYLOAD - tail
    size = max(size, (blocks - 1) * ppb * PAYLOAD + 1)
    return MediaTiming("m", size, ppb * PAYLOAD, tuple(starts), t + draw(st.sampled_from([0, 0.3])))


@given(timings(), st.floats(-1.0, 40.0, allow_nan=False))
def test_bisection_finds_the_same_packet_as_a_walk(m: MediaTiming, t: float) -> None:
    """first_gseq_at(t) is the first packet whose time is >= t, as a packet walk finds it."""
    assert m.first_gseq_at(t) == brute_first(m, t)
    assert m.total == sum(m.packet_count(b) for b in range(m.blocks))


@given(timings(), st.data())
def test_bisection_at_exact_packet_times(m: MediaTiming, data: st.DataObject) -> None:
    """Seeking to a packet's own media time lands on the first packet with that time."""
    g = data.draw(st.integers(0, m.total - 1))
    t = m.gseq_time(g)
    assert m.first_gseq_at(t) == brute_first(m, t) <= g


def test_damaged_time_index_is_flattened_to_non_decreasing() -> None:
    """A time index that goes back is read as non-decreasing, so bisection stays exact."""
    m = MediaTiming("m", 4 * PAYLOAD, PAYLOAD, (0.0, 2.0, 1.0, 3.0), 4.0)
    assert m.block_starts == (0.0, 2.0, 2.0, 3.0)
    assert [m.first_gseq_at(t) for t in (0.5, 2.0, 2.5)] == [1, 1, 3]


@given(timings(), st.floats(0.0, 30.0, allow_nan=False), st.integers(0, 2))
def test_scheduler_starts_at_the_bisected_packet(m: MediaTiming, t: float, node: int) -> None:
    """A node's share starts at its first packet at or after the start position."""
    s = NodeScheduler()
    mine = [b for b in range(m.blocks) if b % 3 == node]
    sess = s.add("s", m, mine, start_ct=0.0, start_mt=t)
    walked = [(b, j) for b in mine for j in range(m.packet_count(b)) if m.packet_time(b, j) >= t]
    assert (sess.peek() or (None, None))[:2] == (walked[0] if walked else (None, None))


def test_seek_of_a_served_session_keeps_the_node_counter() -> None:
    """Re-adding a session (a seek) goes on with its per-node sequence counter."""
    m = MediaTiming("m", 10 * PAYLOAD, PAYLOAD, tuple(float(i) for i in range(10)), 10.0)
    s = NodeScheduler()
    s.add("s", m, range(10), start_ct=0.0)
    sent = s.tick(2.5)
    s.add("s", m, range(10), start_ct=3.0, start_mt=7.0)
    after = s.tick(3.0)
    assert [p.node_seq for p in sent] == [0, 1, 2]
    assert [(p.gseq, p.node_seq) for p in after] == [(7, 3)]


def test_a_multi_hour_index_seeks_fast() -> None:
    """A 3-hour file of 10,000 blocks: a thousand seeks take well under a second."""
    import time

    blocks = 10_000
    m = MediaTiming("m", blocks * 200 * PAYLOAD, 200 * PAYLOAD,
                    tuple(i * 1.08 for i in range(blocks)), blocks * 1.08)  # fmt: skip
    t0 = time.perf_counter()
    for k in range(1000):
        m.first_gseq_at(k * 10.7)
    assert time.perf_counter() - t0 < 0.5


# --- the relay's rewrite ----------------------------------------------------------------


def test_rewrite_strips_the_extension_for_a_standard_client() -> None:
    """Without the opt-in: X bit 0, a 12-byte header, new seq and SSRC, payload intact."""
    data = RtpHeaderTemplate(33, 0x1111, 2).build(500, 9000, b"\x47" * 188, 7, marker=True)
    out = rewrite(data, 0x1_0005, (0xABCD).to_bytes(4, "big"), keep_extension=False)
    assert out[0] == 0x80 and out[1] == 0x80 | 33
    assert out[2:4] == (5).to_bytes(2, "big") and out[4:8] == data[4:8]
    assert out[8:12] == (0xABCD).to_bytes(4, "big") and out[12:] == b"\x47" * 188
    kept = rewrite(data, 5, (0xABCD).to_bytes(4, "big"), keep_extension=True)
    assert kept[0] == 0x90 and kept[12:] == data[12:] and len(kept) == len(data)


# --- RTSP on one node: PLAY, seek, PAUSE, PLAY --------------------------------------------

SIZE = 300 * PAYLOAD  # 30 blocks of 10 packets, 1 s each: 30 s
BLOCK = 10 * PAYLOAD
URL = "rtsp://127.0.0.1:8554/clip/track1"


def one_node() -> tuple[YimaStreamingService, UdpClock, list[bytes]]:
    reactor = UdpClock()
    member = Member("a", "127.0.0.1:7946")
    node = SimpleNamespace(
        registry=RpcRegistry(), cluster_time=reactor.seconds, add_status=lambda f: None,
        subscribe=lambda s: None, node_id="a", view=SimpleNamespace(members=[member]),
        rpc=None, config=SimpleNamespace(cluster_host="127.0.0.1"),
    )  # fmt: skip
    info = MediaInfo("clip", KIND_TS, SIZE, BLOCK, 1, streamable=True, duration=30.0,
                     block_times=tuple(i * 1_000_000 for i in range(30)))  # fmt: skip
    data = bytes(range(256)) * (SIZE // 256 + 1)

    def read_block(name: str, b: int) -> Any:
        from twisted.internet.defer import succeed

        return succeed(data[b * BLOCK : (b + 1) * BLOCK])

    storage = SimpleNamespace(
        media_info=lambda name: info, read_block=read_block,
        time_index=lambda name: succeed(info), run_blocking=maybeDeferred,
        places=lambda info, key: [LogicalDisk("d0", "a", "p0")],
        blocks_of_node=lambda name, node_id: succeed(list(range(info.blocks))),
    )  # fmt: skip
    svc = YimaStreamingService(node, reactor, storage, rtsp_endpoint=None)  # type: ignore[arg-type]
    out: list[bytes] = []
    svc._send = lambda data, addr: out.append(data) if addr[1] == 5000 else None  # type: ignore[method-assign]
    return svc, reactor, out


def _session(svc: YimaStreamingService) -> ServerSession:
    session = ServerSession("S1", 60.0, 0.0, peer="127.0.0.1")
    spec = TransportSpec(client_port=(5000, 5001))
    session.streams[URL] = spec
    svc.setup(URL, spec, session)
    return session


def _reply(d: Any) -> Any:
    got: list[Any] = []
    d.addBoth(got.append)
    assert got, "answered at once"
    if isinstance(got[0], Exception) or hasattr(got[0], "raiseException"):
        got[0].raiseException()
    return got[0]


def _seq(p: bytes) -> int:
    return int.from_bytes(p[2:4], "big")


def test_play_seek_pause_play_keeps_seq_continuous_and_rtp_info_exact() -> None:
    """PLAY, seek forwards and backwards while playing, PAUSE (answers Range), PLAY:
    RTP-Info names the seq and rtptime of the next packet the client gets; the client's
    sequence numbers go on by one throughout, plain 12-byte RTP from one SSRC."""
    svc, reactor, out = one_node()
    session = _session(svc)
    plan = svc.plans["S1"]
    replies = [_reply(svc.play(session, NptRange(2.0, None)))]
    marks = [0]

    def run(seconds: float) -> None:
        for _ in range(int(seconds * 100)):
            reactor.advance(0.01)

    # The relay plays RELAY_LEAD behind what the nodes send: 2 s of playing take longer.
    run(2.0 + RELAY_LEAD)
    for start in (20.0, 5.0):
        marks.append(len(out))
        replies.append(_reply(svc.play(session, NptRange(start, None))))
        run(2.0 + RELAY_LEAD)
    paused = _reply(svc.pause(session))
    run(1.0)
    marks.append(len(out))
    replies.append(_reply(svc.play(session, None)))
    run(1.0)
    # The relay plays out from the reply (the lead is sent at once) and stops at PAUSE.
    assert paused.start == pytest.approx(5.0 + 2.0 + RELAY_LEAD)
    for mark, reply in zip(marks, replies, strict=True):
        (info,) = reply.rtp_info
        assert info.url == URL
        assert (info.seq, info.rtptime) == (_seq(out[mark]), int.from_bytes(out[mark][4:8], "big"))
    assert [r.range.start for r in replies[:3]] == [2.0, 20.0, 5.0]
    assert replies[3].range.start == pytest.approx(paused.start, abs=0.1)
    seqs = [_seq(p) for p in out]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs)), seqs
    assert all(p[0] == 0x80 and p[8:12] == plan.ssrc.to_bytes(4, "big") for p in out)
    assert all(len(p) == 12 + PAYLOAD for p in out)
    # RTP timestamps never go back, a backward seek included (they go on with wall
    # time across a seek); within a position they follow the media time from RTP-Info.
    ts = [int.from_bytes(p[4:8], "big") for p in out]
    assert all(0 < (b - a) & 0xFFFFFFFF < 0x80000000 for a, b in itertools.pairwise(ts)), ts
    for mark, end, reply in zip(marks[:3], marks[1:4], replies[:3], strict=True):
        rtptime, t0 = reply.rtp_info[0].rtptime, reply.range.start
        times = [t0 + ((t - rtptime) & 0xFFFFFFFF) / 90000 for t in ts[mark:end]]
        assert times == pytest.approx([t0 + 0.1 * k for k in range(end - mark)])


def test_packets_of_the_old_position_are_dropped_after_a_seek() -> None:
    """A node's packet for the position before a seek (old SSRC) is not forwarded."""
    svc, reactor, out = one_node()
    session = _session(svc)
    _reply(svc.play(session, NptRange(0.0, None)))
    for _ in range(100):
        reactor.advance(0.01)
    plan = svc.plans["S1"]
    old_ssrc = plan.node_ssrc
    _reply(svc.play(session, NptRange(1.0, None)))  # backwards: the old packets lie ahead
    assert plan.node_ssrc != old_ssrc
    n = len(out)
    stale = RtpHeaderTemplate(33, old_ssrc, 0).build(plan.seq_base + 15, 0, b"\x47" * 188, 99)
    svc._relayed("S1", stale)
    assert len(out) == n and plan.relay is not None and plan.relay.stats.stale == 1


def test_seek_past_the_end_is_457_with_a_reason() -> None:
    """PLAY Range starting after the end answers 457 saying why."""
    svc, _, _ = one_node()
    session = _session(svc)
    with pytest.raises(RtspStatusError) as e:
        svc.play(session, NptRange(31.0, None))
    assert e.value.status == 457 and "past the end" in e.value.reason


def test_reorderer_reset_drops_what_it_held() -> None:
    """reset(first) forgets held packets and starts over at ``first``."""
    r = Reorderer(first=0)
    assert r.push(2, b"two", 0.0) == []
    r.reset(10)
    assert r.push(10, b"ten", 0.1) == [b"ten"]
    assert r.tick(5.0) == []


def test_seek_to_the_very_end_ends_the_stream_with_bye() -> None:
    """PLAY Range at the end sends no packet and an RTCP BYE after the grace time."""
    svc, reactor, _ = one_node()
    rtcp: list[bytes] = []
    svc._send = lambda data, addr: rtcp.append(data) if addr[1] == 5001 else None  # type: ignore[method-assign]
    session = _session(svc)
    reply = _reply(svc.play(session, NptRange(30.0, None)))
    assert reply.range.start == 30.0
    reactor.advance(2.0)
    assert svc.plans["S1"].bye_sent and any(
        data[1] == 203 or b"end of stream" in data for data in rtcp
    )


def test_seek_restarts_a_taken_over_share_with_its_index_and_blocks() -> None:
    """After a takeover, a seek restarts the departed node's share here: same blocks,
    same (takeover) node index, the session's new internal SSRC, from the new position."""
    svc, _, _ = one_node()
    session = _session(svc)
    _reply(svc.play(session, NptRange(0.0, None)))
    plan = svc.plans["S1"]
    plan.members = ("a", "b")
    plan.takeovers["b"] = "S1+b"
    plan.takeover_index["b"] = 2
    svc.streaming.start(session="S1+b", media="clip", start_ct=0.0, start_mt=0.0, host="h",
                        port=1, ssrc=plan.node_ssrc, seq_base=plan.seq_base, ts_base=0,
                        node_index=2, all_blocks=False, blocks=[1, 3, 5])  # fmt: skip
    _reply(svc.play(session, NptRange(4.0, None)))
    taken = svc.streaming.scheduler.sessions["S1+b"]
    dest = svc.streaming.destinations["S1+b"]
    assert taken.my_blocks == (1, 3, 5) and dest.node_index == 2
    assert dest.ssrc == plan.node_ssrc and (taken.peek() or (None,))[0] == 5


def test_relayed_nack_after_a_seek_names_the_right_packets() -> None:
    """A standard client's NACK (its own, renumbered seqs) after a backward seek is mapped
    back to the global packets of the new position."""
    from yimaporc.rtp import GenericNack, nack_items_from_lost, serialize_rtcp

    svc, reactor, _ = one_node()
    session = _session(svc)
    _reply(svc.play(session, NptRange(10.0, None)))
    for _ in range(150):
        reactor.advance(0.01)
    reply = _reply(svc.play(session, NptRange(2.0, None)))
    for _ in range(100):
        reactor.advance(0.01)
    asked: list[list[int] | None] = []
    svc.streaming.nack = lambda s, ns, gs=None: asked.append(gs) or {}  # type: ignore[method-assign,assignment]
    first = reply.rtp_info[0].seq
    lost = [(first + 3) & 0xFFFF, (first + 4) & 0xFFFF]
    nack = GenericNack(1, svc.plans["S1"].ssrc, nack_items_from_lost(lost))
    svc.feedback.datagram(serialize_rtcp(nack), None)
    assert asked == [[23, 24]]  # 2.0 s is block 2, packet 0: gseq 20


# --- RTSP over TCP interleaved: nothing of the old position after the PAUSE reply ------


class _TcpClient:
    """A player on one RTSP connection (interleaved TCP) to the one-node service: what it
    reads, in order, as ('reply', method, response) and ('rtp', seq, rtptime) items."""

    def __init__(self, svc: YimaStreamingService) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from yimaporc.rtsp import RtspClientConnection

        self.proto = svc.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.conn = RtspClientConnection()
        self.seen: list[tuple[Any, ...]] = []

    def send(self, pair: tuple[int, bytes]) -> None:
        self.proto.dataReceived(pair[1])
        self.read()

    def read(self) -> None:
        from yimaporc.rtsp import InterleavedFrame

        data = self.transport.value()
        self.transport.clear()
        if data:
            self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if isinstance(event, InterleavedFrame):
                if event.channel == 0:
                    rtptime = int.from_bytes(event.data[4:8], "big")
                    self.seen.append(("rtp", _seq(event.data), rtptime))
            elif hasattr(event, "response"):
                self.seen.append(("reply", event.method, event.response))
            else:
                return


@pytest.mark.parametrize("phase", [k / 100 for k in range(10)])
def test_no_rtp_of_the_old_position_follows_the_pause_reply_over_tcp(phase: float) -> None:
    """GStreamer's seek over TCP (PAUSE, then PLAY with Range): no RTP frame reaches the
    connection after the PAUSE reply (a player flushes at PAUSE and takes a late frame of
    the old position as the timing base of the new one), whatever the phase of the
    packet clock; the first frame after the PLAY reply is the one its RTP-Info names, and
    the sequence numbers go on by one."""
    svc, reactor, _ = one_node()
    c = _TcpClient(svc)
    c.send(c.conn.setup(URL, TransportSpec(lower="TCP", interleaved=(0, 1))))
    c.send(c.conn.play(URL.rsplit("/", 1)[0]))
    for _ in range(int((RELAY_LEAD + 0.5 + 1.0 + phase) * 100)):
        reactor.advance(0.01)
        c.read()
    c.send(c.conn.pause(URL.rsplit("/", 1)[0]))
    for _ in range(50):
        reactor.advance(0.01)
        c.read()
    c.send(c.conn.play(URL.rsplit("/", 1)[0], NptRange(10.0, None)))
    for _ in range(300):
        reactor.advance(0.01)
        c.read()
    methods = [s[1] for s in c.seen if s[0] == "reply"]
    assert methods == ["SETUP", "PLAY", "PAUSE", "PLAY"]
    kinds = [s[1] if s[0] == "reply" else "rtp" for s in c.seen]
    pause_at = kinds.index("PAUSE")
    assert kinds[pause_at + 1] == "PLAY", kinds[pause_at - 3 : pause_at + 4]
    (info,) = parse_rtp_info(c.seen[pause_at + 1][2].headers.get("RTP-Info"))
    assert c.seen[pause_at + 2] == ("rtp", info.seq, info.rtptime)
    seqs = [s[1] for s in c.seen if s[0] == "rtp"]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs)), seqs


def test_relayed_play_starts_at_the_reply_with_the_full_lead() -> None:
    """A relayed PLAY (and a seek): the first packet reaches the player right after the
    reply, not START_LEAD + RELAY_LEAD later, while the nodes' schedule is anchored
    RELAY_LEAD before the playout (the lead is sent at once), so every later packet is
    still held RELAY_LEAD; nothing is NACKed or skipped meanwhile."""
    svc, reactor, _ = one_node()
    c = _TcpClient(svc)
    c.send(c.conn.setup(URL, TransportSpec(lower="TCP", interleaved=(0, 1))))
    for start in (None, NptRange(12.0, None)):
        c.seen.clear()
        c.send(c.conn.play(URL.rsplit("/", 1)[0], start))
        reactor.advance(0)
        c.read()
        kinds = [s[0] if s[0] == "rtp" else s[1] for s in c.seen]
        assert kinds[:2] == ["PLAY", "rtp"], kinds
        plan = svc.plans[next(iter(svc.plans))]
        own = svc.streaming.scheduler.sessions[next(iter(svc.plans))]
        assert own.anchor_ct == pytest.approx(plan.started_ct - RELAY_LEAD)
        assert plan.started_ct == reactor.seconds() and plan.lead == pytest.approx(RELAY_LEAD)
        for _ in range(300):
            reactor.advance(0.01)
            c.read()
    assert plan.relay is not None and plan.relay.stats.gaps_skipped == 0
    assert plan.relay.stats.overdue_nacked == 0 and plan.nacked == {}


def test_pause_and_resume_answer_the_same_range_end_as_play() -> None:
    """Once DESCRIBE found the presentation's end (the last frame's PTS, past the PCR
    duration), PLAY, PAUSE and the resuming PLAY all answer it as the Range end: a
    player that takes the end for its stop (GStreamer) keeps the last frames."""
    svc, reactor, _out = one_node()
    info = svc.storage.media_info("clip")
    svc._ends["clip"] = (info, 30.7)
    session = _session(svc)
    assert _reply(svc.play(session, NptRange(2.0, None))).range.end == 30.7
    for _ in range(200):
        reactor.advance(0.01)
    assert _reply(svc.pause(session)).end == 30.7
    assert _reply(svc.play(session, None)).range.end == 30.7


def test_a_seek_within_the_announced_range_is_served() -> None:
    """The SDP's range ends with the last frame (past the PCR duration): a seek between
    the two starts at the end's keyframe instead of 457; only past that end is 457."""
    svc, _reactor, _out = one_node()
    svc._ends["clip"] = (svc.storage.media_info("clip"), 30.7)
    session = _session(svc)
    assert _reply(svc.play(session, NptRange(30.5, None))).range.end == 30.7
    with pytest.raises(RtspStatusError) as info:
        _reply(svc.play(session, NptRange(30.8, None)))
    assert info.value.status == 457 and "30.700" in info.value.reason
