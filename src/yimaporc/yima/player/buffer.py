"""The player's reassembly buffer and media-rate consumer, sans-IO.

Packets from every node land in one buffer keyed by (extended) global
sequence number, in any order, duplicates ignored.  The consumer plays packet
``g`` at ``playout_start + (media_time - start_mt) / rate``; it walks the
global sequence in order, so a position it passes without the packet is
*missing at playout*, and a packet arriving after its playout instant is
*late* (counted, not played).  The buffer level (bytes, and media seconds
ahead of the playout clock) is what flow control steers.
"""

from __future__ import annotations

import heapq

import attrs


@attrs.frozen
class Buffered:
    """One packet waiting in the buffer."""

    gseq: int
    media_time: float
    size: int
    node: int
    node_seq: int
    payload: bytes = b""


@attrs.define
class BufferStats:
    """What the buffer saw."""

    received: int = 0
    duplicates: int = 0
    late: int = 0
    missing: int = 0
    played: int = 0
    underflows: int = 0


class PlayoutBuffer:
    """Reassembly by global sequence number plus the consumer's playout clock."""

    def __init__(
        self,
        playout_start: float,
        *,
        start_mt: float = 0.0,
        rate: float = 1.0,
        first_gseq: int = 0,
        total: int | None = None,
        capacity: int | None = None,
    ) -> None:
        self.playout_start = playout_start
        self.start_mt = start_mt
        self.rate = rate
        self.next_gseq = first_gseq
        self.total = total
        self.capacity = capacity
        self.stats = BufferStats()
        self.level_bytes = 0
        self.max_level_bytes = 0
        self.played_mt: float | None = None
        self.lateness = 0.0
        self.ended = False
        self._packets: dict[int, Buffered] = {}
        self._heap: list[int] = []
        self._dry = False
        self._max_mt = start_mt
        self._max_gseq = first_gseq - 1

    # --- clock ---------------------------------------------------------------------

    def playout_time(self, media_time: float) -> float:
        """Instant at which ``media_time`` plays."""
        return self.playout_start + (media_time - self.start_mt) / self.rate

    def clock_mt(self, now: float) -> float:
        """Media time the playout clock shows at ``now``."""
        return self.start_mt + (now - self.playout_start) * self.rate

    # --- levels --------------------------------------------------------------------

    def level_seconds(self, now: float) -> float:
        """Media seconds buffered ahead of the playout clock."""
        if not self._packets:
            return 0.0
        return max(0.0, self._max_mt - max(self.clock_mt(now), self.start_mt))

    @property
    def max_gseq(self) -> int:
        """Highest global sequence number received so far."""
        return self._max_gseq

    def __contains__(self, gseq: int) -> bool:
        return gseq in self._packets

    def get(self, gseq: int) -> Buffered | None:
        """The buffered packet ``gseq``, if waiting."""
        return self._packets.get(gseq)

    def holes(self, limit: int = 1024) -> list[int]:
        """Positions not yet played, below the highest received, without a packet."""
        out: list[int] = []
        for g in range(self.next_gseq, self._max_gseq):
            if g not in self._packets:
                out.append(g)
                if len(out) >= limit:
                    break
        return out

    # --- input ---------------------------------------------------------------------

    def insert(self, pkt: Buffered, now: float) -> str:
        """Store one arriving packet: ``"ok"``, ``"duplicate"`` or ``"late"``."""
        if pkt.gseq in self._packets:
            self.stats.duplicates += 1
            return "duplicate"
        if pkt.gseq < self.next_gseq or self.playout_time(pkt.media_time) < now:
            self.stats.late += 1
            return "late"
        if self.total is not None and pkt.gseq >= self.total:
            self.stats.duplicates += 1
            return "duplicate"
        self._packets[pkt.gseq] = pkt
        heapq.heappush(self._heap, pkt.gseq)
        self.stats.received += 1
        self.level_bytes += pkt.size
        self.max_level_bytes = max(self.max_level_bytes, self.level_bytes)
        self._max_mt = max(self._max_mt, pkt.media_time)
        self._max_gseq = max(self._max_gseq, pkt.gseq)
        self._dry = False
        return "ok"

    # --- consumer ------------------------------------------------------------------

    def next_playout(self) -> float | None:
        """When the consumer next has something to do."""
        if not self._heap:
            return None
        return self.playout_time(self._packets[self._heap[0]].media_time)

    def play(self, now: float) -> list[Buffered]:
        """Release, in global order, every packet whose playout instant has come."""
        out: list[Buffered] = []
        while self._heap:
            g = self._heap[0]
            pkt = self._packets[g]
            if self.playout_time(pkt.media_time) > now:
                break
            heapq.heappop(self._heap)
            del self._packets[g]
            self.stats.missing += g - self.next_gseq
            self.next_gseq = g + 1
            self.level_bytes -= pkt.size
            self.played_mt = pkt.media_time
            self.lateness = now - self.playout_time(pkt.media_time)
            self.stats.played += 1
            out.append(pkt)
        if now >= self.playout_start and not self._packets and not self.done:
            if not self._dry:
                self.stats.underflows += 1
            self._dry = True
        return out

    def presented_mt(self, now: float) -> float | None:
        """Media time the decoder is presenting at ``now`` (None before the first packet).

        While the next packet is in the buffer, presentation is continuous and
        follows the playout clock, minus how late the consumer ran.  While it
        is missing the stream presents nothing (a concealed gap, counted as
        missing at playout), so None.
        """
        if self.played_mt is None or self.done or self.next_gseq not in self._packets:
            return None
        return max(self.played_mt, self.clock_mt(now) - self.lateness * self.rate)

    @property
    def done(self) -> bool:
        """True once the whole stream has been played (or given up at its end)."""
        return self.ended or (self.total is not None and self.next_gseq >= self.total)

    def finish(self) -> None:
        """End of stream: whatever was never played counts as missing."""
        if self.total is not None and self.next_gseq < self.total:
            self.stats.missing += self.total - self.next_gseq
            self.next_gseq = self.total
        self.ended = True
