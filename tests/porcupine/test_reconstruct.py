"""The sans-IO reconstruction core (porcupine/reconstruct.py): the hint codec, the
actions of install/receive/tick, the majority write, the store-side admission rule,
and the two holes mailsim found (issue 14 item 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from mailtest_helpers import ImmediateReactor, SyncPool, result_of
from twisted.internet.defer import Deferred, succeed

from yimaporc.cluster.buckets import BucketMap
from yimaporc.porcupine.cluster import ClusterUserManager
from yimaporc.porcupine.profiledb import ProfileDB
from yimaporc.porcupine.reconstruct import (
    ALLOCATION_TTL,
    HORIZON_AGE,
    LAPSED_PER_USER,
    MAX_OUTSTANDING,
    PLAN_TTL,
    READ_LEASE,
    BucketHint,
    Horizon,
    MajorityWrite,
    MalformedHint,
    NeedMark,
    Number,
    PullHints,
    PushProfiles,
    Reconstruction,
    SendHints,
    Settled,
    Taken,
    UserHint,
    admit_fenced,
    decode_hints,
)
from yimaporc.porcupine.softstate import bucket_of
from yimaporc.porcupine.values import PENDING
from yimaporc.testing.hints import apply_hint

NB = 8
USERS = [f"p{i * 2654435761 % 1000003}@example.org" for i in range(200)]


def users_of(bucket: int) -> list[str]:
    return [u for u in USERS if bucket_of(u, NB) == bucket]


def all_to(owner: str, epoch: int) -> BucketMap:
    return BucketMap((owner,) * NB, (epoch,) * NB)


@st.composite
def hints(draw: st.DrawFn) -> BucketHint:
    b = draw(st.integers(0, NB - 1))
    mine = users_of(b)
    users = tuple(
        UserHint(u, draw(st.booleans()), draw(st.integers(1, 2**40)), draw(st.integers(0, 999)))
        for u in draw(st.lists(st.sampled_from(mine), unique=True))
        if mine
    )
    holders = tuple(
        (u, draw(st.sampled_from(["n1", "n2", "n3"])))
        for u in draw(st.lists(st.sampled_from(mine), unique=True))
        if mine
    )
    return BucketHint(
        b, draw(st.integers(0, 2**40)), users, (), draw(st.integers(1, 2**40)), holders
    )


@given(hints())
def test_bucket_hint_round_trips_through_its_json_form(h: BucketHint) -> None:
    """encode/decode is the identity on well-formed hints (the one codec of porcupine.hints)."""
    assert BucketHint.decode(h.encode(), NB) == h


def test_bucket_hint_decode_rejects_bad_heads_and_skips_bad_items() -> None:
    """A bad head is MalformedHint (dropped by decode_hints); bad user items, users of
    another bucket and bad holder pairs are skipped; an older peer's short entry reads
    with the defaults."""
    for junk in (None, [], [1], ["x", 1, []], [NB, 1, []], [0, 1, "users"], {"a": 1}):
        try:
            BucketHint.decode(junk, NB)
        except MalformedHint:
            continue
        raise AssertionError(f"accepted {junk!r}")
    (u,) = users_of(3)[:1]
    other = users_of(4)[0]
    h = BucketHint.decode([3, 7, [[u, 1, "9"], [other, True, 5], [None], 5], [], "x", [[u]]], NB)
    assert h == BucketHint(3, 7, (UserHint(u, True, 9, 0),), (), 1, ())
    assert decode_hints([[3, 7, []], "junk", [99, 1, []]], NB) == [BucketHint(3, 7)]


def test_majority_write_asks_a_majority_then_spares_and_decides() -> None:
    """Ourselves and the next members after us first; a refusal brings in a spare; True
    at a majority, False once it cannot be reached."""
    w = MajorityWrite("n3", ["n1", "n2", "n3", "n4", "n5"], ["n1", "n2", "n3", "n4", "n5"])
    assert w.first == ("n3", "n4", "n5")
    assert w.answer(True) is None and w.answer(False) == "n1"
    assert w.result is None and w.answer(True) is None and w.answer(True) is None
    assert w.result is True
    lost = MajorityWrite("n1", ["n1", "n2"], ["n1", "n2", "n3", "n4", "n5"])
    assert lost.first == ("n1", "n2")
    lost.answer(True)
    lost.answer(True)
    assert lost.result is False, "two of five known is no majority"


def test_majority_write_hedges_past_slow_members_at_most_hedge_max() -> None:
    """Regression (test_slow_node_gets_less): a vote still undecided at HEDGE_DELAY asks
    one spare per missing answer (at most HEDGE_MAX), so a slow disk among the first
    asked does not fail every write that named it; a decided vote asks none."""
    five = ["n1", "n2", "n3", "n4", "n5"]
    w = MajorityWrite("n3", five, five)
    w.answer(True)
    w.answer(True)  # n3, n4 answered; n5 is slow
    assert w.hedge() == ["n1"]
    assert w.answer(True) is None and w.result is True, "the spare completes the majority"
    assert w.hedge() == []
    nine = [f"n{i}" for i in range(1, 10)]
    slow = MajorityWrite("n1", nine, nine)
    assert len(slow.first) == 5 and slow.hedge() == ["n6", "n7"]
    for _ in range(5):
        slow.answer(True)
    assert slow.result is True, "a slow node's late answer still counts"


def test_pending_note_puts_the_node_in_the_fragment_list() -> None:
    """Regression (measure() under load): a node reminding the manager of unnumbered mail
    holds the user's mail, so it is in the fragment list even when the delivery's own
    note never came (a store that timed out after reaching the node)."""
    c = Reconstruction("n1", NB)
    c.install(all_to("n1", 1), ["n1", "n2"], view=1, now=0.0)
    user = "someone@example.org"
    assert "n2" not in c.state.fragment_list(user)
    c.note_pending(user, "n2", now=0.0)
    assert "n2" in c.state.fragment_list(user) and c.pending[user] == {"n2": 1}


def test_install_returns_the_sends_pulls_and_profile_push() -> None:
    """Boot: hints for every owned bucket.  A node joining: the lowest-id old member
    pushes profiles; hints go for fresh buckets and those of managers that came.  An
    away manager pulls its unrestamped buckets from every member."""
    c = Reconstruction("n1", NB)
    out = c.install(all_to("n1", 1), ["n1"], view=1, now=0.0)
    assert SendHints(all_to("n1", 1), tuple(range(NB)), 1) in out
    two = BucketMap(("n1", "n2") * (NB // 2), (1, 2) * (NB // 2))
    out = c.install(two, ["n1", "n2"], view=2, now=0.0)
    assert PushProfiles(("n2",)) in out
    (send,) = [a for a in out if isinstance(a, SendHints)]
    assert send.buckets == (1, 3, 5, 7), "n2's buckets: fresh; n1 kept its own at epoch 1"
    away = c.install(two, ["n1", "n2"], view=5, away=True, now=0.0)
    assert PullHints("n2", tuple(b for b in range(NB) if b % 2 == 0), 5) in away


def test_settle_timeout_leaves_the_silent_member_missing() -> None:
    """A fresh bucket settles when every member's hint came, or at the deadline, when
    the silent members stay ``missing`` (no numbering) until their hint arrives."""
    c = Reconstruction("n1", NB, settle_timeout=2.0)
    c.prev_live = {"n1"}
    c.install(all_to("n1", 3), ["n1", "n2"], view=3, now=10.0)
    assert c.next_deadline() == 12.0 and not c.may_number(USERS[0], True)
    for b in range(NB):
        c.receive("n1", BucketHint(b, 3), 3, now=10.5)
    assert Settled(0) in c.receive("n2", BucketHint(0, 3), 3, now=10.6)
    out = c.tick(12.0, lease=True)
    assert Settled(1) in out and c.missing[1] == {"n2"}
    c.receive("n2", BucketHint(1, 3), 3, now=12.5)
    assert 1 not in c.missing


def test_holder_back_in_view_stays_away_until_its_hint() -> None:
    """Regression (mailsim bridge seed): a holder that left and came back is still away
    (reads refused, not shown smaller) until its hint for the bucket arrives, and the
    manager pulls that hint (the holder may see no change and send none)."""
    c = Reconstruction("n1", NB)
    user = users_of(2)[0]
    c.install(all_to("n1", 1), ["n1", "n2", "n3"], view=1, now=0.0)
    for n in ("n1", "n2", "n3"):
        c.receive(n, BucketHint(2, 1, (UserHint(user, n == "n2", 5),)), 1, now=0.0)
    assert c.state.fragment_list(user) == {"n2"}
    c.install(all_to("n1", 1), ["n1", "n3"], view=2, now=1.0)
    assert c.state.away_list(user) == {"n2"}
    out = c.install(all_to("n1", 1), ["n1", "n2", "n3"], view=3, now=2.0)
    assert c.state.away_list(user) == {"n2"}, "back, but what it holds is unknown yet"
    assert PullHints("n2", (2,), 3) in out
    c.receive("n2", BucketHint(2, 1, (UserHint(user, True, 9),)), 3, now=2.1)
    assert c.state.away_list(user) == set() and c.state.fragment_list(user) == {"n2"}


def test_allocation_older_than_the_ttl_is_stored_unnumbered() -> None:
    """Regression (mailsim pause seeds): a plan whose store lands later than PLAN_TTL
    (a proxy paused between plan and store) is stored unnumbered, not under a UID
    below ones the manager handed out and clients saw meanwhile."""
    assert admit_fenced(7, "n1@3", "n1@3", True, 7, age=PLAN_TTL)
    assert not admit_fenced(7, "n1@3", "n1@3", True, 7, age=PLAN_TTL + 0.01)
    assert not admit_fenced(7, "n1@3", "n2@4", True, 7)
    assert not admit_fenced(6, "n1@3", "n1@3", True, 7)
    assert admit_fenced(6, "", None, False, 7), "unfenced (replicated, APPEND): as before"


def test_numbering_waits_for_a_majority_holder_record(tmp_path: Path) -> None:
    """Regression (mailsim partition seeds): a manager numbers a node's unnumbered mail
    only once a majority recorded that node as a holder; without that record (cut
    off) it numbers nothing, so a later manager can never show higher UIDs first."""
    clock = ImmediateReactor()
    profiles = ProfileDB(clock, SyncPool(), tmp_path / "p.sqlite", clock.seconds)  # type: ignore[arg-type]
    um = ClusterUserManager("n1", profiles, clock)
    um.known = {"n1", "n2", "n3"}
    user = next(u for u in (f"v{i}@example.org" for i in range(99)))
    b = bucket_of(user, 256)
    um.install(BucketMap(("n1",) * 256, (2,) * 256), ["n1", "n2", "n3"], view=2)
    for n in ("n1", "n2", "n3"):
        apply_hint(um, n, [b, 2, [[user, n == "n2", 1, int(n == "n2")]], [], 1, []])
    numbered: list[tuple[Any, ...]] = []
    accept = {"ok": False}

    def holders_on(node: str, bucket: int, fence: str, pairs: Any) -> Deferred[bool]:
        return succeed(accept["ok"])

    def number_on(*args: Any) -> Deferred[tuple[int, int, int]]:
        numbered.append(args)
        return succeed((1, 0, args[3] + 1))

    um.holders_on, um.number_on = holders_on, number_on
    um.mark_on = lambda node, bucket, fence, mark, seen=None: succeed(True)
    um.note_pending(user, "n2")
    clock.advance(0.0)
    assert numbered == [] and um.pending[user] == {"n2": 1}
    accept["ok"] = True
    clock.advance(um.number_retry)
    assert [a[0] for a in numbered] == ["n2"] and user not in um.pending
    assert result_of(um.fragments(user)) == ("n2",)


def test_members_coming_back_make_our_buckets_settle_again() -> None:
    """Regression (mailsim seed 37, bridge then heal): a merge gave a bucket back to its
    old manager at its old epoch (not fresh), while the other side had numbered in it
    above the old mark; numbering now waits for the returning members' hints (their
    marks) instead of reusing those UIDs."""
    c = Reconstruction("n0", NB)
    user = users_of(5)[0]
    c.known = {"n0", "n1", "n2"}
    c.install(all_to("n0", 4), ["n0", "n1", "n2"], view=1, now=0.0)
    for n in ("n0", "n1", "n2"):
        c.receive(n, BucketHint(5, 4, (), (), 10), 1, now=0.0)
    c.granted[5] = 100
    c.install(all_to("n0", 4), ["n0", "n1"], view=2, now=1.0)
    assert c.may_number(user, True), "kept its bucket: no settling"
    c.install(all_to("n0", 4), ["n0", "n1", "n2"], view=3, now=2.0)
    assert 5 in c.settling and not c.may_number(user, True)
    c.receive("n2", BucketHint(5, 4, (), (), 300), 3, now=2.1)
    assert c.may_number(user, True)
    taken = c.take(user, 1, lease=True)
    assert not isinstance(taken, int) and getattr(taken, "target", 0) > 300, taken


def numbering_core(user: str) -> Reconstruction:
    """A settled manager of ``user``'s bucket with a majority and a granted mark."""
    c = Reconstruction("n0", NB)
    c.known = {"n0", "n1", "n2"}
    b = bucket_of(user, NB)
    c.install(all_to("n0", 4), ["n0", "n1", "n2"], view=1, now=0.0)
    for n in ("n0", "n1", "n2"):
        c.receive(n, BucketHint(b, 4, (UserHint(user, True, 5),), (), 1), 1, now=0.0)
    c.granted[b] = 1000
    c.read_until = float("inf")  # a majority keeps confirming our view
    return c


