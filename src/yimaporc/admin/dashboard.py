"""The cluster dashboard: ``GET /`` (a page) and ``GET /api/cluster`` (its data).

``/api/cluster`` is the whole cluster as this node sees it: every member of its view
with a :func:`summary` of that member's status, fetched over the cluster RPC
(:class:`NodeSummary`), plus members that left the view lately (health ``gone``).
The route is open like ``/api/status``, so its cost is bounded whoever asks: one
gathering at a time, at most one per :data:`REFRESH` seconds (callers in between get
the last answer), each member asked once with a :data:`TIMEOUT`.

The page (:data:`PAGE`) is plain HTML, CSS and JavaScript served by the node itself
(no external resources): it polls ``/api/cluster`` every 2 s and draws the members
table, per-kind details and small charts of the last minutes on canvases.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.defer import TimeoutError as DeferTimeout
from twisted.protocols import amp
from twisted.python.failure import Failure

from ..cluster.rpc import BigBytes, PeerUnavailable
from ..cluster.wire import Member

if TYPE_CHECKING:
    from ..cluster.node import ClusterNode

__all__ = ["PAGE", "ClusterView", "NodeSummary", "answer_summary", "health", "page", "summary"]

#: Seconds a gathered cluster view is served again before members are asked anew.
REFRESH = 1.0
#: Seconds to wait for one member's summary.
TIMEOUT = 2.0
#: Members that left the view are shown as ``gone`` for this long (seconds) ...
FORGET_AFTER = 600.0
#: ... and at most this many of them.
MAX_FORMER = 32
#: Sessions listed per yima node (the busiest).
MAX_SESSIONS = 32
#: A member whose reactor ran a timer this late (ms, over the last minute) is ``degraded``.
LAG_DEGRADED_MS = 500.0


class NodeSummary(amp.Command):
    """A member's :func:`summary` (JSON), for the dashboard of whichever node asks."""

    commandName = b"yimaporc.node-summary"
    arguments = []  # type: ignore[var-annotated]
    response = [(b"summary", BigBytes())]


def _pick(doc: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: doc[k] for k in keys if k in doc}


