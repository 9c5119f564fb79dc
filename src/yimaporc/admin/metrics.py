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

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from ..cluster.histogram import HistogramFamily
    from ..cluster.node import ClusterNode
    from ..cluster.rpcstats import RpcCallStats

__all__ = ["CONTENT_TYPE", "NodeCollector", "NodeMetrics", "families"]

#: The Content-Type of what :func:`generate_latest` writes: the text format 0.0.4, which
#: every Prometheus version reads (newer prometheus_client releases announce 1.0.0 as
#: their "latest", which Prometheus 2 servers do not know).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Datagram drop reasons always exported (0 until one happens), so alerts can refer to them.
DROP_REASONS = ("bad_mac", "malformed", "replayed", "wrong_scope")
#: Failure-detector events always exported (docs/cluster.md, "Failure detection").
DETECTOR_EVENTS = ("suspected", "accused")
#: Mail protocols whose sessions and commands are always exported.
MAIL_PROTOCOLS = ("smtp", "submission", "pop3", "imap")

_NAME_PART = re.compile(r"[^a-zA-Z0-9_]")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def _label_value(value: str) -> str:
    return _NAME_PART.sub("_", value)[:64]


class _Families:
    """Metric families by name, each created on first use with a fixed label set."""

    def __init__(self) -> None:
        self._by_name: dict[str, Metric] = {}

    def _family(self, kind: str, name: str, doc: str, labels: Iterable[str]) -> Metric:
        fam = self._by_name.get(name)
        if fam is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            fam = cls(name, doc, labels=list(labels))
            self._by_name[name] = fam
        return fam

    def _add(self, kind: str, name: str, doc: str, value: Any, labels: Mapping[str, str]) -> None:
        number = _number(value)
        fam = self._family(kind, name, doc, labels)
        if number is not None:
            fam.add_metric([str(v) for v in labels.values()], number)  # type: ignore[attr-defined]

    def gauge(self, name: str, doc: str, value: Any, **labels: str) -> None:
        """Add one gauge sample (skipped when ``value`` is not a number)."""
        self._add("gauge", name, doc, value, labels)

    def counter(self, name: str, doc: str, value: Any, **labels: str) -> None:
        """Add one counter sample; ``name`` is given without ``_total``."""
        self._add("counter", name, doc, value, labels)

    def all(self) -> list[Metric]:
        """Every family that has at least one sample."""
        return [f for f in self._by_name.values() if f.samples]


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


