"""In-order relay for standard players, sans-IO.

Stock players (ffmpeg, GStreamer) need one RTP stream, in order, from one
address (see docs/wire.md and shared reference "players.md").  In bipartite
mode the node holding the RTSP session receives every node's scheduled packets
and forwards them in global sequence order.  A packet is held while an earlier
one is missing, at most ``hold`` seconds; then the gap is given up (the player
sees an ordinary loss) and forwarding continues.  Duplicates and packets older
than what was already forwarded are dropped.

Paced (``due`` given): the nodes send a relayed session *ahead* of its playout
by the session's lead, and the relay holds every packet until its due instant,
in order.  A gap is then given up only when the packet after it falls due and
the gap has been waited for as long as the session's lead (``hold_until``): the
relay's hold is the session's lead, and meanwhile the RTSP node asks the owner
again or rebuilds the share from parity (:meth:`Reorderer.missing` names what
is overdue).  In steady state the packet after a gap falls due last; at the
start of a burst (a PLAY: the nodes send the whole lead at once, all of it due
at the reply) ``hold_until`` is what keeps a share still on its way from being
skipped.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import attrs


@attrs.define
class RelayStats:
    """What the relay did so far."""

    forwarded: int = 0
    duplicates: int = 0
    too_late: int = 0
    gaps_skipped: int = 0
    #: Packets of an earlier position (sent before the nodes took a seek), dropped.
    stale: int = 0
    #: Overdue packets (not there when they should have arrived): asked again of the owner.
    overdue_nacked: int = 0
    #: Node shares taken over before the membership noticed (the owner went silent).
    early_takeovers: int = 0
    #: Datagrams the relay socket received from the nodes, and the reads that brought
    #: them (a read brings a whole run where the kernel has UDP GRO, see .recvpath).
    received: int = 0
    receive_reads: int = 0
    #: Overdue watches that ran late (this node stalled) and so took no share over.
    watch_stalls: int = 0


class Reorderer:
    """Releases items in ascending global sequence number, waiting ``hold`` s for gaps."""

    def __init__(
        self,
        first: int = 0,
        hold: float = 0.2,
        limit: int = 4096,
        due: Callable[[int], float] | None = None,
        hold_until: Callable[[int], float] | None = None,
    ) -> None:
        self.next = first
        self.hold = hold
        self.limit = limit
        #: Paced: ``due(gseq)`` is the instant a packet may go (``inf`` while paused).
        self.due = due
        #: Paced: ``hold_until(gseq)`` is the earliest instant a missing ``gseq`` may be
        #: given up (however due the packets after it are).
        self.hold_until = hold_until
        self.stats = RelayStats()
        self._heap: list[tuple[int, float, bytes]] = []
        self._held: set[int] = set()
        #: Every packet in [next, _whole) is held: :meth:`missing` starts there.
        self._whole = first

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
        out = self._release(now)
        while len(self._heap) > self.limit:
            out.extend(self._skip_gap(now))
        return out

    def missing(self, upto: int, limit: int = 512) -> list[int]:
        """Sequence numbers in ``[next, upto)`` not held (at most ``limit``): what is
        overdue when every packet before ``upto`` should have arrived by now."""
        start = max(self._whole, self.next)
        while start < upto and start in self._held:
            start += 1
        self._whole = start  # amortised: the held prefix is walked once, not at every call
        out = []
        for g in range(start, upto):
            if g not in self._held:
                out.append(g)
                if len(out) >= limit:
                    break
        return out

    def reset(self, first: int) -> None:
        """Start over at ``first`` (a seek): whatever is held is dropped."""
        self._heap.clear()
        self._held.clear()
        self.next = self._whole = first

    def tick(self, now: float) -> list[bytes]:
        """Release what is due; give up gaps whose next packet is due and which were
        held until ``hold_until`` (paced), or whose next packet waited ``hold`` seconds."""
        out = self._release(now)
        while self._heap and now >= self._give_up_at(self._heap[0]):
            out.extend(self._skip_gap(now))
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`tick` may release something (None: nothing held, or paused)."""
        if not self._heap:
            return None
        head = self._heap[0]
        t = self._give_up_at(head) if head[0] != self.next else self._due(head)
        return None if t == float("inf") else t

    def _due(self, entry: tuple[int, float, bytes]) -> float:
        return entry[1] if self.due is None else self.due(entry[0])

    def _give_up_at(self, entry: tuple[int, float, bytes]) -> float:
        if self.due is None:
            return entry[1] + self.hold
        t = self.due(entry[0])
        return t if self.hold_until is None else max(t, self.hold_until(self.next))

    def _skip_gap(self, now: float) -> list[bytes]:
        gseq = self._heap[0][0]
        if gseq > self.next:
            self.stats.gaps_skipped += gseq - self.next
            self.next = gseq
        return self._release(now, force=True)

    def _release(self, now: float, force: bool = False) -> list[bytes]:
        out = []
        while self._heap and self._heap[0][0] == self.next:
            if not force and self.due is not None and self.due(self.next) > now:
                break
            force = False
            gseq, _, data = heapq.heappop(self._heap)
            self._held.discard(gseq)
            out.append(data)
            self.next += 1
        self.stats.forwarded += len(out)
        return out


def rewrite(data: bytes, seq: int, ssrc: bytes, keep_extension: bool) -> bytes:
    """A node's RTP packet as the relay forwards it: sequence number ``seq`` (the
    session's own, continuous across seeks), SSRC ``ssrc`` (4 bytes), and the
    header extension kept only for a client that opted in (``x-yima-fanout``).

    Without it the packet is plain RFC 3550 RTP: X bit clear, the 12-byte fixed
    header (plus CSRCs, if any) followed by the payload.
    """
    seq_bytes = (seq & 0xFFFF).to_bytes(2, "big")
    if keep_extension or not data[0] & 0x10:
        return data[:2] + seq_bytes + data[4:8] + ssrc + data[12:]
    fixed = 12 + 4 * (data[0] & 0x0F)
    if len(data) < fixed + 4:
        return bytes((data[0] & 0xEF,)) + data[1:2] + seq_bytes + data[4:8] + ssrc + data[12:]
    end = fixed + 4 + 4 * int.from_bytes(data[fixed + 2 : fixed + 4], "big")
    return (bytes((data[0] & 0xEF,)) + data[1:2] + seq_bytes + data[4:8] + ssrc
            + data[12:fixed] + data[end:])  # fmt: skip
