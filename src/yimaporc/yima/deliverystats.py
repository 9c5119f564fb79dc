"""What the delivery engine counts for operators: lateness, per-session rates, cache hits.

:class:`DeliveryStats` is sans-IO: the engine (:mod:`.engine`) tells it every packet it
sent (with how late it went out) and, after each read-ahead scan, which blocks its
sessions wanted. ``/api/status`` shows the totals under ``streaming`` and the running
sessions under ``streaming.running``; ``GET /metrics`` exports the totals.

Block cache: each session's need of a block is one *lookup*. It is a *hit* when the
block is already in the engine's cache (or being read for another session), a *miss*
when the engine has to read it from disk (then ``block_reads`` counts the read). A
session keeps needing a block while the block is in its read-ahead window; a lookup is
counted when that need begins.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Container, Hashable, Iterable

import attrs

__all__ = ["LATE_AFTER", "DeliveryStats", "SessionDelivery"]

#: A packet sent more than this many seconds after its deadline counts as late.
LATE_AFTER = 0.05
#: At most this many sessions are listed (the busiest first).
MAX_LISTED = 64
#: Ended sessions are dropped from the per-session table once it holds this many.
FORGET_AFTER = 256


@attrs.define
class SessionDelivery:
    """One session's share sent by this node."""

    packets: int = 0
    bytes: int = 0
    late_packets: int = 0
    max_late: float = 0.0


class DeliveryStats:
    """Counters of one node's delivery engine (see module doc)."""

    def __init__(self) -> None:
        self.late_packets = 0
        self.cache_hits = 0
        self.sessions: dict[str, SessionDelivery] = {}
        self._demand: dict[Hashable, int] = {}
        self._reads: Counter[Hashable] = Counter()  # reads begun, not yet matched to a need

    def sent(self, session: str, nbytes: int, lateness: float) -> None:
        """One packet of ``session`` (``nbytes`` of payload) went out ``lateness`` s
        after its deadline (negative: early)."""
        s = self.sessions.get(session)
        if s is None:
            s = self.sessions[session] = SessionDelivery()
        s.packets += 1
        s.bytes += nbytes
        if lateness > LATE_AFTER:
            self.late_packets += 1
            s.late_packets += 1
            s.max_late = max(s.max_late, lateness)

    def sent_run(self, session: str, packets: int, nbytes: int, late: int, max_late: float) -> None:
        """``packets`` packets of ``session`` (``nbytes`` of payload) went out, ``late``
        of them more than :data:`LATE_AFTER` after their deadline, the latest by
        ``max_late`` seconds."""
        s = self.sessions.get(session)
        if s is None:
            s = self.sessions[session] = SessionDelivery()
        s.packets += packets
        s.bytes += nbytes
        if late > 0:
            self.late_packets += late
            s.late_packets += late
            s.max_late = max(s.max_late, max_late)

    def read_started(self, key: Hashable) -> None:
        """The engine began reading ``key`` from disk (a miss for the need that asked)."""
        self._reads[key] += 1

    def wanted(
        self,
        keys: Iterable[Hashable],
        available: Callable[[Hashable], bool],
        live: Container[str] | None = None,
    ) -> None:
        """The blocks the sessions want now (a key once per session wanting it);
        ``available(key)``: cached or being read; ``live``: the sessions that still run
        (the others are forgotten once they pile up, whether or not status is asked)."""
        if live is not None and len(self.sessions) > FORGET_AFTER:
            for sid in [s for s in self.sessions if s not in live]:
                del self.sessions[sid]
        demand = Counter(keys)
        prev = self._demand
        kept: dict[Hashable, int] = {}
        for key, n in demand.items():
            if not available(key):
                continue  # not read yet (too many reads in flight): counted when it is
            fresh = n - prev.get(key, 0)
            if fresh > 0:
                misses = min(fresh, self._reads.pop(key, 0))
                self.cache_hits += fresh - misses
            kept[key] = n
        self._demand = kept
        if len(self._reads) > 4 * len(kept) + 64:
            self._reads.clear()  # reads no session wanted any more

    def running(
        self, live: Iterable[str], media_of: Callable[[str], str]
    ) -> list[dict[str, object]]:
        """The sessions in ``live`` (forgetting the others), busiest first."""
        live = set(live)
        for sid in [s for s in self.sessions if s not in live]:
            del self.sessions[sid]
        busiest = sorted(self.sessions.items(), key=lambda kv: (-kv[1].bytes, kv[0]))
        return [
            {
                # not the RTSP session id (it controls the session): a digest of it,
                # the same on every node serving the session
                "session": hashlib.sha256(sid.encode()).hexdigest()[:10],
                "media": media_of(sid),
                "packets": s.packets,
                "bytes": s.bytes,
                "late_packets": s.late_packets,
                "max_late_ms": round(s.max_late * 1e3, 1),
            }
            for sid, s in busiest[:MAX_LISTED]
        ]
