"""Node side of the player's RTCP: NACKs resend once, YIMA feedback re-anchors, probes answer."""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from yimaporc.rtp import (
    App,
    GenericNack,
    YimaFeedback,
    YimaKind,
    nack_items_from_lost,
    parse_rtcp,
    serialize_rtcp,
)
from yimaporc.yima.feedback import (
    FeedbackReceiver,
    ProbeReply,
    parse_probe,
    probe_request,
)
from yimaporc.yima.schedule import PAYLOAD, MediaTiming, Packet
from yimaporc.yima.streaming import Destination, StreamingNode

BLOCK = 4 * PAYLOAD
M = MediaTiming("clip", 9 * BLOCK, BLOCK, tuple(float(i) for i in range(9)), 9.0)
SSRC = 0xABCD


def packetize(p: Packet, d: Destination, payload: bytes) -> bytes:
    return struct.pack("!HIB", p.gseq, p.node_seq, int(p.retransmission)) + payload


class Setup:
    def __init__(self, relay: Any = None) -> None:
        self.clock = Clock()
        self.wire: list[tuple[bytes, Any]] = []
        self.replies: list[tuple[bytes, Any]] = []
        self.node = StreamingNode(
            self.clock,
            self.clock.seconds,
            timing=lambda name: M,
            my_blocks=lambda name: [0, 3, 6],
            read_block=lambda name, b: succeed(bytes([b]) * BLOCK),
            packetize=packetize,
            send=lambda data, addr: self.wire.append((data, addr)),
        )
        self.rx = FeedbackReceiver(
            self.node,
            self.clock.seconds,
            lambda data, addr: self.replies.append((data, addr)),
            relay=relay,
        )

    def start(self) -> None:
        self.node.start("s1", "clip", 1.0, 0.0, "127.0.0.9", 5000, SSRC, 0, 0, 0, False)

    def run(self, until: float) -> None:
        while self.clock.seconds() < until:
            self.clock.advance(0.01)

    def sent(self) -> list[tuple[int, int, bool]]:
        return [struct.unpack("!HIB", d[:7]) for d, _ in self.wire]  # type: ignore[misc]


def nack(seqs: list[int]) -> bytes:
    return serialize_rtcp(GenericNack(1, SSRC, nack_items_from_lost(s & 0xFFFF for s in seqs)))


def test_nack_resends_own_packets_once_marked() -> None:
    """A NACK of this node's per-node seqs resends each packet once, as a retransmission."""
    t = Setup()
    t.start()
    t.run(2.0)
    first = t.sent()
    assert [ns for _, ns, _ in first] == list(range(len(first)))
    before = len(t.wire)
    t.rx.datagram(nack([1, 2]), ("127.0.0.9", 5001))
    resent = t.sent()[before:]
    assert [(ns, r) for _, ns, r in resent] == [(1, 1), (2, 1)]
    assert {a for _, a in t.wire[before:]} == {("127.0.0.9", 5000)}
    assert [g for g, _, _ in resent] == [first[1][0], first[2][0]]
    t.rx.datagram(nack([1, 2]), ("127.0.0.9", 5001))
    assert len(t.wire) == before + 2, "at most once per packet"


def test_nack_too_old_or_unknown_is_ignored() -> None:
    """Packets older than the retransmission buffer (seconds) or never sent are not resent."""
    t = Setup()
    t.node.retransmit_age = 1.0
    t.start()
    t.run(4.5)
    before = len(t.wire)
    t.rx.datagram(nack([0, 999]), ("h", 1))
    assert len(t.wire) == before
    t.rx.datagram(serialize_rtcp(GenericNack(1, 0x9999, nack_items_from_lost([5]))), ("h", 1))
    assert len(t.wire) == before


def test_nack_block_out_of_cache_is_reread() -> None:
    """A resend whose block left the engine cache reads it again."""
    t = Setup()
    t.start()
    t.run(2.0)
    t.node.engine.cache.clear()
    before = len(t.wire)
    t.rx.datagram(nack([0]), ("h", 1))
    assert t.sent()[before:] == [(0, 0, 1)]
    assert t.wire[-1][0][7:] == bytes([0]) * PAYLOAD


def fb(kind: YimaKind, seq: int, at: float, value: int = 0) -> bytes:
    return serialize_rtcp(YimaFeedback(kind, 1, SSRC, seq, round(at * 1e6), value))


def test_feedback_speed_pause_resume_at_cluster_instant() -> None:
    """SPEED re-anchors at the named instant; stale feedback is ignored; pause and resume."""
    t = Setup()
    t.start()
    t.run(1.5)
    t.rx.datagram(fb(YimaKind.SPEED, 5, 2.0, 1_250_000), ("h", 1))
    s = t.node.scheduler.sessions["s1"]
    assert (s.anchor_ct, s.speed) == (2.0, 1.25)
    assert abs(s.anchor_mt - 1.0) < 1e-9
    t.rx.datagram(fb(YimaKind.SPEED, 4, 2.1, 500_000), ("h", 1))
    assert s.speed == 1.25, "an older feedback sequence number is ignored"
    t.rx.datagram(fb(YimaKind.PAUSE, 6, 2.5), ("h", 1))
    assert s.paused and abs(s.pause_mt - 1.625) < 1e-9
    t.rx.datagram(fb(YimaKind.RESUME, 7, 4.0), ("h", 1))
    assert not s.paused and (s.anchor_ct, s.anchor_mt) == (4.0, s.pause_mt)
    assert t.rx.feedback_applied == 3