def summary(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What the dashboard shows of one node's status document (bounded in size)."""
    mem = doc.get("membership") or {}
    out: dict[str, Any] = {
        **_pick(doc, "node_id", "kind", "cluster", "address", "epoch", "coordinator", "uptime"),
        "members": [m.get("node_id") for m in doc.get("members", [])][:256],
        "reactor_lag": doc.get("reactor_lag"),
        "local_health": mem.get("local_health"),
        "datagrams_dropped": sum(v for k, v in mem.items() if k.startswith("dropped_")),
        "services": doc.get("services") or {},
    }
    if "buckets" in doc or doc.get("kind") == "porcupine":
        repl = doc.get("replication") or {}
        pending = repl.get("oldest_pending")
        auth = doc.get("auth") or {}
        out["mail"] = {
            "users": doc.get("users"),
            "buckets": doc.get("buckets") or {},
            "messages_accepted": doc.get("messages_accepted", 0),
            "client_errors": sum((doc.get("client_errors") or {}).values()),
            "auth_failures": auth.get("failures", 0),
            "auth_refused": auth.get("refused", 0),
            "outbound_length": (doc.get("outbound") or {}).get("length", 0),
            "outbound_oldest_age": (doc.get("outbound") or {}).get("oldest_age", 0.0),
            "replication_state": repl.get("state"),
            "replication_log_length": repl.get("log_length", 0),
            "replication_oldest_pending_age": (
                pending.get("age", 0.0) if isinstance(pending, dict) else 0.0
            ),
            # {protocol: {sessions, open, commands}}: a handful of protocols
            "sessions": dict(list((doc.get("mail_sessions") or {}).items())[:8]),
        }
    if "disks" in doc or doc.get("kind") == "yima":
        streaming = doc.get("streaming") or {}
        rtcp = streaming.get("rtcp") or {}
        media = doc.get("media") or []
        reorg = (doc.get("storage") or {}).get("reorganisation") or {}
        out["yima"] = {
            "disks": [
                _pick(d, "disk_id", "node_id", "capacity", "blocks", "stored", "fill")
                for d in (doc.get("disks") or [])[:256]
            ],
            "media": len(media),
            "media_bytes": sum(int(m.get("bytes") or 0) for m in media),
            "media_blocks": sum(int(m.get("blocks") or 0) for m in media),
            "reorganising": bool((doc.get("storage") or {}).get("reorganising")),
            "sessions": streaming.get("sessions", 0),
            "mode": streaming.get("mode"),
            "packets_sent": streaming.get("packets_sent", 0),
            "bytes_sent": streaming.get("bytes_sent"),
            "handed_to_relay": streaming.get("handed_to_relay", 0),
            "nacked": rtcp.get("nacked", 0),
            "resent": rtcp.get("resent", 0),
            "late_packets": streaming.get("late_packets", 0),
            "cache_hits": streaming.get("cache_hits", 0),
            "cache_misses": streaming.get("cache_misses", 0),
            "reorg_planned": reorg.get("blocks_to_move", 0),
            "reorg_moved": reorg.get("blocks_moved", 0),
            # the sessions this node serves a share of (digests, not RTSP session ids)
            "running": (streaming.get("running") or [])[:MAX_SESSIONS],
        }
    return out


def health(entry: Mapping[str, Any], epoch: int) -> str:
    """``up``, ``degraded`` (answers, but another epoch, a late reactor or a local health
    score, or it answers the summary RPC with an error, e.g. a node of an older version
    during a rolling upgrade), ``unreachable`` (in the view, not answering) or ``gone``
    (left the view)."""
    if not entry.get("in_view"):
        return "gone"
    s = entry.get("summary")
    if not entry.get("reachable"):
        return "unreachable"
    if entry.get("error") or not isinstance(s, dict):
        return "degraded"
    lag = s.get("reactor_lag") or {}
    if (
        s.get("epoch") != epoch
        or float(lag.get("max_ms") or 0) > LAG_DEGRADED_MS
        or int(s.get("local_health") or 0) > 0
    ):
        return "degraded"
    return "up"


def answer_summary(doc: Mapping[str, Any]) -> dict[str, bytes]:
    """The :class:`NodeSummary` answer for a node whose status document is ``doc``."""
    return {"summary": json.dumps(summary(doc)).encode("utf-8")}


class ClusterView:
    """Gathers every member's summary for ``GET /api/cluster`` (see module doc)."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.gatherings = 0
        self._cached: dict[str, Any] | None = None
        self._cached_at = float("-inf")
        self._waiters: list[Deferred[dict[str, Any]]] | None = None
        #: node_id -> {"address", "summary", "seen"} for every member seen answering.
        self._seen: dict[str, dict[str, Any]] = {}
        #: node_id -> (address, time it left the view)
        self._former: dict[str, tuple[str, float]] = {}

    @property
    def clock(self) -> Any:
        """The node's reactor (read when needed: embedders may mount the admin resource
        on an object that has routes and status but no reactor, and no /api/cluster)."""
        return self.node.reactor

    def local_summary(self) -> dict[str, Any]:
        """This node's own summary (also the answer to :class:`NodeSummary`)."""
        return summary(self.node.status())

    def handle(self, body: dict[str, Any], query: dict[str, str]) -> Deferred[dict[str, Any]]:
        """The ``GET /api/cluster`` route."""
        return self.get()

    def get(self) -> Deferred[dict[str, Any]]:
        """The cluster document: fresh, or the last one if younger than :data:`REFRESH`."""
        now = float(self.clock.seconds())
        if self._cached is not None and now - self._cached_at < REFRESH:
            return succeed(self._cached)
        waiter: Deferred[dict[str, Any]] = Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return waiter
        self._waiters = [waiter]
        self._gather()
        return waiter

    def _gather(self) -> None:
        self.gatherings += 1
        me = self.node.node_id
        view = self.node.view
        started = float(self.clock.seconds())
        peers = [m for m in view.members if m.node_id != me]

        def ask(member: Member) -> Deferred[Any]:
            d = self.node.rpc.call(member.address, NodeSummary)
            d.addTimeout(TIMEOUT, self.clock)
            d.addCallback(lambda r: (json.loads(r["summary"]), self.clock.seconds() - started))
            return d

        d = DeferredList([ask(m) for m in peers], consumeErrors=True)
        d.addCallback(self._gathered, view, peers, started)
        d.addErrback(self._broken)

    def _gathered(
        self, results: list[tuple[bool, Any]], view: Any, peers: list[Member], started: float
    ) -> None:
        now = float(self.clock.seconds())
        me = self.node.node_id
        mine = self.local_summary()
        in_view = {m.node_id for m in view.members} | {me}
        entries: list[dict[str, Any]] = []
        self._seen[me] = {"address": self.node.config.cluster_address, "summary": mine, "seen": now}
        entries.append(
            self._entry(me, self.node.config.cluster_address, True, mine, None, 0.0, now)
        )
        for member, (ok, value) in zip(peers, results, strict=True):
            if ok and isinstance(value[0], dict):
                s, rtt = value
                self._seen[member.node_id] = {"address": member.address, "summary": s, "seen": now}
                entries.append(self._entry(member.node_id, member.address, True, s, None, rtt, now))
            else:
                # down or silent: unreachable; it answered, but with an error: degraded
                down = isinstance(value, Failure) and bool(
                    value.check(PeerUnavailable, DeferTimeout)
                )
                error = value.getErrorMessage() if isinstance(value, Failure) else "bad answer"
                entries.append(
                    self._entry(member.node_id, member.address, not down, None, error, None, now)
                )
        for node_id in list(self._seen):
            if node_id not in in_view and node_id not in self._former:
                self._former[node_id] = (self._seen[node_id]["address"], now)
        for node_id in list(self._former):
            if node_id in in_view or now - self._former[node_id][1] > FORGET_AFTER:
                del self._former[node_id]
        for node_id, _ in sorted(self._former.items(), key=lambda kv: -kv[1][1])[MAX_FORMER:]:
            del self._former[node_id]
            self._seen.pop(node_id, None)
        for node_id, (address, left) in sorted(self._former.items()):
            entry = self._entry(node_id, address, False, None, "left the view", None, now)
            entry["in_view"] = False
            entry["left_ago"] = round(now - left, 3)
            entries.append(entry)
        for entry in entries:
            entry["health"] = health(entry, view.epoch)
        doc = {
            "node_id": me,
            "kind": self.node.config.kind,
            "cluster": self.node.scope.cluster,
            "epoch": view.epoch,
            "coordinator": view.coordinator,
            "time": round(self.node.cluster_time(), 3),
            "gathered_in": round(now - started, 3),
            "round": self.gatherings,
            "nodes": entries,
        }
        self._finish(doc, now)

    def _entry(
        self,
        node_id: str,
        address: str,
        reachable: bool,
        s: dict[str, Any] | None,
        error: str | None,
        rtt: float | None,
        now: float,
    ) -> dict[str, Any]:
        seen = self._seen.get(node_id)
        return {
            "node_id": node_id,
            "address": address,
            "in_view": True,
            "reachable": reachable,
            "error": error,
            "rtt_ms": None if rtt is None else round(rtt * 1e3, 3),
            "seen_ago": None if seen is None else round(now - seen["seen"], 3),
            # a member not answering shows what it last said
            "summary": s if s is not None else (seen or {}).get("summary"),
        }

    def _finish(self, doc: dict[str, Any], now: float) -> None:
        self._cached, self._cached_at = doc, now
        waiters, self._waiters = self._waiters or [], None
        for w in waiters:
            w.callback(doc)

    def _broken(self, failure: Failure) -> None:
        waiters, self._waiters = self._waiters or [], None
        for w in waiters:
            w.errback(failure)


def page() -> bytes:
    """The dashboard page (one file shipped in the package)."""
    return PAGE


PAGE: bytes = resources.files(__package__).joinpath("dashboard.html").read_bytes()