def test_concurrent_deliveries_show_nothing_above_a_uid_still_in_flight() -> None:
    """Regression (mailsim seed 2, bug 3): UIDs 9 and 10 handed to two deliveries, 10
    landed first on another node; a reader cut at the horizon shows neither 10 nor a
    UIDNEXT above 9 until 9 is found (or expires), so 9 never appears below 10."""
    user = users_of(3)[0]
    c = numbering_core(user)
    a = c.take(user, 1, lease=True, now=1.0)
    b = c.take(user, 1, lease=True, now=1.01)
    assert isinstance(a, Taken) and isinstance(b, Taken) and b.first == a.first + 1
    h = c.horizon(user, now=1.02)
    assert h.outstanding == ((a.first, a.first + 1), (b.first, b.first + 1))
    assert h.next == b.first + 1
    # Only b's store landed: the reader finds b, and shows nothing from a.first up.
    assert h.bound([1, 2, b.first]) == a.first
    # Both landed: everything found below the counter is shown.
    assert h.bound([a.first, b.first]) == b.first + 1
    # A UID handed out after this answer (found by the reader) waits for the next one.
    late = c.take(user, 1, lease=True, now=1.03)
    assert isinstance(late, Taken)
    assert h.bound([a.first, b.first, late.first]) == late.first


