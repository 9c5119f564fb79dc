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
import struct
from collections.abc import Callable, Sequence

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
    #: Shares of a node that is not among the session's nodes (outside this node's view
    #: when it started: nobody was asked to send them), served here once found missing.
    unplanned_takeovers: int = 0


class Reorderer:
    """Releases items in ascending global sequence number, waiting ``hold`` s for gaps."""

    def __init__(
        self,
        first: int = 0,
        hold: float = 0.2,
        limit: int = 4096,
        due: Callable[[int], float] | None = None,
        hold_until: Callable[[int], float] | None = None,
        due_upto: Callable[[float], int] | None = None,
    ) -> None:
        self.next = first
        self.hold = hold
        self.limit = limit
        #: Paced: ``due(gseq)`` is the instant a packet may go (``inf`` while paused).
        self.due = due
        #: Paced: ``hold_until(gseq)`` is the earliest instant a missing ``gseq`` may be
        #: given up (however due the packets after it are).
        self.hold_until = hold_until
        #: Paced, optional: ``due_upto(now)`` is the first gseq not due at ``now`` (every
        #: one before it is): a release asks it once instead of ``due`` per packet.
        self.due_upto = due_upto
        self.stats = RelayStats()
        self._heap: list[tuple[int, float, bytes]] = []
        self._held: set[int] = set()
        #: Every packet in [next, _whole) is held: :meth:`missing` starts there.
        self._whole = first
        #: The ``now`` of the last release (everything due then went).
        self._released_at: float | None = None
        #: Gaps given up and never forwarded (the latest ``limit``): the only packets a
        #: late retransmission may still bring to the player (:meth:`take_skipped`).
        self._skipped: dict[int, None] = {}

    def push(self, gseq: int, data: bytes, now: float, settled: bool = False) -> list[bytes]:
        """Accept one packet; return whatever can now be forwarded, in order.

        ``settled``: ``due`` has not changed since the caller's last push (a run's later
        packets, pushed in one go): if that push released at this same ``now``, only
        this packet, if it is the next one, can release more, so ``due`` is not asked
        again (the same outcome)."""
        if gseq < self.next or gseq in self._held:
            if gseq < self.next:
                self.stats.too_late += 1
            else:
                self.stats.duplicates += 1
            return []
        heap = self._heap
        heapq.heappush(heap, (gseq, now, data))
        self._held.add(gseq)
        # Nothing goes while the head is a gap (``_release`` would stop there at once).
        head = heap[0][0]
        if head != self.next or (settled and head != gseq and self._released_at == now):
            out = []
        else:
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

    def take_skipped(self, gseq: int) -> bool:
        """True once for a ``gseq`` whose gap was given up (never forwarded): a late
        retransmission of it may still go to the player, out of order. False for what
        was forwarded already or is unknown (counted as too late)."""
        if self._skipped.pop(gseq, False) is None:
            return True
        self.stats.too_late += 1
        return False

    def reset(self, first: int) -> None:
        """Start over at ``first`` (a seek): whatever is held is dropped."""
        self._heap.clear()
        self._held.clear()
        self._skipped.clear()
        self.next = self._whole = first
        self._released_at = None

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
            skipped = self._skipped
            skipped.update(dict.fromkeys(range(max(self.next, gseq - self.limit), gseq)))
            while len(skipped) > self.limit:
                del skipped[next(iter(skipped))]
            self.next = gseq
        return self._release(now, force=True)

    def _release(self, now: float, force: bool = False) -> list[bytes]:
        out: list[bytes] = []
        heap, held, due, nxt = self._heap, self._held, self.due, self.next
        # Every packet before ``bound`` is due: ``due`` is asked packet by packet, and
        # past the first few of a release ``due_upto`` once for the rest of it.
        if due is None:
            bound = 1 << 62  # unpaced: whatever is in order goes
        else:
            bound = nxt + 1 if force else nxt  # forced: the head goes unasked
        upto, asked = self.due_upto, 0
        pop, discard, append = heapq.heappop, held.discard, out.append
        while heap and heap[0][0] == nxt:
            if nxt >= bound:
                assert due is not None
                if upto is not None and asked >= ASK_EACH:
                    bound = max(nxt, upto(now))
                    if nxt >= bound:
                        break
                else:
                    if due(nxt) > now:
                        break
                    asked += 1
                    bound = nxt + 1
            discard(nxt)
            append(pop(heap)[2])
            nxt += 1
        self.next = nxt
        self._released_at = now  # nothing else is due at ``now`` (see ``push``)
        self.stats.forwarded += len(out)
        return out


#: A release asks ``due`` about this many packets one by one before it asks ``due_upto``
#: (which costs a few ``due`` calls) for the rest.
ASK_EACH = 4


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


_FIXED = struct.Struct(">BBHI4s")  # the 12-byte fixed header as forwarded
_NODE = struct.Struct(">BBHIIHH")  # a node's fixed header and extension header (16 bytes)


def rewrite_run(
    packets: Sequence[bytes], seq_delta: int, ssrc: bytes, keep_extension: bool
) -> tuple[bytearray, list[int], int]:
    """:func:`rewrite` over a run of a node's packets at once, into one buffer.

    Each packet's sequence number becomes its own plus ``seq_delta`` (mod 2**16); the
    rest is :func:`rewrite`'s, byte for byte.  Returns the packets back to back, their
    lengths (in order) and their payload bytes (after the fixed header, CSRCs and any
    extension kept): what the relay sends as one batch and counts in RTCP.
    """
    buf = bytearray()
    lengths: list[int] = []
    octets = 0
    fixed, node = _FIXED, _NODE
    for d in packets:
        n = len(d)
        if n < 16 or d[0] & 0x0F:  # short, or CSRCs: the general case
            seq = (int.from_bytes(d[2:4], "big") + seq_delta) & 0xFFFF
            r = rewrite(d, seq, ssrc, keep_extension)
            buf += r
            lengths.append(len(r))
            hl = 12 + 4 * (r[0] & 0x0F)
            if r[0] & 0x10 and len(r) >= hl + 4:
                hl += 4 + 4 * int.from_bytes(r[hl + 2 : hl + 4], "big")
            octets += len(r) - min(hl, len(r))
            continue
        b0, b1, seq, ts, _, _, words = node.unpack_from(d)
        seq = (seq + seq_delta) & 0xFFFF
        end = 16 + 4 * words
        if not b0 & 0x10:  # plain RTP already: new numbers only
            at = len(buf)
            buf += d
            fixed.pack_into(buf, at, b0, b1, seq, ts, ssrc)
            lengths.append(n)
            octets += n - 12
        elif keep_extension:
            at = len(buf)
            buf += d
            fixed.pack_into(buf, at, b0, b1, seq, ts, ssrc)
            lengths.append(n)
            octets += n - min(end, n)
        else:  # the Yima extension stripped: X clear, fixed header, payload
            buf += fixed.pack(b0 & 0xEF, b1, seq, ts, ssrc)
            if end < n:
                buf += memoryview(d)[end:]
            m = 12 + max(0, n - end)
            lengths.append(m)
            octets += m - 12
    return buf, lengths, octets
