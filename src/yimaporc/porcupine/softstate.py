"""Porcupine's soft state and its reconstruction (seed §2.2, §3.3), sans-IO.

A user manager holds, for the users of the buckets it manages, the *mailbox
fragment list* (which nodes hold mail for the user) and a cache of the user's
profile.  None of it is written to disk: after every user-map change it is
rebuilt in two fully distributed, unsynchronised steps:

1. every node compares its previous and current map and finds the *fresh*
   buckets (reassigned epoch);
2. for each fresh bucket, every node reads its hard state for that bucket (one
   directory per bucket) and sends the bucket's new manager the users it holds
   mail for; of a profile's replicas, only the one with the highest address
   sends the profile.  A node that has just joined (or returned) treats every
   bucket as fresh for sending, since no manager knows what it holds.

Managers drop the soft state of buckets that stopped being theirs or became
fresh, then merge the hints as they arrive.  Delivery and retrieval keep the
lists current between changes (:meth:`UserManagerState.add_fragment`,
:meth:`remove_fragment`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping

import attrs

from ..cluster.buckets import BucketMap


def bucket_of(user: str, n_buckets: int) -> int:
    """The user-map bucket of ``user`` (stable across nodes and runs)."""
    return zlib.crc32(user.lower().encode("utf-8")) % n_buckets


@attrs.frozen
class Hint:
    """Step 2's message: ``sender`` holds mail for ``users`` of ``bucket``; and these profiles."""

    sender: str
    bucket: int
    epoch: int
    users: tuple[str, ...]
    profiles: tuple[tuple[str, bytes], ...] = ()


class UserManagerState:
    """The soft state one node keeps as user manager of its buckets."""

    def __init__(self, me: str, n_buckets: int) -> None:
        self.me = me
        self.n_buckets = n_buckets
        self.map = BucketMap.empty(n_buckets)
        self.fragments: dict[str, set[str]] = {}
        self.profiles: dict[str, bytes] = {}
        #: Nodes that held mail for a user when they left the view: their mail is
        #: out of reach, not gone (retrieval says so instead of showing less).
        self.away: dict[str, set[str]] = {}

    def manages(self, user: str) -> bool:
        """True if this node is ``user``'s manager under the current map."""
        return self.map.owners[bucket_of(user, self.n_buckets)] == self.me

    def install(self, new_map: BucketMap, live: Iterable[str]) -> set[int]:
        """Adopt ``new_map``; forget soft state it invalidates; return the fresh buckets.

        Nodes no longer ``live`` leave every fragment list (their mail is out of
        reach until they return and send hints again).
        """
        fresh = new_map.fresh(self.map)
        self.map = new_map
        for table in (self.fragments, self.profiles, self.away):
            for user in [u for u in table if not self._keep(u, fresh)]:
                del table[user]  # type: ignore[attr-defined]
        alive = set(live)
        # A node that is back stays away until its hint for the bucket arrives
        # (:meth:`back`): until then we do not know what it holds.
        for user in list(self.fragments):
            gone = self.fragments[user] - alive
            if gone:
                self.away.setdefault(user, set()).update(gone)
            self.remove_fragments(user, gone)
        return fresh

    def _keep(self, user: str, fresh: set[int]) -> bool:
        b = bucket_of(user, self.n_buckets)
        return self.map.owners[b] == self.me and b not in fresh

    def apply_hint(self, hint: Hint) -> bool:
        """Merge a reconstruction hint (ignored if it is for a map we do not hold)."""
        if self.map.owners[hint.bucket] != self.me or self.map.epochs[hint.bucket] != hint.epoch:
            return False
        for user in hint.users:
            if bucket_of(user, self.n_buckets) == hint.bucket:
                self.fragments.setdefault(user, set()).add(hint.sender)
        for user, profile in hint.profiles:
            if bucket_of(user, self.n_buckets) == hint.bucket:
                self.profiles[user] = profile
        return True

    def back(self, bucket: int, node: str) -> None:
        """``node``'s hint for ``bucket`` arrived: it is not away for its users."""
        for user in [u for u, nodes in self.away.items() if node in nodes]:
            if bucket_of(user, self.n_buckets) == bucket:
                self.away[user].discard(node)
                if not self.away[user]:
                    del self.away[user]

    def add_fragment(self, user: str, node: str) -> None:
        """Delivery stored mail for ``user`` on ``node``."""
        self.fragments.setdefault(user, set()).add(node)

    def remove_fragment(self, user: str, node: str) -> None:
        """``node`` holds no more mail for ``user`` (seed §2.3.2)."""
        self.remove_fragments(user, {node})

    def remove_fragments(self, user: str, nodes: set[str]) -> None:
        """None of ``nodes`` holds (reachable) mail for ``user``."""
        held = self.fragments.get(user)
        if held is not None:
            held -= nodes
            if not held:
                del self.fragments[user]

    def note_holder(self, user: str, node: str, live: Iterable[str]) -> None:
        """``node`` held mail for ``user`` (a majority recorded it): out of reach if it
        is not ``live`` (its own hint tells the rest when it is)."""
        if node not in set(live):
            self.away.setdefault(user, set()).add(node)

    def away_list(self, user: str) -> set[str]:
        """Nodes that held mail for ``user`` when they left the view (out of reach)."""
        return set(self.away.get(user, ()))

    def fragment_list(self, user: str) -> set[str]:
        """Nodes holding mail for ``user`` (as far as reconstruction and delivery told us)."""
        return set(self.fragments.get(user, ()))


def hints_for(
    me: str,
    new_map: BucketMap,
    fresh: Iterable[int],
    users_with_mail: Callable[[int], Iterable[str]],
    profiles_here: Callable[[int], Mapping[str, bytes]],
    profile_sender: Callable[[str], bool],
) -> list[tuple[str, Hint]]:
    """Step 2 on one node: ``(manager, hint)`` for each fresh bucket it holds anything of.

    ``users_with_mail(b)`` and ``profiles_here(b)`` read this node's hard state of
    bucket ``b`` (one directory each); ``profile_sender(user)`` tells whether this
    node is the profile replica that sends (the one with the highest address).
    """
    out: list[tuple[str, Hint]] = []
    for b in sorted(fresh):
        manager = new_map.owners[b]
        if not manager:
            continue
        users = tuple(sorted(set(users_with_mail(b))))
        profiles = tuple(sorted((u, p) for u, p in profiles_here(b).items() if profile_sender(u)))
        if users or profiles:
            out.append((manager, Hint(me, b, new_map.epochs[b], users, profiles)))
    return out
