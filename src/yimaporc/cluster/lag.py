"""Reactor lag: how late the reactor runs timers, over the last minute.

:class:`LagWindow` is the sans-IO core: it is told, for each timer, when it was
due and when it ran, and keeps the lateness of the last ``window`` seconds.
:class:`ReactorLagMonitor` is the Twisted shell: a timer every ``interval``
seconds on an injected :class:`~twisted.internet.interfaces.IReactorTime`,
each firing reporting how late it ran.  ``GET /api/status`` shows the summary
as ``reactor_lag = {"max_ms": ..., "p99_ms": ...}`` (CONTRACT §5).
"""

from __future__ import annotations

import math
from collections import deque

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from .histogram import Histogram


@attrs.frozen
class LagSummary:
    """Max and 99th percentile of timer lateness (ms) over the window, and the sample count."""

    max_ms: float
    p99_ms: float
    samples: int

    def as_status(self) -> dict[str, float]:
        """The ``reactor_lag`` object of ``/api/status``."""
        return {"max_ms": self.max_ms, "p99_ms": self.p99_ms}


class LagWindow:
    """Timer lateness samples of the last ``window`` seconds (sans-IO)."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, float]] = deque()

    def observe(self, due: float, ran: float) -> float:
        """A timer due at ``due`` ran at ``ran``; record and return its lateness (s, >= 0)."""
        late = max(0.0, ran - due)
        self._samples.append((ran, late))
        self._prune(ran)
        return late

    def _prune(self, now: float) -> None:
        horizon = now - self.window
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()

    def summary(self, now: float) -> LagSummary:
        """Max and p99 (nearest rank) of the samples within ``window`` of ``now``."""
        self._prune(now)
        lates = sorted(late for _, late in self._samples)
        if not lates:
            return LagSummary(0.0, 0.0, 0)
        rank = max(1, math.ceil(0.99 * len(lates)))
        return LagSummary(round(lates[-1] * 1e3, 3), round(lates[rank - 1] * 1e3, 3), len(lates))


class ReactorLagMonitor(Service):
    """Schedules a timer every ``interval`` s on ``clock`` and records how late each ran."""

    def __init__(
        self,
        clock: IReactorTime,
        interval: float = 0.1,
        window: float = 60.0,
        histogram: Histogram | None = None,
    ) -> None:
        self.clock = clock
        self.interval = interval
        self.lag = LagWindow(window)
        #: Every sample's lateness (s), since start (``yimaporc_reactor_lag_seconds``).
        self.histogram = histogram
        self._call: IDelayedCall | None = None
        self._due = 0.0

    def startService(self) -> None:
        """Start sampling."""
        super().startService()
        self._schedule(self.clock.seconds())

    def stopService(self) -> None:
        """Stop sampling."""
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, now: float) -> None:
        self._due = now + self.interval
        self._call = self.clock.callLater(self.interval, self._fire)

    def _fire(self) -> None:
        now = self.clock.seconds()
        late = self.lag.observe(self._due, now)
        if self.histogram is not None:
            self.histogram.observe(late)
        self._schedule(now)

    def summary(self) -> LagSummary:
        """The last window's summary, as of now."""
        return self.lag.summary(self.clock.seconds())
