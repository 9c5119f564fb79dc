"""UID numbering (:class:`Reconstruction`, the top floor): UIDs for deliveries,
the marks a majority records, the visibility horizon, and the numbering loop."""

from __future__ import annotations

from ..values import PENDING
from ._actions import Action, NeedMark, Number, PullHints, Taken
from ._fences import (
    LAPSED_PER_USER,
    LAPSED_USERS,
    MARK_BLOCK,
    NUMBER_BATCH,
)
from ._hinting import HintReconstruction
from ._horizon import Horizon, _collapse


class Reconstruction(HintReconstruction):
    """A user manager's soft state, its reconstruction and its UID counters."""

    # --- UIDs --------------------------------------------------------------------------

    def take(
        self,
        user: str,
        count: int,
        *,
        lease: bool,
        unfenced: bool = False,
        again: bool = True,
        numbering: bool = False,
        now: float = 0.0,
        track: bool = True,
        ttl: float | None = None,
    ) -> Taken | NeedMark | int:
        """``count`` UIDs for ``user`` below the bucket's granted mark, PENDING when we
        may not number, or :class:`NeedMark` (``again`` False: PENDING instead).

        While a numbering of ``user``'s waiting mail is in flight, a delivery
        (``numbering`` False) gets PENDING too: its UID would be above the block being
        numbered, and shown before that block lands (the pause test found it).

        Every UID range handed out is *outstanding* (:meth:`horizon`) until
        :meth:`confirm`, a numbering's answer, or :attr:`allocation_ttl` after ``now``
        (``track`` False: not at all; the node's APPEND/COPY, docs/mail.md; ``ttl``:
        another expiry, for allocations whose age the store checks)."""
        b = self.bucket(user)
        if not numbering and not unfenced and any(u == user for u, _ in self.numbering):
            self.pending_plans += 1
            return PENDING
        if not self.may_number(user, lease) or not self.numbers_leased(now):
            if unfenced and self.state.manages(user):
                first = max(self.uidnext.get(user, 1), self.floor.get(b, 1))
                self.uidnext[user] = first + max(1, count)
                if track:
                    self._allocate(user, first, first + max(1, count), now, ttl)
                return Taken(first, "")
            self.pending_plans += 1
            return PENDING
        first = max(self.uidnext.get(user, 1), self.floor.get(b, 1))
        end = first + max(1, count)
        if end <= self.granted.get(b, 0):
            self.uidnext[user] = end
            if track:
                self._allocate(user, first, end, now, ttl)
            return Taken(first, "" if unfenced else self.fence(b))
        if not again:
            self.pending_plans += 1
            return PENDING
        return NeedMark(b, self.fence(b), end + MARK_BLOCK)

    def _allocate(
        self, user: str, first: int, end: int, now: float, ttl: float | None = None
    ) -> None:
        life = self.allocation_ttl if ttl is None else ttl
        self.allocated.setdefault(user, {})[first] = (end, now + life)

    def renew(self, user: str, first: int, now: float, ttl: float) -> bool:
        """Keep the allocation at ``first`` outstanding ``ttl`` from ``now`` (its
        delivery waited for a holder record); False if it is gone or expired (then
        a reader may have been shown UIDs above it: it must not land)."""
        mine = self.allocated.get(user)
        got = mine.get(first) if mine else None
        if mine is None or got is None or got[1] < now:
            return False
        mine[first] = (got[0], max(got[1], now + ttl))  # never shortened
        return True

    def confirm(self, user: str, first: int) -> bool:
        """The allocation starting at ``first`` landed (its store answered) or never
        will (abandoned): it no longer holds ``user``'s horizon back.  False when the
        horizon had already dropped it expired: readers may have been shown higher
        UIDs, so a delivery stored under it gets no 250 (docs/mail.md, "A holder note
        after the allocation lapsed"); the answer stays False for that UID."""
        if first in self.lapsed.get(user, ()):
            self.lapsed_notes += 1
            return False
        mine = self.allocated.get(user)
        if mine is not None:
            mine.pop(first, None)
            if not mine:
                del self.allocated[user]
        return True

    def _lapse(self, user: str, first: int) -> None:
        """Remember that ``user``'s allocation at ``first`` left the horizon expired."""
        firsts = self.lapsed.setdefault(user, {})
        firsts[first] = None
        while len(firsts) > LAPSED_PER_USER:
            del firsts[next(iter(firsts))]
        while len(self.lapsed) > LAPSED_USERS:
            del self.lapsed[next(iter(self.lapsed))]

    def horizon(self, user: str, now: float) -> Horizon:
        """What a reader may show of ``user``'s mail (:class:`Horizon`), with the
        fragment list of the same moment; expired allocations are dropped (and
        remembered as lapsed: a holder note for one of them gets no 250, see
        :meth:`confirm`).  A delivery whose coordinator died holding one (SIGKILL)
        holds newer mail back only until the expiry, never until that node returns:
        acknowledged mail stays readable while a node is down."""
        mine = self.allocated.get(user)
        if mine:
            for first, (_, expires) in list(mine.items()):
                if expires < now:
                    del mine[first]
                    self._lapse(user, first)
            if not mine:
                del self.allocated[user]
        ranges = [(f, e) for f, (e, _) in (mine or {}).items()]
        top = self.uidnext.get(user, 1)
        return Horizon(_collapse(ranges, top), top)

    def mark_write(self, need: NeedMark) -> bool:
        """Start raising a mark; False if a raise of this bucket is already running
        (wait for its :meth:`mark_done`)."""
        if need.bucket in self.extending:
            return False
        self.extending.add(need.bucket)
        return True

    def mark_done(self, need: NeedMark, granted: bool, seen: int = 1) -> None:
        """A majority recorded ``need.target`` (``granted``) or could not.  ``seen``:
        the highest mark the asked nodes had before (their answers carry it): our UIDs
        start at or above it, whatever our hints said (a merge can give a bucket back
        to its old manager at its old entry while another side's manager numbered in
        it; mailsim seed 475)."""
        self.extending.discard(need.bucket)
        if self.fence(need.bucket) != need.fence:
            return
        self.floor[need.bucket] = max(self.floor.get(need.bucket, 1), seen)
        if granted:
            self.granted[need.bucket] = max(self.granted.get(need.bucket, 0), need.target)

    # --- numbering what waits -----------------------------------------------------------

    def tick(self, now: float, *, lease: bool, number: bool = True) -> list[Action]:
        """Everything due at ``now``: settle timeouts, then the numbering loop
        (``number`` False: a shell that cannot number skips a due round)."""
        out: list[Action] = []
        for b in sorted(b for b, t in self.settle_at.items() if t <= now):
            missing = self.settling.get(b)
            if missing:
                self.missing[b] = set(missing)
                if self.pull_missing_at is None:
                    self.pull_missing_at = now
            out.extend(self._settle(b, now))
        if self.pull_missing_at is not None and self.pull_missing_at <= now:
            self.pull_missing_at = None
            per: dict[str, set[int]] = {}
            for b, peers in self.missing.items():
                if self.state.map.owners[b] == self.me:
                    for peer in peers & self.members - {self.me}:
                        per.setdefault(peer, set()).add(b)
            for user, nodes in self.state.away.items():  # back, hint not in yet
                for peer in nodes & self.members - {self.me}:
                    per.setdefault(peer, set()).add(self.bucket(user))
            for peer in sorted(per):
                out.append(PullHints(peer, tuple(sorted(per[peer])), self.view_epoch))
            if per:
                self.pull_missing_at = now + self.settle_timeout
        if self.number_at is not None and self.number_at <= now:
            self.number_at = None
            if not number:
                return out
            blocked = False
            for user in list(self.pending):
                for node, n in list(self.pending.get(user, {}).items()):
                    if any(u == user for u, _ in self.numbering):
                        continue  # one numbering per user at a time (blocks in order)
                    if (
                        node not in self.members
                        or not self.may_number(user, lease)
                        or not self.numbers_leased(now)
                    ):
                        blocked = True
                        continue
                    self.numbering.add((user, node))
                    out.append(Number(user, node, min(max(1, n), NUMBER_BATCH)))
            if blocked or self.numbering:
                self.kick(now, self.number_retry)
        return out

    def settled_by_timeout(self, bucket: int) -> set[str]:
        """Members whose hint had not arrived when ``bucket`` settled by timeout."""
        return set(self.missing.get(bucket, ()))

    def number_cancelled(self, user: str, node: str, now: float) -> None:
        """A :class:`Number` got no UIDs (lost the right, or no mark): later."""
        self.numbering.discard((user, node))
        self.kick(now, self.number_retry)

    def number_done(
        self,
        user: str,
        node: str,
        numbered: int,
        left: int,
        top: int,
        now: float,
        first: int | None = None,
    ) -> bool:
        """``node`` numbered ``numbered`` messages, ``left`` still wait, its highest
        UIDNEXT is ``top``.  True if a majority should record ``node`` as a holder.
        ``first``: the block's first UID, confirmed (the numbered ones are on ``node``,
        the rest of the block is never used)."""
        self.numbering.discard((user, node))
        if first is not None:
            self.confirm(user, first)
        self.numbered += numbered
        if not self.state.manages(user):
            return False
        self.uidnext[user] = max(self.uidnext.get(user, 1), top)
        # The node held unnumbered mail of ``user``: it holds mail, numbered now or by
        # an earlier call whose answer was lost (then ``numbered`` is 0 here).
        self.state.add_fragment(user, node)
        if left:
            self.pending.setdefault(user, {})[node] = left
            self.kick(now, 0.0 if numbered else self.number_retry)
        else:
            self.pending.get(user, {}).pop(node, None)
            if not self.pending.get(user):
                self.pending.pop(user, None)
            else:
                self.kick(now)  # the user's next node at once (one numbering at a time)
        return bool(numbered)

    def number_failed(self, user: str, node: str, now: float) -> None:
        """A :class:`Number` call failed: later."""
        self.numbering.discard((user, node))
        self.kick(now, self.number_retry)
