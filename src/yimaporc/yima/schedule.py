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

One :class:`NodeScheduler` serves all sessions of a node with one timer.  A tick
visits only the sessions whose next packet is due (a heap of their next deadlines):
a node of an N-node fan-out holds every session but sends for about 1/N of them at
any time, and a walk over all of them at every tick made each node's cost grow with
the cluster's sessions instead of its share.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Container, Sequence
from heapq import heappop, heappush

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

    def packet_step(self, block: int) -> float:
        """Media time between two packets of ``block``."""
        return self._steps[block]

    def block_length(self, block: int) -> int:
        """Bytes of ``block`` (the last one may be short)."""
        return min(self.block_size, self.size - block * self.block_size)


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


#: Packets of one session due in one tick, consecutive in one block: ``(session,
#: block, j, count, node_seq, deadline, step)``: packets ``j .. j+count-1`` of
#: ``block``, numbered ``node_seq ..`` by this node, the first due at cluster time
#: ``deadline`` and each next one ``step`` seconds later.  The engine's hot path
#: works on runs (no object per packet); :meth:`NodeScheduler.run_packets` expands
#: one into :class:`Packet` values where a caller needs them.
Run = tuple[str, int, int, int, int, float, float]

#: What the retransmission buffer keeps of a run: ``(node_seq, block, j, count,
#: deadline, step)``.
SentRun = tuple[int, int, int, int, float, float]