def _porcupine(out: _Families, doc: Mapping[str, Any]) -> None:
    out.gauge("yimaporc_mail_users", "Mail accounts in the cluster.", doc.get("users"))
    buckets = doc.get("buckets") or {}
    for node_id, count in sorted(buckets.items()):
        out.gauge(
            "yimaporc_mail_buckets",
            "User-map buckets each member manages, as this node sees it.",
            count,
            member=str(node_id),
        )
    out.counter(
        "yimaporc_mail_messages_accepted",
        "Messages this node accepted for local delivery (SMTP 250).",
        doc.get("messages_accepted"),
    )
    commits = doc.get("group_commit")
    if isinstance(commits, dict):
        for key, help_ in (
            ("groups", "Group commits of deliveries on this node."),
            ("messages", "Messages stored through group commits on this node."),
            ("journal_syncs", "Group-commit journal syncs (one fdatasync per group)."),
            ("checkpoints", "Group-commit journal checkpoints."),
        ):
            out.counter(f"yimaporc_mail_group_commit_{key}", help_, commits.get(key))
    for key, value in sorted((doc.get("client_errors") or {}).items()):
        # "imap.bad_syntax", "pop3.not_authenticated", or older "smtp_bad_arguments"
        sep = "." if "." in str(key) else "_"
        protocol, _, error = str(key).partition(sep)
        out.counter(
            "yimaporc_mail_client_errors",
            "Client mistakes answered with a protocol error, by protocol and kind.",
            value,
            protocol=_label_value(protocol),
            error=_label_value(error or "other"),
        )
    sessions = doc.get("mail_sessions")
    if isinstance(sessions, dict):
        for proto in sorted(set(MAIL_PROTOCOLS) | set(sessions)):
            row = sessions.get(proto) or {}
            label = _label_value(str(proto))
            out.counter(
                "yimaporc_mail_sessions",
                "Mail sessions (connections) accepted, by protocol.",
                row.get("sessions", 0),
                protocol=label,
            )
            out.gauge(
                "yimaporc_mail_open_sessions",
                "Mail sessions open now, by protocol.",
                row.get("open", 0),
                protocol=label,
            )
            out.counter(
                "yimaporc_mail_commands",
                "Mail protocol commands read from clients, by protocol.",
                row.get("commands", 0),
                protocol=label,
            )
    out.gauge(
        "yimaporc_mail_imap_open_mailboxes",
        "Mailboxes IMAP sessions hold selected.",
        doc.get("imap_open_mailboxes"),
    )
    index = doc.get("mail_index") or {}
    for key, text in (
        ("hits", "Mailbox reads answered from the in-memory index (no thread-pool trip)."),
        ("misses", "Mailbox reads that found the user's index cold."),
        ("fills", "Users' mailbox indexes loaded from SQLite into memory."),
        ("invalidations", "Users' in-memory indexes dropped because their rows changed."),
        ("evictions", "Users' in-memory indexes dropped to stay within the bound."),
    ):
        out.counter(f"yimaporc_mail_index_{key}", text, index.get(key))
    out.gauge(
        "yimaporc_mail_index_rows",
        "Rows (messages plus mailboxes) in the index.",
        index.get("rows"),
    )
    out.gauge("yimaporc_mail_index_users", "Users in the in-memory index.", index.get("users"))
    bodies = doc.get("mail_body_cache") or {}
    for key, text in (
        ("hits", "Message bodies answered from the in-memory body cache (no file read)."),
        ("misses", "Message bodies not in the body cache (read from their files)."),
        ("evictions", "Bodies dropped from the body cache to stay within its bound."),
    ):
        out.counter(f"yimaporc_mail_body_cache_{key}", text, bodies.get(key))
    out.gauge(
        "yimaporc_mail_body_cache_bytes",
        "Bytes of message bodies held in the body cache.",
        bodies.get("bytes"),
    )
    out.gauge(
        "yimaporc_mail_plaintext_passwords",
        "1 if this node takes passwords without TLS (no certificate configured).",
        doc.get("plaintext_passwords"),
    )
    auth = doc.get("auth") or {}
    for key, text in (
        ("attempts", "Password checks asked for (IMAP, POP3, SMTP AUTH)."),
        ("successes", "Successful logins."),
        ("failures", "Failed password checks."),
        ("throttled", "Failed logins answered after a throttle delay."),
        ("refused", "Logins refused unchecked by the throttle."),
        ("locks", "Throttle locks set (account/address pairs, addresses, accounts)."),
        ("cache_hits", "Logins answered by the verified-credential cache (no scrypt)."),
        ("cache_misses", "Logins the verified-credential cache could not answer (scrypt ran)."),
        ("cache_shared", "Logins that waited for the same password check already running."),
    ):
        out.counter(f"yimaporc_mail_auth_{key}", text, auth.get(key))
    for key, value in sorted(auth.items()):
        if key.startswith("refused_"):
            out.counter(
                "yimaporc_mail_auth_refused_by_reason",
                "Logins refused unchecked, by reason.",
                value,
                reason=_label_value(key[8:]),
            )
    out.gauge("yimaporc_mail_auth_in_flight", "Password checks in progress.", auth.get("in_flight"))
    out.gauge(
        "yimaporc_mail_auth_cache_entries",
        "Verified credentials held by the auth cache.",
        auth.get("cache_entries"),
    )
    out.gauge(
        "yimaporc_mail_auth_tracked_addresses",
        "Client addresses in the throttle's table.",
        auth.get("tracked_addresses"),
    )
    out.gauge(
        "yimaporc_mail_auth_tracked_accounts",
        "Accounts in the throttle's table.",
        auth.get("tracked_accounts"),
    )
    outbound = doc.get("outbound") or {}
    out.gauge(
        "yimaporc_mail_outbound_queue_length",
        "Messages waiting in the outbound queue.",
        outbound.get("length"),
    )
    out.gauge(
        "yimaporc_mail_outbound_oldest_age_seconds",
        "Age of the oldest message in the outbound queue (0 when empty).",
        outbound.get("oldest_age"),
    )
    for key in ("attempts", "delivered", "deferred", "bounced"):
        out.counter(
            f"yimaporc_mail_outbound_{key}",
            f"Outbound deliveries: {key}.",
            outbound.get(key),
        )
    cluster = doc.get("mail_cluster") or {}
    out.gauge(
        "yimaporc_mail_managed_buckets",
        "User-map buckets this node manages.",
        cluster.get("managed_buckets"),
    )
    out.gauge(
        "yimaporc_mail_settling_buckets",
        "Buckets still being rebuilt after a view change.",
        cluster.get("settling_buckets"),
    )
    out.gauge(
        "yimaporc_mail_users_with_mail",
        "Users with mail on this node.",
        cluster.get("users_with_mail"),
    )
    out.gauge(
        "yimaporc_mail_load", "This node's load as the balancer sees it.", cluster.get("load")
    )
    for command, value in sorted((cluster.get("rpc_calls") or {}).items()):
        out.counter(
            "yimaporc_mail_cluster_rpc_calls",
            "Mail-cluster RPCs this node made, by command.",
            value,
            command=_label_value(str(command)),
        )
    repl = doc.get("replication")
    if isinstance(repl, dict):
        state = str(repl.get("state", "unknown"))
        for s in sorted({"running", "starting", "refused", state}):
            out.gauge(
                "yimaporc_mail_replication_state",
                "1 for the replication state this node is in (running, starting, refused).",
                int(s == state),
                state=_label_value(s),
            )
        out.gauge(
            "yimaporc_mail_replication_log_length",
            "Entries in this node's replication log.",
            repl.get("log_length"),
        )
        pending = repl.get("oldest_pending")
        out.gauge(
            "yimaporc_mail_replication_oldest_pending_age_seconds",
            "Age of the oldest log entry not yet acknowledged by every replica (0 if none).",
            pending.get("age") if isinstance(pending, dict) else 0,
        )
        awaiting = repl.get("awaiting") or {}
        for peer, count in sorted(awaiting.items()):
            out.gauge(
                "yimaporc_mail_replication_awaiting",
                "Log entries waiting for an acknowledgement, by replica.",
                count,
                member=str(peer),
            )
        for key in (
            "messages_sent",
            "send_calls",
            "send_failures",
            "write_rounds",
            "coordinator_retries",
            "retargets",
        ):
            out.counter(
                f"yimaporc_mail_replication_{key}",
                f"Replication: {key.replace('_', ' ')}.",
                repl.get(key),
            )
        out.gauge(
            "yimaporc_mail_replication_under_replicated",
            "Messages below their R copies as this node knows (a replica out of reach, or a "
            "copy this node should hold and has not re-created yet).",
            repl.get("under_replicated"),
        )
        repair = repl.get("repair") or {}
        out.counter(
            "yimaporc_mail_replication_repaired",
            "Copies this node re-created from its peers (re-replication).",
            repair.get("repaired"),
        )
        out.counter(
            "yimaporc_mail_replication_short_acks",
            "Deliveries answered with fewer copies than R (the log completes them).",
            repl.get("short_acks"),
        )
        out.gauge(
            "yimaporc_mail_replication_queued_actions",
            "Replication actions queued.",
            repl.get("queued_actions"),
        )
        out.gauge(
            "yimaporc_mail_replication_waiting_agents",
            "Writers waiting for replication.",
            repl.get("waiting_agents"),
        )


