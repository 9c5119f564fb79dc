"""Prometheus metrics of one node (``GET /metrics``), built from its live state per scrape.

:class:`NodeCollector` is a ``prometheus_client`` custom collector: every scrape asks the
node for its status document (the one ``GET /api/status`` shows) and turns it into
metric families with :func:`families`, so the metrics can never drift from the status.
Each admin endpoint has its own :class:`~prometheus_client.CollectorRegistry` (never the
process-wide default one: several nodes may live in one process, as in the tests).

Names follow the Prometheus conventions: a ``yimaporc_`` prefix, ``_total`` for
counters, base units (``_seconds``, ``_bytes``), and labels only for small, bounded sets
(a reason, a protocol, a disk, a cluster member), never for users or addresses of
clients. docs/operations.md ("Metrics") lists every name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from ._families import DETECTOR_EVENTS, DROP_REASONS, _Families, _label_value, _number
from ._families_porcupine import _porcupine
from ._families_yima import _yima

if TYPE_CHECKING:
    from ..cluster.histogram import HistogramFamily
    from ..cluster.node import ClusterNode
    from ..cluster.rpcstats import RpcCallStats

__all__ = ["CONTENT_TYPE", "NodeCollector", "NodeMetrics", "families"]

#: The Content-Type of what :func:`generate_latest` writes: the text format 0.0.4, which
#: every Prometheus version reads (newer prometheus_client releases announce 1.0.0 as
#: their "latest", which Prometheus 2 servers do not know).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def families(doc: Mapping[str, Any], *, view_changes: int | None = None) -> list[Metric]:
    """The metric families for one node's status document ``doc`` (see module doc)."""
    out = _Families()
    _common(out, doc, view_changes)
    if doc.get("kind") == "porcupine" or "replication" in doc or "outbound" in doc:
        _porcupine(out, doc)
    if doc.get("kind") == "yima" or "streaming" in doc or "disks" in doc:
        _yima(out, doc)
    return out.all()


def _common(out: _Families, doc: Mapping[str, Any], view_changes: int | None) -> None:
    me = str(doc.get("node_id", ""))
    out.gauge(
        "yimaporc_node_info",
        "This node: its id, kind and cluster name (always 1).",
        1,
        node_id=me,
        kind=str(doc.get("kind", "")),
        cluster=str(doc.get("cluster", "")),
    )
    out.gauge("yimaporc_uptime_seconds", "Seconds since the node started.", doc.get("uptime"))
    out.gauge(
        "yimaporc_membership_epoch", "Epoch of the committed membership view.", doc.get("epoch")
    )
    members = doc.get("members")
    if isinstance(members, list):
        out.gauge(
            "yimaporc_membership_members", "Members in this node's current view.", len(members)
        )
    out.gauge(
        "yimaporc_membership_coordinator",
        "1 if this node coordinates the current view, else 0.",
        int(doc.get("coordinator") == me),
    )
    if view_changes is not None:
        out.counter(
            "yimaporc_membership_view_changes",
            "Membership views committed since the node started.",
            view_changes,
        )
    mem = doc.get("membership") or {}
    datagrams = {
        "sent": "Membership datagrams sent.",
        "send_errors": "Membership datagrams the kernel refused to send.",
        "received": "Membership datagrams received (before any check).",
        "accepted": "Membership datagrams that passed MAC, scope and replay checks.",
    }
    for key, text in datagrams.items():
        out.counter(f"yimaporc_membership_datagrams_{key}", text, mem.get(key, 0))
    reasons = set(DROP_REASONS) | {k[8:] for k in mem if k.startswith("dropped_")}
    for reason in sorted(reasons):
        out.counter(
            "yimaporc_membership_datagrams_dropped",
            "Membership datagrams dropped, by reason.",
            mem.get("dropped_" + reason, 0),
            reason=_label_value(reason),
        )
    events = set(DETECTOR_EVENTS) | {k[9:] for k in mem if k.startswith("detector_")}
    for event in sorted(events):
        out.counter(
            "yimaporc_membership_detector_events",
            "Failure-detector events (suspicions, accusations, indirect probes...).",
            mem.get("detector_" + event, 0),
            event=_label_value(event),
        )
    out.counter(
        "yimaporc_membership_suspicions",
        "Times this node's failure detector began to suspect the member it watches.",
        mem.get("detector_suspected", 0),
    )
    out.gauge(
        "yimaporc_membership_local_health",
        "The failure detector's local health score (0 is healthy).",
        mem.get("local_health"),
    )
    out.gauge(
        "yimaporc_membership_udp_receive_buffer_bytes",
        "Receive buffer the kernel granted the membership UDP socket.",
        mem.get("udp_rcvbuf"),
    )
    clock = doc.get("clock") or {}
    out.gauge(
        "yimaporc_clock_offset_seconds",
        "Offset of this node's clock to the cluster's reference clock.",
        clock.get("offset"),
    )
    out.gauge(
        "yimaporc_clock_rtt_seconds",
        "Round-trip time of the last clock synchronisation.",
        clock.get("rtt"),
    )
    rpc = doc.get("rpc") or {}
    out.gauge(
        "yimaporc_rpc_unauthenticated_connections",
        "RPC connections that have not proven the cluster key yet.",
        rpc.get("unauthenticated"),
    )
    for key, value in sorted(rpc.items()):
        for prefix in ("dropped_", "refused_"):
            if key.startswith(prefix):
                out.counter(
                    f"yimaporc_rpc_{prefix[:-1]}",
                    f"RPC connections or boxes {prefix[:-1]}, by reason.",
                    value,
                    reason=_label_value(key[len(prefix) :]),
                )
    admin = doc.get("admin") or {}
    out.gauge("yimaporc_admin_connections", "Open admin API connections.", admin.get("connections"))
    for key, value in sorted(admin.items()):
        if key.startswith("refused_") and key[8:].isdigit():
            out.counter(
                "yimaporc_admin_refused_requests",
                "Admin requests refused from their head, by HTTP status.",
                value,
                status=key[8:],
            )
    out.counter(
        "yimaporc_admin_refused_connections",
        "Admin connections closed at once because of the connection caps.",
        admin.get("refused_connections"),
    )
    files = doc.get("state_files") or {}
    for name, stats in sorted(files.items()):
        for outcome, key in (
            ("written", "writes"),
            ("failed", "failed"),
            ("coalesced", "coalesced"),
        ):
            out.counter(
                "yimaporc_state_file_writes",
                "Node state file saves (membership, bucket map) by outcome: written, failed, "
                "or coalesced into a newer save.",
                stats.get(key, 0),
                file=_label_value(str(name)),
                outcome=outcome,
            )
    lag = doc.get("reactor_lag") or {}
    for key, stat in (("max_ms", "max"), ("p99_ms", "p99")):
        value = _number(lag.get(key))
        out.gauge(
            f"yimaporc_reactor_lag_{stat}_seconds",
            f"How late the reactor ran its timers over the last minute ({stat}).",
            None if value is None else value / 1e3,
        )


