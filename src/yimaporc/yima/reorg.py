"""Reorganisation after a scaling operation: which blocks move, and how fast (pure).

Protocol (docs/storage.md, "Reorganisation"):

1. The new history is computed but not yet current; every node reads with the
   rule *new place first, then old place* (:func:`read_order`).
2. Each move copies the block to its new disk (durable write) and leaves the
   old copy in place; :class:`MoveThrottle` paces the copies.
3. When every move is done the new history becomes current cluster-wide.
4. Then the old copies are deleted (the plan's ``src_disk`` of each move).

At every moment a block is at its old place, its new place or both, so a
reader following the rule always finds it.  A move between two logical disks
of the same physical disk is no move at all and is left out of the plan.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence

import attrs

from .media import MediaInfo
from .parity import FilePlacement, Layout
from .placement import LogicalDisk, ScalingHistory
from .store import BlockKey, expected_length


@attrs.frozen
class Move:
    """Copy ``key`` from logical disk ``src`` (old numbering) to ``dst`` (new numbering)."""

    key: BlockKey
    src: int
    dst: int
    src_disk: LogicalDisk
    dst_disk: LogicalDisk
    size: int = 0


@attrs.frozen
class Plan:
    """The moves of one file for one scaling operation."""

    moves: tuple[Move, ...]
    total: int

    @property
    def moved(self) -> int:
        """Number of blocks that change physical disk."""
        return len(self.moves)

    def summary(self) -> str:
        """The line ``disks add/remove`` prints last (summed over files by the caller)."""
        return f"moved {self.moved} of {self.total} blocks"


def _keys(layout: Layout) -> Iterable[tuple[BlockKey, int]]:
    for i, d in enumerate(layout.data):
        yield BlockKey(i), d
    for g, d in enumerate(layout.parity):
        yield BlockKey(g, True), d


def plan_moves(
    placement: FilePlacement,
    old: ScalingHistory,
    new: ScalingHistory,
    size_of: Callable[[BlockKey], int] | None = None,
) -> Plan:
    """Every data and parity block whose physical disk differs between ``old`` and ``new``."""
    return diff_layouts(placement.layout(old), placement.layout(new), old, new, size_of)


def diff_layouts(
    before: Layout,
    after_layout: Layout,
    old: ScalingHistory,
    new: ScalingHistory,
    size_of: Callable[[BlockKey], int] | None = None,
) -> Plan:
    """:func:`plan_moves` from the two layouts (blocking: O(blocks), run it off the reactor)."""
    after = dict(_keys(after_layout))
    old_table, new_table = old.disks, new.disks
    moves = []
    total = 0
    for key, src in _keys(before):
        total += 1
        dst = after[key]
        if old_table[src].physical != new_table[dst].physical:
            size = 0 if size_of is None else size_of(key)
            moves.append(Move(key, src, dst, old_table[src], new_table[dst], size))
    return Plan(tuple(moves), total)


def plan_for(info: MediaInfo, old: ScalingHistory, new: ScalingHistory) -> Plan:
    """:func:`plan_moves` for a stored file, with block sizes."""
    placement = FilePlacement.of(info)
    return plan_moves(placement, old, new, lambda k: expected_length(info, k))


def plan_for_layouts(
    info: MediaInfo, before: Layout, after: Layout, old: ScalingHistory, new: ScalingHistory
) -> Plan:
    """:func:`plan_for` from layouts already computed (blocking: O(blocks))."""
    return diff_layouts(before, after, old, new, lambda k: expected_length(info, k))


def read_order(
    placement: FilePlacement, key: BlockKey, old: ScalingHistory, new: ScalingHistory | None
) -> list[LogicalDisk]:
    """Where to look for ``key`` while ``old`` -> ``new`` is under way: new place, then old."""
    out: list[LogicalDisk] = []
    for h in (new, old):
        if h is None:
            continue
        if key.parity:
            disk = h.disks[placement.parity_disk(key.index, h)]
        else:
            disk = h.disks[placement.data_disk(key.index, h)]
        if all(disk.physical != o.physical for o in out):
            out.append(disk)
    return out


# Float slack so a refill that lands a hair short of a block still starts it.
_SLACK = 1e-6


class MoveThrottle:
    """Sans-IO pacing of moves: a token bucket of ``rate`` bytes/s and a cap on moves in flight.

    Call :meth:`start` whenever something changed (a move finished, the timer
    from :meth:`next_wakeup` fired); start the moves it returns and report
    each with :meth:`finished` or :meth:`failed`.
    """

    def __init__(
        self,
        moves: Sequence[Move],
        rate: float,
        now: float,
        burst: int | None = None,
        max_in_flight: int = 4,
        max_attempts: int = 3,
    ) -> None:
        if rate <= 0 or max_in_flight < 1 or max_attempts < 1:
            raise ValueError("rate, max_in_flight and max_attempts must be positive")
        biggest = max((m.size for m in moves), default=0)
        self.rate = rate
        self.burst = max(burst if burst is not None else 0, biggest, 1)
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self._queue: deque[Move] = deque(moves)
        self._attempts: dict[Move, int] = {}
        self._tokens = float(self.burst)
        self._stamp = now
        self.in_flight: set[Move] = set()
        self.done: list[Move] = []
        self.failures: list[Move] = []

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def start(self, now: float) -> list[Move]:
        """Moves to start now."""
        self._refill(now)
        out = []
        while self._queue and len(self.in_flight) < self.max_in_flight:
            move = self._queue[0]
            if self._tokens + _SLACK < move.size:
                break
            self._queue.popleft()
            self._tokens -= move.size
            self.in_flight.add(move)
            self._attempts[move] = self._attempts.get(move, 0) + 1
            out.append(move)
        return out

    def finished(self, move: Move, now: float) -> None:
        """``move`` is durably at its new place."""
        self.in_flight.discard(move)
        self.done.append(move)

    def failed(self, move: Move, now: float) -> None:
        """``move`` failed; its bytes are refunded and it is retried up to ``max_attempts`` times."""
        self.in_flight.discard(move)
        self._refill(now)
        self._tokens = min(self.burst, self._tokens + move.size)
        if self._attempts.get(move, 0) < self.max_attempts:
            self._queue.append(move)
        else:
            self.failures.append(move)

    @property
    def complete(self) -> bool:
        """Nothing queued and nothing in flight."""
        return not self._queue and not self.in_flight

    def next_wakeup(self, now: float) -> float | None:
        """When :meth:`start` could next return something, or None to wait for a move to end."""
        if not self._queue or len(self.in_flight) >= self.max_in_flight:
            return None
        self._refill(now)
        need = self._queue[0].size - self._tokens
        return now if need <= _SLACK else now + need / self.rate
