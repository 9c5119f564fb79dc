"""The Twisted shell of a node's delivery: one timer, read-ahead, payload slicing.

:class:`DeliveryEngine` drives a :class:`~yimaporc.yima.schedule.NodeScheduler`
on the cluster clock.  It reads the blocks the schedule will need within the
prefetch window through an injected ``read_block`` (which runs off the reactor
thread), keeps them in a bounded cache, and at each deadline hands every due
packet with its payload bytes to an injected ``emit`` callable (which builds the
RTP header and writes the datagram).  One engine, one timer, all sessions.

With ``emit_run`` the hot path has no object per packet: each tick hands over,
per session and block, one run of due packets (:data:`~.schedule.Run`) with the
cached block, and the caller packs and sends the run as one batch.
``send_ahead`` lets a tick take what falls due within that many seconds too,
so a session gets several packets per system call instead of one wake-up each.

The block cache holds the sessions' working set: the distinct blocks their
read-ahead windows want (times ``cache_slack``, at least ``cache_blocks``),
bounded by ``cache_bytes``; least recently used blocks go first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .deliverystats import LATE_AFTER, DeliveryStats
from .schedule import NodeScheduler, Packet, Run

BlockKey = tuple[str, int]


class DeliveryEngine:
    """Runs the node's scheduler: reads ahead, sends at deadlines."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        cluster_time: Callable[[], float],
        scheduler: NodeScheduler,
        read_block: Callable[[str, int], Deferred[bytes]],
        emit: Callable[[Packet, bytes], None],
        *,
        emit_run: Callable[[Run, bytes], None] | None = None,
        flush: Callable[[], object] | None = None,
        send_ahead: float = 0.0,
        max_reads: int = 4,
        cache_blocks: int = 64,
        cache_bytes: int = 256 << 20,
        cache_slack: float = 2.0,
        min_interval: float = 0.001,
        prefetch_interval: float = 0.02,
    ) -> None:
        self.clock = clock
        self.cluster_time = cluster_time
        self.scheduler = scheduler
        self.read_block = read_block
        self.emit = emit
        #: Batched hot path: one call per run of due packets (see module doc).
        self.emit_run = emit_run
        #: Called at the start of every tick (a sender sends what EAGAIN kept back).
        self.flush = flush
        self.send_ahead = send_ahead
        self.max_reads = max_reads
        #: The cache holds at least this many blocks, and the working set times
        #: ``cache_slack``, but never more than ``cache_bytes`` of data.
        self.cache_blocks = cache_blocks
        self.cache_bytes = cache_bytes
        self.cache_slack = cache_slack
        #: The block limit of the last read-ahead scan, and the bytes now held.
        self.cache_limit = cache_blocks
        self.cached_bytes = 0
        self.cache: OrderedDict[BlockKey, bytes] = OrderedDict()
        self._reading: set[BlockKey] = set()
        self._timer: IDelayedCall | None = None
        #: The pending wake-up is the retry for a due block still being read.
        self._blocked = False
        #: Wake-ups are at least this far apart (epoll has 1 ms resolution anyway):
        #: at high packet rates one tick sends every packet due, instead of one
        #: wake-up (and one pass over all sessions) per packet.
        self.min_interval = min_interval
        #: The read-ahead window is scanned at most this often (and when a read ends).
        self.prefetch_interval = prefetch_interval
        self._next_prefetch = float("-inf")
        self.ticks = 0
        self.sent = 0
        self.sent_bytes = 0
        self.read_errors = 0
        self.block_reads = 0
        self.block_read_bytes = 0
        #: Late packets, per-session rates and block-cache hits (for operators).
        self.stats = DeliveryStats()
        #: Called at the end of every tick (a delivery worker publishes its counters).
        self.after_tick: Callable[[], object] | None = None
        #: True: nothing is sent (a delivery worker whose node's main process is
        #: stopped or silent); :meth:`poke` after clearing it goes on.
        self.held = False

    def poke(self) -> None:
        """Re-plan now (a session was added, paused, resumed or changed)."""
        self._run()

    def stop(self) -> None:
        """Cancel the timer."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _run(self) -> None:
        # Called early (poke, a block read, a retry): the pending wake-up goes, or every
        # early call would leave one more timer chain ticking for the rest of the stream.
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.held:
            return
        now = self.cluster_time()
        self.ticks += 1
        if self.flush is not None:
            self.flush()
        if now >= self._next_prefetch:
            self._prefetch(now)
        if self.emit_run is not None:
            self._send_runs(now)
        else:
            self._send_packets(now)
        self._reschedule(now)
        if self.after_tick is not None:
            self.after_tick()

    def _send_packets(self, now: float) -> None:
        sessions, cache = self.scheduler.sessions, self.cache
        for pkt in self.scheduler.tick(now + self.send_ahead, ready=cache):
            key = (sessions[pkt.session].media.name, pkt.block)
            data = cache[key]
            cache.move_to_end(key)
            try:
                payload = data[pkt.offset : pkt.offset + pkt.length]
                self.emit(pkt, payload)
                self.sent += 1
                self.sent_bytes += len(payload)
                self.stats.sent(pkt.session, len(payload), now - pkt.deadline)
            except Exception:
                self.log.failure("delivery: sending packet {g} failed", g=pkt.gseq)

    def _send_runs(self, now: float) -> None:
        sessions, cache, emit_run = self.scheduler.sessions, self.cache, self.emit_run
        assert emit_run is not None
        for run in self.scheduler.tick_runs(now + self.send_ahead, ready=cache):
            sid, block, j0, count, _ns, d0, dstep = run
            media = sessions[sid].media
            key = (media.name, block)
            data = cache[key]
            cache.move_to_end(key)
            try:
                emit_run(run, data)
            except Exception:
                self.log.failure("delivery: sending packets of block {b} failed", b=block)
                continue
            size = media.payload
            nbytes = min(media.block_length(block), (j0 + count) * size) - j0 * size
            self.sent += count
            self.sent_bytes += nbytes
            late_by = now - d0 - LATE_AFTER
            if late_by > 0:
                late = count if dstep <= 0 else min(count, math.ceil(late_by / dstep))
                self.stats.sent_run(sid, count, nbytes, late, now - d0)
            else:
                self.stats.sent_run(sid, count, nbytes, 0, 0.0)

    def _reschedule(self, now: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        # The batched path's tick found the next deadline in its pass over the sessions.
        batched = self.emit_run is not None
        deadline = self.scheduler.next_due if batched else self.scheduler.next_deadline()
        if deadline is None:
            self._timer = None
            return
        # Wake at the next deadline itself (not send_ahead before it): that tick then
        # takes every packet due within send_ahead, so wake-ups are at least that far
        # apart and each session's packets leave several at a time, never late.
        delay = max(self.min_interval, deadline - now)
        self._blocked = False
        if deadline <= now and not set(self.scheduler.wanted_blocks(now)) <= set(self.cache):
            # A due block is still being read: its arrival calls _run again.
            delay = 0.05
            self._blocked = True
        self._timer = self.clock.callLater(delay, self._run)

    def _prefetch(self, now: float) -> None:
        self._next_prefetch = now + self.prefetch_interval
        wanted = self.scheduler.wanted_blocks(now)
        for key in wanted:
            if key in self.cache or key in self._reading:
                continue
            if len(self._reading) >= self.max_reads:
                break
            self.stats.read_started(key)
            self._reading.add(key)
            self.block_reads += 1
            d = self.read_block(*key)
            d.addCallbacks(self._loaded, self._failed, callbackArgs=(key,), errbackArgs=(key,))
        self.stats.wanted(
            wanted, lambda k: k in self.cache or k in self._reading, self.scheduler.sessions
        )
        self.cache_limit = max(self.cache_blocks, math.ceil(len(set(wanted)) * self.cache_slack))
        self._evict()

    def _evict(self) -> None:
        """Drop least recently used blocks beyond the block limit or the byte budget."""
        cache = self.cache
        while len(cache) > self.cache_limit or (
            self.cached_bytes > self.cache_bytes and len(cache) > 1
        ):
            _, old = cache.popitem(last=False)
            self.cached_bytes -= len(old)

    def _loaded(self, data: bytes, key: BlockKey) -> None:
        self._reading.discard(key)
        self.block_read_bytes += len(data)
        old = self.cache.pop(key, None)
        if old is not None:
            self.cached_bytes -= len(old)
        self.cache[key] = data
        self.cached_bytes += len(data)  # the read-ahead scan (next) evicts
        self._next_prefetch = float("-inf")  # keep the read-ahead chain going
        if self._blocked or self._timer is None or self.held:
            # Packets wait for a block (this one, perhaps): send what is due now.
            self._run()
        else:
            # Read ahead of its packets: the timer's tick sends them, as planned (a
            # tick per arriving block would cut every session's run short).
            self._prefetch(self.cluster_time())

    def _failed(self, failure: Failure, key: BlockKey) -> Any:
        self._reading.discard(key)
        self.read_errors += 1
        self.log.error(
            "delivery: cannot read block {key}: {e}", key=key, e=failure.getErrorMessage()
        )
        # Retry on the next tick; the scheduler keeps the packets waiting.
        self.clock.callLater(0.2, self._run)
        return None
