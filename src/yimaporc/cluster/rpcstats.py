"""Counts and latencies of the RPCs a node makes, by command (for ``GET /metrics``).

:class:`RpcCallStats` is told when each call started and how it ended; it keeps, per
AMP command name, the number of calls, the failures by kind (``unavailable``: the peer
could not be reached or did not answer in time; ``remote``: the peer answered with an
error) and a cumulative latency histogram over fixed :data:`BUCKETS`. Command names
are the cluster's own (a bounded set), so they make fine metric labels.
"""

from __future__ import annotations

import bisect
from typing import Any

import attrs
from twisted.python.failure import Failure

__all__ = ["BUCKETS", "CommandStats", "RpcCallStats"]

#: Upper bounds (seconds) of the latency histogram; the last bucket is +Inf.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@attrs.define
class CommandStats:
    """One command's calls: ``counts[i]`` calls took at most ``BUCKETS[i]`` s (the
    last entry: longer), ``total`` seconds in all, failures by kind."""

    calls: int = 0
    total: float = 0.0
    counts: list[int] = attrs.field(factory=lambda: [0] * (len(BUCKETS) + 1))
    errors: dict[str, int] = attrs.field(factory=lambda: {"unavailable": 0, "remote": 0})

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, calls)`` pairs as a Prometheus histogram wants them, ending with +Inf."""
        out, running = [], 0
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class RpcCallStats:
    """Per-command call statistics; :meth:`observe` is added to each call's Deferred."""

    def __init__(self) -> None:
        self.commands: dict[str, CommandStats] = {}

    def observe(self, result: Any, command: str, seconds: float, unavailable: type) -> Any:
        """Record one finished call of ``command`` that took ``seconds``; pass ``result``
        on. A :class:`Failure` of type ``unavailable`` counts as such, any other as
        ``remote``."""
        stats = self.commands.get(command)
        if stats is None:
            stats = self.commands[command] = CommandStats()
        stats.calls += 1
        stats.total += max(0.0, seconds)
        stats.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        if isinstance(result, Failure):
            stats.errors["unavailable" if result.check(unavailable) else "remote"] += 1
        return result
