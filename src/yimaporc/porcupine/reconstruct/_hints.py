"""The hint (``porcupine.hints``): one typed value, one codec."""

from __future__ import annotations

from typing import Any

import attrs

from ..softstate import bucket_of
from ._fences import MAX_HOLDERS


class MalformedHint(ValueError):
    """A hint entry that is not ``[bucket, epoch, [[user, has_mail, uidnext, n]...],
    [record...], mark, [[user, node]...]]``."""


@attrs.frozen
class UserHint:
    """What one node's hard state says of one user: holds mail (numbered or not),
    its highest UIDNEXT (or the highest it ever showed), unnumbered messages."""

    user: str
    has_mail: bool
    uidnext: int
    unnumbered: int = 0


@attrs.frozen
class BucketHint:
    """One bucket's reconstruction hint from its sender's hard state, for the
    manager that holds ``epoch`` for the bucket.  ``records`` are profile records
    (checked by :meth:`~yimaporc.porcupine.profiledb.ProfileDB.merge`), ``mark``
    the highest UID mark recorded there, ``holders`` the (user, node) pairs a
    majority recorded as having held mail."""

    bucket: int
    epoch: int
    users: tuple[UserHint, ...] = ()
    records: tuple[Any, ...] = ()
    mark: int = 1
    holders: tuple[tuple[str, str], ...] = ()

    def encode(self) -> list[Any]:
        """The JSON form ``porcupine.hints`` carries (docs/wire.md)."""
        return [
            self.bucket,
            self.epoch,
            [[u.user, u.has_mail, u.uidnext, u.unnumbered] for u in self.users],
            [list(r) for r in self.records],
            self.mark,
            [list(h) for h in self.holders],
        ]

    @classmethod
    def decode(cls, obj: Any, n_buckets: int) -> BucketHint:
        """Inverse of :meth:`encode`; :class:`MalformedHint` if the head is bad.

        A malformed user item or holder pair is skipped, and so is one of another
        bucket; entries of older peers (no pending count, no mark, no holders) read
        with the defaults."""
        if not isinstance(obj, list) or len(obj) < 3:
            raise MalformedHint("a hint entry is a list of at least 3 items")
        try:
            bucket, epoch = int(obj[0]), int(obj[1])
        except (TypeError, ValueError, OverflowError) as e:  # Infinity: OverflowError
            raise MalformedHint("bucket and epoch must be integers") from e
        if not 0 <= bucket < n_buckets or not isinstance(obj[2], list):
            raise MalformedHint("bucket out of range or users not a list")
        users: list[UserHint] = []
        for item in obj[2]:
            try:
                user, has_mail, uidnext = str(item[0]), bool(item[1]), int(item[2])
                unnumbered = int(item[3]) if len(item) > 3 else 0
            except (IndexError, TypeError, ValueError, KeyError, OverflowError):
                continue
            if bucket_of(user, n_buckets) == bucket:
                users.append(UserHint(user, has_mail, uidnext, unnumbered))
        records = tuple(obj[3]) if len(obj) > 3 and isinstance(obj[3], list) else ()
        mark = 1
        if len(obj) > 4:
            try:
                mark = int(obj[4])
            except (TypeError, ValueError, OverflowError):
                mark = 1
        holders: list[tuple[str, str]] = []
        if len(obj) > 5 and isinstance(obj[5], list):
            for pair in obj[5][:MAX_HOLDERS]:
                try:
                    user, node = str(pair[0]), str(pair[1])
                except (IndexError, TypeError, KeyError):
                    continue
                if bucket_of(user, n_buckets) == bucket:
                    holders.append((user, node))
        return cls(bucket, epoch, tuple(users), records, mark, tuple(holders))


def decode_hints(entries: Any, n_buckets: int) -> list[BucketHint]:
    """Every well-formed entry of a ``porcupine.hints`` list (others dropped)."""
    out: list[BucketHint] = []
    for e in entries if isinstance(entries, list) else ():
        try:
            out.append(BucketHint.decode(e, n_buckets))
        except MalformedHint:
            continue
    return out
