"""Cumulative histograms a node's services keep for ``GET /metrics``.

A :class:`Histogram` counts observations into fixed buckets (sans-IO: it is told
values, it never reads a clock). :class:`Histograms` is a node's set of them, by metric
name and a small fixed label set; services ask it for theirs with :meth:`Histograms.get`
and call :meth:`Histogram.observe`; the metrics collector (``yimaporc.admin.metrics``)
exports every one of them at each scrape. Histograms are not in ``/api/status``: a
status document stays small and readable, the distribution is for Prometheus.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import attrs

__all__ = ["DELIVERY_BUCKETS", "LAG_BUCKETS", "Histogram", "Histograms"]

#: Reactor lag (seconds): a healthy reactor is below 5 ms, a stalled one seconds late.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Mail delivery (seconds): an fsync and a replica's acknowledgement, up to a slow disk.
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@attrs.define
class Histogram:
    """``counts[i]`` observations were at most ``buckets[i]`` (the last entry: larger),
    ``total`` is their sum."""

    buckets: tuple[float, ...]
    counts: list[int] = attrs.field()
    total: float = 0.0

    @counts.default
    def _zeros(self) -> list[int]:
        return [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        """Count one observation (negative values count as 0)."""
        value = max(0.0, float(value))
        self.total += value
        self.counts[bisect.bisect_left(self.buckets, value)] += 1

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as a Prometheus histogram wants them, ending with +Inf."""
        out, running = [], 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@attrs.frozen
class HistogramFamily:
    """One metric name: its help text, label names and a histogram per label values."""

    name: str
    doc: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...]
    series: dict[tuple[str, ...], Histogram] = attrs.field(factory=dict, eq=False)


class Histograms:
    """A node's histograms by metric name (see module doc)."""

    def __init__(self) -> None:
        self._families: dict[str, HistogramFamily] = {}

    def get(self, name: str, doc: str, buckets: tuple[float, ...], **labels: str) -> Histogram:
        """The histogram ``name`` with ``labels`` (created on first use; every call for
        one name must give the same label names)."""
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = HistogramFamily(name, doc, tuple(labels), buckets)
        if tuple(labels) != fam.labels:
            raise ValueError(f"{name}: labels {tuple(labels)} instead of {fam.labels}")
        key = tuple(labels.values())
        hist = fam.series.get(key)
        if hist is None:
            hist = fam.series[key] = Histogram(fam.buckets)
        return hist

    def __iter__(self) -> Iterator[HistogramFamily]:
        return iter(list(self._families.values()))