def rpc_families(stats: RpcCallStats) -> list[Metric]:
    """Calls, failures and a latency histogram per command of the RPCs this node made."""
    calls = CounterMetricFamily(
        "yimaporc_rpc_calls", "Cluster RPCs this node made, by command.", labels=["command"]
    )
    errors = CounterMetricFamily(
        "yimaporc_rpc_call_errors",
        "Cluster RPCs that failed, by command and kind (unavailable: peer down or too "
        "slow; remote: the peer answered with an error).",
        labels=["command", "error"],
    )
    latency = HistogramMetricFamily(
        "yimaporc_rpc_call_duration_seconds",
        "Time from a cluster RPC's start to its answer or failure, by command.",
        labels=["command"],
    )
    for name, cmd in sorted(stats.commands.items()):
        label = name[:64]
        calls.add_metric([label], cmd.calls)
        for kind, n in sorted(cmd.errors.items()):
            errors.add_metric([label, kind], n)
        latency.add_metric([label], cmd.cumulative(), sum_value=cmd.total)
    return [calls, errors, latency]


def histogram_families(histograms: Iterable[HistogramFamily]) -> list[Metric]:
    """The node's own histograms (reactor lag, mail delivery...)."""
    out: list[Metric] = []
    for fam in histograms:
        metric = HistogramMetricFamily(fam.name, fam.doc, labels=list(fam.labels))
        for key, hist in sorted(fam.series.items()):
            metric.add_metric(list(key), hist.cumulative(), sum_value=hist.total)
        out.append(metric)
    return out


class NodeCollector(Collector):
    """Collects ``node``'s metrics at every scrape, from its status as of then."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        """The node's families, from its status as of now."""
        node = self.node
        yield from families(node.status(), view_changes=node.view_changes)
        yield from rpc_families(node.rpc.calls)
        yield from histogram_families(node.histograms)


class NodeMetrics:
    """One registry holding one node's collector; ``render()`` is the scrape answer."""

    def __init__(self, node: ClusterNode) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = NodeCollector(node)
        self.registry.register(self.collector)

    def render(self) -> bytes:
        """The text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)
