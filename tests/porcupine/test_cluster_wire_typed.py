"""The typed control-plane arguments of the Porcupine cluster commands (HintList,
BucketList, HolderList, RecordList): round trips through an AMP box, and garbage is a
MalformedAmpBox or dropped items, never another exception."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.protocols import amp

from yimaporc.porcupine._cluster_commands import Hints, HintsRequest, ProfilePut, UidHolders
from yimaporc.porcupine._cluster_wire import BucketList, HintList, HolderList, Json, RecordList
from yimaporc.porcupine.reconstruct import BucketHint, UserHint
from yimaporc.porcupine.usermap import N_BUCKETS, bucket_of

USERS = st.integers(0, 5000).map(lambda i: f"user{i}@example.org")
NODES = st.sampled_from(["n1", "n2", "n3", "node-4"])
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=30,
)


@st.composite
def bucket_hints(draw: Any) -> BucketHint:
    user = draw(USERS)
    bucket = bucket_of(user)
    mates = [u for u in draw(st.lists(USERS, max_size=6)) if bucket_of(u) == bucket]
    users = tuple(
        UserHint(u, draw(st.booleans()), draw(st.integers(1, 2**31)), draw(st.integers(0, 50)))
        for u in dict.fromkeys([user, *mates])
    )
    holders = tuple((u.user, draw(NODES)) for u in users if draw(st.booleans()))
    return BucketHint(bucket, draw(st.integers(0, 2**31)), users, (), draw(st.integers(1, 2**40)), holders)  # fmt: skip


def through_box(command: type[amp.Command], **kw: Any) -> dict[str, Any]:
    """``kw`` made into a box (bytes) by ``command`` and parsed back by it."""
    box = command.makeArguments(kw, None)
    assert all(isinstance(v, bytes) for v in box.values())
    return dict(command.parseArguments(box, None))


def parse_raw(command: type[amp.Command], name: str, value: Any, **kw: Any) -> Any:
    """The value a typed callee gets for argument ``name`` when a peer sent ``value``
    as plain JSON (raises MalformedAmpBox for a bad box)."""

    class Raw(amp.Command):
        arguments = [(a, Json() if a == name.encode() else arg) for a, arg in command.arguments]

    box = Raw.makeArguments({name: value, **kw}, None)
    return command.parseArguments(box, None)[name]


@settings(max_examples=60, deadline=None)
@given(st.lists(bucket_hints(), max_size=4), st.integers(0, 2**31))
def test_hints_round_trip_through_a_box(hints: list[BucketHint], view: int) -> None:
    """Typed hints in, the same typed hints out (the JSON on the wire is BucketHint.encode)."""
    got = through_box(Hints, sender="n1", hints=hints, view=view)
    assert got["hints"] == hints and got["view"] == view
    assert HintList.decode(HintList.encode(hints)) == hints


@settings(deadline=None)  # examples from the profile (fuzz: 1000)
@given(JSON)
@example([[False, float("inf"), None]])  # JSON's Infinity as the epoch: int() overflows
@example([[1, 2, [["u", True, float("-inf")]], [], float("inf")]])
def test_hint_garbage_is_a_malformed_box_or_dropped_entries(junk: Any) -> None:
    """Any JSON as ``hints``: a MalformedAmpBox (not a list), else only valid hints."""
    try:
        got = parse_raw(Hints, "hints", junk, sender="n1")
    except amp.MalformedAmpBox:
        assert not isinstance(junk, list)
        return
    assert isinstance(junk, list)
    assert all(isinstance(h, BucketHint) and 0 <= h.bucket < N_BUCKETS for h in got)
    assert all(bucket_of(u.user) == h.bucket for h in got for u in h.users)


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, N_BUCKETS - 1), max_size=40))
def test_buckets_round_trip_sorted_without_repeats(buckets: set[int]) -> None:
    """Bucket numbers in: the same set out, sorted; repeats on the wire are merged."""
    assert through_box(HintsRequest, sender="n1", buckets=sorted(buckets))["buckets"] == tuple(sorted(buckets))  # fmt: skip
    assert BucketList.decode(BucketList.encode([*buckets, *buckets])) == tuple(sorted(buckets))


@settings(deadline=None)  # examples from the profile (fuzz: 1000)
@given(JSON)
def test_bucket_garbage_is_a_malformed_box(junk: Any) -> None:
    """Anything but a short list of in-range integers is refused as a whole."""
    ok = (
        isinstance(junk, list)
        and len(junk) <= N_BUCKETS
        and all(type(b) is int and 0 <= b < N_BUCKETS for b in junk)
    )
    try:
        got = parse_raw(HintsRequest, "buckets", junk, sender="n1")
    except amp.MalformedAmpBox:
        assert not ok
        return
    assert ok and got == tuple(sorted(set(junk)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(USERS, NODES), max_size=10))
def test_holders_round_trip(pairs: list[tuple[str, str]]) -> None:
    """(user, node) pairs in, the same pairs out."""
    got = through_box(UidHolders, bucket=3, fence="f", holders=pairs)
    assert got["holders"] == tuple(pairs) and HolderList.decode(HolderList.encode(pairs)) == tuple(pairs)  # fmt: skip


@settings(deadline=None)  # examples from the profile (fuzz: 1000)
@given(JSON)
def test_holder_garbage_is_a_malformed_box_or_dropped_pairs(junk: Any) -> None:
    """Not a list: refused; a list: only its [str, str] items kept."""
    try:
        got = parse_raw(UidHolders, "holders", junk, bucket=1, fence="f")
    except amp.MalformedAmpBox:
        assert not isinstance(junk, list)
        return
    assert isinstance(junk, list) and all(isinstance(u, str) and isinstance(n, str) for u, n in got)  # fmt: skip


RECORDS = st.tuples(
    USERS,
    st.text(min_size=1, max_size=20),
    st.integers(1, 16),
    st.floats(0, 2e9),
    st.floats(0, 2e9),
    st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(RECORDS, max_size=6))
def test_profile_records_round_trip(records: list[Any]) -> None:
    """Profile records in, the same records out (as tuples)."""
    assert through_box(ProfilePut, records=records)["records"] == records
    assert RecordList.decode(RecordList.encode(records)) == records


@settings(deadline=None)  # examples from the profile (fuzz: 1000)
@given(JSON)
def test_record_garbage_is_a_malformed_box_or_dropped_records(junk: Any) -> None:
    """Not a list: refused; a list: only well-formed records with a valid address kept."""
    try:
        got = parse_raw(ProfilePut, "records", junk)
    except amp.MalformedAmpBox:
        assert not isinstance(junk, list)
        return
    assert isinstance(junk, list)
    for address, password_hash, replicas, created, updated, deleted in got:
        assert "@" in address and isinstance(password_hash, str) and isinstance(replicas, int)
        assert isinstance(created, float) and isinstance(updated, float) and isinstance(deleted, bool)  # fmt: skip