def test_allocations_leave_the_horizon_when_confirmed_numbered_or_expired() -> None:
    """An allocation holds the horizon back until confirm(), a numbering's answer
    (numbered or not, the block is settled), or ALLOCATION_TTL (no store admits it
    numbered any later); a bucket that moves away drops its users' allocations."""
    user = users_of(3)[0]
    c = numbering_core(user)
    a = c.take(user, 1, lease=True, now=1.0)
    b = c.take(user, 3, lease=True, now=1.0, numbering=True)
    assert isinstance(a, Taken) and isinstance(b, Taken)
    c.confirm(user, a.first)
    assert c.horizon(user, 1.1).outstanding == ((b.first, b.first + 3),)
    c.numbering.add((user, "n1"))
    c.number_done(user, "n1", 1, 0, b.first + 1, now=1.2, first=b.first)
    assert c.horizon(user, 1.2).outstanding == ()
    d = c.take(user, 1, lease=True, now=2.0)
    assert isinstance(d, Taken)
    assert c.horizon(user, 2.0 + ALLOCATION_TTL).outstanding == ((d.first, d.first + 1),)
    assert c.horizon(user, 2.0 + ALLOCATION_TTL + 0.01).outstanding == ()
    e = c.take(user, 1, lease=True, now=3.0)
    assert isinstance(e, Taken) and c.allocated
    c.install(all_to("n1", 5), ["n0", "n1", "n2"], view=2, now=3.1)
    assert not c.allocated and c.horizon(user, 3.1).outstanding == ()


