"""GET /metrics (Prometheus), GET / (the dashboard) and GET /api/cluster (its data)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from yimaporc.admin import dashboard
from yimaporc.admin.dashboard import ClusterView, NodeSummary, answer_summary, health, summary
from yimaporc.admin.metrics import NodeMetrics, families
from yimaporc.admin.server import AdminResource, Refusal
from yimaporc.cluster.membership import View
from yimaporc.cluster.node import ClusterNode, NodeConfig
from yimaporc.cluster.rpc import PeerUnavailable
from yimaporc.cluster.wire import Member

PORCUPINE_STATUS: dict[str, Any] = {
    "node_id": "p1",
    "kind": "porcupine",
    "cluster": "mail",
    "epoch": 7,
    "coordinator": "p1",
    "members": [{"node_id": "p1", "address": "a:1"}, {"node_id": "p2", "address": "b:1"}],
    "uptime": 12.5,
    "clock": {"reference": "p1", "offset": 0.0, "rtt": None},
    "membership": {"sent": 10, "received": 9, "accepted": 8, "dropped_bad_mac": 1},
    "rpc": {"unauthenticated": 0, "dropped_oversize": 2, "refused_bad_proof": 3},
    "admin": {"connections": 1, "refused_401": 4, "refused_413": 0, "refused_connections": 0},
    "reactor_lag": {"max_ms": 250.0, "p99_ms": 12.0},
    "users": 5,
    "buckets": {"p1": 128, "p2": 128},
    "messages_accepted": 42,
    "delivery": {"unrecorded_holders": 3, "store_retries": 1},
    "client_errors": {"smtp_bad_arguments": 2, "imap.bad_syntax": 1},
    "mail_refusals": {"validity_unknown": 6},
    "imap_open_mailboxes": 3,
    "plaintext_passwords": True,
    "auth": {
        "attempts": 6,
        "successes": 4,
        "failures": 2,
        "throttled": 1,
        "refused": 1,
        "refused_locked": 1,
        "locks": 1,
        "in_flight": 0,
        "tracked_addresses": 1,
        "tracked_accounts": 1,
    },
    "outbound": {
        "length": 3,
        "oldest_age": 61.5,
        "attempts": 4,
        "delivered": 1,
        "deferred": 3,
        "bounced": 0,
    },
    "mail_cluster": {
        "managed_buckets": 128,
        "settling_buckets": 0,
        "users_with_mail": 2,
        "load": 0.5,
        "rpc_calls": {"deliver": 9},
        "unnumbered": 4,
        "numbered": 11,
        "pending_plans": 5,
        "late_allocations": 2,
    },
    "replication": {
        "state": "running",
        "log_length": 4,
        "messages_sent": 8,
        "oldest_pending": {"age": 1.25, "coordinator": "p2"},
        "awaiting": {"p2": 4},
        "send_calls": 8,
        "send_failures": 0,
        "write_rounds": 2,
        "queued_actions": 0,
        "waiting_agents": 0,
        "under_replicated": 5,
        "short_acks": 1,
        "repair": {"synced": True, "rounds": 3, "repaired": 7, "missing": 0, "failures": 0},
    },
}

YIMA_STATUS: dict[str, Any] = {
    "node_id": "y1",
    "kind": "yima",
    "cluster": "media",
    "epoch": 3,
    "coordinator": "y2",
    "members": [{"node_id": "y1", "address": "a:1"}],
    "membership": {},
    "rpc": {"unauthenticated": 1},
    "disks": [
        {
            "disk_id": "y1-0",
            "node_id": "y1",
            "path": "/d0",
            "capacity": 1000,
            "blocks": 7,
            "logical": 1,
            "stored": 7,
        },
        {
            "disk_id": "y2-0",
            "node_id": "y2",
            "path": "/d1",
            "capacity": None,
            "blocks": 5,
            "logical": 1,
            "stored": None,
        },
    ],
    "media": [{"name": "a", "blocks": 12, "bytes": 3000}, {"name": "b", "blocks": 1, "bytes": 10}],
    "storage": {"reorganising": True, "scaling_steps": 2, "logical_disks": 2},
    "rtsp": {
        "sessions": 2,
        "connections": 3,
        "refused_sessions": 1,
        "refused_destinations": 0,
        "refused_connections": 5,
        "max_connections": 448,
        "refused_server_connections": 6,
        "reaped": 4,
        "idle_closed": 0,
        "aborted_unread": 7,
        "interleaved_dropped": 0,
        "relay_ports": 1,
        "refused": {"404": 2, "461": 1},
    },
    "streaming": {
        "mode": "bipartite",
        "sessions": 2,
        "packets_sent": 100,
        "bytes_sent": 18800,
        "handed_to_relay": 3,
        "ended_share_lost": 0,
        "rtcp": {"received": 5, "malformed": 1, "nacked": 2, "resent": 2, "feedback_applied": 4},
    },
}


def parsed(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels: value}, through prometheus_client's own parser."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def exposition(doc: dict[str, Any], view_changes: int | None = None) -> str:
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    class One:
        def collect(self) -> Any:
            return families(doc, view_changes=view_changes)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(One())  # type: ignore[arg-type]
    return generate_latest(reg).decode()


def test_porcupine_status_becomes_conventional_metrics() -> None:
    """Every porcupine status field maps to a yimaporc_ metric; counters end in _total."""
    text = exposition(PORCUPINE_STATUS, view_changes=3)
    got = parsed(text)
    assert got["yimaporc_membership_epoch"] == {(): 7}
    assert got["yimaporc_membership_members"] == {(): 2}
    assert got["yimaporc_membership_coordinator"] == {(): 1}
    assert got["yimaporc_membership_view_changes_total"] == {(): 3}
    dropped = got["yimaporc_membership_datagrams_dropped_total"]
    assert dropped[(("reason", "bad_mac"),)] == 1 and dropped[(("reason", "replayed"),)] == 0
    assert got["yimaporc_membership_datagrams_accepted_total"] == {(): 8}
    assert got["yimaporc_rpc_dropped_total"] == {(("reason", "oversize"),): 2}
    assert got["yimaporc_rpc_refused_total"] == {(("reason", "bad_proof"),): 3}
    assert got["yimaporc_admin_refused_requests_total"][(("status", "401"),)] == 4
    assert got["yimaporc_reactor_lag_max_seconds"] == {(): 0.25}
    assert got["yimaporc_reactor_lag_p99_seconds"] == {(): 0.012}
    assert got["yimaporc_mail_messages_accepted_total"] == {(): 42}
    assert got["yimaporc_mail_client_errors_total"] == {
        (("error", "bad_arguments"), ("protocol", "smtp")): 2,
        (("error", "bad_syntax"), ("protocol", "imap")): 1,
    }
    assert got["yimaporc_mail_refusals_total"] == {(("reason", "validity_unknown"),): 6}
    assert got["yimaporc_mail_delivery_events_total"] == {
        (("event", "store_retries"),): 1,
        (("event", "unrecorded_holders"),): 3,
    }
    assert got["yimaporc_mail_unnumbered"] == {(): 4}
    assert got["yimaporc_mail_uid_events_total"] == {
        (("event", "numbered"),): 11,
        (("event", "pending_plans"),): 5,
        (("event", "late_allocations"),): 2,
    }
    assert got["yimaporc_mail_auth_failures_total"] == {(): 2}
    assert got["yimaporc_mail_imap_open_mailboxes"] == {(): 3}
    assert got["yimaporc_mail_plaintext_passwords"] == {(): 1}
    assert got["yimaporc_mail_auth_refused_by_reason_total"] == {(("reason", "locked"),): 1}
    assert got["yimaporc_mail_outbound_queue_length"] == {(): 3}
    assert got["yimaporc_mail_outbound_oldest_age_seconds"] == {(): 61.5}
    assert got["yimaporc_mail_replication_log_length"] == {(): 4}
    assert got["yimaporc_mail_replication_oldest_pending_age_seconds"] == {(): 1.25}
    assert got["yimaporc_mail_replication_state"][(("state", "running"),)] == 1
    assert got["yimaporc_mail_replication_under_replicated"] == {(): 5}
    assert got["yimaporc_mail_replication_repaired_total"] == {(): 7}
    assert got["yimaporc_mail_buckets"] == {(("member", "p1"),): 128, (("member", "p2"),): 128}
    assert got["yimaporc_mail_cluster_rpc_calls_total"] == {(("command", "deliver"),): 9}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("yimaporc_")
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
    # no label carries a user (nor anything with an @)
    assert "@" not in text


def test_yima_status_becomes_metrics_and_absent_lag_is_absent() -> None:
    """Disks, catalog, streaming and RTCP map to metrics; no reactor_lag -> no lag gauges."""
    got = parsed(exposition(YIMA_STATUS))
    disk = (("disk", "y1-0"), ("member", "y1"))
    assert got["yimaporc_yima_disk_blocks"][disk] == 7
    assert got["yimaporc_yima_disk_capacity_bytes"] == {disk: 1000}
    assert got["yimaporc_yima_disk_stored_blocks"] == {disk: 7}
    assert got["yimaporc_yima_media"] == {(): 2}
    assert got["yimaporc_yima_media_bytes"] == {(): 3010}
    assert got["yimaporc_yima_reorganising"] == {(): 1}
    assert got["yimaporc_yima_sessions"] == {(("mode", "bipartite"),): 2}
    assert got["yimaporc_yima_packets_sent_total"] == {(): 100}
    assert got["yimaporc_yima_payload_bytes_sent_total"] == {(): 18800}
    assert got["yimaporc_yima_relay_handoffs_total"] == {(): 3}
    assert got["yimaporc_yima_rtcp_nacked_total"] == {(): 2}
    assert got["yimaporc_rtsp_connections"] == {(): 3}
    assert got["yimaporc_rtsp_refused_sessions_total"] == {(): 1}
    assert got["yimaporc_rtsp_reaped_total"] == {(): 4}
    assert got["yimaporc_rtsp_refused_connections_total"] == {(): 5}
    assert got["yimaporc_rtsp_refused_server_connections_total"] == {(): 6}
    assert got["yimaporc_rtsp_max_connections"] == {(): 448}
    assert got["yimaporc_rtsp_aborted_unread_total"] == {(): 7}
    assert got["yimaporc_rtsp_refused_total"] == {(("status", "404"),): 2, (("status", "461"),): 1}
    assert got["yimaporc_membership_coordinator"] == {(): 0}
    assert got["yimaporc_rpc_unauthenticated_connections"] == {(): 1}
    assert not any(name.startswith("yimaporc_reactor_lag") for name in got)
    assert not any(name.startswith("yimaporc_mail_") for name in got)


def node(tmp_path: Path, node_id: str = "n1", kind: str = "porcupine") -> ClusterNode:
    cfg = NodeConfig(node_id, kind, tmp_path / node_id, "127.0.0.1", 7946)
    return ClusterNode(Clock(), cfg, b"s" * 32, rng=random.Random(1))


def get(resource: AdminResource, path: bytes) -> DummyRequest:
    req = DummyRequest([])
    req.method = b"GET"
    req.path = path
    req.uri = path
    out = resource.render(req)
    if isinstance(out, bytes):
        req.write(out)
        req.finish()
    return req


def test_metrics_route_is_open_and_per_node(tmp_path: Path) -> None:
    """Two nodes in one process each serve their own metrics at /metrics, open like status."""
    a, b = node(tmp_path, "a"), node(tmp_path, "b", "yima")
    a.add_status(lambda: {"users": 9})
    res_a, res_b = AdminResource(a), AdminResource(b)
    assert isinstance(res_a.admission(b"GET", b"/metrics", Headers(), None), int)
    req = get(res_a, b"/metrics")
    assert req.responseHeaders.getRawHeaders(b"content-type") == [
        b"text/plain; version=0.0.4; charset=utf-8"
    ]
    got_a = parsed(b"".join(req.written).decode())
    got_b = parsed(b"".join(get(res_b, b"/metrics").written).decode())
    assert got_a["yimaporc_node_info"] == {
        (("cluster", "porcupine"), ("kind", "porcupine"), ("node_id", "a")): 1
    }
    assert got_a["yimaporc_mail_users"] == {(): 9}
    assert list(got_b["yimaporc_node_info"]) == [
        (("cluster", "yima"), ("kind", "yima"), ("node_id", "b"))
    ]
    # a scrape sees the state of that moment
    a.view_changes = 5
    got_a = parsed(b"".join(get(res_a, b"/metrics").written).decode())
    assert got_a["yimaporc_membership_view_changes_total"] == {(): 5}
    assert NodeMetrics(a).registry is not NodeMetrics(a).registry


def test_dashboard_page_is_self_contained(tmp_path: Path) -> None:
    """GET / is the dashboard: HTML that loads nothing from the network, polls /api/cluster."""
    res = AdminResource(node(tmp_path))
    assert isinstance(res.admission(b"GET", b"/", Headers(), None), int)
    req = get(res, b"/")
    page = b"".join(req.written).decode()
    assert req.responseHeaders.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert 'fetch("/api/cluster"' in page and "<canvas" not in page.split("<script>")[0]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "http://" not in page and "https://" not in page


@attrs.define
class FakeNode:
    """What ClusterView uses of a node: view, rpc, clock, status."""

    node_id: str
    view: View
    reactor: Clock = attrs.field(factory=Clock)
    answers: dict[str, Any] = attrs.field(factory=dict)
    calls: list[str] = attrs.field(factory=list)
    epoch_of: dict[str, int] = attrs.field(factory=dict)

    @property
    def config(self) -> Any:
        return NodeConfig(self.node_id, "porcupine", Path("/x"), "10.0.0.1", 7946)

    @property
    def scope(self) -> Any:
        return self.config.scope

    @property
    def rpc(self) -> FakeNode:
        return self

    def cluster_time(self) -> float:
        return float(self.reactor.seconds())

    def status(self) -> dict[str, Any]:
        return {**PORCUPINE_STATUS, "node_id": self.node_id, "epoch": self.view.epoch}

    def call(self, address: str, command: type, **kw: Any) -> Deferred[Any]:
        assert command is NodeSummary
        self.calls.append(address)
        answer = self.answers.get(address, "hang")
        if answer == "hang":
            return Deferred()
        if answer == "down":
            return fail(PeerUnavailable(f"{address}: connection refused"))
        if answer == "old":  # a node of an older version: no such command
            return fail(amp.UnhandledCommand("yimaporc.node-summary"))
        return succeed(answer)


def peer_answer(node_id: str, epoch: int, lag_ms: float = 1.0) -> dict[str, bytes]:
    doc = {**PORCUPINE_STATUS, "node_id": node_id, "epoch": epoch}
    doc["reactor_lag"] = {"max_ms": lag_ms, "p99_ms": lag_ms}
    return answer_summary(doc)


def view(epoch: int, *ids: str) -> View:
    return View(epoch, tuple(Member(i, f"{i}:7946", 1) for i in ids), ids[0])


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


def by_id(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["node_id"]: n for n in doc["nodes"]}


def test_cluster_view_asks_every_member_and_judges_health() -> None:
    """Each member is asked once; up, degraded (other epoch or late reactor), unreachable."""
    fake = FakeNode("p1", view(5, "p1", "p2", "p3", "p4", "p5"))
    fake.answers = {
        "p2:7946": peer_answer("p2", 5),
        "p3:7946": peer_answer("p3", 5, lag_ms=900.0),
        "p4:7946": "down",
        "p5:7946": "old",
    }
    cv = ClusterView(fake)  # type: ignore[arg-type]
    doc = result(cv.get())
    nodes = by_id(doc)
    assert {k: v["health"] for k, v in nodes.items()} == {
        "p1": "up", "p2": "up", "p3": "degraded", "p4": "unreachable", "p5": "degraded",
    }  # fmt: skip
    assert nodes["p5"]["reachable"] and "node-summary" in nodes["p5"]["error"]
    assert "connection refused" in nodes["p4"]["error"]
    assert nodes["p2"]["summary"]["mail"]["messages_accepted"] == 42
    assert sorted(fake.calls) == ["p2:7946", "p3:7946", "p4:7946", "p5:7946"]
    assert doc["epoch"] == 5 and doc["coordinator"] == "p1"
    assert json.loads(json.dumps(doc)) == doc


def test_cluster_view_is_bounded_cached_and_times_out() -> None:
    """Requests within REFRESH share one gathering; a silent member costs at most TIMEOUT."""
    fake = FakeNode("p1", view(2, "p1", "p2", "p3"))
    fake.answers = {"p2:7946": peer_answer("p2", 2)}  # p3 never answers
    cv = ClusterView(fake)  # type: ignore[arg-type]
    first, second = cv.get(), cv.get()
    assert cv.gatherings == 1 and len(fake.calls) == 2
    fake.reactor.advance(dashboard.TIMEOUT)
    a, b = result(first), result(second)
    assert a is b and by_id(a)["p3"]["health"] == "unreachable"
    assert a["round"] == 1
    assert result(cv.get()) is a and cv.gatherings == 1
    fake.reactor.advance(dashboard.REFRESH)
    cv.get()
    assert cv.gatherings == 2


def test_cluster_view_shows_members_that_left_as_gone_then_forgets() -> None:
    """A member no longer in the view is listed as gone (with what it last said), then
    forgotten after FORGET_AFTER."""
    fake = FakeNode("p1", view(1, "p1", "p2"))
    fake.answers = {"p2:7946": peer_answer("p2", 1)}
    cv = ClusterView(fake)  # type: ignore[arg-type]
    result(cv.get())
    fake.view = view(2, "p1")
    fake.reactor.advance(5)
    nodes = by_id(result(cv.get()))
    assert nodes["p2"]["health"] == "gone" and nodes["p2"]["in_view"] is False
    assert nodes["p2"]["summary"]["node_id"] == "p2"
    fake.reactor.advance(dashboard.FORGET_AFTER + 1)
    assert set(by_id(result(cv.get()))) == {"p1"}


@pytest.mark.parametrize(
    ("entry", "want"),
    [
        ({"in_view": False}, "gone"),
        ({"in_view": True, "reachable": False, "summary": {"epoch": 4}}, "unreachable"),
        ({"in_view": True, "reachable": True, "summary": {"epoch": 4}}, "up"),
        ({"in_view": True, "reachable": True, "summary": {"epoch": 3}}, "degraded"),
        (
            {"in_view": True, "reachable": True, "summary": {"epoch": 4, "local_health": 2}},
            "degraded",
        ),
    ],
)
def test_health_rules(entry: dict[str, Any], want: str) -> None:
    """The health of a member entry, as the dashboard colours it."""
    assert health(entry, 4) == want


def test_summary_is_small_and_keeps_what_the_page_shows() -> None:
    """The summary of a yima status has disks, sessions and rates' counters, not the catalog."""
    s = summary(
        {**YIMA_STATUS, "media": [{"name": f"m{i}", "blocks": 1, "bytes": 2} for i in range(5000)]}
    )
    assert s["yima"]["media"] == 5000 and s["yima"]["media_bytes"] == 10000
    assert s["yima"]["sessions"] == 2 and s["yima"]["bytes_sent"] == 18800
    assert [d["disk_id"] for d in s["yima"]["disks"]] == ["y1-0", "y2-0"]
    assert "mail" not in s and len(json.dumps(s)) < 2000


def test_cluster_route_is_open_and_answers_json(tmp_path: Path) -> None:
    """GET /api/cluster needs no token and answers this node's entry for a cluster of one."""
    n = node(tmp_path)
    res = AdminResource(n)
    assert isinstance(res.admission(b"GET", b"/api/cluster", Headers(), None), int)
    assert isinstance(res.admission(b"POST", b"/api/cluster", Headers(), 10), int)
    req = get(res, b"/api/cluster")
    doc = json.loads(b"".join(req.written))
    assert [e["node_id"] for e in doc["nodes"]] == ["n1"]
    assert doc["nodes"][0]["summary"]["kind"] == "porcupine"
    assert not isinstance(res.admission(b"GET", b"/api/rpc-check", Headers(), None), int)
    assert isinstance(res.admission(b"GET", b"/api/rpc-check", Headers(), None), Refusal)