def _yima(out: _Families, doc: Mapping[str, Any]) -> None:
    disks = doc.get("disks") or []
    for disk in disks:
        if not isinstance(disk, dict):
            continue
        labels = {"disk": str(disk.get("disk_id", "")), "member": str(disk.get("node_id", ""))}
        out.gauge(
            "yimaporc_yima_disk_blocks",
            "Blocks (data and parity) placed on each disk of the cluster.",
            disk.get("blocks"),
            **labels,
        )
        out.gauge(
            "yimaporc_yima_disk_stored_blocks",
            "Block files found on each disk (last scan; only this node's disks).",
            disk.get("stored"),
            **labels,
        )
        out.gauge(
            "yimaporc_yima_disk_capacity_bytes",
            "Configured capacity of each disk (absent when unlimited).",
            disk.get("capacity"),
            **labels,
        )
        out.gauge(
            "yimaporc_yima_disk_logical_disks",
            "Logical disks (placement slots) on each physical disk.",
            disk.get("logical"),
            **labels,
        )
        out.gauge(
            "yimaporc_yima_disk_fill_ratio",
            "Fill of each disk, 0..1, when the node reports it.",
            disk.get("fill"),
            **labels,
        )
    media = doc.get("media")
    if isinstance(media, list):
        out.gauge("yimaporc_yima_media", "Titles in the media catalog.", len(media))
        out.gauge(
            "yimaporc_yima_media_bytes",
            "Bytes of all titles in the media catalog.",
            sum(int(m.get("bytes") or 0) for m in media if isinstance(m, dict)),
        )
    storage = doc.get("storage") or {}
    out.gauge(
        "yimaporc_yima_reorganising",
        "1 while a disk add/remove reorganisation runs.",
        storage.get("reorganising"),
    )
    reorg = storage.get("reorganisation")
    if isinstance(reorg, dict):
        out.gauge(
            "yimaporc_yima_reorg_planned_blocks",
            "Blocks the current (or last) disk add/remove this node runs plans to move "
            "(grows as each title is planned; compare yimaporc_yima_reorg_moved_blocks).",
            reorg.get("blocks_to_move"),
        )
        out.gauge(
            "yimaporc_yima_reorg_moved_blocks",
            "Blocks the current (or last) disk add/remove this node runs has moved.",
            reorg.get("blocks_moved"),
        )
        out.counter(
            "yimaporc_yima_reorg_block_moves",
            "Blocks moved by disk adds/removes this node ran, since it started.",
            reorg.get("blocks_moved_total"),
        )
    out.gauge(
        "yimaporc_yima_scaling_steps",
        "Scaling steps (disk adds/removes) in the placement history.",
        storage.get("scaling_steps"),
    )
    out.gauge(
        "yimaporc_yima_logical_disks",
        "Logical disks in the current placement.",
        storage.get("logical_disks"),
    )
    streaming = doc.get("streaming") or {}
    out.gauge(
        "yimaporc_yima_sessions",
        "RTSP sessions set up through this node (it relays or serves them), by mode.",
        streaming.get("sessions"),
        mode=_label_value(str(streaming.get("mode", ""))),
    )
    for key, name, text in (
        ("packets_sent", "packets_sent", "RTP packets this node sent."),
        ("bytes_sent", "payload_bytes_sent", "RTP payload bytes this node sent."),
        (
            "handed_to_relay",
            "relay_handoffs",
            "Packets handed straight to this node's own relay (in process, not over UDP).",
        ),
        ("ended_share_lost", "sessions_ended_share_lost", "Sessions ended as media was lost."),
        ("block_reads", "block_reads", "Blocks read from disk for delivery (read-ahead)."),
        ("block_read_bytes", "block_read_bytes", "Bytes of blocks read from disk for delivery."),
        ("block_read_errors", "block_read_errors", "Block reads for delivery that failed."),
        (
            "late_waits",
            "late_waits",
            "Scheduler ticks at which a due packet waited for its block (late sending).",
        ),
        (
            "late_packets",
            "late_packets",
            "RTP packets sent more than 50 ms after their deadline.",
        ),
        (
            "cache_hits",
            "block_cache_hits",
            "Blocks a session needed that were already in the block cache.",
        ),
        (
            "cache_misses",
            "block_cache_misses",
            "Blocks a session needed that had to be read from disk.",
        ),
    ):
        out.counter(f"yimaporc_yima_{name}", text, streaming.get(key))
    out.gauge(
        "yimaporc_yima_shares_served",
        "Session shares this node schedules (its own and any it took over).",
        streaming.get("shares_served"),
    )
    for key, name, text in (
        ("orphans_stopped", "orphan_shares_stopped", "Shares stopped as their RTSP node left."),
        ("early_handovers", "early_handovers", "Shares taken over at a player's HANDOVER."),
    ):
        out.counter(f"yimaporc_yima_{name}", text, streaming.get(key))
    workers = streaming.get("workers") or {}
    out.gauge("yimaporc_yima_workers_live", "Delivery worker processes running (--workers).",
              workers.get("live"))  # fmt: skip
    for key, text in (
        ("deaths", "Delivery worker processes that died (their sessions moved)."),
        ("sessions_moved", "Sessions moved from a dead delivery worker to another."),
    ):
        out.counter(f"yimaporc_yima_worker_{key}", text, workers.get(key))
    relay = streaming.get("relay") or {}
    for key, text in (
        ("forwarded", "Packets the relays forwarded to standard players."),
        ("skipped", "Packets the relays gave up (still missing when the next one was due)."),
        ("overdue_nacked", "Overdue packets the relays asked of their owner again."),
        ("early_takeovers", "Silent nodes' shares the relays had served from parity."),
        ("duplicates", "Duplicate packets the relays dropped."),
        ("too_late", "Packets that reached a relay after it had given them up."),
        ("stale", "Packets of a position before a seek, dropped by the relays."),
    ):
        out.counter(f"yimaporc_yima_relay_{key}", text, relay.get(key))
    rtsp = doc.get("rtsp") or {}
    for key, text in (
        ("sessions", "RTSP sessions open on this node."),
        ("connections", "RTSP connections open on this node."),
        ("relay_ports", "Relay sockets open for sessions of this node."),
    ):
        out.gauge(f"yimaporc_rtsp_{key}", text, rtsp.get(key))
    for key, text in (
        ("refused_sessions", "SETUPs refused by the session caps (453/503)."),
        ("refused_destinations", "SETUPs refused for naming another destination (461)."),
        ("reaped", "Sessions closed after their client went quiet."),
        ("idle_closed", "RTSP connections closed as idle."),
        ("interleaved_dropped", "Interleaved frames dropped (client not reading)."),
    ):
        out.counter(f"yimaporc_rtsp_{key}", text, rtsp.get(key))
    rtcp = streaming.get("rtcp") or {}
    for key, text in (
        ("received", "RTCP packets received."),
        ("malformed", "RTCP packets dropped as malformed."),
        ("nacked", "Packets players asked for again (generic NACK)."),
        ("resent", "Retransmissions sent."),
        ("feedback_applied", "Flow-control feedback messages applied."),
    ):
        out.counter(f"yimaporc_yima_rtcp_{key}", text, rtcp.get(key))


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
        changes = getattr(self.node, "view_changes", None)
        yield from families(self.node.status(), view_changes=changes)
        stats = getattr(getattr(self.node, "rpc", None), "calls", None)
        if stats is not None:
            yield from rpc_families(stats)
        histograms = getattr(self.node, "histograms", None)
        if histograms is not None:
            yield from histogram_families(histograms)


class NodeMetrics:
    """One registry holding one node's collector; ``render()`` is the scrape answer."""

    def __init__(self, node: ClusterNode) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = NodeCollector(node)
        self.registry.register(self.collector)

    def render(self) -> bytes:
        """The text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)