def test_a_dead_coordinators_allocation_holds_newer_mail_only_until_it_expires() -> None:
    """Regression (CI, integration test_sigkill_during_deliveries): a holder that went
    away holding an unconfirmed allocation (a replicated delivery's coordinator,
    SIGKILLed) used to keep the allocation outstanding until that node came back (at
    most 300 s), hiding every newer *acknowledged* message on the survivors.  Now it
    expires as any other; the lapse is remembered, so a holder note that comes after
    it (the coordinator was paused, not dead) is refused: no 250 under that UID."""
    user = users_of(3)[0]
    c = numbering_core(user)
    a = c.take(user, 1, lease=True, now=1.0)
    b = c.take(user, 1, lease=True, now=1.0)
    assert isinstance(a, Taken) and isinstance(b, Taken)
    c.state.note_holder(user, "n2", ["n0", "n1"])  # n2 killed mid-delivery
    assert c.horizon(user, 1.0 + ALLOCATION_TTL).outstanding == (
        (a.first, a.first + 1),
        (b.first, b.first + 1),
    ), "held until the expiry"
    assert c.confirm(user, b.first), "b's note in time: its 250 stands"
    later = 1.0 + ALLOCATION_TTL + 0.01
    assert c.horizon(user, later).outstanding == (), "n2 still away: no longer held"
    assert not c.confirm(user, a.first), "a note after the lapse: 451"
    assert not c.confirm(user, a.first), "and again on a retry"
    assert c.lapsed_notes == 2
    # Bounded memory: only the newest LAPSED_PER_USER lapses of a user are kept.
    for i in range(LAPSED_PER_USER + 5):
        got = c.take(user, 1, lease=True, now=later)
        assert isinstance(got, Taken)
        c.horizon(user, later + ALLOCATION_TTL + 0.01 + i)
    assert len(c.lapsed[user]) == LAPSED_PER_USER
    assert c.confirm(user, a.first), "forgotten: treated as in time"


