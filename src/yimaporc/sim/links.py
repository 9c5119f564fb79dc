"""Who can talk to whom, by host name: partitions into groups and single cut links.

The topology half of the kernel's network (:class:`~yimaporc.sim.kernel.SimKernel`
extends :class:`Links`); the bench's core-only network (``bench/mailmodel``) uses it too.
"""

from __future__ import annotations

from collections.abc import Iterable


class Links:
    """Who can talk to whom: partitions into groups and single cut links, by name."""

    def __init__(self) -> None:
        self._groups: dict[str, int] | None = None
        self._cut: set[frozenset[str]] = set()

    def partition(self, *groups: Iterable[str]) -> None:
        """Only nodes within the same group can talk; unlisted nodes are isolated."""
        self._groups = {}
        for i, group in enumerate(groups):
            for node_id in group:
                self._groups[node_id] = i

    def heal(self) -> None:
        """Remove every partition and cut link."""
        self._groups = None
        self._cut.clear()

    def cut(self, a: str, b: str) -> None:
        """Only the link between ``a`` and ``b`` fails (non-transitive connectivity)."""
        self._cut.add(frozenset((a, b)))

    def connected(self, a: str, b: str) -> bool:
        """True when ``a`` and ``b`` can exchange messages."""
        if self._cut and frozenset((a, b)) in self._cut:
            return False
        if self._groups is None:
            return True
        ga, gb = self._groups.get(a), self._groups.get(b)
        return ga is not None and ga == gb
