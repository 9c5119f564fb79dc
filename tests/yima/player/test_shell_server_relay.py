"""The RTSP node forwards a relayed client's RTCP (NACKs by global seq, YIMA feedback)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from yimaporc.cluster.rpc import RpcRegistry
from yimaporc.rtp import (
    GenericNack,
    RtpHeaderTemplate,
    YimaFeedback,
    YimaKind,
    nack_items_from_lost,
    serialize_rtcp,
)
from yimaporc.yima.feedback import mark_retransmission
from yimaporc.yima.relay import Reorderer
from yimaporc.yima.rtspservice import YimaStreamingService, _Plan
from yimaporc.yima.streaming import StreamControl, StreamNack

SSRC = 0x5151
SEQ_BASE = 65500


def service() -> tuple[YimaStreamingService, list[tuple[Any, ...]]]:
    clock = Clock()
    calls: list[tuple[Any, ...]] = []
    members = [SimpleNamespace(node_id=n, address=f"127.0.0.{i}:7946")
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
    """A retransmission for a gap the relay already gave up on is forwarded out of order."""
    svc, calls = service()
    tpl = RtpHeaderTemplate(33, SSRC, 1)
    late = tpl.build(SEQ_BASE + 10, 0, b"x" * 188, 4)
    svc._relayed("s1", late)
    assert not [c for c in calls if c[0] == "send"], "a late first transmission is dropped"
    svc._relayed("s1", mark_retransmission(late))
    assert [c[2] for c in calls if c[0] == "send"] == [("127.0.0.9", 5000)]
