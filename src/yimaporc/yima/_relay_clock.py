"""One reactor timer for the releases of every relayed session of a node.

Each relayed session releases its packets when the first of them falls due, and takes
with it everything due within ``slack`` (the relay's send-ahead, 10 ms).  With a timer
per session, a node relaying S sessions woke up S times per packet interval, one
``epoll_wait`` and one timer call each (about 18 us of CPU a wake-up on this machine,
most of a release's cost).  Here every session's next release is an entry in one heap
and the reactor holds a single call at the earliest; when it runs it releases every
session whose next release falls due within ``slack``.  A release never lets a packet
go more than ``slack`` before it is due (it takes what is due within ``slack`` of the
instant it runs), so a session served a little before its own instant sends nothing
earlier than it would have: the rule is unchanged, the wake-ups are shared.

A session's entry is a :class:`RelayWake`, held by the session as its ``relay_timer``:
``cancel()`` (a seek, a pause, a teardown) leaves the entry in the heap, skipped when it
comes up.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

__all__ = ["RelayClock", "RelayWake"]


class RelayWake:
    """A session's next release in a :class:`RelayClock` (the ``active``/``cancel`` of
    a DelayedCall, which it replaces)."""

    __slots__ = ("live", "session_id")

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.live = True

    def active(self) -> bool:
        return self.live

    def cancel(self) -> None:
        self.live = False


class RelayClock:
    """Releases of many sessions on one reactor timer (see the module doc).

    ``now()`` is the clock the deadlines are in (the cluster's); ``release(session_id)``
    is a session's release (it arms the session's next one through :meth:`arm`)."""

    def __init__(
        self,
        reactor: IReactorTime,
        now: Callable[[], float],
        release: Callable[[str], None],
        slack: float,
    ) -> None:
        self.reactor = reactor
        self.now = now
        self.release = release
        self.slack = slack
        self._heap: list[tuple[float, int, RelayWake]] = []
        self._order = itertools.count()
        self._call: Any = None
        self._call_at = 0.0
        #: Times the reactor ran this clock, and the releases it made then.
        self.wakeups = 0
        self.releases = 0

    def arm(self, session_id: str, at: float) -> RelayWake:
        """Release ``session_id`` at ``at`` (or up to ``slack`` before, with others)."""
        wake = RelayWake(session_id)
        heapq.heappush(self._heap, (at, next(self._order), wake))
        if self._call is None or at < self._call_at:
            self._schedule(at)
        return wake

    def stop(self) -> None:
        """Forget every entry and the reactor's call."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        for _, _, wake in self._heap:
            wake.live = False
        self._heap.clear()

    def _schedule(self, at: float) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call_at = at
        self._call = self.reactor.callLater(max(0.0, at - self.now()), self._run)

    def _run(self) -> None:
        self._call = None
        self.wakeups += 1
        heap, horizon = self._heap, self.now() + self.slack
        again: list[tuple[float, int, RelayWake]] = []
        served: set[str] = set()
        while heap and heap[0][0] <= horizon:
            entry = heapq.heappop(heap)
            wake = entry[2]
            if not wake.live:
                continue
            if wake.session_id in served:  # armed again within this run: the next one
                again.append(entry)
                continue
            wake.live = False
            served.add(wake.session_id)
            self.releases += 1
            self.release(wake.session_id)
        for entry in again:
            heapq.heappush(heap, entry)
        while heap and not heap[0][2].live:
            heapq.heappop(heap)
        if heap and self._call is None:
            self._schedule(heap[0][0])
        elif heap and heap[0][0] < self._call_at:
            self._schedule(heap[0][0])
