"""Building blocks of the metric families: value coercion, families created on first use,
and the label sets always exported."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    pass

#: Datagram drop reasons always exported (0 until one happens), so alerts can refer to them.
DROP_REASONS = ("bad_mac", "malformed", "replayed", "wrong_scope")
#: Failure-detector events always exported (docs/cluster.md, "Failure detection").
DETECTOR_EVENTS = ("suspected", "accused")
#: Mail protocols whose sessions and commands are always exported.
MAIL_PROTOCOLS = ("smtp", "submission", "pop3", "imap")

_NAME_PART = re.compile(r"[^a-zA-Z0-9_]")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def _label_value(value: str) -> str:
    return _NAME_PART.sub("_", value)[:64]


class _Families:
    """Metric families by name, each created on first use with a fixed label set."""

    def __init__(self) -> None:
        self._by_name: dict[str, Metric] = {}

    def _family(self, kind: str, name: str, doc: str, labels: Iterable[str]) -> Metric:
        fam = self._by_name.get(name)
        if fam is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            fam = cls(name, doc, labels=list(labels))
            self._by_name[name] = fam
        return fam

    def _add(self, kind: str, name: str, doc: str, value: Any, labels: Mapping[str, str]) -> None:
        number = _number(value)
        fam = self._family(kind, name, doc, labels)
        if number is not None:
            fam.add_metric([str(v) for v in labels.values()], number)  # type: ignore[attr-defined]

    def gauge(self, name: str, doc: str, value: Any, **labels: str) -> None:
        """Add one gauge sample (skipped when ``value`` is not a number)."""
        self._add("gauge", name, doc, value, labels)

    def counter(self, name: str, doc: str, value: Any, **labels: str) -> None:
        """Add one counter sample; ``name`` is given without ``_total``."""
        self._add("counter", name, doc, value, labels)

    def all(self) -> list[Metric]:
        """Every family that has at least one sample."""
        return [f for f in self._by_name.values() if f.samples]
