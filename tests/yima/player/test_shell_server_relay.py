"""The RTSP node forwards a relayed client's RTCP (NACKs by global seq, YIMA feedback)."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from yimaporc.cluster.membership import Member
from yimaporc.cluster.rpc import RpcRegistry
from yimaporc.rtp import (
    GenericNack,
    RtpHeaderTemplate,
    YimaFeedback,
    YimaKind,
    nack_items_from_lost,
    serialize_rtcp,
)
from yimaporc.rtsp._machine import ServerSession
from yimaporc.yima.feedback import mark_retransmission
from yimaporc.yima.relay import Reorderer
from yimaporc.yima.rtspservice import YimaStreamingService, _Plan
from yimaporc.yima.streaming import StreamControl, StreamNack

SSRC = 0x5151
SEQ_BASE = 65500


def service() -> tuple[YimaStreamingService, list[tuple[Any, ...]]]:
    clock = Clock()
    calls: list[tuple[Any, ...]] = []
    members = [Member(n, f"127.0.0.{i}:7946")
               for i, n in enumerate("abc", 1)]  # fmt: skip

    def call(address: str, command: Any, **kw: Any) -> Any:
        calls.append(("rpc", address, command, kw))
        return succeed({})

    node = SimpleNamespace(
        registry=RpcRegistry(), cluster_time=clock.seconds, add_status=lambda f: None,
        subscribe=lambda s: None, node_id="a", view=SimpleNamespace(members=members),
        rpc=SimpleNamespace(call=call), config=SimpleNamespace(cluster_host="127.0.0.1"),
    )  # fmt: skip
    storage = SimpleNamespace(read_block=lambda name, b: succeed(b""))
    svc = YimaStreamingService(node, clock, storage, rtsp_endpoint=None)  # type: ignore[arg-type]

    def nack(session: str, node_seqs: list[int], gseqs: list[int] | None = None) -> dict[str, Any]:
        calls.append(("nack", session, node_seqs, gseqs))
        return {}

    def control(session: str, action: str, at: float, value: float) -> dict[str, Any]:
        calls.append(("control", session, action, at, value))
        return {}

    def send(data: bytes, addr: tuple[str, int]) -> None:
        calls.append(("send", data, addr))

    svc.streaming.nack = nack  # type: ignore[method-assign]
    svc.streaming.control = control  # type: ignore[method-assign]
    svc._send = send  # type: ignore[method-assign]
    plan = _Plan("clip", "127.0.0.9", 5000, False, None, SSRC, SEQ_BASE, 0)
    plan.relay = Reorderer(first=30)
    svc.plans["s1"] = plan
    return svc, calls


def test_relayed_nack_is_mapped_to_global_seqs_and_sent_to_every_node() -> None:
    """16-bit global numbers (across the wrap) -> extended gseqs -> every member, once."""
    svc, calls = service()
    lost = [65531, 65535, 0, 2]  # gseq 31, 35, 36, 38
    svc.feedback.datagram(serialize_rtcp(GenericNack(1, SSRC, nack_items_from_lost(lost))), None)
    want = [31, 35, 36, 38]
    assert ("nack", "s1", [], want) in calls
    rpcs = [(c[1], c[3]) for c in calls if c[0] == "rpc" and c[2] is StreamNack]
    assert rpcs == [(f"127.0.0.{i}:7946", {"session": "s1", "node_seqs": [], "gseqs": want})
                    for i in (2, 3)]  # fmt: skip


def test_relayed_feedback_goes_to_every_node() -> None:
    """YIMA SPEED for a relayed session: this node and the others switch at one instant."""
    svc, calls = service()
    fb = YimaFeedback(YimaKind.SPEED, 1, SSRC, 1, 2_500_000, 1_150_000)
    svc.feedback.datagram(serialize_rtcp(fb), None)
    assert ("control", "s1", "speed", 2.5, 1.15) in calls
    rpcs = [c[3] for c in calls if c[0] == "rpc" and c[2] is StreamControl]
    assert rpcs == [{"session": "s1", "action": "speed", "at": 2.5, "value": 1.15}] * 2


def test_fanout_session_is_not_relayed() -> None:
    """A fan-out plan's RTCP is this node's own business (not forwarded)."""
    svc, calls = service()
    svc.plans["s1"].fanout = True
    svc.feedback.datagram(serialize_rtcp(GenericNack(1, SSRC, nack_items_from_lost([1]))), None)
    assert not [c for c in calls if c[0] == "rpc"]


def test_late_retransmission_reaches_the_player_directly() -> None:
    """A retransmission for a gap the relay gave up on is forwarded out of order, once."""
    svc, calls = service()
    tpl = RtpHeaderTemplate(33, SSRC, 1)
    pkt = {g: tpl.build(SEQ_BASE + g, 0, b"x" * 188, 4) for g in (30, 31, 32)}
    svc._relayed("s1", pkt[30])
    svc._relayed("s1", pkt[32])
    plan = svc.plans["s1"]
    assert plan.relay is not None
    svc._forward("s1", plan, plan.relay.tick(100.0))  # 31 given up, 32 forwarded
    sent = len([c for c in calls if c[0] == "send"])
    svc._relayed("s1", pkt[31])
    assert len([c for c in calls if c[0] == "send"]) == sent, "a late first transmission is dropped"
    svc._relayed("s1", mark_retransmission(pkt[31]))
    late = [c for c in calls if c[0] == "send"][sent:]
    assert [c[2] for c in late] == [("127.0.0.9", 5000)]
    svc._relayed("s1", mark_retransmission(pkt[31]))
    assert len([c for c in calls if c[0] == "send"]) == sent + 1, "forwarded late only once"


def test_retransmission_of_a_forwarded_packet_is_not_sent_again() -> None:
    """A node woken from a stall answers old NACKs: what the player already got (say from
    parity) is dropped, not sent a second time out of order (duplicate frames)."""
    svc, calls = service()
    tpl = RtpHeaderTemplate(33, SSRC, 1)
    pkt = {g: tpl.build(SEQ_BASE + g, 0, b"x" * 188, 4) for g in (30, 31, 32)}
    for g in (30, 31, 32):
        svc._relayed("s1", pkt[g])
    sent = len([c for c in calls if c[0] == "send"])
    assert sent == 3
    svc._relayed("s1", mark_retransmission(pkt[31]))
    assert len([c for c in calls if c[0] == "send"]) == sent
    assert svc.plans["s1"].relay.stats.too_late == 1  # type: ignore[union-attr]


def test_late_retransmission_never_goes_to_a_tcp_player() -> None:
    """Over TCP interleaved the player reads in order: a packet behind the ones already
    written would be taken as the next one (corrupt frames), so it is dropped."""
    svc, _calls = service()
    plan = svc.plans["s1"]
    written: list[tuple[int, bytes]] = []
    plan.tcp_channel = 0

    class Sink:
        def send_interleaved(self, channel: int, data: bytes) -> bool:
            written.append((channel, data))
            return True

        def send_interleaved_many(self, channel: int, packets: Sequence[bytes]) -> int:
            written.extend((channel, d) for d in packets)
            return len(packets)

    plan.session = ServerSession("s1", 60.0, 0.0, sender=Sink())
    tpl = RtpHeaderTemplate(33, SSRC, 1)
    pkt = {g: tpl.build(SEQ_BASE + g, 0, b"x" * 188, 4) for g in (30, 31, 32)}
    svc._relayed("s1", pkt[30])
    svc._relayed("s1", pkt[32])
    assert plan.relay is not None
    svc._forward("s1", plan, plan.relay.tick(100.0))
    assert len(written) == 2
    svc._relayed("s1", mark_retransmission(pkt[31]))
    assert len(written) == 2
    assert plan.relay.stats.too_late == 1
