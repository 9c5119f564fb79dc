"""Reconstruction from hints (:class:`HintReconstruction`): a committed user map
installed (what to send, which buckets settle), each member's hint received or
pulled, and the holder and unnumbered-mail notes that keep the fragment lists."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from ...cluster.buckets import BucketMap
from ._actions import Action, PullHints, PushProfiles, SendHints, Settled
from ._fences import (
    MAX_EARLY_HINTS,
    UID_GAP,
)
from ._hints import BucketHint
from ._state import ManagerState


class HintReconstruction(ManagerState):
    """Installs maps, receives hints, keeps holders and unnumbered-mail notes."""

    # --- install -------------------------------------------------------------------

    def install(
        self,
        new_map: BucketMap,
        live: Iterable[str],
        *,
        view: int = 0,
        away: bool = False,
        now: float = 0.0,
    ) -> list[Action]:
        """Adopt ``new_map`` (committed in view epoch ``view``).

        ``away``: our previous view is not the one the coordinator committed from
        (it rebooted, sat in another partition, or installed a commit the
        coordinator never saw); the first install since boot sends every bucket's
        hints in any case (no manager knows what we hold).  Returns the
        hints to send (every bucket when away, else the fresh ones and those of
        managers that came into view), the pulls (away: the buckets we manage that
        this commit did not restamp, from every member), the profile push (the
        lowest-id node of the old view, to nodes that came) and the buckets whose
        settling ended."""
        alive = set(live)
        booted = self.prev_live is None
        old_map = self.state.map
        self.hint_from.clear()
        fresh = self.state.install(new_map, alive)
        self.view_epoch, self.members = view, alive
        out: list[Action] = []
        mine = set(new_map.buckets_of(self.me))
        for user in list(self.uidnext):
            b = self.bucket(user)
            if b not in mine or b in fresh:
                del self.uidnext[user]
        for b in list(self.floor):
            if b not in mine or b in fresh:
                del self.floor[b]
        # A granted block ends at every view change: the first UIDs after one take a
        # majority write, whose answers bring any higher mark another side's manager
        # recorded while we kept the bucket's map entry (a merge can hand it back to us
        # unchanged, with no member new to our view: mailsim seed 475).
        self.granted.clear()
        for b in list(self.settling):
            if b not in mine or b in fresh:
                out.extend(self._settle(b, now))
        for b in list(self.missing):
            if b not in mine or b in fresh:
                del self.missing[b]
            else:
                self.missing[b] &= alive
                if not self.missing[b]:
                    del self.missing[b]
        for user in list(self.pending):
            if not self.state.manages(user):
                del self.pending[user]
        for user in list(self.allocated):
            if self.bucket(user) not in mine or self.bucket(user) in fresh:
                del self.allocated[user]  # a later manager's fences settle those
        for user in list(self.holders_seen):
            if self.bucket(user) not in mine or self.bucket(user) in fresh:
                del self.holders_seen[user]  # the new map's hints bring them again
            else:
                # A recorded holder that leaves the view is away, also when it never
                # was in the fragment list (it was a member when the record came in a
                # hint, and left before its own hint did: mailsim seed 17).
                for node in self.holders_seen[user] - alive:
                    self.state.note_holder(user, node, alive)
        for b in sorted(fresh & mine):
            self.gaps[b] = UID_GAP if len(alive) > 1 else 0
            self._start_settling(b, alive, now)
        # Members that were not in our previous view may have stored and numbered
        # under another side's manager of our buckets (a merge can give a bucket back
        # to us at our old epoch, so it is not fresh): our buckets settle again until
        # their hints (with that side's UID marks) are in.
        if not booted:
            assert self.prev_live is not None
            came_in = alive - self.prev_live - {self.me}
            if came_in:
                for b in sorted(mine - fresh):
                    waiting = self.settling.setdefault(b, set())
                    waiting |= came_in
                    self.settle_at.setdefault(b, now + self.settle_timeout)
        self.to_pull = []
        if away and len(alive) > 1:
            self.to_pull = sorted(b for b in mine if new_map.epochs[b] != view)
            for b in self.to_pull:
                self.gaps[b] = UID_GAP
                if b not in fresh:
                    self._start_settling(b, alive, now)
        early, self.early = self.early, []
        for sender, hint, sent_in in early:
            out.extend(self.receive(sender, hint, sent_in, now=now))
        notes, self.early_notes = self.early_notes, []
        for user, node in notes:
            if self.state.manages(user) and node in alive:
                self.state.add_fragment(user, node)
        late, self.early_pending = self.early_pending, []
        for user, node in late:
            if self.state.manages(user) and node in alive:
                self.note_pending(user, node, now)
        # What to send (MailCluster._map_changed before issue 14 item 4).
        if away or booted:
            send = set(range(len(new_map)))  # no manager knows what we hold
        else:
            assert self.prev_live is not None
            came = alive - self.prev_live
            send = set(new_map.fresh(old_map)) | {
                b for b in range(len(new_map)) if new_map.owners[b] in came
            }
        prev = self.prev_live or {self.me}
        self.prev_live = alive
        order = tuple(sorted(b for b in send if new_map.owners[b]))
        if order:
            out.append(SendHints(new_map, order, view))
        if self.to_pull:
            for peer in sorted(alive - {self.me}):
                out.append(PullHints(peer, tuple(self.to_pull), view))
        # Holders that are back in the view stay away (reads of their users refused)
        # until their hint arrives; they may see no change and send none: ask them.
        back: dict[str, set[int]] = {}
        for user, nodes in self.state.away.items():
            for n in nodes & alive:
                back.setdefault(n, set()).add(self.bucket(user))
        for peer in sorted(back):
            wanted = tuple(sorted(back[peer] - set(self.to_pull)))
            if wanted and peer != self.me:
                out.append(PullHints(peer, wanted, view))
                if self.pull_missing_at is None:
                    self.pull_missing_at = now + self.settle_timeout
            elif peer == self.me:
                for b in back[peer]:
                    self.state.back(b, peer)
        came = alive - prev
        if came and prev & alive and self.me == min(prev & alive):
            out.append(PushProfiles(tuple(sorted(came))))
        return out

    def _start_settling(self, bucket: int, alive: set[str], now: float) -> None:
        self.settling[bucket] = set(alive)
        self.settle_at[bucket] = now + self.settle_timeout

    def _settle(self, bucket: int, now: float) -> list[Action]:
        self.settling.pop(bucket, None)
        self.settle_at.pop(bucket, None)
        if self.pending:
            self.kick(now)
        return [Settled(bucket)]

    def receive(
        self, sender: str, hint: BucketHint, view: int | None = None, *, now: float = 0.0
    ) -> list[Action]:
        """Merge one bucket's hint from ``sender``, sent in view epoch ``view``.

        Bucket epochs are not ordered across partitions (a merged map can keep an
        older lineage's entry), view epochs are: a hint from a newer view than ours
        is kept and replayed when we install that view; otherwise it counts only if
        our map has the same (owner, epoch) entry and the sender is a member (else it
        is dropped: its sender sees the bucket fresh and sends again).  ``view``
        None (an older peer) is taken as our own view."""
        b = hint.bucket
        if not 0 <= b < len(self.state.map):
            return []
        if view is not None and view > self.view_epoch:
            if len(self.early) < MAX_EARLY_HINTS:
                self.early.append((sender, hint, view))
            return []
        if (self.state.map.owners[b], self.state.map.epochs[b]) != (self.me, hint.epoch):
            return []
        if sender != self.me and sender not in self.members:
            return []
        self.hints_received += 1
        self.state.back(b, sender)
        gap = self.gaps.get(b, 0)
        for u in hint.users:
            if self.bucket(u.user) != b:
                continue
            if u.has_mail:
                self.state.add_fragment(u.user, sender)
            self.uidnext[u.user] = max(self.uidnext.get(u.user, 1), u.uidnext + gap)
            if u.unnumbered > 0:
                self.pending.setdefault(u.user, {})[sender] = u.unnumbered
            else:
                self.pending.get(u.user, {}).pop(sender, None)
        self.floor[b] = max(self.floor.get(b, 1), hint.mark)
        everyone = self.members | {self.me}
        heard = self.hint_from.setdefault(b, set())
        heard.add(sender)
        for user, node in hint.holders:
            if self.bucket(user) == b:
                self.state.note_holder(user, node, everyone)
                self.holders_seen.setdefault(user, set()).add(node)
                if (
                    node in everyone
                    and node != self.me
                    and node not in heard
                    and node not in self.state.fragment_list(user)
                ):
                    # A recorded holder in our view whose own hint has not come (a
                    # bridge can keep it from us while we kept the bucket: it stored
                    # and numbered under another side's manager, mailsim seed 197):
                    # away until its hint arrives, which we pull.
                    self.state.away.setdefault(user, set()).add(node)
                    if self.pull_missing_at is None:
                        self.pull_missing_at = now
        out: list[Action] = []
        late = self.missing.get(b)
        if late is not None:
            late.discard(sender)
            if not late:
                del self.missing[b]
        waiting = self.settling.get(b)
        if waiting is not None:
            waiting.discard(sender)
            if not waiting:
                out.extend(self._settle(b, now))
        if self.pending:
            self.kick(now)
        return out

    def pulled(
        self, peer: str, hints: Sequence[BucketHint], asked: Iterable[int]
    ) -> list[BucketHint]:
        """A pull's answer from ``peer``, as hints for our current map: its current hard
        state counts for whatever map we hold now (only buckets asked and ours)."""
        want = set(asked)
        bmap = self.state.map
        return [
            attrs.evolve(h, epoch=bmap.epochs[h.bucket])
            for h in hints
            if h.bucket in want and 0 <= h.bucket < len(bmap) and bmap.owners[h.bucket] == self.me
        ]

    def still_wanted(self, manager: str, hints: Sequence[BucketHint]) -> list[BucketHint]:
        """Of hints we sent ``manager``, those our current map still gives it at those
        epochs (a failed push is resent only for them)."""
        bmap = self.state.map
        return [
            h for h in hints if (bmap.owners[h.bucket], bmap.epochs[h.bucket]) == (manager, h.epoch)
        ]

    def pull_again(self, peer: str, buckets: Sequence[int], view: int) -> list[int]:
        """Buckets of a failed pull worth asking ``peer`` again (none once the view
        changed or ``peer`` left it)."""
        if self.view_epoch != view or peer not in self.members:
            return []
        return [b for b in buckets if self.state.map.owners[b] == self.me]

    # --- holders and unnumbered mail ----------------------------------------------------

    def add_fragment(self, user: str, node: str) -> bool:
        """A delivery stored mail for ``user`` on ``node``; True if we manage ``user``.
        A note for a user we do not manage (a proxy's map differs from ours) is kept
        until our next install and applied again then."""
        self.state.add_fragment(user, node)
        if not self.state.manages(user):
            if len(self.early_notes) < MAX_EARLY_HINTS:
                self.early_notes.append((user, node))
            return False
        return True

    def record_holder(self, user: str, node: str, lease: bool) -> tuple[int, str] | None:
        """Should a majority record that ``node`` holds ``user``'s mail (once per
        tenure)?  The (bucket, fence) to write, or None."""
        b = self.bucket(user)
        fence = self.fence(b)
        key = (user, node, fence)
        if key in self.recorded or not self.may_number(user, lease):
            return None
        if len(self.recorded) > 100_000:
            self.recorded.clear()
            self.confirmed.clear()
        self.recorded.add(key)
        return b, fence

    def holder_ok(self, user: str, node: str) -> bool:
        """Has a majority recorded, in this tenure, that ``node`` holds ``user``'s mail?
        A message gets a UID on a node only then (mail numbered on a node a later
        manager cannot know of would show up after the heal below UIDs shown)."""
        return (user, node, self.fence(self.bucket(user))) in self.confirmed

    def unrecorded(self, user: str) -> set[str]:
        """Nodes of ``user``'s fragment list no majority is known to have recorded as
        holders (added by a delivery's note or a hint's ``has_mail``, their record not
        confirmed yet): a numbered store goes there only after its record (else a
        manager on the other side of a partition, not knowing it, could show higher
        UIDs and this one would appear below them after the heal; mailsim seed 18)."""
        fence = self.fence(self.bucket(user))
        known = self.holders_seen.get(user, set())
        return {
            n
            for n in self.state.fragment_list(user)
            if n not in known and (user, n, fence) not in self.confirmed
        }

    def holder_recorded(self, user: str, node: str, fence: str, ok: bool) -> None:
        """The outcome of a :meth:`record_holder` write (a failed one is tried again)."""
        if not ok:
            self.recorded.discard((user, node, fence))
        else:
            if len(self.confirmed) > 100_000:
                self.confirmed.clear()
            self.confirmed.add((user, node, fence))

    def note_pending(self, user: str, node: str, now: float = 0.0) -> None:
        """A message for ``user`` was stored unnumbered on ``node``: ``node`` holds the
        user's mail, so it is in the fragment list too (the store's own note may be
        missing: a store that timed out after reaching the node still happens there,
        and the node's reminder is then the only word of it)."""
        if self.state.manages(user):
            self.state.add_fragment(user, node)
            have = self.pending.setdefault(user, {})
            have[node] = max(1, have.get(node, 0))
            self.kick(now)
        elif len(self.early_pending) < MAX_EARLY_HINTS:
            self.early_pending.append((user, node))  # our map may be behind
