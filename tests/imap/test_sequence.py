"""Sequence sets: parsing, resolution against sequence numbers and UIDs, compact formatting.

The resolution rules (strict FETCH numbers, UID ranges past the end, empty mailbox)
were checked against Dovecot 2.3.19.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yimaporc.imap._sequence import (
    MAX_NUMBER,
    SequenceSet,
    SequenceSetError,
    format_uid_set,
    parse_sequence_set,
)


def test_parse_and_format_round_trip() -> None:
    """``1:3,5,7:*`` keeps its ranges (``*`` as None) and formats back unchanged."""
    s = parse_sequence_set(b"1:3,5,7:*")
    assert s.ranges == ((1, 3), (5, 5), (7, None))
    assert s.format() == b"1:3,5,7:*"
    assert s.uses_star()
    assert not SequenceSet.parse("4:2").uses_star()


@pytest.mark.parametrize(
    "text", [b"", b"0", b"1:0", b"a", b"1,", b",1", b"1::2", b"1:2:3", b"01", b"-1", b"4294967296"]
)
def test_parse_rejects(text: bytes) -> None:
    """Zero, leading zeros, empty items, bad ranges and 33-bit numbers are errors."""
    with pytest.raises(SequenceSetError):
        SequenceSet.parse(text)


def test_largest_number_accepted() -> None:
    """4294967295 is the largest nz-number and parses."""
    assert SequenceSet.parse(b"1:4294967295").ranges == ((1, MAX_NUMBER),)


def test_resolve_seqs() -> None:
    """Reversed ranges, ``*`` as the count and duplicates merge into sorted numbers."""
    assert SequenceSet.parse(b"5:3,1,*,4").resolve_seqs(6) == [1, 3, 4, 5, 6]
    assert SequenceSet.parse(b"*:2").resolve_seqs(3) == [2, 3]


def test_resolve_seqs_strict_and_lenient() -> None:
    """Past the count: FETCH-style strict resolution raises, SEARCH-style drops (Dovecot)."""
    s = SequenceSet.parse(b"5:9")
    with pytest.raises(SequenceSetError):
        s.resolve_seqs(6)
    assert s.resolve_seqs(6, strict=False) == [5, 6]
    with pytest.raises(SequenceSetError):
        SequenceSet.parse(b"9:*").resolve_seqs(6)


def test_empty_mailbox() -> None:
    """With no messages: strict sequence numbers are an error, UIDs and SEARCH give nothing."""
    s = SequenceSet.parse(b"1:*")
    with pytest.raises(SequenceSetError):
        s.resolve_seqs(0)
    assert s.resolve_seqs(0, strict=False) == []
    assert s.resolve_uids([]) == []
    assert not s.contains(1, 0)


def test_resolve_uids() -> None:
    """UIDs not in the mailbox are skipped; ``n:*`` past the end holds the highest UID."""
    uids = [3, 7, 8, 12]
    assert SequenceSet.parse(b"1:7").resolve_uids(uids) == [3, 7]
    assert SequenceSet.parse(b"900:*").resolve_uids(uids) == [12]
    assert SequenceSet.parse(b"*").resolve_uids(uids) == [12]
    assert SequenceSet.parse(b"9:10").resolve_uids(uids) == []
    assert SequenceSet.parse(b"8,3").resolve_uid_seqs(uids) == [1, 3]


def test_huge_range_is_cheap() -> None:
    """``1:4294967295`` resolves against a small mailbox without expanding the range."""
    s = SequenceSet.parse(b"1:4294967295")
    assert s.resolve_uids([5, 9]) == [5, 9]
    assert s.resolve_seqs(2, strict=False) == [1, 2]


def test_format_uid_set() -> None:
    """UID sets compact into runs; unsorted input keeps its order for COPYUID pairs."""
    assert format_uid_set([5, 1, 2, 3, 9, 10]) == b"1:3,5,9:10"
    assert format_uid_set([304, 319, 320]) == b"304,319:320"
    assert format_uid_set([3, 4, 1, 2], sort=False) == b"3:4,1:2"
    with pytest.raises(SequenceSetError):
        format_uid_set([])
    with pytest.raises(SequenceSetError):
        format_uid_set([0])


_numbers = st.lists(st.integers(1, 60), max_size=30)
_ends = st.one_of(st.none(), st.integers(1, 60))


@st.composite
def _sets(draw: st.DrawFn) -> SequenceSet:
    ranges = draw(st.lists(st.tuples(_ends, _ends), min_size=1, max_size=6))
    return SequenceSet(tuple(ranges))


def _naive(s: SequenceSet, largest: int) -> set[int]:
    out: set[int] = set()
    for a, b in s.ranges:
        x = largest if a is None else a
        y = largest if b is None else b
        out |= set(range(min(x, y), max(x, y) + 1))
    return out


@given(_numbers)
def test_format_parses_back(numbers: list[int]) -> None:
    """A formatted UID set parses and resolves to exactly the numbers formatted."""
    if not numbers:
        return
    s = SequenceSet.parse(format_uid_set(numbers))
    assert s.resolve_uids(sorted(set(numbers))) == sorted(set(numbers))
    assert _naive(s, max(numbers)) == set(numbers)


@given(_sets())
def test_format_then_parse_is_identity(s: SequenceSet) -> None:
    """Any set formats to text that parses back to the same ranges."""
    assert SequenceSet.parse(s.format()) == s


@given(_sets(), st.lists(st.integers(1, 80), unique=True, max_size=25))
def test_uid_resolution_matches_naive(s: SequenceSet, uids: list[int]) -> None:
    """UID resolution equals the set semantics with ``*`` = highest UID, on any UID list."""
    uids.sort()
    expected = [u for u in uids if uids and u in _naive(s, uids[-1])]
    assert s.resolve_uids(uids) == expected
    assert [u for u in uids if s.contains(u, uids[-1])] == expected


@given(_sets(), st.integers(0, 70))
def test_seq_resolution_matches_naive(s: SequenceSet, count: int) -> None:
    """Lenient resolution is the naive set clipped to 1..count; strict raises iff it clips."""
    naive = _naive(s, count) if count else set()
    assert s.resolve_seqs(count, strict=False) == sorted(n for n in naive if n <= count)
    if count and max(naive) <= count:
        assert s.resolve_seqs(count) == sorted(naive)
    else:
        with pytest.raises(SequenceSetError):
            s.resolve_seqs(count)