def _run_seq(r: SentRun) -> int:
    return r[0]


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
    #: The retransmission buffer: the runs sent, oldest first (see :data:`SentRun`).
    sent_runs: list[SentRun] = attrs.field(factory=list)
    resent: set[int] = attrs.field(factory=set)
    late: int = 0
    #: Seconds beyond a tick's horizon this session's packets are taken (a relayed
    #: session's run, ``--relay-batch-ms``): each wake-up at its next deadline sends
    #: what falls due within the tick's horizon plus this, so its packets leave in
    #: runs that much longer, none later than without it (the first of a run at its
    #: deadline, as before).  0: the tick's horizon alone (fan-out sessions).
    ahead: float = 0.0

    def sent_packet(self, node_seq: int, window: int) -> Packet | None:
        """The packet sent as ``node_seq``, if it is among the last ``window`` sent."""
        if not self.node_seq - window <= node_seq < self.node_seq:
            return None
        runs = self.sent_runs
        i = bisect_right(runs, node_seq, key=_run_seq) - 1
        if i < 0:
            return None
        ns0, block, j0, count, d0, dstep = runs[i]
        k = node_seq - ns0
        if k >= count:
            return None
        media, j = self.media, j0 + k
        size = media.payload
        offset = j * size
        return Packet(
            self.session_id,
            block * media.packets_per_block + j,
            node_seq,
            block,
            offset,
            min(size, media.block_length(block) - offset),
            media.packet_time(block, j),
            d0 + k * dstep,
        )

    def node_seqs_of(self, gseqs: Sequence[int], window: int) -> list[int]:
        """This node's numbers of the global packets ``gseqs`` it sent (the last
        ``window``); the ones it did not send are left out."""
        ppb = self.media.packets_per_block
        floor = self.node_seq - window
        by_block: dict[int, list[SentRun]] = {}
        for r in self.sent_runs:
            if r[0] + r[3] > floor:
                by_block.setdefault(r[1], []).append(r)
        out = []
        for g in gseqs:
            block, j = divmod(g, ppb)
            for ns0, _b, j0, count, _d, _s in by_block.get(block, ()):
                if j0 <= j < j0 + count and ns0 + j - j0 >= floor:
                    out.append(ns0 + j - j0)
        return out

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
        #: The earliest deadline left after the last :meth:`tick_runs` (found in the
        #: same pass: :meth:`next_deadline` without a second walk over the sessions).
        self.next_due: float | None = None
        #: The sessions by next deadline: ``(deadline, entry, session)``; an entry is
        #: current while ``_entry[session]`` names it (older ones are skipped).  A
        #: session out of the heap (ended, or at its pause point) is back on change.
        self._heap: list[tuple[float, int, str]] = []
        self._entry: dict[str, int] = {}
        self._entries = 0
        #: Sessions wanting no block until the window reaches this deadline (see
        #: :meth:`wanted_blocks`).
        self._quiet: dict[str, float] = {}

    def _wake(self, session_id: str, at: float = float("-inf")) -> None:
        """Visit ``session_id`` at the first tick at or after ``at`` (-inf: the next)."""
        self._entries += 1
        self._entry[session_id] = self._entries
        self._quiet.pop(session_id, None)
        heappush(self._heap, (at, self._entries, session_id))
        if len(self._heap) > 4 * len(self._entry) + 64:  # drop the superseded entries
            self._heap = [e for e in self._heap if self._entry.get(e[2]) == e[1]]
            self._heap.sort()

    def add(
        self,
        session_id: str,
        media: MediaTiming,
        my_blocks: Sequence[int],
        start_ct: float,
        start_mt: float = 0.0,
        ahead: float = 0.0,
    ) -> Session:
        """Serve ``my_blocks`` of ``media`` from media time ``start_mt`` at cluster time ``start_ct``.

        ``ahead``: see :attr:`Session.ahead` (0: every packet within the tick's horizon).
        """
        blocks = tuple(sorted(my_blocks))
        s = Session(
            session_id, media, blocks, anchor_ct=start_ct, anchor_mt=start_mt, ahead=max(0.0, ahead)
        )
        old = self.sessions.get(session_id)
        if old is not None:
            # A seek restarts the session: this node's counter goes on (its packets
            # stay numbered once each) and NACKs may still name what it sent before.
            s.node_seq, s.sent_runs, s.resent = old.node_seq, old.sent_runs, old.resent
        # Skip what lies before the start position (PLAY with a Range): bisection
        # in the time index, never a walk over the packets.
        block, j = media.first_at(start_mt)
        s.cursor_block = bisect_left(blocks, block)
        if s.cursor_block < len(blocks) and blocks[s.cursor_block] == block:
            s.cursor_packet = j
        self.sessions[session_id] = s
        self._wake(session_id)
        return s

    def remove(self, session_id: str) -> None:
        """Stop serving a session."""
        self.sessions.pop(session_id, None)
        self._entry.pop(session_id, None)
        self._quiet.pop(session_id, None)

    def pause(
        self, session_id: str, at_ct: float | None = None, at_mt: float | None = None
    ) -> None:
        """Stop at cluster time ``at_ct`` (now if None): pause-resume flow control, RTSP PAUSE.

        Every node is told the same instant, so all stop at the same media
        position and a later :meth:`resume` restarts them together.  ``at_mt``:
        the media position to stop at, the common schedule's at ``at_ct`` (the
        player's): what is due before it still goes out, and :meth:`resume`
        restarts from it, so a node whose own schedule drifted (trimmed, slow)
        resumes in step with the others instead of carrying its lag on.
        """
        s = self.sessions.get(session_id)
        if s is None or s.paused:
            return
        if at_mt is not None and at_mt >= 0:
            s.pause_mt = at_mt
        elif at_ct is None:
            mt = s.next_media_time()
            s.pause_mt = mt if mt is not None else s.media.duration
        else:
            s.pause_mt = s.anchor_mt + (at_ct - s.anchor_ct) * s.speed
        s.paused = True
        self._wake(session_id)

    def resume(self, session_id: str, at_ct: float) -> None:
        """Continue from the media position of the pause, due at cluster time ``at_ct``."""
        s = self.sessions.get(session_id)
        if s is None or not s.paused:
            return
        s.paused = False
        self._wake(session_id)
        s.anchor_ct, s.anchor_mt = at_ct, s.pause_mt

    def set_speed(self, session_id: str, speed: float, at_ct: float) -> None:
        """Change the delivery rate (delta p) from cluster time ``at_ct`` on."""
        s = self.sessions.get(session_id)
        if s is None or speed <= 0:
            return
        mt_at = s.anchor_mt + (at_ct - s.anchor_ct) * s.speed
        s.anchor_ct, s.anchor_mt, s.speed = at_ct, mt_at, speed
        self._wake(session_id)

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

    def tick(self, now: float, ready: Container[tuple[str, int]] | None = None) -> list[Packet]:
        """Packets due by ``now``, in deadline order (:meth:`tick_runs`, expanded).

        ``ready`` holds the ``(media, block)`` pairs whose data is in memory; a
        due packet of a block still being read waits (and counts as late).
        """
        out = [p for run in self.tick_runs(now, ready) for p in self.run_packets(run)]
        out.sort(key=lambda p: (p.deadline, p.session))
        return out

    def run_packets(self, run: Run) -> list[Packet]:
        """The packets of one run (see :data:`Run`)."""
        sid, block, j0, count, ns0, _d0, _step = run
        s = self.sessions[sid]
        media = s.media
        size, gseq0 = media.payload, block * media.packets_per_block
        blen = media.block_length(block)
        out = []
        for j in range(j0, j0 + count):
            mt = media.packet_time(block, j)
            length = min(size, blen - j * size)
            out.append(Packet(sid, gseq0 + j, ns0 + j - j0, block, j * size, length, mt,
                              s.deadline(mt)))  # fmt: skip
        return out

    def tick_runs(self, now: float, ready: Container[tuple[str, int]] | None = None) -> list[Run]:
        """The packets due by ``now`` as runs (one per session and block), taken as sent.

        Only the sessions whose next deadline is due are visited (earliest first).
        Per session, in order; a session stops at its first packet not due (due by
        ``now`` plus its :attr:`~Session.ahead`: a session with one is still woken at its
        next deadline, and then takes that much more), at its pause point, or at a
        packet whose block is not in ``ready`` (that counts as late, once per session
        and tick, if the packet is due by ``now`` itself).  The work is per run: how many
        packets of a block are due is computed from the block's packet spacing.
        """
        out: list[Run] = []
        heap, entry, sessions = self._heap, self._entry, self.sessions
        again: list[tuple[str, float]] = []
        while heap and heap[0][0] <= now:
            _, n, sid = heappop(heap)
            if entry.get(sid) != n:
                continue  # superseded by a later change
            s = sessions[sid]
            d = self._due_runs(sid, s, now, ready, out, now + s.ahead if s.ahead else None)
            if d is None:
                del entry[sid]  # ended, or at its pause point: back on a change
            else:
                again.append((sid, d))  # d <= now: a block still being read
        for sid, d in again:
            self._wake(sid, d)
        while heap and entry.get(heap[0][2]) != heap[0][1]:
            heappop(heap)
        self.next_due = heap[0][0] if heap else None
        return out

    def _due_runs(
        self,
        sid: str,
        s: Session,
        now: float,
        ready: Container[tuple[str, int]] | None,
        out: list[Run],
        upto: float | None = None,
    ) -> float | None:
        """Append ``s``'s runs due by ``upto`` (default ``now``) to ``out``; its next
        deadline after them (None: at its end or its pause point).  A packet due by
        ``now`` whose block is not ready is late; one due later (taken ahead) just waits
        for its block."""
        if upto is None:
            upto = now
        media, blocks = s.media, s.my_blocks
        starts, steps, counts = media.block_starts, media._steps, media._counts
        deadline = s.deadline
        while s.cursor_block < len(blocks):
            block = blocks[s.cursor_block]
            n, j = counts[block], s.cursor_packet
            if j >= n:
                s.cursor_block += 1
                s.cursor_packet = 0
                continue
            start, step = starts[block], steps[block]
            if s.paused and start + step * j >= s.pause_mt:
                return None
            d0 = deadline(start + step * j)
            if d0 > upto:
                return d0
            if ready is not None and (media.name, block) not in ready:
                if d0 <= now:
                    s.late += 1
                    self.late_waits += 1
                return d0
            end = n
            if step > 0:
                horizon = s.anchor_mt + (upto - s.anchor_ct) * s.speed
                if s.paused:
                    horizon = min(horizon, s.pause_mt)
                end = min(n, max(j + 1, int((horizon - start) / step) + 1))
                # Settle on the exact comparisons a packet-by-packet walk makes.
                while end > j + 1 and (
                    deadline(start + step * (end - 1)) > upto
                    or (s.paused and start + step * (end - 1) >= s.pause_mt)
                ):
                    end -= 1
                while (
                    end < n
                    and deadline(start + step * end) <= upto
                    and not (s.paused and start + step * end >= s.pause_mt)
                ):
                    end += 1
            count = end - j
            out.append((sid, block, j, count, s.node_seq, d0, step / s.speed))
            s.sent_runs.append((s.node_seq, block, j, count, d0, step / s.speed))
            s.node_seq += count
            s.cursor_packet = end
            self._trim(s)
        return None

    def _trim(self, s: Session) -> None:
        """Forget runs older than the retransmission window (in slices, not per run)."""
        floor = s.node_seq - self.retransmit_window
        runs = s.sent_runs
        if len(runs) > 64 and runs[32][0] + runs[32][3] <= floor:
            k = bisect_right(runs, floor, key=_run_seq)
            while k > 0 and runs[k - 1][0] + runs[k - 1][3] > floor:
                k -= 1
            del runs[:k]
            if len(s.resent) > 2 * self.retransmit_window:
                s.resent = {n for n in s.resent if n >= floor}

    def wanted_blocks(self, now: float) -> list[tuple[str, int]]:
        """Blocks whose packets fall due within the prefetch window (read them ahead).

        A session wanting none (its next block starts beyond the window, or it has
        ended) is not looked at again until that block nears, or until it changes.
        """
        out: list[tuple[str, int]] = []
        quiet, prefetch = self._quiet, self.prefetch
        horizon = now + prefetch
        for sid, s in self.sessions.items():
            if s.paused:
                continue
            q = quiet.get(sid)
            if q is not None and q > horizon:
                continue
            blocks, name, times = s.my_blocks, s.media.name, s.media.block_starts
            k = s.cursor_block
            while k < len(blocks):
                d = s.deadline(times[blocks[k]])
                if d > horizon:
                    if k == s.cursor_block:
                        # Kept as the deadline and compared with the same horizon as
                        # below: ``d - prefetch > now`` rounds differently and could
                        # skip a block that falls due (hypothesis found one).
                        quiet[sid] = d
                    break
                out.append((name, blocks[k]))
                k += 1
            else:
                if k == s.cursor_block:
                    quiet[sid] = float("inf")  # nothing left to read
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
            if n in s.resent:
                continue
            pkt = s.sent_packet(n, self.retransmit_window)
            if pkt is None:
                continue
            if now is not None and max_age is not None and now - pkt.deadline > max_age:
                continue
            s.resent.add(n)
            out.append(attrs.evolve(pkt, retransmission=True))
        return out
