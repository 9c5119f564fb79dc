"""Flow-control decisions of the player (seed §3.1), sans-IO.

Two modes steer the buffer level:

* :class:`PauseResume` -- the nodes send faster than real time; at the high
  threshold the player pauses every node, at the low one it resumes them all
  at one cluster instant.
* :class:`DeltaP` -- client-controlled inter-packet delay.  The level axis is
  cut by several thresholds into bands, each mapped to a delivery speed
  (1.0 = real time, i.e. delta p as scheduled).  Leaving a band needs the level
  to cross the boundary by ``hysteresis`` and, except towards the outermost
  bands, ``dwell`` seconds since the last change, so VBR bursts do not make the
  speed oscillate.

:class:`NodeTrim` corrects single nodes whose packets run behind the others
(a slow or late node): it compares each node's slack (playout instant minus
arrival) with the median slack and nudges that node's speed alone.
"""

from __future__ import annotations

import bisect
import statistics

import attrs

from ..control import StreamAction


@attrs.frozen
class PauseResumeConfig:
    """Thresholds of pause-resume, and the over-rate the nodes stream at meanwhile."""

    high: float
    low: float
    speed: float = 1.25

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError("pause-resume needs 0 <= low < high")
        if self.speed <= 1.0:
            raise ValueError("pause-resume needs the nodes to stream faster than real time")


class PauseResume:
    """Max/min threshold switch: returns :attr:`StreamAction.PAUSE`, ``RESUME`` or None."""

    def __init__(self, config: PauseResumeConfig) -> None:
        self.config = config
        self.paused = False
        self.pauses = 0

    def update(self, level: float) -> StreamAction | None:
        """Decision for the current buffer level."""
        if not self.paused and level >= self.config.high:
            self.paused = True
            self.pauses += 1
            return StreamAction.PAUSE
        if self.paused and level <= self.config.low:
            self.paused = False
            return StreamAction.RESUME
        return None


@attrs.frozen
class BandsConfig:
    """Multi-threshold buffering: ``len(speeds) == len(thresholds) + 1``, speeds falling."""

    thresholds: tuple[float, ...]
    speeds: tuple[float, ...] = (1.5, 1.15, 1.0, 0.85, 0.6)
    hysteresis: float = 0.0
    dwell: float = 0.3

    def __attrs_post_init__(self) -> None:
        if len(self.speeds) != len(self.thresholds) + 1:
            raise ValueError("need one more speed than thresholds")
        if list(self.thresholds) != sorted(self.thresholds):
            raise ValueError("thresholds must ascend")
        if any(s <= 0 for s in self.speeds) or list(self.speeds) != sorted(self.speeds)[::-1]:
            raise ValueError("speeds must be positive and fall as the level rises")

    @classmethod
    def around(cls, target: float, spread: float = 0.35, hysteresis: float = 0.05) -> BandsConfig:
        """Five bands centred on ``target`` (thresholds at target x (1 -/+ spread, -/+ spread/3))."""
        f = (1 - spread, 1 - spread / 3, 1 + spread / 3, 1 + spread)
        return cls(tuple(target * x for x in f), hysteresis=target * hysteresis)


class DeltaP:
    """Band tracker with hysteresis and dwell; ``update`` returns a new speed or None."""

    def __init__(self, config: BandsConfig) -> None:
        self.config = config
        self.band = 0
        self.changed_at: float | None = None
        self.changes = 0

    @property
    def speed(self) -> float:
        """Speed of the current band."""
        return self.config.speeds[self.band]

    def update(self, level: float, now: float) -> float | None:
        """Move to another band if the level clearly left the current one."""
        t, h = self.config.thresholds, self.config.hysteresis
        if self.band < len(t) and level >= t[self.band] + h:
            new = bisect.bisect_right(t, level - h)
        elif self.band > 0 and level < t[self.band - 1] - h:
            new = bisect.bisect_right(t, level + h)
        else:
            return None
        if new == self.band:
            return None
        outer = new in (0, len(t))
        if not outer and self.changed_at is not None and now - self.changed_at < self.config.dwell:
            return None
        self.band = new
        self.changed_at = now
        self.changes += 1
        return self.speed


