"""In-order relay for standard players, sans-IO.

Stock players (ffmpeg, GStreamer) need one RTP stream, in order, from one
address (see docs/wire.md and shared reference "players.md").  In bipartite
mode the node holding the RTSP session receives every node's scheduled packets
and forwards them in global sequence order.  A packet is held while an earlier
one is missing, at most ``hold`` seconds; then the gap is given up (the player
sees an ordinary loss) and forwarding continues.  Duplicates and packets older
than what was already forwarded are dropped.
"""

from __future__ import annotations

import heapq

import attrs


@attrs.define
class RelayStats:
    """What the relay did so far."""

    forwarded: int = 0
    duplicates: int = 0
    too_late: int = 0
    gaps_skipped: int = 0


class Reorderer:
    """Releases items in ascending global sequence number, waiting ``hold`` s for gaps."""

    def __init__(self, first: int = 0, hold: float = 0.2, limit: int = 4096) -> None:
        self.next = first
        self.hold = hold
        self.limit = limit
        self.stats = RelayStats()
        self._heap: list[tuple[int, float, bytes]] = []
        self._held: set[int] = set()

    def push(self, gseq: int, data: bytes, now: float) -> list[bytes]:
        """Accept one packet; return whatever can now be forwarded, in order."""
        if gseq < self.next or gseq in self._held:
            if gseq < self.next:
                self.stats.too_late += 1
            else:
                self.stats.duplicates += 1
            return []
        heapq.heappush(self._heap, (gseq, now, data))
        self._held.add(gseq)
        out = self._release()
        while len(self._heap) > self.limit:
            out.extend(self._skip_gap())
        return out

    def tick(self, now: float) -> list[bytes]:
        """Give up gaps whose next packet has waited ``hold`` seconds."""
        out: list[bytes] = []
        while self._heap and now - self._heap[0][1] >= self.hold:
            out.extend(self._skip_gap())
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`tick` may release something."""
        return self._heap[0][1] + self.hold if self._heap else None

    def _skip_gap(self) -> list[bytes]:
        gseq = self._heap[0][0]
        if gseq > self.next:
            self.stats.gaps_skipped += gseq - self.next
            self.next = gseq
        return self._release()

    def _release(self) -> list[bytes]:
        out = []
        while self._heap and self._heap[0][0] == self.next:
            gseq, _, data = heapq.heappop(self._heap)
            self._held.discard(gseq)
            out.append(data)
            self.next += 1
        self.stats.forwarded += len(out)
        return out
