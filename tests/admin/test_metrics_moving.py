"""Each metric issue 21 names appears in /metrics and moves when the thing it counts happens.

The components are real (the reactor-lag monitor, the SMTP/POP3/IMAP protocols, the Yima
delivery engine); only the clock and the transports are fakes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from yimaporc.admin.metrics import NodeMetrics, families, histogram_families
from yimaporc.cluster.histogram import LAG_BUCKETS, Histogram, Histograms
from yimaporc.cluster.lag import ReactorLagMonitor
from yimaporc.cluster.node import ClusterNode, NodeConfig
from yimaporc.porcupine._guard import ClientErrors
from yimaporc.porcupine._pop3 import MailPOP3
from yimaporc.porcupine._smtp import MailESMTP
from yimaporc.porcupine.delivery import Recipient, SmtpPolicy
from yimaporc.porcupine.imap_backend import MailboxRegistry, PorcupineImapBackend
from yimaporc.porcupine.imap_server import PorcupineImapFactory
from yimaporc.porcupine.interfaces import ISmtpDelivery
from yimaporc.yima.deliverystats import DeliveryStats
from yimaporc.yima.engine import DeliveryEngine
from yimaporc.yima.schedule import PAYLOAD, MediaTiming, NodeScheduler, Packet

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse(metrics: list[Any]) -> Samples:
    """Families -> text exposition -> prometheus_client's parser -> sample values."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    class One:
        def collect(self) -> Any:
            return metrics

    reg = CollectorRegistry(auto_describe=False)
    reg.register(One())  # type: ignore[arg-type]
    out: Samples = {}
    for family in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_histogram_counts_cumulatively_and_keeps_label_names() -> None:
    """Observations land in the first bucket that holds them; le counts are cumulative;
    one name keeps one label set."""
    hists = Histograms()
    h = hists.get("x_seconds", "x", (0.1, 1.0), stage="a")
    for v in (0.05, 0.1, 0.5, 3.0, -1.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 3), ("1.0", 4), ("+Inf", 5)]
    assert h.count == 5 and h.total == pytest.approx(3.65)
    assert hists.get("x_seconds", "x", (0.1, 1.0), stage="a") is h
    with pytest.raises(ValueError):
        hists.get("x_seconds", "x", (0.1, 1.0), other="b")
    got = parse(histogram_families(hists))
    assert got["x_seconds_bucket"][(("le", "1.0"), ("stage", "a"))] == 4
    assert got["x_seconds_count"] == {(("stage", "a"),): 5}


def test_reactor_lag_histogram_moves_with_late_timers(tmp_path: Path) -> None:
    """yimaporc_reactor_lag_seconds: each 100 ms sample's lateness, exported by the node."""
    clock = Clock()
    cfg = NodeConfig("n1", "porcupine", tmp_path / "n1", "127.0.0.1", 7946)
    node = ClusterNode(clock, cfg, b"s" * 32, rng=random.Random(1))
    before = parse(list(NodeMetrics(node).collector.collect()))
    assert before["yimaporc_reactor_lag_seconds_count"] == {(): 0}
    node.lag_monitor.startService()
    clock.advance(0.1)  # on time
    clock.advance(0.4)  # the next sample ran 300 ms late
    node.lag_monitor.stopService()
    got = parse(list(NodeMetrics(node).collector.collect()))
    assert got["yimaporc_reactor_lag_seconds_count"] == {(): 2}
    assert got["yimaporc_reactor_lag_seconds_bucket"][(("le", "0.25"),)] == 1
    assert got["yimaporc_reactor_lag_seconds_bucket"][(("le", "0.5"),)] == 2
    assert got["yimaporc_reactor_lag_seconds_sum"][()] == pytest.approx(0.3)
    # the gauges stay
    assert got["yimaporc_reactor_lag_max_seconds"] == {(): pytest.approx(0.3)}


def test_lag_monitor_without_histogram_still_summarises() -> None:
    """The histogram is optional: a monitor built without one keeps its window."""
    clock = Clock()
    mon = ReactorLagMonitor(clock)
    mon.startService()
    clock.advance(0.35)
    assert mon.summary().max_ms == pytest.approx(250.0)
    hist = Histogram(LAG_BUCKETS)
    mon2 = ReactorLagMonitor(clock, histogram=hist)
    mon2.startService()
    clock.advance(0.1)
    assert hist.count == 1
    mon.stopService()
    mon2.stopService()


def test_suspicions_are_always_exported_and_move() -> None:
    """yimaporc_membership_suspicions_total and detector events exist at 0, then count."""
    quiet = parse(families({"node_id": "a", "membership": {}}))
    assert quiet["yimaporc_membership_suspicions_total"] == {(): 0}
    assert quiet["yimaporc_membership_detector_events_total"] == {
        (("event", "accused"),): 0,
        (("event", "suspected"),): 0,
    }
    busy = parse(
        families({"node_id": "a", "membership": {"detector_suspected": 3, "detector_stalls": 1}})
    )
    assert busy["yimaporc_membership_suspicions_total"] == {(): 3}
    assert busy["yimaporc_membership_detector_events_total"][(("event", "stalls"),)] == 1