@given(
    st.lists(st.tuples(st.integers(1, 10_000), st.integers(1, 8)), max_size=40),
    st.integers(1, 20_000),
)
def test_horizon_round_trips_through_its_wire_form(pairs: list[tuple[int, int]], top: int) -> None:
    """encode/decode is the identity on a horizon (the ``horizon`` of porcupine.um.fragments)."""
    h = Horizon(tuple(sorted((f, f + n) for f, n in pairs)), top)
    assert Horizon.decode(h.encode()) == h


def test_horizon_decode_rejects_junk_and_collapses_conservatively() -> None:
    """Junk decodes to None (the reader then shows what it finds, as from an older
    manager); more than MAX_OUTSTANDING ranges collapse into one range up to the
    counter, so the bound can only go down, never up."""
    for junk in (
        None,
        [],
        [1, 2],
        ["x"],
        [1, "a", 3],
        {"a": 1},
        [float("inf")],
        [1, 2, float("nan")],
    ):
        assert Horizon.decode(junk) is None
    many = [(i * 2, i * 2 + 1) for i in range(1, MAX_OUTSTANDING + 50)]
    top = many[-1][1] + 10
    h = Horizon.decode([top, *(x for r in many for x in r)])
    assert h is not None and len(h.outstanding) == MAX_OUTSTANDING
    found = [f for f, _ in many[: MAX_OUTSTANDING + 10]]
    assert h.bound(found) <= Horizon(tuple(many), top).bound(found)


def test_a_fragment_node_without_a_majority_record_is_unrecorded() -> None:
    """Regression (mailsim seed 18, clean partition before failure detection): a node
    in the fragment list only by a delivery's note (its holder record failed: no
    majority on this side) is ``unrecorded``, so the next delivery records it before a
    numbered store there instead of numbering mail the other side's manager cannot
    know of; recorded holders (from hints, or confirmed in this tenure) are not."""
    user = users_of(3)[0]
    c = numbering_core(user)
    fence = c.fence(bucket_of(user, NB))
    c.receive("n1", BucketHint(3, 4, (UserHint(user, True, 5),), (), 1, ((user, "n1"),)), 1)
    assert c.add_fragment(user, "n2")
    assert c.record_holder(user, "n2", lease=True) == (3, fence)
    c.holder_recorded(user, "n2", fence, ok=False)  # no majority answered
    assert c.state.fragment_list(user) >= {"n1", "n2"}
    assert c.unrecorded(user) == {"n0", "n2"}  # n0: has_mail in its own hint, no record
    assert c.record_holder(user, "n2", lease=True) == (3, fence)
    c.holder_recorded(user, "n2", fence, ok=True)
    assert c.unrecorded(user) == {"n0"}


