"""Metric families of a Yima node's status: disks, media, streaming, relay, RTCP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass
from ._families import _Families, _label_value


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
        ("restarts", "Replacement delivery worker processes started after deaths."),
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
        ("received", "Datagrams the relay sockets received from the nodes."),
        ("receive_reads", "Reads that brought them (one per run of datagrams with UDP GRO)."),
        ("watch_stalls", "Overdue watches that ran late (a stall here) and took no share over."),
        ("unplanned_takeovers", "Shares of nodes not in the view at PLAY, served here."),
    ):
        out.counter(f"yimaporc_yima_relay_{key}", text, relay.get(key))
    rtsp = doc.get("rtsp") or {}
    for key, text in (
        ("sessions", "RTSP sessions open on this node."),
        ("connections", "RTSP connections open on this node."),
        ("relay_ports", "Relay sockets open for sessions of this node."),
        ("max_connections", "The cap on RTSP connections of this node in all."),
    ):
        out.gauge(f"yimaporc_rtsp_{key}", text, rtsp.get(key))
    for key, text in (
        ("refused_sessions", "SETUPs refused by the session caps (453/503)."),
        ("refused_destinations", "SETUPs refused for naming another destination (461)."),
        ("refused_connections", "Connections refused past a client's cap (503)."),
        ("refused_server_connections", "Connections refused past the node's cap in all (503)."),
        ("reaped", "Sessions closed after their client went quiet."),
        ("idle_closed", "RTSP connections closed as idle."),
        ("aborted_unread", "Closed RTSP connections aborted with output still unread."),
        ("interleaved_dropped", "Interleaved frames dropped (client not reading)."),
    ):
        out.counter(f"yimaporc_rtsp_{key}", text, rtsp.get(key))
    for status, n in sorted((rtsp.get("refused") or {}).items()):
        out.counter("yimaporc_rtsp_refused", "RTSP error answers, by status.", n, status=status)
    rtcp = streaming.get("rtcp") or {}
    for key, text in (
        ("received", "RTCP packets received."),
        ("malformed", "RTCP packets dropped as malformed."),
        ("nacked", "Packets players asked for again (generic NACK)."),
        ("resent", "Retransmissions sent."),
        ("feedback_applied", "Flow-control feedback messages applied."),
    ):
        out.counter(f"yimaporc_yima_rtcp_{key}", text, rtcp.get(key))
