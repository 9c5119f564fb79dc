"""What the core asks its shell to do (:data:`Action`), what a delivery's UID
request gets (:class:`Taken`, :class:`NeedMark`), and the majority write that
raises a bucket's UID mark (:class:`MajorityWrite`)."""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from ...cluster.buckets import BucketMap
from ._fences import (
    HEDGE_MAX,
)


@attrs.frozen
class SendHints:
    """Read our hard state of ``buckets`` and send each manager (of ``bmap``) its part,
    tagged with view ``view``."""

    bmap: BucketMap
    buckets: tuple[int, ...]
    view: int


@attrs.frozen
class PullHints:
    """Ask ``peer`` for its hints of ``buckets`` (we were away), in view ``view``."""

    peer: str
    buckets: tuple[int, ...]
    view: int


@attrs.frozen
class PushProfiles:
    """Anti-entropy: send every profile record to ``nodes`` (they came into view)."""

    nodes: tuple[str, ...]


@attrs.frozen
class Settled:
    """``bucket`` stopped settling: wake what waits for it."""

    bucket: int


@attrs.frozen
class Number:
    """Number up to ``count`` of ``user``'s unnumbered messages on ``node``: take UIDs
    (:meth:`Reconstruction.take`), then ``number_pending`` there and report with
    :meth:`Reconstruction.number_done` / :meth:`Reconstruction.number_failed`."""

    user: str
    node: str
    count: int


Action = SendHints | PullHints | PushProfiles | Settled | Number


@attrs.frozen
class Taken:
    """UIDs ``first``.. for a store, carrying ``fence`` ("" unfenced)."""

    first: int
    fence: str


@attrs.frozen
class NeedMark:
    """The UIDs do not fit below ``bucket``'s granted mark: raise it to ``target`` on
    a majority (:meth:`Reconstruction.mark_write`), then take again."""

    bucket: int
    fence: str
    target: int


class MajorityWrite:
    """Which nodes to ask for a durable write that must reach a majority of the known
    cluster: ourselves and the next members after us (spread), the rest only when
    one refuses or fails.  :attr:`result` becomes True once a majority agreed, False
    once that can no longer happen; a caller's timeout decides otherwise."""

    def __init__(self, me: str, members: Iterable[str], known: Iterable[str]) -> None:
        k = set(known) | {me}
        self.need = len(k) // 2 + 1
        others = sorted((set(members) & k) - {me})
        at = sum(1 for n in others if n < me)
        others = others[at:] + others[:at]
        self.first: tuple[str, ...] = (me, *others[: self.need - 1])
        self._spare = others[self.need - 1 :]
        self._left = len(self.first)
        self._ok = 0
        self.result: bool | None = None

    def answer(self, ok: bool) -> str | None:
        """One asked node answered (or failed: ``ok`` False); the next node to ask."""
        if self.result is not None:
            return None
        self._left -= 1
        if ok:
            self._ok += 1
            if self._ok >= self.need:
                self.result = True
                return None
        elif self._spare:
            self._left += 1
            return self._spare.pop(0)
        if self._left == 0:
            self.result = False
        return None

    def hedge(self) -> list[str]:
        """Spares to ask now because asked nodes are slow to answer (called once, after
        :data:`HEDGE_DELAY`): one per missing answer, at most :data:`HEDGE_MAX`.  A
        slow node's late answer still counts."""
        if self.result is not None:
            return []
        missing = min(self.need - self._ok, self._left, HEDGE_MAX, len(self._spare))
        extra = self._spare[:missing]
        del self._spare[:missing]
        self._left += len(extra)
        return extra
