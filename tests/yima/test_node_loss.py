"""A lost share costs the player nothing: the paced relay, overdue NACKs to the owner,
early takeover from parity under a new node index, and the nodes' side of it."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import attrs
from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.task import Clock

from yimaporc.cluster.membership import Member
from yimaporc.cluster.rpc import RpcRegistry
from yimaporc.rtp import (
    GenericNack,
    YimaFeedback,
    YimaKind,
    nack_items_from_lost,
    serialize_rtcp,
)
from yimaporc.rtsp._machine import ServerSession
from yimaporc.rtsp._wire import NptRange, TransportSpec
from yimaporc.testing.yima import UdpClock
from yimaporc.yima.control import StreamAction
from yimaporc.yima.feedback import FeedbackReceiver, StreamPorts
from yimaporc.yima.media import KIND_TS, MediaInfo
from yimaporc.yima.placement import LogicalDisk
from yimaporc.yima.relay import Reorderer
from yimaporc.yima.rtspservice import RELAY_LEAD, YimaStreamingService
from yimaporc.yima.schedule import PAYLOAD, MediaTiming
from yimaporc.yima.streaming import StreamControl, StreamingNode, StreamNack, StreamStart

# --- the paced reorderer ------------------------------------------------------------------


def test_paced_relay_holds_each_packet_until_due() -> None:
    """With ``due``, in-order packets wait for their instant; nothing goes early."""
    r = Reorderer(due=lambda g: 10.0 + g)
    assert r.push(0, b"0", 8.5) == [] and r.push(1, b"1", 8.6) == []
    assert r.next_deadline() == 10.0
    assert r.tick(9.99) == []
    assert r.tick(10.0) == [b"0"]
    assert r.tick(11.5) == [b"1"]
    assert r.stats.gaps_skipped == 0


def test_paced_relay_gives_a_gap_up_only_when_the_next_packet_is_due() -> None:
    """A gap waits as long as the lead lasts (the next packet's due instant), not 0.3 s;
    a late fill within the lead closes it; missing() names what is overdue."""
    r = Reorderer(due=lambda g: 10.0 + g)
    r.push(0, b"0", 8.0)
    r.push(2, b"2", 9.0)
    assert r.missing(3) == [1]
    assert r.tick(10.0) == [b"0"]
    assert r.tick(11.5) == []  # packet 1 due at 11, but 2 is not due before 12
    assert r.push(1, b"1", 11.6) == [b"1"]  # late but within the lead: forwarded
    assert r.tick(12.0) == [b"2"] and r.stats.gaps_skipped == 0
    r.push(4, b"4", 12.5)
    assert r.tick(13.9) == [] and r.tick(14.0) == [b"4"]
    assert r.stats.gaps_skipped == 1


def test_missing_names_exactly_the_absent_packets_as_they_come_and_go() -> None:
    """missing(upto) after arrivals, fills, releases and a reset: always the packets in
    [next, upto) not held (its held-prefix shortcut never hides one)."""
    r = Reorderer(due=lambda g: float(g))
    for g in (0, 1, 2, 4, 5, 8):
        r.push(g, b"x", 0.0)
    assert r.missing(10) == [3, 6, 7, 9]
    r.push(3, b"x", 0.0)
    assert r.missing(10) == [6, 7, 9]
    assert len(r.tick(5.0)) == 5 and r.next == 6  # packet 0 went at once (due at 0)
    assert r.missing(10) == [6, 7, 9] and r.missing(7, limit=1) == [6]
    r.reset(2)
    r.push(3, b"x", 0.0)
    assert r.missing(5) == [2, 4]


def test_paused_relay_holds_everything() -> None:
    """A due of inf (paused) releases nothing and sets no timer."""
    paused = {"on": True}
    r = Reorderer(due=lambda g: float("inf") if paused["on"] else 0.0)
    r.push(0, b"0", 1.0)
    assert r.next_deadline() is None and r.tick(1e9) == []
    paused["on"] = False
    assert r.tick(2.0) == [b"0"]


# --- a 3-node session relayed by node a; node b goes silent -----------------------------

BLOCKS = 40
BLOCK = 5 * PAYLOAD  # 5 packets of 0.1 s per 0.5 s block: 20 s
URL = "rtsp://127.0.0.1:8554/clip/track1"


def owner(block: int) -> str:
    """Blocks alternate between nodes a and b; c holds only parity."""
    return "ab"[block % 2]


def three_nodes(
    mode: str = "bipartite", parity: int = 2
) -> tuple[YimaStreamingService, UdpClock, list[bytes], list[tuple[Any, ...]]]:
    """Node a of members a, b, c (b and c only answer RPCs), its client's packets in a list."""
    reactor = UdpClock()
    members = [Member(n, f"10.0.0.{i}:7946")
               for i, n in enumerate("abc", 1)]  # fmt: skip
    calls: list[tuple[Any, ...]] = []

    def call(address: str, command: Any, **kw: Any) -> Any:
        calls.append((address, command, kw))
        answers = {StreamStart: {"packets": 0}, StreamPorts: {"rtp": 6000, "rtcp": 6001}}
        return succeed(answers.get(command, {}))

    node = SimpleNamespace(
        registry=RpcRegistry(), cluster_time=reactor.seconds, add_status=lambda f: None,
        subscribe=lambda s: None, node_id="a", view=SimpleNamespace(members=members),
        rpc=SimpleNamespace(call=call), config=SimpleNamespace(cluster_host="127.0.0.1"),
    )  # fmt: skip
    info = MediaInfo("clip", KIND_TS, BLOCKS * BLOCK, BLOCK, 1, streamable=True,
                     duration=BLOCKS * 0.5, parity_group=parity,
                     block_times=tuple(i * 500_000 for i in range(BLOCKS)))  # fmt: skip
    data = bytes(range(256)) * (info.size // 256 + 1)

    def read(name: str, key: Any, avoid: Any = ()) -> Any:
        calls.append(("read", key.index, tuple(sorted(avoid))))
        return succeed(data[key.index * BLOCK : (key.index + 1) * BLOCK])

    storage = SimpleNamespace(
        media_info=lambda name: info,
        time_index=lambda name: succeed(info),
        run_blocking=maybeDeferred,
        read_block=lambda name, b: succeed(data[b * BLOCK : (b + 1) * BLOCK]),
        read=read,
        places=lambda info, key: [LogicalDisk("d", owner(key.index), "p")],
        blocks_of_node=lambda name, n: succeed([b for b in range(BLOCKS) if owner(b) == n]),
    )  # fmt: skip
    svc = YimaStreamingService(node, reactor, storage, rtsp_endpoint=None, mode=mode)  # type: ignore[arg-type]
    out: list[bytes] = []
    svc._send = lambda d, addr: out.append(d) if addr[1] == 5000 else None  # type: ignore[method-assign]
    return svc, reactor, out, calls


def play(svc: YimaStreamingService) -> ServerSession:
    session = ServerSession("S1", 60.0, 0.0, peer="127.0.0.1")
    spec = TransportSpec(client_port=(5000, 5001))
    session.streams[URL] = spec
    svc.setup(URL, spec, session)
    svc.play(session, NptRange(0.0, None))
    return session


def run(reactor: Clock, seconds: float) -> None:
    for _ in range(int(seconds * 100)):
        reactor.advance(0.01)


def assert_every_packet_in_order(out: list[bytes]) -> None:
    """The client got every packet of the clip, RTP sequence numbers one apart."""
    seqs = [int.from_bytes(p[2:4], "big") for p in out]
    assert len(seqs) == BLOCKS * 5
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs))


