"""IMAP sequence sets (RFC 3501 9, ``sequence-set``): parse, resolve, format.

A :class:`SequenceSet` is kept as written: a tuple of ``(low, high)`` ranges where
``None`` stands for ``*`` and a single number ``n`` is ``(n, n)``. Nothing is expanded
until it is resolved against a mailbox, so ``1:4294967295`` costs no more than ``1``.

Resolution rules (RFC 3501 6.4.8 and 9, as Dovecot applies them):

- ``*`` is the largest number in use: the message count for sequence numbers, the
  highest UID for UIDs.
- a range's ends may come in either order: ``5:3`` is ``3:5``.
- a UID range past the end still contains the highest UID: ``UID FETCH 900:*`` with
  highest UID 12 is ``12:900``, which holds 12.
- in an empty mailbox every set resolves to nothing (``*`` has no value).
- sequence numbers above the message count are an error for commands that address
  messages (FETCH, STORE, COPY: :meth:`SequenceSet.resolve_seqs` with ``strict``), and
  simply match nothing in SEARCH (``strict=False``); UIDs that do not exist are never an
  error.

Errors are :class:`SequenceSetError` (a ``ValueError``); the caller answers ``BAD``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

import attrs

#: The largest nz-number (RFC 3501: 32-bit unsigned).
MAX_NUMBER = 4294967295

#: A range end: a number, or None for ``*``.
End = int | None


class SequenceSetError(ValueError):
    """A sequence set that does not parse, or addresses messages that do not exist."""


def _number(text: str) -> End:
    if text == "*":
        return None
    if not text.isdigit() or not text.isascii() or text[0] == "0" or len(text) > 10:
        raise SequenceSetError(f"invalid sequence number {text[:20]!r}")
    n = int(text)
    if n > MAX_NUMBER:
        raise SequenceSetError(f"sequence number out of range {text[:20]!r}")
    return n


@attrs.frozen
class SequenceSet:
    """A parsed ``sequence-set``: ranges as written, ``None`` for ``*``."""

    ranges: tuple[tuple[End, End], ...]

    @classmethod
    def parse(cls, text: str | bytes) -> SequenceSet:
        """``b"1:3,5,7:*"`` -> SequenceSet; :class:`SequenceSetError` on bad syntax."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        if not text:
            raise SequenceSetError("empty sequence set")
        ranges: list[tuple[End, End]] = []
        for item in text.split(","):
            low, sep, high = item.partition(":")
            if sep and ":" in high:
                raise SequenceSetError(f"invalid sequence range {item[:20]!r}")
            a = _number(low)
            ranges.append((a, _number(high) if sep else a))
        return cls(tuple(ranges))

    @classmethod
    def of(cls, numbers: Iterable[int]) -> SequenceSet:
        """The compact set of ``numbers`` (sorted, runs joined)."""
        return cls(tuple(_runs(sorted(set(numbers)))))

    def format(self) -> bytes:
        """The set as written on the wire (``1:3,5,7:*``)."""
        return ",".join(_item(a, b) for a, b in self.ranges).encode("ascii")

    def uses_star(self) -> bool:
        """Does any range end in ``*``?"""
        return any(a is None or b is None for a, b in self.ranges)

    def _bounds(self, largest: int) -> list[tuple[int, int]]:
        """The ranges with ``*`` = ``largest``, each as ``(low, high)``, low <= high."""
        out = []
        for a, b in self.ranges:
            x = largest if a is None else a
            y = largest if b is None else b
            out.append((x, y) if x <= y else (y, x))
        return out

    def contains(self, number: int, largest: int) -> bool:
        """Is ``number`` in the set, ``*`` being ``largest`` (the count or highest UID)?"""
        if largest <= 0:
            return False
        return any(x <= number <= y for x, y in self._bounds(largest))

    def resolve_seqs(self, count: int, strict: bool = True) -> list[int]:
        """Sequence numbers (sorted, unique) in a mailbox of ``count`` messages.

        With ``strict``, a number above ``count`` (or any set in an empty mailbox) raises
        :class:`SequenceSetError`, as FETCH/STORE/COPY answer ``BAD``; without, such
        numbers are dropped (SEARCH).
        """
        if count <= 0:
            if strict:
                raise SequenceSetError("no messages")
            return []
        picked: list[tuple[int, int]] = []
        for x, y in self._bounds(count):
            if y > count:
                if strict:
                    raise SequenceSetError("invalid message sequence number")
                y = count
            if x <= y:
                picked.append((x, y))
        return _expand(picked)

    def resolve_uids(self, uids: Sequence[int]) -> list[int]:
        """The UIDs of ``uids`` (ascending, the mailbox's) that the set names."""
        return [uids[i] for i in self.uid_indexes(uids)]

    def resolve_uid_seqs(self, uids: Sequence[int]) -> list[int]:
        """The sequence numbers (1-based) of the messages whose UIDs the set names."""
        return [i + 1 for i in self.uid_indexes(uids)]

    def uid_indexes(self, uids: Sequence[int]) -> list[int]:
        """0-based positions in ``uids`` (ascending) named by the set; sorted, unique."""
        if not uids:
            return []
        spans = []
        for x, y in self._bounds(uids[-1]):
            lo = bisect.bisect_left(uids, x)
            hi = bisect.bisect_right(uids, y)
            if lo < hi:
                spans.append((lo, hi - 1))
        return _expand(spans)


def _expand(spans: list[tuple[int, int]]) -> list[int]:
    """Merge inclusive spans and list every number they hold, ascending."""
    out: list[int] = []
    last = -1
    for x, y in sorted(spans):
        x = max(x, last + 1)
        if x <= y:
            out.extend(range(x, y + 1))
            last = y
    return out


def _item(a: End, b: End) -> str:
    sa = "*" if a is None else str(a)
    return sa if a == b else f"{sa}:{'*' if b is None else b}"


def _runs(numbers: Sequence[int]) -> list[tuple[End, End]]:
    """Runs of consecutive ascending numbers, in the order given."""
    out: list[tuple[End, End]] = []
    start = prev = None
    for n in numbers:
        if prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            out.append((start, prev))
        start = prev = n
    if start is not None:
        out.append((start, prev))
    return out


def parse_sequence_set(text: str | bytes) -> SequenceSet:
    """Same as :meth:`SequenceSet.parse`."""
    return SequenceSet.parse(text)


def format_uid_set(uids: Iterable[int], sort: bool = True) -> bytes:
    """A compact ``uid-set`` (``304,319:320``) for ESEARCH ALL, VANISHED, APPENDUID.

    With ``sort=False`` the order is kept and only ascending runs are joined, as
    COPYUID needs: its source and destination sets pair up in order (RFC 4315 3).
    Raises :class:`SequenceSetError` on an empty input or a number out of range.
    """
    numbers = sorted(set(uids)) if sort else list(uids)
    if not numbers:
        raise SequenceSetError("empty uid set")
    if any(not 0 < n <= MAX_NUMBER for n in numbers):
        raise SequenceSetError("uid out of range")
    return SequenceSet(tuple(_runs(numbers))).format()