def test_feedback_pause_names_the_position_to_stop_at() -> None:
    """A PAUSE whose value names a media position (ms) stops there, not at the node's own
    position at the instant (a node whose schedule drifted resumes in step)."""
    t = Setup()
    t.start()
    t.run(1.5)
    t.rx.datagram(fb(YimaKind.PAUSE, 1, 2.5, 1_480), ("h", 1))
    s = t.node.scheduler.sessions["s1"]
    assert s.paused and abs(s.pause_mt - 1.48) < 1e-9


def test_feedback_delta_p_is_a_speed() -> None:
    """DELTA_P (absolute inter-packet delay) becomes speed = nominal delay / delta p."""
    t = Setup()
    t.start()
    step = 9.0 / 36
    t.rx.datagram(fb(YimaKind.DELTA_P, 1, 1.0, round(step / 2 * 1e6)), ("h", 1))
    assert abs(t.node.scheduler.sessions["s1"].speed - 2.0) < 1e-6


def test_probe_answers_time_and_session_facts() -> None:
    """A YIMT probe is answered to its source with cluster time, start instant, totals."""
    t = Setup()
    t.start()
    t.clock.advance(3.25)
    t.rx.datagram(probe_request(1, SSRC, 42, 123), ("127.0.0.9", 5001))
    [(data, addr)] = t.replies
    assert addr == ("127.0.0.9", 5001)
    [app] = parse_rtcp(data)
    assert isinstance(app, App)
    r = parse_probe(app)
    assert isinstance(r, ProbeReply)
    assert (r.token, r.client_us, r.cluster_us, r.start_ct_us) == (42, 123, 3_250_000, 1_000_000)
    assert (r.total, r.packets_per_block) == (36, 4)


def test_garbage_is_counted_not_fatal() -> None:
    """Malformed RTCP and RTP on the port change nothing."""
    t = Setup()
    t.start()
    for junk in (b"\x81\xcd\x00\x09xx", b"\x80\x21" + bytes(30), b"", b"\xff" * 8):
        t.rx.datagram(junk, ("h", 1))
    assert t.rx.malformed >= 1 and not t.replies


class FakeRelay:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def session_for(self, media_ssrc: int) -> str | None:
        return "s1" if media_ssrc == SSRC else None

    def nack(self, session: str, gseqs: list[int]) -> None:
        self.calls.append(("nack", session, gseqs))

    def control(self, session: str, action: str, at: float, value: float) -> None:
        self.calls.append(("control", session, action, at, value))

    def touch(self, session: str) -> None:
        self.calls.append(("touch", session))


def test_relayed_session_forwards_global_nacks_and_feedback() -> None:
    """At the RTSP node a relayed session's NACK (global seqs) and feedback are forwarded."""
    relay = FakeRelay()
    t = Setup(relay)
    t.rx.datagram(nack([7, 8, 20]), ("h", 1))
    t.rx.datagram(fb(YimaKind.SPEED, 1, 2.0, 800_000), ("h", 1))
    assert ("nack", "s1", [7, 8, 20]) in relay.calls
    assert ("control", "s1", "speed", 2.0, 0.8) in relay.calls
    assert ("touch", "s1") in relay.calls


def test_owner_resends_by_global_seq() -> None:
    """StreamNack with global sequence numbers resends the matching own packets."""
    t = Setup()
    t.start()
    t.run(2.0)
    before = len(t.wire)
    assert t.node.nack("s1", [], gseqs=[1, 2, 4])["resent"] == 2
    assert [(g, r) for g, _, r in t.sent()[before:]] == [(1, 1), (2, 1)]


def test_retransmission_mark_keeps_header_and_tag() -> None:
    """The mark fills the extension's padding: 24-byte header, Yima tag intact, ID 2 = 1."""
    from yimaporc.rtp import RtpHeaderTemplate, parse_one_byte_extension, parse_rtp
    from yimaporc.yima.feedback import is_retransmission, mark_retransmission

    data = RtpHeaderTemplate(33, 5, 2).build(7, 9, b"x" * 188, 1234)
    marked = mark_retransmission(data)
    assert len(marked) == len(data) and not is_retransmission(data) and is_retransmission(marked)
    pkt = parse_rtp(marked)
    assert pkt.yima is not None and (pkt.yima.node_index, pkt.yima.node_seq) == (2, 1234)
    assert (2, b"\x01") in parse_one_byte_extension(pkt.extension)
    assert pkt.payload == b"x" * 188
    assert mark_retransmission(b"\x80\x21" + bytes(30)) == b"\x80\x21" + bytes(30)
