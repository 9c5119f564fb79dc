"""The event loop of the bench's core-only network model (:mod:`.simnet`).

:class:`CoreNet` drives protocol cores directly, without a reactor: one seeded
``random.Random``, a queue of callables in (time, order of scheduling) order, the links
(:class:`~yimaporc.sim.links.Links`: partitions, cut links) and the seeded fate of one
datagram (loss, duplication, latency, reordering).  A seed replays exactly: the random
draws happen in a fixed order.  (It was ``yimaporc.simloop``; the package's one kernel,
:mod:`yimaporc.sim.kernel`, runs the shipped shells, and the replication crash-point
simulator is a scenario on it, :mod:`yimaporc.sim.replication`.)
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

from yimaporc.sim.links import Links


class CoreNet(Links):
    """A virtual clock, its event queue, the links between nodes and the random draws.

    ``now`` is true (simulated) time; :meth:`run_until` advances it, running each
    scheduled callable at its time, ties in the order they were scheduled.
    """

    def __init__(self, seed: int, *, start: float = 0.0) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.now = start
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    # --- time -------------------------------------------------------------------

    def _at(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, fn))

    def run_until(self, until: float, stop: Callable[[], bool] | None = None) -> bool:
        """Advance to ``until`` (true time); with ``stop``, return early once it holds
        (checked after each event; True when it held)."""
        queue = self._queue
        while queue and queue[0][0] <= until:
            when, _, fn = heapq.heappop(queue)
            self.now = when
            fn()
            if stop is not None and stop():
                return True
        self.now = max(self.now, until)
        return stop() if stop is not None else False

    # --- datagrams --------------------------------------------------------------

    def _delays(
        self,
        latency: tuple[float, float],
        loss: float,
        duplicate: float,
        reorder: tuple[float, float] | None = None,
    ) -> list[float]:
        """When each copy of one datagram arrives, from now: none when it is lost, two
        when it is duplicated; ``reorder`` (probability, largest extra delay) holds a
        copy back.  The draws: loss, duplication, then per copy the latency (and the
        reordering when a model has one)."""
        rng = self.rng
        if rng.random() < loss:
            return []
        copies = 2 if rng.random() < duplicate else 1
        delays = []
        for _ in range(copies):
            delay = rng.uniform(*latency)
            if reorder is not None and rng.random() < reorder[0]:
                delay += rng.uniform(0, reorder[1])
            delays.append(delay)
        return delays