class ScheduleMirror:
    """The stream's common schedule, recomputed from the player's own commands.

    Nodes re-anchor ``deadline(t) = anchor_ct + (t - anchor_mt) / speed`` on
    every command; replaying the same commands here gives, for any media
    time, the instant the nodes were told to send it.  Arrival minus that
    instant is a node's lag, free of the common-mode swings of flow control.
    Speed 0 is a pause.
    """

    def __init__(self, start_ct: float, start_mt: float = 0.0, speed: float = 1.0) -> None:
        self._segs: list[tuple[float, float, float]] = [(start_ct, start_mt, speed)]
        self._mts: list[float] = [start_mt]

    @property
    def speed(self) -> float:
        """Speed in force after the last command."""
        return self._segs[-1][2]

    def set_speed(self, speed: float, at_ct: float) -> None:
        """Mirror a speed change (or a pause, speed 0) taking effect at ``at_ct``."""
        ct, mt, sp = self._segs[-1]
        at_ct = max(at_ct, ct)
        mt_at = mt + (at_ct - ct) * sp
        self._segs.append((at_ct, mt_at, speed))
        self._mts.append(mt_at)

    def position(self, at_ct: float) -> float:
        """The media position of the common schedule at cluster time ``at_ct``."""
        ct, mt, sp = self._segs[-1]
        return mt + max(0.0, at_ct - ct) * sp

    def deadline(self, media_time: float) -> float | None:
        """When the nodes were to send ``media_time`` (None while it is paused)."""
        i = max(0, bisect.bisect_right(self._mts, media_time) - 1)
        ct, mt, sp = self._segs[i]
        if sp <= 0:
            return None
        return ct + (media_time - mt) / sp


@attrs.frozen
class TrimConfig:
    """Per-node correction: PI gains on slack error (s), bounds, quantum, EWMA weight."""

    kp: float = 0.5
    ki: float = 0.1
    max_trim: float = 0.25
    quantum: float = 0.005
    alpha: float = 0.05
    min_nodes: int = 2


class NodeTrim:
    """Keeps every node's lag near the median by trimming that node's speed.

    ``observe`` takes a node's *slack*: the instant the common schedule (see
    :class:`ScheduleMirror`) meant the packet to leave minus its arrival.
    """

    def __init__(self, config: TrimConfig | None = None) -> None:
        self.config = config or TrimConfig()
        self.slack: dict[int, float] = {}
        self.factor: dict[int, float] = {}
        self._integral: dict[int, float] = {}
        self._last: float | None = None

    def observe(self, node: int, slack: float) -> None:
        """One first-transmission packet from ``node`` arrived with ``slack`` (see class)."""
        old = self.slack.get(node)
        a = self.config.alpha
        self.slack[node] = slack if old is None else old + a * (slack - old)
        self.factor.setdefault(node, 1.0)

    def update(self, now: float) -> dict[int, float]:
        """Nodes whose factor changed, with the new factor."""
        dt = 0.0 if self._last is None else now - self._last
        self._last = now
        c = self.config
        if len(self.slack) < c.min_nodes:
            return {}
        ref = statistics.median(self.slack.values())
        out: dict[int, float] = {}
        for node, slack in self.slack.items():
            err = ref - slack
            i = self._integral.get(node, 0.0) + c.ki * err * dt
            i = max(-c.max_trim, min(c.max_trim, i))
            self._integral[node] = i
            f = 1.0 + c.kp * err + i
            f = max(1.0 - c.max_trim, min(1.0 + c.max_trim, f))
            f = round(round(f / c.quantum) * c.quantum, 6)
            if f != self.factor.get(node):
                self.factor[node] = f
                out[node] = f
        return out


def quantize(x: float, quantum: float) -> float:
    """``x`` rounded to a multiple of ``quantum``."""
    return round(round(x / quantum) * quantum, 6)