def test_a_recorded_holder_leaving_before_its_hint_is_away() -> None:
    """Regression (mailsim seed 17): a hint named n1 as a recorded holder while n1 was
    a member, n1's own hint never came (the bucket settled missing it, reads refused),
    then n1 left the view: it must be away (reads refused), not forgotten with the
    missing entry (reads then listed the mailbox without n1's mail as complete)."""
    user = users_of(3)[0]
    c = Reconstruction("n2", NB, settle_timeout=2.0)
    c.known = {"n0", "n1", "n2", "n3", "n4"}
    c.install(all_to("n2", 7), ["n0", "n1", "n2", "n4"], view=7, now=0.0)
    for n in ("n0", "n2", "n4"):
        c.receive(n, BucketHint(3, 7, (), (), 1, ((user, "n1"),)), 7, now=0.1)
    c.tick(2.5, lease=True)
    assert not c.certain(user), "n1's hint is missing"
    c.install(all_to("n2", 7), ["n0", "n2", "n4"], view=8, now=3.0)
    assert c.certain(user)
    assert c.state.away_list(user) == {"n1"}


def test_a_kept_bucket_takes_a_fresh_mark_after_every_view_change() -> None:
    """Regression (mailsim seed 475, partition then bridge): a merge handed a bucket
    back to its old manager at its old entry, with no member new to its view, while
    the other side's manager had numbered up to 517 under a mark of 774; the old
    manager went on in its granted block (UID 517 twice). Every view change now ends
    the granted block, and the mark write's answers raise the floor to the highest
    mark the asked nodes had."""
    user = users_of(3)[0]
    c = numbering_core(user)
    assert isinstance(c.take(user, 1, lease=True, now=1.0), Taken)
    c.install(all_to("n0", 4), ["n0", "n1", "n2"], view=9, now=2.0)
    assert c.may_number(user, True), "kept bucket, same members: no settling"
    need = c.take(user, 1, lease=True, now=2.1)
    assert isinstance(need, NeedMark), need
    assert c.mark_write(need)
    c.mark_done(need, granted=True, seen=774)
    again = c.take(user, 1, lease=True, now=2.2)
    assert isinstance(again, NeedMark) and again.target > 774, "the target was below 774"
    assert c.mark_write(again)
    c.mark_done(again, granted=True, seen=774)
    taken = c.take(user, 1, lease=True, now=2.3)
    assert isinstance(taken, Taken) and taken.first >= 774, taken


def _settled_core(me: str, members: list[str], view: int, now: float) -> Reconstruction:
    c = Reconstruction(me, NB)
    c.prev_live = set(members)
    c.known |= set(members)
    c.install(all_to(me, view), members, view=view, now=now)
    for b in range(NB):
        for n in members:
            c.receive(n, BucketHint(b, view), view, now=now)
    return c


def test_read_lease_certain_only_while_a_majority_confirmed_our_view() -> None:
    """A manager with a majority view and every hint in is certain only while a
    majority confirmed its view less than READ_LEASE ago (counted from asking, with
    room for the reader's listing): cut off before failure detection, it stops."""
    c = _settled_core("n1", ["n1", "n2", "n3"], 4, now=10.0)
    user = USERS[0]
    assert c.certain(user) and not c.certain(user, now=10.0), "no lease yet"
    c.read_granted(c.view_id(), asked_at=10.0)
    assert c.certain(user, now=10.5)
    assert not c.certain(user, now=10.0 + READ_LEASE - HORIZON_AGE + 0.01)
    c.read_granted((3, ("n1", "n2", "n3")), asked_at=11.0)  # an answer for an old view
    assert not c.certain(user, now=11.0)
    alone = _settled_core("n9", ["n9"], 1, now=0.0)
    assert alone.certain(users_of(0)[0], now=50.0), "alone in its known cluster: no lease"


def test_no_uids_without_a_majority_confirmed_read_lease() -> None:
    """Regression (chaos seed 56): a manager cut off by a partition and then a bridge
    kept its granted mark and numbered 8 waiting messages under it after the majority
    had raised the bucket's mark twice without it; readers had shown higher UIDs.  A
    manager hands out UIDs (deliveries and numbering) only while a majority confirmed
    its view; with the lease lapsed it answers PENDING and numbers nothing."""
    user = USERS[0]
    c = _settled_core("n1", ["n1", "n2", "n3"], 4, now=10.0)
    c.granted[c.bucket(user)] = 1000
    c.pending[user] = {"n2": 3}
    assert c.may_number(user, True), "a majority view, settled, the pause lease holds"
    assert c.take(user, 1, lease=True, now=10.0) == PENDING, "no read lease yet"
    c.kick(10.0)
    assert not [a for a in c.tick(10.0, lease=True) if isinstance(a, Number)]
    c.read_granted(c.view_id(), asked_at=10.0)
    assert isinstance(c.take(user, 1, lease=True, now=10.5), Taken)
    c.kick(10.5)
    assert [a for a in c.tick(10.5, lease=True) if isinstance(a, Number)]
    lapsed = 10.0 + READ_LEASE + 0.01
    assert c.take(user, 1, lease=True, now=lapsed) == PENDING
    c.numbering.clear()
    c.kick(lapsed)
    assert not [a for a in c.tick(lapsed, lease=True) if isinstance(a, Number)]
    off = _settled_core("n1", ["n1", "n2", "n3"], 4, now=10.0)
    off.read_leases = False  # a shell without the renewal loop (MailCluster unstarted)
    off.granted[off.bucket(user)] = 1000
    assert isinstance(off.take(user, 1, lease=True, now=10.0), Taken)