def test_nodes_send_a_lead_ahead_and_the_relay_plays_it_out_on_time() -> None:
    """The other nodes are told to start RELAY_LEAD before the playout instant, and the
    RTSP node names itself as the session's origin."""
    svc, _reactor, _out, calls = three_nodes()
    play(svc)
    plan = svc.plans["S1"]
    starts = [kw for _, c, kw in calls if c is StreamStart]
    assert {kw["node_index"] for kw in starts} == {1, 2}
    assert all(kw["start_ct"] == plan.started_ct - RELAY_LEAD for kw in starts)
    assert all(kw["origin"] == "a" for kw in starts)
    own = svc.streaming.scheduler.sessions["S1"]
    assert own.anchor_ct == plan.started_ct - RELAY_LEAD


def test_silent_owner_is_nacked_alone_then_its_share_is_served_here_from_parity() -> None:
    """Node b sends nothing: its overdue packets are NACKed to b only, then b's share is
    served here (read around b, new node index 3, b told to stop) well within the lead;
    the client gets every packet in order, none skipped; TEARDOWN stops the taken share."""
    svc, reactor, out, calls = three_nodes()
    session = play(svc)
    plan = svc.plans["S1"]
    run(reactor, 3.0)
    nacks = [(a, kw) for a, c, kw in calls if c is StreamNack]
    assert nacks and {a for a, _ in nacks} == {"10.0.0.2:7946"}
    assert all(g // 5 % 2 == 1 for _, kw in nacks for g in kw["gseqs"])
    assert ("10.0.0.2:7946", StreamControl,
            {"session": "S1", "action": "stop", "at": 0.0, "value": 0.0}) in calls  # fmt: skip
    assert plan.takeovers == {"b": "S1+b"} and plan.takeover_index == {"b": 3}
    assert svc.streaming.destinations["S1+b"].node_index == 3
    assert any(c[0] == "read" and c[2] == ("b",) for c in calls), "reads go around b"
    run(reactor, BLOCKS * 0.5)
    assert plan.relay is not None and plan.relay.stats.gaps_skipped == 0
    assert_every_packet_in_order(out)
    status = svc.status()["streaming"]["relay"]
    assert status["early_takeovers"] == 1 and status["skipped"] == 0
    assert status["overdue_nacked"] > 0
    svc.teardown(session)
    assert svc.streaming.scheduler.sessions == {}, "the taken share stops with the session"


def test_owner_that_answers_is_not_taken_over() -> None:
    """Node b's packets arrive (here: handed in as they fall due): no NACK, no takeover."""
    svc, reactor, out, calls = three_nodes()
    play(svc)
    plan = svc.plans["S1"]
    # Stand in for b: a local session serving b's blocks with b's index into the relay.
    svc.streaming.start(session="b", media="clip", start_ct=plan.started_ct - RELAY_LEAD,
                        start_mt=0.0, host=plan.relay_addr[0], port=plan.relay_addr[1],
                        ssrc=plan.node_ssrc, seq_base=plan.seq_base, ts_base=plan.ts_base,
                        node_index=1, all_blocks=False,
                        blocks=[b for b in range(BLOCKS) if owner(b) == "b"])  # fmt: skip
    run(reactor, BLOCKS * 0.5 + 3)
    assert not [c for c in calls if c[1] is StreamNack]
    assert plan.takeovers == {} and plan.relay is not None
    assert plan.relay.stats.gaps_skipped == 0 and len(out) == BLOCKS * 5


def test_share_of_a_node_outside_the_view_at_play_is_served_here() -> None:
    """b still holds its blocks but is not in a's view when the session starts (a
    membership split that has not healed): nobody is told to send b's share, and no
    NACK or silence brings it (b is not one of the session's nodes). The relay serves
    it here at once (parity), so the client still gets every packet, in order."""
    svc, reactor, out, calls = three_nodes()
    svc.node.view = SimpleNamespace(members=[m for m in svc.node.view.members if m.node_id != "b"])
    play(svc)
    plan = svc.plans["S1"]
    assert plan.members == ("a", "c")
    assert {a for a, c, _ in calls if c is StreamStart} == {"10.0.0.3:7946"}
    run(reactor, 1.0)
    assert plan.takeovers == {"b": "S1+b"}, "served here well within the lead"
    run(reactor, BLOCKS * 0.5 + 2)
    assert plan.relay is not None and plan.relay.stats.gaps_skipped == 0
    assert_every_packet_in_order(out)
    status = svc.status()["streaming"]["relay"]
    assert status["unplanned_takeovers"] == 1 and status["early_takeovers"] == 0
    assert "b" not in svc.suspects, "not marked silent: it may be alive beyond the split"
    assert ("10.0.0.2:7946", StreamControl,
            {"session": "S1", "action": "stop", "at": 0.0, "value": 0.0}) not in calls  # fmt: skip


def test_relay_follows_a_speed_change_of_its_session() -> None:
    """YIMA SPEED x2 for a relayed session (from its client): the nodes and the relay
    switch at one instant, so packets keep arriving ahead and nothing is NACKed or lost."""
    svc, reactor, out, calls = three_nodes()
    play(svc)
    plan = svc.plans["S1"]
    svc.streaming.start(session="b", media="clip", start_ct=plan.started_ct - RELAY_LEAD,
                        start_mt=0.0, host=plan.relay_addr[0], port=plan.relay_addr[1],
                        ssrc=plan.node_ssrc, seq_base=plan.seq_base, ts_base=plan.ts_base,
                        node_index=1, all_blocks=False,
                        blocks=[b for b in range(BLOCKS) if owner(b) == "b"])  # fmt: skip
    run(reactor, 4.0)
    at = reactor.seconds() + 0.1
    svc.control("S1", StreamAction.SPEED, at, 2.0)
    svc.streaming.control("b", StreamAction.SPEED, at, 2.0)
    assert plan.speed == 2.0
    assert svc._relay_due(plan, 100) - svc._relay_due(plan, 50) == 2.5  # 5 s of media at x2
    run(reactor, BLOCKS * 0.25 + 2)
    assert not [c for c in calls if c[1] is StreamNack] and plan.takeovers == {}
    assert plan.relay is not None and plan.relay.stats.gaps_skipped == 0
    assert len(out) == BLOCKS * 5


def test_relayed_client_nack_goes_to_the_owner_only() -> None:
    """A standard client's NACK reaches the node whose share holds each packet, no other."""
    svc, _reactor, _out, calls = three_nodes()
    play(svc)
    plan = svc.plans["S1"]
    svc.streaming.nack = lambda s, ns, gs=None: calls.append(("local", s, gs)) or {}  # type: ignore[method-assign,assignment,func-returns-value]
    lost = [(plan.seq_offset + g) & 0xFFFF for g in (1, 6, 7)]  # blocks 0 (a), 1 (b), 1 (b)
    calls.clear()
    svc.feedback.datagram(serialize_rtcp(GenericNack(1, plan.ssrc, nack_items_from_lost(lost))),
                          None)  # fmt: skip
    assert ("local", "S1", [1]) in calls
    rpcs = [(a, kw["gseqs"]) for a, c, kw in (x for x in calls if len(x) == 3) if c is StreamNack]
    assert rpcs == [("10.0.0.2:7946", [6, 7])]


def play_fanout(svc: YimaStreamingService) -> Any:
    """SETUP (x-yima-fanout) and PLAY of session S1 from 0; its plan."""
    session = ServerSession("S1", 60.0, 0.0, peer="127.0.0.1")
    spec = TransportSpec(client_port=(5000, 5001), yima_fanout=True)
    session.streams[URL] = spec
    svc.setup(URL, spec, session)
    svc.play(session, NptRange(0.0, None))
    return svc.plans["S1"]


def handover_for_b(svc: YimaStreamingService, plan: Any) -> YimaFeedback:
    """The player's YIMA HANDOVER for a packet of block 3 (b's), sent once; it."""
    fb = YimaFeedback(YimaKind.HANDOVER, 1, plan.ssrc, 7, 0, 0xFFFFFFFF, 15)
    svc.feedback.datagram(serialize_rtcp(fb), None)
    return fb


def test_fanout_handover_request_serves_the_share_under_a_new_index() -> None:
    """YIMA HANDOVER from a fan-out player for a packet of b's: served here from that
    packet's media time on, as node 3; asked twice, taken over once."""
    svc, reactor, _out, _calls = three_nodes()
    plan = play_fanout(svc)
    run(reactor, 2.0)
    fb = handover_for_b(svc, plan)
    svc.feedback.datagram(serialize_rtcp(attrs.evolve(fb, feedback_seq=8)), None)
    assert plan.takeovers == {"b": "S1+b"} and svc.early_handovers == 1
    taken = svc.streaming.scheduler.sessions["S1+b"]
    assert taken.peek() is not None and taken.peek()[0] == 3  # type: ignore[index]
    assert svc.streaming.destinations["S1+b"].node_index == 3


def test_fanout_handover_for_a_node_outside_the_view_at_play_serves_its_share() -> None:
    """A fan-out session started while b was outside a's view (b still holds its
    blocks): the player's HANDOVER for b's packet is served here, not ignored."""
    svc, reactor, _out, _calls = three_nodes()
    svc.node.view = SimpleNamespace(members=[m for m in svc.node.view.members if m.node_id != "b"])
    plan = play_fanout(svc)
    assert plan.members == ("a", "c")
    run(reactor, 2.0)
    handover_for_b(svc, plan)
    assert plan.takeovers == {"b": "S1+b"} and svc.early_handovers == 1
    assert "b" not in svc.suspects
    assert svc.streaming.destinations["S1+b"].node_index == 2


# --- the nodes' side --------------------------------------------------------------------


def test_shares_of_a_vanished_rtsp_node_stop_here() -> None:
    """A share started by node c stops when c leaves the membership; others play on."""
    svc, _reactor, _out, _calls = three_nodes()
    for sid, origin in (("X", "c"), ("Y", "b")):
        svc.streaming.start(session=sid, media="clip", start_ct=0.0, start_mt=0.0, host="h",
                            port=1, ssrc=5, seq_base=0, ts_base=0, node_index=0,
                            all_blocks=True, origin=origin)  # fmt: skip
    old = SimpleNamespace(members=svc.node.view.members)
    new = SimpleNamespace(members=[m for m in old.members if m.node_id != "c"])
    svc.membership_changed(old, new)  # type: ignore[arg-type]
    assert set(svc.streaming.scheduler.sessions) == {"Y"}
    assert svc.status()["streaming"]["orphans_stopped"] == 1


def test_master_slave_ends_with_bye_when_a_share_is_lost_without_parity() -> None:
    """Master-slave, media without parity, a slave leaves: RTCP BYE saying why, stopped."""
    svc, reactor, _out, _calls = three_nodes(mode="master-slave", parity=0)
    rtcp: list[bytes] = []
    svc._send = lambda d, addr: rtcp.append(d) if addr[1] == 5001 else None  # type: ignore[method-assign]
    play(svc)
    run(reactor, 1.0)
    old = SimpleNamespace(members=svc.node.view.members)
    new = SimpleNamespace(members=[m for m in old.members if m.node_id != "b"])
    svc.membership_changed(old, new)  # type: ignore[arg-type]
    assert svc.plans["S1"].bye_sent and svc.lost_sessions == 1
    assert any(b"node b left" in d for d in rtcp)
    assert "S1" not in svc.streaming.scheduler.sessions


def test_feedback_by_ssrc_reaches_every_session_of_the_stream() -> None:
    """A NACK and a speed change for a stream reach this node's own share and the share
    it took over (same SSRC), not only the first."""
    clock = Clock()
    timing = MediaTiming("m", 20 * PAYLOAD, 5 * PAYLOAD, (0.0, 1.0, 2.0, 3.0), 4.0)
    sent: list[tuple[int, Any]] = []
    streaming = StreamingNode(
        clock, clock.seconds, timing=lambda n: timing, my_blocks=lambda n: [0, 1, 2, 3],
        read_block=lambda n, b: succeed(b"\0" * 5 * PAYLOAD),
        packetize=lambda p, d, pl: d.node_index.to_bytes(1, "big"),
        send=lambda data, addr: sent.append((data[0], addr)),
    )  # fmt: skip
    for sid, blocks, index in (("S", [0, 2], 0), ("S+b", [1, 3], 3)):
        streaming.start(session=sid, media="m", start_ct=0.0, start_mt=0.0, host="h", port=1,
                        ssrc=77, seq_base=0, ts_base=0, node_index=index, all_blocks=False,
                        blocks=blocks)  # fmt: skip
    clock.advance(1.5)
    fb = FeedbackReceiver(streaming, clock.seconds, lambda d, a: None)
    fb.datagram(serialize_rtcp(YimaFeedback(YimaKind.SPEED, 1, 77, 1, 0, 2_000_000)), None)
    assert {s.speed for s in streaming.scheduler.sessions.values()} == {2.0}
    n = len(sent)
    fb.datagram(serialize_rtcp(GenericNack(1, 77, nack_items_from_lost([0]))), None)
    assert sorted(d for d, _ in sent[n:]) == [0, 3]  # node_seq 0 of each share, resent


def test_an_owner_late_on_one_session_but_heard_on_another_is_not_taken_over() -> None:
    """Node b sends session S1's share 0.5 s late (past OVERDUE + RETRY, within the
    lead) while it serves S2 on time: b is alive, so S1's overdue packets are asked of b
    but its share is not rebuilt from parity, and S1's client still gets every packet in
    order, none skipped."""
    svc, reactor, out, calls = three_nodes()
    play(svc)
    s2 = ServerSession("S2", 60.0, 0.0, peer="127.0.0.1")
    spec = TransportSpec(client_port=(5002, 5003))
    s2.streams[URL] = spec
    svc.setup(URL, spec, s2)
    svc.play(s2, NptRange(0.0, None))
    b_blocks = [b for b in range(BLOCKS) if owner(b) == "b"]
    for sid, late in (("S1", 0.5), ("S2", 0.0)):
        plan = svc.plans[sid]
        svc.streaming.start(session=f"b-{sid}", media="clip",
                            start_ct=plan.started_ct - RELAY_LEAD + late, start_mt=0.0,
                            host=plan.relay_addr[0], port=plan.relay_addr[1],
                            ssrc=plan.node_ssrc, seq_base=plan.seq_base, ts_base=plan.ts_base,
                            node_index=1, all_blocks=False, blocks=b_blocks)  # fmt: skip
    run(reactor, BLOCKS * 0.5 + 3)
    plan = svc.plans["S1"]
    assert [kw["session"] for _, c, kw in calls if c is StreamNack] != [], "S1 was late"
    assert plan.takeovers == {} and svc.suspects == {}
    assert plan.relay is not None and plan.relay.stats.early_takeovers == 0
    assert plan.relay.stats.gaps_skipped == 0
    assert_every_packet_in_order(out)


def test_a_watch_that_ran_late_takes_over_only_after_reading_its_sockets() -> None:
    """Node b is silent.  Once its packets are NACKed, this node stalls for 0.5 s (one
    clock step): the watch that runs after the stall takes no share over (the missing
    packets could be unread in its sockets) and counts the stall; it looks again once
    the reactor has read its sockets.  Here that read brings word from b: nothing is
    taken over.  b silent after that: the next watches take its share over."""
    svc, reactor, _out, calls = three_nodes()
    play(svc)
    plan = svc.plans["S1"]
    while not [c for c in calls if c[1] is StreamNack]:
        reactor.advance(0.01)
    look_again = svc._look_again
    heard: list[float] = []

    def after_reading(session_id: str) -> None:
        # the reactor's I/O pass before the second look read a packet of b's
        heard.append(svc.node.cluster_time())
        plan.heard[plan.members.index("b")] = heard[-1]
        look_again(session_id)

    svc._look_again = after_reading  # type: ignore[method-assign]
    reactor.advance(0.5)
    assert heard, "looked again after the stall"
    assert plan.takeovers == {} and svc.suspects == {}
    assert svc.status()["streaming"]["relay"]["watch_stalls"] == 1
    svc._look_again = look_again  # type: ignore[method-assign]
    run(reactor, 0.6)
    assert plan.takeovers == {"b": "S1+b"}


def test_a_watch_that_ran_late_looks_again_at_once_and_takes_a_silent_share_over() -> None:
    """On a loaded machine every watch can run late: the second look after the stall,
    the sockets read and b still silent, takes b's share over at once (it does not
    wait for a watch on time, which may never come before the membership decides)."""
    svc, reactor, _out, calls = three_nodes()
    play(svc)
    plan = svc.plans["S1"]
    while not [c for c in calls if c[1] is StreamNack]:
        reactor.advance(0.01)
    reactor.advance(0.5)
    assert svc.status()["streaming"]["relay"]["watch_stalls"] == 1
    assert plan.takeovers == {"b": "S1+b"}
    assert plan.relay is not None and plan.relay.stats.early_takeovers == 1
