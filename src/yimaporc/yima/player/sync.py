"""Multi-stream synchronisation (seed §3.3), sans-IO.

Three levels, as in Yima: block level (every stream of a presentation starts
at one cluster instant, so the nodes' retrieval schedules line up), coarse
(flow control keeps the buffered media seconds equal across streams: this
controller trims each stream's delivery speed towards the mean level) and fine
(all streams play against one playout clock, each packet at ``playout_start +
media_time``).  :class:`SkewMeter` measures what is actually presented: at an
instant, the spread of the media times last played by the streams.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs


@attrs.frozen
class SyncConfig:
    """Gain (speed per second of level difference), bound and quantum of the trim."""

    gain: float = 0.1
    max_trim: float = 0.1
    quantum: float = 0.01
    deadband: float = 0.05


class SyncController:
    """Per-stream speed trims that pull every stream's level towards the mean."""

    def __init__(self, config: SyncConfig | None = None) -> None:
        self.config = config or SyncConfig()
        self.trim: dict[str, float] = {}

    def update(self, levels: Mapping[str, float]) -> dict[str, float]:
        """Streams whose trim changed, with the new trim factor."""
        if len(levels) < 2:
            return {}
        c = self.config
        mean = sum(levels.values()) / len(levels)
        out: dict[str, float] = {}
        for sid, level in levels.items():
            diff = mean - level
            old = self.trim.get(sid, 1.0)
            f = 1.0
            if abs(diff) >= c.deadband:
                f += max(-c.max_trim, min(c.max_trim, c.gain * diff))
            f = round(round(f / c.quantum) * c.quantum, 6)
            if f != old:
                self.trim[sid] = f
                out[sid] = f
        return out


class SkewMeter:
    """Largest difference between the media times the streams present at one instant."""

    def __init__(self) -> None:
        self.max_skew = 0.0
        self.samples = 0
        self.total = 0.0

    def sample(self, positions: Mapping[str, float | None]) -> float | None:
        """Record one instant; ``None`` positions (not started, or finished) are left out."""
        vals = [v for v in positions.values() if v is not None]
        if len(vals) < 2 or len(vals) < len(positions):
            return None
        skew = max(vals) - min(vals)
        self.max_skew = max(self.max_skew, skew)
        self.samples += 1
        self.total += skew
        return skew

    @property
    def mean_skew(self) -> float:
        """Average skew over the samples."""
        return self.total / self.samples if self.samples else 0.0