def test_a_node_that_confirmed_a_read_lease_records_no_mark_for_another_view() -> None:
    """A node confirms only its own view (epoch and members: both sides of a
    partition may commit one epoch); having confirmed, it records no UID mark for a
    map of another view, for a bucket another node managed there, until READ_LEASE
    after that, nor for READ_LEASE after a boot."""
    half = BucketMap(("n1", "n2") * (NB // 2), (4,) * NB)
    y = Reconstruction("n2", NB)
    y.known |= {"n1", "n2", "n3"}
    y.install(half, ["n1", "n2", "n3"], view=4, now=10.0)
    assert not y.grant_read((4, ("n1", "n2")), now=10.0), "same epoch, other members"
    assert y.grant_read(y.view_id(), now=10.0)
    assert y.may_record_mark(0, 10.1), "marks for the view it confirmed are fine"
    moved = BucketMap(("n3", "n2") * (NB // 2), (5, 4) * (NB // 2))
    y.install(moved, ["n2", "n3"], view=5, now=10.2)
    assert not y.may_record_mark(0, 10.5) and y.marks_delayed == 1, "n1's bucket moved"
    assert y.may_record_mark(1, 10.5), "n2 kept bucket 1: it knows its own allocations"
    assert y.may_record_mark(0, 10.0 + READ_LEASE)
    y.booted(20.0)
    assert not y.may_record_mark(1, 20.5) and y.may_record_mark(1, 20.0 + READ_LEASE)


def test_marks_blocked_says_while_a_promise_for_another_view_runs() -> None:
    """``marks_blocked`` (status, and the test harness's settled check) is true while
    a confirmed lease of another view or a restart's wait may refuse a mark."""
    y = _settled_core("n2", ["n1", "n2", "n3"], 4, now=10.0)
    assert not y.marks_blocked(10.0)
    y.grant_read(y.view_id(), now=10.0)
    assert not y.marks_blocked(10.1), "a promise for the current view blocks nothing"
    y.install(all_to("n3", 5), ["n2", "n3"], view=5, now=10.2)
    assert y.marks_blocked(10.5) and not y.marks_blocked(10.0 + READ_LEASE)


def test_recorded_holder_in_view_without_its_own_hint_is_away_until_it_comes() -> None:
    """A hint carries a majority's record that n3 holds a user's mail, n3 is in our
    view but its own hint has not come (a bridge kept it from us while we kept the
    bucket; mailsim seed 197): n3 is away (reads refused, its hint pulled) until its
    hint arrives; a holder whose hint came first is not marked."""
    c = _settled_core("n1", ["n1", "n2", "n3"], 4, now=10.0)
    c.install(all_to("n1", 4), ["n1", "n2", "n3"], view=5, now=10.5)  # kept, nobody new
    user = users_of(0)[0]
    c.receive("n2", BucketHint(0, 4, (), (), 1, ((user, "n3"),)), 5, now=11.0)
    assert c.state.away_list(user) == {"n3"}
    pulls = [a for a in c.tick(11.0, lease=True) if isinstance(a, PullHints)]
    assert pulls and pulls[0].peer == "n3" and 0 in pulls[0].buckets
    c.receive("n3", BucketHint(0, 4, (UserHint(user, True, 9, 0),)), 5, now=11.1)
    assert c.state.away_list(user) == set() and "n3" in c.state.fragment_list(user)
    c.receive("n2", BucketHint(0, 4, (), (), 1, ((user, "n3"),)), 5, now=11.2)
    assert c.state.away_list(user) == set(), "its hint came: not away again"