POLICY = SmtpPolicy("example.org", "mx.example.org", max_message_size=4000)


@implementer(ISmtpDelivery)
class AcceptAll:
    """An IMessageDelivery taking every sender and recipient (into the session's DATA)."""

    authenticated_as: str | None = None

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return b"Received: from " + helo[0]

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        rcpt = Recipient(str(user.dest), False)
        return lambda: user.protocol.message_for(rcpt)


def test_mail_sessions_commands_errors_and_delivery_latency_move() -> None:
    """SMTP, POP3 and IMAP sessions, open sessions and commands count per protocol; the
    delivery histogram gets the time from the final dot to the 250."""
    clock = Clock()
    errors = ClientErrors(clock.seconds)
    latency = Histogram((0.5, 1.0, 5.0))
    stored: list[Deferred[object]] = []

    def deliver(sender: bytes, rcpts: list[Recipient], body: bytes) -> Deferred[object]:
        d: Deferred[object] = Deferred()
        stored.append(d)
        return d

    smtp = MailESMTP(
        clock, POLICY, deliver, counters=errors.counts, stats=errors, on_stored=latency.observe
    )
    smtp.delivery = AcceptAll()
    t = StringTransport()
    smtp.makeConnection(t)
    smtp.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n")
    smtp.dataReceived(b"Subject: s\r\n\r\nhi\r\n.\r\n")
    clock.advance(0.75)  # replicas take their time
    stored[0].callback(None)
    assert b"250 2.0.0 Ok: stored" in t.value()
    assert latency.count == 1 and latency.total == pytest.approx(0.75)
    smtp.dataReceived(b"BOGUS\r\n")

    pop = MailPOP3(clock, errors=errors)
    pop.makeConnection(StringTransport())
    pop.dataReceived(b"CAPA\r\nNOOP\r\n")
    backend = PorcupineImapBackend(None, MailboxRegistry(), clock, errors)
    imap = PorcupineImapFactory(backend, lambda p, addr: None, errors, clock).buildProtocol(None)
    imap.makeConnection(StringTransport())
    imap.dataReceived(b"a1 CAPABILITY\r\n")
    clock.advance(1)
    imap.dataReceived(b"a2 NOOP\r\n")
    clock.advance(1)
    doc = {"node_id": "p1", "kind": "porcupine", "mail_sessions": errors.activity()}
    got = parse(families(doc))
    assert got["yimaporc_mail_sessions_total"] == {
        (("protocol", "imap"),): 1,
        (("protocol", "pop3"),): 1,
        (("protocol", "smtp"),): 1,
        (("protocol", "submission"),): 0,
    }
    assert got["yimaporc_mail_open_sessions"][(("protocol", "pop3"),)] == 1
    commands = got["yimaporc_mail_commands_total"]
    assert commands[(("protocol", "smtp"),)] == 5  # EHLO MAIL RCPT DATA BOGUS
    assert commands[(("protocol", "pop3"),)] == 2
    assert commands[(("protocol", "imap"),)] == 2
    for p in (smtp, pop, imap):
        p.connectionLost(None)
        p.connectionLost(None)  # a second call does not count twice
    got = parse(families({**doc, "mail_sessions": errors.activity()}))
    assert set(got["yimaporc_mail_open_sessions"].values()) == {0}
    assert got["yimaporc_mail_sessions_total"][(("protocol", "smtp"),)] == 1


def test_no_stats_hooks_means_no_counting() -> None:
    """A protocol built without the hooks (as embedders and older tests do) still works."""
    smtp = MailESMTP(Clock(), POLICY, lambda s, r, b: succeed(None))
    t = StringTransport()
    smtp.makeConnection(t)
    smtp.dataReceived(b"NOOP\r\n")
    smtp.connectionLost(None)
    assert t.value().startswith(b"220")


BLOCK = 4 * PAYLOAD


def media(name: str, blocks: int) -> MediaTiming:
    return MediaTiming(
        name, blocks * BLOCK, BLOCK, tuple(float(i) for i in range(blocks)), float(blocks)
    )


