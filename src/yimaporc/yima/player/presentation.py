"""Several streams of one presentation on one playout clock (seed §3.3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .core import StreamPlayer
from .events import (
    Action,
    PacketArrived,
    ProbeAnswered,
)
from .sync import SkewMeter, SyncConfig, SyncController


class Presentation:
    """Several streams started at one cluster instant and played against one clock."""

    def __init__(
        self,
        players: Sequence[StreamPlayer],
        sync: SyncConfig | None = None,
        sync_interval: float = 0.5,
        coarse_sync: bool = True,
    ) -> None:
        starts = {p.playout_start for p in players}
        if len(starts) != 1:
            raise ValueError("streams of a presentation share one playout clock")
        self.players = {p.stream: p for p in players}
        self.sync = SyncController(sync)
        self.skew = SkewMeter()
        self.sync_interval = sync_interval
        self.coarse_sync = coarse_sync
        self.max_level_spread = 0.0
        self.playout_start = starts.pop()
        self._next_sync = self.playout_start
        self._now = 0.0

    def start(self, now: float) -> list[Action]:
        """Start every stream."""
        return [a for p in self.players.values() for a in p.start(now)]

    def receive(self, event: PacketArrived | ProbeAnswered, now: float) -> list[Action]:
        """Route one event to its stream."""
        player = self.players.get(event.stream)
        if player is None:
            return []
        out = player.receive(event, now)
        self._now = now
        self._measure()
        return out

    def handle_timer(self, now: float) -> list[Action]:
        """Timers of every stream, then coarse synchronisation."""
        out: list[Action] = []
        for p in self.players.values():
            out.extend(p.handle_timer(now))
        self._now = now
        self._measure()
        if len(self.players) > 1 and now >= self._next_sync:
            self._next_sync = now + self.sync_interval
            levels = {sid: p.buffer.level_seconds(now) for sid, p in self.players.items()}
            if now >= self.playout_start + self.sync_interval and not self.done:
                spread = max(levels.values()) - min(levels.values())
                self.max_level_spread = max(self.max_level_spread, spread)
            if self.coarse_sync:
                for sid, trim in self.sync.update(levels).items():
                    out.extend(self.players[sid].set_sync_trim(trim, now))
        return out

    def get_timer(self, now: float) -> float | None:
        """The earliest timer over all streams."""
        times = [t for p in self.players.values() if (t := p.get_timer(now)) is not None]
        if len(self.players) > 1 and times:
            times.append(self._next_sync)
        return min(times, default=None)

    @property
    def done(self) -> bool:
        """True once every stream has been played to its end."""
        return all(p.buffer.done for p in self.players.values())

    def finish(self) -> None:
        """End the session."""
        for p in self.players.values():
            p.finish()

    def _measure(self) -> None:
        self.skew.sample({sid: p.buffer.presented_mt(self._now) for sid, p in self.players.items()})

    def stats(self) -> dict[str, Any]:
        """CONTRACT §3 stats over all streams, with per-stream detail under ``streams``."""
        per = {sid: p.stats() for sid, p in self.players.items()}
        out: dict[str, Any] = {}
        for key in (
            "packets_expected",
            "packets_received",
            "packets_dropped_simulated",
            "nacks_sent",
            "nack_messages",
            "nacks_given_up_late",
            "retransmissions_received",
            "packets_missing_at_playout",
            "late_packets",
            "duplicates",
            "underflows",
            "speed_changes",
            "pauses",
            "band_changes",
        ):
            out[key] = sum(s[key] for s in per.values())
        out["max_sync_skew_ms"] = round(self.skew.max_skew * 1000, 3)
        out["mean_sync_skew_ms"] = round(self.skew.mean_skew * 1000, 3)
        out["max_level_spread_s"] = round(self.max_level_spread, 4)
        out["nodes_seen"] = sorted({n for s in per.values() for n in s["nodes_seen"]})
        out["buffer_levels"] = _sum_levels([s["buffer_levels"] for s in per.values()])
        out["streams"] = {
            sid: {k: v for k, v in s.items() if k != "buffer_levels"} for sid, s in per.items()
        }
        return out


def _sum_levels(series: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """Add per-stream [t, bytes] samples taken at (about) the same instants."""
    if len(series) == 1:
        return [list(x) for x in series[0]]
    n = min((len(s) for s in series), default=0)
    return [[series[0][i][0], sum(s[i][1] for s in series)] for i in range(n)]
