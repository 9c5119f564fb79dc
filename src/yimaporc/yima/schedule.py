"""Deadline-driven packet scheduling of one node (Yima-2 bipartite delivery), sans-IO.

Every node computes, for a session, the RTP packets of *its own* blocks and the
cluster time at which each is due; no coordination beyond the session's start
instant on the common clock is needed because blocks are whole multiples of the
RTP payload, so the global sequence number of every packet is ``block *
packets_per_block + j``.  A packet's media time is interpolated within its
block from the media's time index (VBR-correct at block granularity).

Flow control (seed §3.1) re-anchors the schedule: ``deadline(t) = anchor_ct +
(t - anchor_mt) / speed``.  Pause/resume stops and restarts from the next
packet; delta-p changes ``speed`` (1.0 = real time).  Feedback carries the
cluster time at which it takes effect, so every node applies it identically.

One :class:`NodeScheduler` serves all sessions of a node with one timer.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence

import attrs

PAYLOAD = 7 * 188


@attrs.frozen
class MediaTiming:
    """What scheduling needs of a media file."""

    name: str
    size: int
    block_size: int
    block_starts: tuple[float, ...]
    duration: float
    # Bytes of the file per RTP payload (7 TS packets; whole sample frames for WAV).
    payload: int = PAYLOAD
    clock_rate: int = 90000

    # Per-block packet counts and packet spacing, computed once: these are
    # asked for on every packet (the bench profile showed them dominating).
    _counts: tuple[int, ...] = attrs.field(init=False, repr=False, eq=False)
    _steps: tuple[float, ...] = attrs.field(init=False, repr=False, eq=False)
    _total: int = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        # Block start times as a non-decreasing sequence (a time index is; a
        # damaged one is flattened), so packet times never go backwards and the
        # time index can be searched by bisection.
        starts: list[float] = []
        for t in self.block_starts:
            starts.append(max(t, starts[-1]) if starts else t)
        object.__setattr__(self, "block_starts", tuple(starts))
        n = len(starts)
        counts = tuple(
            -(-min(self.block_size, self.size - b * self.block_size) // self.payload)
            for b in range(n)
        )
        ends = (*starts[1:], max(self.duration, starts[-1]) if starts else self.duration)
        steps = tuple((e - s) / max(1, c) for s, e, c in zip(starts, ends, counts, strict=True))
        object.__setattr__(self, "_counts", counts)
        object.__setattr__(self, "_steps", steps)
        object.__setattr__(self, "_total", sum(counts))

    @property
    def total(self) -> int:
        """RTP packets in the whole file (computed once)."""
        return self._total

    def gseq_time(self, gseq: int) -> float:
        """Media time of global packet ``gseq`` (``block * packets_per_block + j``);
        the end of the media for :attr:`total` (one past the last packet) and beyond."""
        if gseq >= self._total:
            return max(self.duration, self.block_starts[-1]) if self.block_starts else 0.0
        ppb = self.packets_per_block
        return self.packet_time(gseq // ppb, gseq % ppb)

    def first_at(self, media_time: float) -> tuple[int, int]:
        """(block, j) of the first packet whose media time is ``>= media_time``, O(log blocks).

        ``(blocks, 0)`` when there is none (the end).  Packet times never
        decrease along the global order, so every packet before it is earlier
        and every packet from it on is at or after ``media_time``: a seek by
        bisection over the block start times, then arithmetic inside the block.
        """
        starts = self.block_starts
        nxt = bisect_left(starts, media_time)  # first block starting at or after media_time
        if nxt == 0:
            return 0, 0
        b = nxt - 1  # starts before media_time: the packet may lie inside it
        s, step, count = starts[b], self._steps[b], self._counts[b]
        if step > 0:
            j = min(count, max(0, math.ceil((media_time - s) / step)))
        else:
            j = count
        # Rounding of the division: settle on the exact comparison packet_time uses.
        while j > 0 and s + step * (j - 1) >= media_time:
            j -= 1
        while j < count and s + step * j < media_time:
            j += 1
        if j < count:
            return b, j
        return nxt, 0

    def first_gseq_at(self, media_time: float) -> int:
        """Global sequence number of the first packet at or after ``media_time``
        (:attr:`total`'s worth of packets, i.e. the end, when there is none)."""
        block, j = self.first_at(media_time)
        if block >= self.blocks:
            return self.total  # only the last block may be short: total = last gseq + 1
        return block * self.packets_per_block + j

    @property
    def blocks(self) -> int:
        """Number of blocks."""
        return len(self.block_starts)

    @property
    def packets_per_block(self) -> int:
        """RTP packets in a full block."""
        return -(-self.block_size // self.payload)

    def packet_count(self, block: int) -> int:
        """RTP packets in ``block`` (the last one may be short)."""
        return self._counts[block]

    def packet_time(self, block: int, j: int) -> float:
        """Media time of packet ``j`` of ``block``."""
        return self.block_starts[block] + self._steps[block] * j


@attrs.frozen
class Packet:
    """One RTP packet to send: where its payload lies and which numbers it carries."""

    session: str
    gseq: int
    node_seq: int
    block: int
    offset: int
    length: int
    media_time: float
    deadline: float
    retransmission: bool = False


@attrs.define
class Session:
    """One stream this node serves (its share of the packets)."""

    session_id: str
    media: MediaTiming
    my_blocks: tuple[int, ...]
    anchor_ct: float
    anchor_mt: float = 0.0
    speed: float = 1.0
    paused: bool = False
    pause_mt: float = 0.0
    cursor_block: int = 0
    cursor_packet: int = 0
    node_seq: int = 0
    sent: OrderedDict[int, Packet] = attrs.field(factory=OrderedDict)
    resent: set[int] = attrs.field(factory=set)
    late: int = 0

    def deadline(self, media_time: float) -> float:
        """Cluster time at which media time ``media_time`` is due."""
        return self.anchor_ct + (media_time - self.anchor_mt) / self.speed

    def peek(self) -> tuple[int, int, float] | None:
        """(block, j, media_time) of the next packet to send, or None at the end."""
        while self.cursor_block < len(self.my_blocks):
            block = self.my_blocks[self.cursor_block]
            if self.cursor_packet < self.media.packet_count(block):
                return block, self.cursor_packet, self.media.packet_time(block, self.cursor_packet)
            self.cursor_block += 1
            self.cursor_packet = 0
        return None

    def next_media_time(self) -> float | None:
        """Media time of the next packet, if any."""
        nxt = self.peek()
        return None if nxt is None else nxt[2]


class NodeScheduler:
    """All sessions of one node; ``tick(now)`` returns the packets due by ``now``."""

    def __init__(self, retransmit_window: int = 4096, prefetch: float = 2.0) -> None:
        self.sessions: dict[str, Session] = {}
        self.retransmit_window = retransmit_window
        self.prefetch = prefetch
        #: Times a due packet waited because its block was not read yet (all sessions).
        self.late_waits = 0

    def add(
        self,
        session_id: str,
        media: MediaTiming,
        my_blocks: Sequence[int],
        start_ct: float,
        start_mt: float = 0.0,
    ) -> Session:
        """Serve ``my_blocks`` of ``media`` from media time ``start_mt`` at cluster time ``start_ct``."""
        blocks = tuple(sorted(my_blocks))
        s = Session(session_id, media, blocks, anchor_ct=start_ct, anchor_mt=start_mt)
        old = self.sessions.get(session_id)
        if old is not None:
            # A seek restarts the session: this node's counter goes on (its packets
            # stay numbered once each) and NACKs may still name what it sent before.
            s.node_seq, s.sent, s.resent = old.node_seq, old.sent, old.resent
        # Skip what lies before the start position (PLAY with a Range): bisection
        # in the time index, never a walk over the packets.
        block, j = media.first_at(start_mt)
        s.cursor_block = bisect_left(blocks, block)
        if s.cursor_block < len(blocks) and blocks[s.cursor_block] == block:
            s.cursor_packet = j
        self.sessions[session_id] = s
        return s

    def remove(self, session_id: str) -> None:
        """Stop serving a session."""
        self.sessions.pop(session_id, None)

    def pause(self, session_id: str, at_ct: float | None = None) -> None:
        """Stop at cluster time ``at_ct`` (now if None): pause-resume flow control, RTSP PAUSE.

        Every node is told the same instant, so all stop at the same media
        position and a later :meth:`resume` restarts them together.
        """
        s = self.sessions.get(session_id)
        if s is None or s.paused:
            return
        if at_ct is None:
            mt = s.next_media_time()
            s.pause_mt = mt if mt is not None else s.media.duration
        else:
            s.pause_mt = s.anchor_mt + (at_ct - s.anchor_ct) * s.speed
        s.paused = True

    def resume(self, session_id: str, at_ct: float) -> None:
        """Continue from the media position of the pause, due at cluster time ``at_ct``."""
        s = self.sessions.get(session_id)
        if s is None or not s.paused:
            return
        s.paused = False
        s.anchor_ct, s.anchor_mt = at_ct, s.pause_mt

    def set_speed(self, session_id: str, speed: float, at_ct: float) -> None:
        """Change the delivery rate (delta p) from cluster time ``at_ct`` on."""
        s = self.sessions.get(session_id)
        if s is None or speed <= 0:
            return
        mt_at = s.anchor_mt + (at_ct - s.anchor_ct) * s.speed
        s.anchor_ct, s.anchor_mt, s.speed = at_ct, mt_at, speed

    def next_deadline(self) -> float | None:
        """The earliest deadline over all sessions."""
        times = []
        for s in self.sessions.values():
            mt = s.next_media_time()
            if mt is not None and not (s.paused and mt >= s.pause_mt):
                times.append(s.deadline(mt))
        return min(times, default=None)

    def finished(self, session_id: str) -> bool:
        """True once every packet of the session went out."""
        s = self.sessions.get(session_id)
        return s is None or s.peek() is None

    def tick(self, now: float, ready: set[tuple[str, int]] | None = None) -> list[Packet]:
        """Packets due by ``now``, in deadline order.

        ``ready`` holds the ``(media, block)`` pairs whose data is in memory; a
        due packet of a block still being read waits (and counts as late).
        """
        heap: list[tuple[float, str]] = []
        for sid, s in self.sessions.items():
            if (mt := s.next_media_time()) is not None and not (s.paused and mt >= s.pause_mt):
                heapq.heappush(heap, (s.deadline(mt), sid))
        out: list[Packet] = []
        while heap:
            deadline, sid = heapq.heappop(heap)
            if deadline > now:
                break
            s = self.sessions[sid]
            nxt = s.peek()
            if nxt is None:
                continue
            block, j, mt = nxt
            if ready is not None and (s.media.name, block) not in ready:
                s.late += 1
                self.late_waits += 1
                continue
            size = s.media.payload
            offset = j * size
            length = min(
                size, min(s.media.block_size, s.media.size - block * s.media.block_size) - offset
            )
            pkt = Packet(
                sid,
                block * s.media.packets_per_block + j,
                s.node_seq,
                block,
                offset,
                length,
                mt,
                deadline,
            )
            s.node_seq += 1
            s.cursor_packet += 1
            s.sent[pkt.node_seq] = pkt
            while len(s.sent) > self.retransmit_window:
                old, _ = s.sent.popitem(last=False)
                s.resent.discard(old)
            out.append(pkt)
            mt2 = s.next_media_time()
            if mt2 is not None and not (s.paused and mt2 >= s.pause_mt):
                heapq.heappush(heap, (s.deadline(mt2), sid))
        return out

    def wanted_blocks(self, now: float) -> list[tuple[str, int]]:
        """Blocks whose packets fall due within the prefetch window (read them ahead)."""
        out: list[tuple[str, int]] = []
        for s in self.sessions.values():
            if s.paused:
                continue
            for k in range(s.cursor_block, len(s.my_blocks)):
                block = s.my_blocks[k]
                if s.deadline(s.media.packet_time(block, 0)) > now + self.prefetch:
                    break
                out.append((s.media.name, block))
        return out

    def retransmit(
        self,
        session_id: str,
        node_seqs: Sequence[int],
        now: float | None = None,
        max_age: float | None = None,
    ) -> list[Packet]:
        """Packets to resend for a NACK: each at most once, only if still buffered.

        With ``now`` and ``max_age``, a packet sent more than ``max_age`` seconds
        ago is no longer buffered (the retransmission buffer holds a few seconds).
        """
        s = self.sessions.get(session_id)
        if s is None:
            return []
        out = []
        for n in node_seqs:
            pkt = s.sent.get(n)
            if pkt is None or n in s.resent:
                continue
            if now is not None and max_age is not None and now - pkt.deadline > max_age:
                continue
            s.resent.add(n)
            out.append(attrs.evolve(pkt, retransmission=True))
        return out