def test_yima_cache_hits_misses_and_late_packets_move() -> None:
    """Two sessions of one title: each block is read once (a miss) and found in the cache
    by the other session (a hit); a block read too slowly makes its packets late."""
    clock = Clock()
    sched = NodeScheduler(prefetch=1.5)
    slow: dict[int, Deferred[bytes]] = {}

    def read(m: str, b: int) -> Deferred[bytes]:
        if b == 2:
            d: Deferred[bytes] = Deferred()
            slow[b] = d
            return d
        return succeed(bytes([b]) * BLOCK)

    sent: list[Packet] = []
    eng = DeliveryEngine(clock, clock.seconds, sched, read, lambda p, d: sent.append(p))
    sched.add("s1", media("m", 3), [0, 1, 2], start_ct=1.0)
    sched.add("s2", media("m", 3), [0, 1, 2], start_ct=1.0)
    eng.poke()
    for _ in range(320):
        clock.advance(0.01)
    slow.pop(2).callback(bytes([2]) * BLOCK)  # 0.2 s after its first packet was due (3.0)
    for _ in range(200):
        clock.advance(0.01)
    assert len(sent) == 2 * 3 * 4
    stats = eng.stats
    assert eng.block_reads == 3  # misses
    assert stats.cache_hits == 3  # the second session's need of each block
    assert stats.late_packets == 2  # block 2's first packet (due 3.0, sent 3.2), both sessions
    rows = stats.running(["s1", "s2"], lambda sid: "m")
    assert [r["packets"] for r in rows] == [12, 12] and rows[0]["max_late_ms"] >= 150
    assert all("s1" != r["session"] and "s2" != r["session"] for r in rows)
    doc = {
        "node_id": "y1",
        "kind": "yima",
        "streaming": {
            "late_packets": stats.late_packets,
            "cache_hits": stats.cache_hits,
            "cache_misses": eng.block_reads,
        },
        "storage": {
            "reorganisation": {"blocks_to_move": 10, "blocks_moved": 4, "blocks_moved_total": 9}
        },
    }
    got = parse(families(doc))
    assert got["yimaporc_yima_block_cache_hits_total"] == {(): 3}
    assert got["yimaporc_yima_block_cache_misses_total"] == {(): 3}
    assert got["yimaporc_yima_late_packets_total"] == {(): 2}
    assert got["yimaporc_yima_reorg_planned_blocks"] == {(): 10}
    assert got["yimaporc_yima_reorg_moved_blocks"] == {(): 4}
    assert got["yimaporc_yima_reorg_block_moves_total"] == {(): 9}
    # the running list forgets sessions that ended
    assert stats.running(["s1"], lambda sid: "m")[0]["packets"] == 12
    assert len(stats.sessions) == 1


def test_cache_hit_counting_follows_each_sessions_need() -> None:
    """A need is counted when it begins: a block wanted again in the next scan is not a
    new lookup; a block not readable yet (too many reads) is counted once read."""
    stats = DeliveryStats()
    cached = {"a"}
    stats.read_started("b")
    stats.wanted(["a", "a", "b"], lambda k: k in cached or k == "b")
    assert stats.cache_hits == 2  # both sessions found a cached; b was read (a miss)
    stats.wanted(["a", "a", "b", "b"], lambda k: True)
    assert stats.cache_hits == 3  # only the second session's need of b is new
    stats.wanted(["c"], lambda k: False)
    stats.read_started("c")
    stats.wanted(["c"], lambda k: True)
    assert stats.cache_hits == 3  # c: one miss when its read began


def test_ended_sessions_are_forgotten_without_a_status_call() -> None:
    """The per-session table stays bounded by the live sessions even if nobody asks."""
    from yimaporc.yima.deliverystats import FORGET_AFTER

    stats = DeliveryStats()
    for i in range(FORGET_AFTER + 10):
        stats.sent(f"s{i}", 100, 0.0)
    stats.wanted([], lambda k: True, {"s1", "s2"})
    assert set(stats.sessions) == {"s1", "s2"}


def test_dashboard_summary_carries_the_new_panels_data_bounded() -> None:
    """The summary a member sends for the dashboard has mail sessions per protocol, the
    yima late packets, cache counts, reorganisation progress and at most 32 sessions."""
    from yimaporc.admin.dashboard import MAX_SESSIONS, summary

    mail = summary(
        {
            "kind": "porcupine",
            "mail_sessions": {"smtp": {"sessions": 4, "open": 1, "commands": 20}},
        }
    )["mail"]
    assert mail["sessions"] == {"smtp": {"sessions": 4, "open": 1, "commands": 20}}
    running = [{"session": f"{i:010x}", "media": "m", "bytes": 1} for i in range(100)]
    yima = summary(
        {
            "kind": "yima",
            "streaming": {"late_packets": 3, "cache_hits": 5, "cache_misses": 2,
                          "running": running},
            "storage": {"reorganisation": {"blocks_to_move": 9, "blocks_moved": 4}},
        }
    )["yima"]  # fmt: skip
    assert (yima["late_packets"], yima["cache_hits"], yima["cache_misses"]) == (3, 5, 2)
    assert (yima["reorg_planned"], yima["reorg_moved"]) == (9, 4)
    assert yima["running"] == running[:MAX_SESSIONS] and MAX_SESSIONS == 32
