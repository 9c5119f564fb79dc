"""The Twisted shell of a node's delivery: one timer, read-ahead, payload slicing.

:class:`DeliveryEngine` drives a :class:`~yimaporc.yima.schedule.NodeScheduler`
on the cluster clock.  It reads the blocks the schedule will need within the
prefetch window through an injected ``read_block`` (which runs off the reactor
thread), keeps them in a bounded cache, and at each deadline hands every due
packet with its payload bytes to an injected ``emit`` callable (which builds the
RTP header and writes the datagram).  One engine, one timer, all sessions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .deliverystats import DeliveryStats
from .schedule import NodeScheduler, Packet

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
        max_reads: int = 4,
        cache_blocks: int = 64,
        min_interval: float = 0.001,
        prefetch_interval: float = 0.02,
    ) -> None:
        self.clock = clock
        self.cluster_time = cluster_time
        self.scheduler = scheduler
        self.read_block = read_block
        self.emit = emit
        self.max_reads = max_reads
        self.cache_blocks = cache_blocks
        self.cache: OrderedDict[BlockKey, bytes] = OrderedDict()
        self._reading: set[BlockKey] = set()
        self._timer: IDelayedCall | None = None
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

    def poke(self) -> None:
        """Re-plan now (a session was added, paused, resumed or changed)."""
        self._run()

    def stop(self) -> None:
        """Cancel the timer."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _run(self) -> None:
        self._timer = None
        now = self.cluster_time()
        self.ticks += 1
        if now >= self._next_prefetch:
            self._prefetch(now)
        for pkt in self.scheduler.tick(now, ready=set(self.cache)):
            data = self.cache[(self.scheduler.sessions[pkt.session].media.name, pkt.block)]
            self.cache.move_to_end((self.scheduler.sessions[pkt.session].media.name, pkt.block))
            try:
                payload = data[pkt.offset : pkt.offset + pkt.length]
                self.emit(pkt, payload)
                self.sent += 1
                self.sent_bytes += len(payload)
                self.stats.sent(pkt.session, len(payload), now - pkt.deadline)
            except Exception:
                self.log.failure("delivery: sending packet {g} failed", g=pkt.gseq)
        self._reschedule(now)

    def _reschedule(self, now: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        deadline = self.scheduler.next_deadline()
        if deadline is None:
            self._timer = None
            return
        delay = max(self.min_interval, deadline - now)
        if deadline <= now and not set(self.scheduler.wanted_blocks(now)) <= set(self.cache):
            # A due block is still being read: its arrival calls _run again.
            delay = 0.05
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
        while len(self.cache) > self.cache_blocks:
            self.cache.popitem(last=False)

    def _loaded(self, data: bytes, key: BlockKey) -> None:
        self._reading.discard(key)
        self.block_read_bytes += len(data)
        self.cache[key] = data
        self._next_prefetch = float("-inf")  # keep the read-ahead chain going
        self._run()

    def _failed(self, failure: Failure, key: BlockKey) -> Any:
        self._reading.discard(key)
        self.read_errors += 1
        self.log.error(
            "delivery: cannot read block {key}: {e}", key=key, e=failure.getErrorMessage()
        )
        # Retry on the next tick; the scheduler keeps the packets waiting.
        self.clock.callLater(0.2, self._run)
        return None
