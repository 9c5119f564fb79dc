"""The visibility horizon a manager sends with a fragment list (issue 14 item 1,
bug 3): what a reader may show."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from ._fences import PLAN_TTL


@attrs.frozen
class Horizon:
    """The visibility horizon of one user, from its manager (issue 14 item 1, bug 3).

    ``outstanding``: the UID ranges ``[first, end)`` the manager handed out that may
    still land (a store or a numbering in flight, not confirmed, not expired);
    ``next``: the manager's counter (every UID handed out is below it).  A reader that
    lists the fragment nodes of the *same* answer shows only UIDs below
    :meth:`bound`, and a UIDNEXT no higher: an outstanding UID it does not find may
    still land on its node, and anything above it shown now would have it appear
    below a UID already shown.  Every UID below the bound is either on a node of that
    fragment list (a numbered store goes only to a listed or majority-recorded node)
    or will never be used, so what a reader shows grows only upwards.
    """

    outstanding: tuple[tuple[int, int], ...] = ()
    next: int = 1

    def bound(self, present: Iterable[int]) -> int:
        """Show nothing at or above this: the lowest outstanding UID not among
        ``present`` (the UIDs the reader found), else :attr:`next` (a UID handed out
        after this answer may be anywhere, so one found above ``next`` waits for the
        next answer)."""
        have = set(present)
        for first, end in sorted(self.outstanding):
            for uid in range(first, min(end, self.next)):
                if uid not in have:
                    return uid
        return self.next

    def encode(self) -> list[int]:
        """The flat JSON/AMP form: ``[next, first1, end1, first2, end2, ...]``."""
        return [self.next, *(x for r in self.outstanding for x in r)]

    @classmethod
    def decode(cls, obj: Any) -> Horizon | None:
        """Inverse of :meth:`encode`; None for a missing or malformed value (an older
        manager: no horizon, the reader shows what it finds)."""
        if not isinstance(obj, list) or not obj or len(obj) % 2 != 1:
            return None
        try:
            nums = [int(x) for x in obj]
        except (TypeError, ValueError, OverflowError):  # Infinity: OverflowError
            return None
        pairs = [(nums[i], nums[i + 1]) for i in range(1, len(nums), 2) if nums[i] < nums[i + 1]]
        return cls(_collapse(pairs, nums[0]), nums[0])


#: A reader shows a listing only if the horizon it was cut at is at most this old
#: (measured by the reader, from sending its request): a reader paused or slowed
#: between the manager's answer and its listing would hide what readers at a newer
#: horizon showed meanwhile; it asks again instead.
HORIZON_AGE = PLAN_TTL / 2


#: At most this many outstanding ranges per user are sent to a reader; beyond that
#: (a burst far above any real delivery rate) the highest ones are sent as one range
#: up to the counter: conservative, the reader shows less for a moment, never more.
MAX_OUTSTANDING = 256


def _collapse(ranges: Iterable[tuple[int, int]], top: int) -> tuple[tuple[int, int], ...]:
    ordered = sorted(ranges)
    if len(ordered) <= MAX_OUTSTANDING:
        return tuple(ordered)
    rest = ordered[MAX_OUTSTANDING - 1 :]
    end = max(top, *(e for _, e in rest))
    return (*ordered[: MAX_OUTSTANDING - 1], (rest[0][0], end))
