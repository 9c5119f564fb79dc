"""Metric families of a Porcupine node's status: mail protocols, delivery, replication."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass
from ._families import MAIL_PROTOCOLS, _Families, _label_value


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
    for key, value in sorted((doc.get("mail_refusals") or {}).items()):
        out.counter(
            "yimaporc_mail_refusals",
            "IMAP/POP3 commands refused with a transient [UNAVAILABLE] for what this node "
            "could not know (validity_unknown: the user's profile, hence INBOX UIDVALIDITY; "
            "reserve_wait_lapsed: APPEND/COPY with the user's manager out of reach 10 s; "
            "append_wait_lapsed: an APPEND/COPY still failing before anything was written "
            "after 16 s), and reserve_waits/append_waits: their retries meanwhile.",
            value,
            reason=_label_value(str(key)),
        )
    for key, value in sorted((doc.get("delivery") or {}).items()):
        out.counter(
            "yimaporc_mail_delivery_events",
            "Delivery proxy events on this node, by kind (store_retries, unsure_stores, "
            "holder_retries, unrecorded_holders, notes_lost, lookups_unavailable).",
            value,
            event=_label_value(str(key)),
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
    workers = doc.get("mail_workers")
    if isinstance(workers, dict):
        out.gauge(
            "yimaporc_mail_workers_live",
            "POP3/IMAP worker processes connected and serving (--mail-workers).",
            workers.get("live"),
        )
        for key, text in (
            ("deaths", "POP3/IMAP worker processes that ended (their sessions were cut)."),
            ("restarts", "Replacement POP3/IMAP worker processes started after deaths."),
        ):
            out.counter(f"yimaporc_mail_worker_{key}", text, workers.get(key))
        for key, value in sorted((workers.get("channel") or {}).items()):
            out.counter(
                "yimaporc_mail_worker_channel_refusals",
                "Boxes or connections the workers' unix socket refused, by reason.",
                value,
                reason=_label_value(str(key)),
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
    out.gauge(
        "yimaporc_mail_unnumbered",
        "Messages stored here without a UID, waiting for their manager to number them.",
        cluster.get("unnumbered"),
    )
    for key in ("numbered", "pending_plans", "late_allocations"):
        out.counter(
            "yimaporc_mail_uid_events",
            "UID events: messages numbered late by their manager, deliveries that got "
            "no UID, stores whose allocation was too old here.",
            cluster.get(key),
            event=key,
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
