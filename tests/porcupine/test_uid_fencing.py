"""The storing node's side of the UID scheme (docs/mail.md, "UIDs under partitions
and pauses"): fences, unnumbered (PENDING) storage, numbering, demotion, the shown
UIDNEXT and the UID marks, on a real FragmentStore; and the manager's refusals."""

from __future__ import annotations

from pathlib import Path

from mailtest_helpers import ImmediateReactor, SyncPool, result_of

from yimaporc.cluster.buckets import BucketMap
from yimaporc.porcupine.cluster import ClusterUserManager, has_majority
from yimaporc.porcupine.fragments import FragmentStore
from yimaporc.porcupine.profiledb import ProfileDB
from yimaporc.porcupine.reconstruct import (
    NODE_ALLOCATION_TTL,
    NODE_PLAN_TTL,
    NODE_TIMED_ALLOCATION_TTL,
    split_fence,
    timed_fence,
)
from yimaporc.porcupine.usermap import N_BUCKETS, bucket_of
from yimaporc.porcupine.values import INBOX, PENDING, NewMessage
from yimaporc.testing.hints import apply_hint

USER = "ulla@example.org"
B = bucket_of(USER)


def store_at(tmp_path: Path) -> FragmentStore:
    s = FragmentStore(tmp_path / "n1", "n1", lambda: 1_700_000_000.0)
    s.set_fences({B: "n2@5"})
    return s


def new(body: bytes, uid: int, fence: str = "n2@5", date: float = 0.0) -> NewMessage:
    return NewMessage(USER, INBOX, body, (), date, uid, fence)


def test_stale_fence_or_lapsed_lease_stores_unnumbered_never_listed(tmp_path: Path) -> None:
    """A fenced store whose fence is not the node's (a paused or cut-off manager), or
    arriving while the node's lease lapsed, is durable but unnumbered: UID 0, not in
    the listing, counted in the hint; the right fence is stored under its UID."""
    s = store_at(tmp_path)
    assert [d.uid for d in s.store([new(b"a\r\n", 7)])] == [7]
    assert [d.uid for d in s.store([new(b"b\r\n", 8, fence="n3@4")])] == [0]
    s.fence_ok = lambda: False
    assert [d.uid for d in s.store([new(b"c\r\n", 9)])] == [0]
    s.fence_ok = lambda: True
    assert [d.uid for d in s.digests(USER, INBOX)] == [7]
    assert s.uid_marks(B)[USER] == (True, 8, 2)
    assert s.pending_users == {USER}


def test_fenced_uid_below_uidnext_is_never_a_second_message_under_it(tmp_path: Path) -> None:
    """A fenced UID below what the mailbox already numbered (a store overtaken by a
    later one: concurrent deliveries) keeps its UID, young as its fence says (the
    manager's horizon holds readers below it meanwhile), so no UID is lost; a UID
    taken already goes unnumbered (numbered afresh later), never a second message."""
    s = store_at(tmp_path)
    s.store([new(b"late\r\n", 12)])
    assert [d.uid for d in s.store([new(b"early\r\n", 10)])] == [10]
    assert [d.uid for d in s.store([new(b"dup\r\n", 12)])] == [0]
    assert [d.uid for d in s.store([new(b"again\r\n", 10)])] == [0]
    assert [d.uid for d in s.digests(USER, INBOX)] == [10, 12]
    assert [d.uid for d in s.store([new(b"next\r\n", 13)])] == [13], "UIDNEXT not moved back"


def test_number_pending_only_with_the_current_fence_oldest_first_above_uidnext(
    tmp_path: Path,
) -> None:
    """Numbering takes the oldest unnumbered messages first, only for the node's current
    fence, and never uses a UID below the mailbox's UIDNEXT (it says where to go on)."""
    s = store_at(tmp_path)
    s.store([new(b"n\r\n", 20)])
    s.store([new(b"y\r\n", PENDING, "", 2.0), new(b"x\r\n", PENDING, "", 1.0)])
    assert s.number_pending(USER, "n3@4", 30, 5) == (0, [], 2, 21)
    assert s.number_pending(USER, "n2@5", 15, 5) == (0, [], 2, 21)
    assert s.number_pending(USER, "n2@5", 30, 5) == (2, [INBOX], 0, 32)
    got = {d.uid: d.internal_date for d in s.digests(USER, INBOX)}
    assert set(got) == {20, 30, 31} and (got[30], got[31]) == (1.0, 2.0)
    assert s.pending(USER) == 0 and s.pending_users == set()
    fetched = s.fetch(USER, INBOX, [30, 31])
    assert fetched == {30: b"x\r\n", 31: b"y\r\n"}


def test_demote_takes_a_message_back_to_unnumbered_and_recovery_keeps_its_body(
    tmp_path: Path,
) -> None:
    """Demotion (two messages under one UID) moves the row back to unnumbered; the body
    stays (start-up recovery does not take it for an orphan) and numbering gives it a
    new UID."""
    s = store_at(tmp_path)
    (d,) = s.store([new(b"twin\r\n", 5)])
    assert s.demote(USER, INBOX, 5, "no-such-key") is False
    assert s.demote(USER, INBOX, 5, d.key) is True
    assert s.digests(USER, INBOX) == [] and s.pending(USER) == 1
    s.close()
    s = store_at(tmp_path)
    assert s.recover() == 0 and s.pending_users == {USER}
    assert s.number_pending(USER, "n2@5", 40, 1)[0] == 1
    assert s.fetch(USER, INBOX, [40]) == {40: b"twin\r\n"}


def test_shown_uidnext_only_grows_within_one_uidvalidity(tmp_path: Path) -> None:
    """The UIDNEXT a node showed is kept per mailbox and UIDVALIDITY: a smaller merged
    value (a holder out of reach) is raised to it; a new UIDVALIDITY starts again."""
    s = store_at(tmp_path)
    assert s.shown(USER, {INBOX: (100, 9)}) == {INBOX: 9}
    assert s.shown(USER, {INBOX: (100, 4)}) == {INBOX: 9}
    assert s.shown(USER, {INBOX: (101, 2)}) == {INBOX: 2}
    assert s.uid_marks(B)[USER][1] == 2, "the hint counts what this node showed"


def test_uid_marks_and_holders_are_refused_for_a_stale_fence(tmp_path: Path) -> None:
    """A mark or holder record is written only for the node's current fence of the
    bucket (so it is either in the node's next hint or refused) and only grows."""
    s = store_at(tmp_path)
    assert s.bucket_mark(B) == 1
    assert s.raise_mark(B, "n3@4", 500) is False
    assert s.raise_mark(B, "n2@5", 300) is True
    assert s.raise_mark(B, "n2@5", 200) is True
    assert s.bucket_mark(B) == 300
    assert s.record_holders(B, "n3@4", [(USER, "n9")]) is False
    assert s.record_holders(B, "n2@5", [(USER, "n9"), (USER, "n9")]) is True
    assert s.bucket_holders(B) == [[USER, "n9"]]


def test_manager_without_majority_or_settled_hints_answers_pending(tmp_path: Path) -> None:
    """The manager numbers only with a majority of the known cluster, every member's
    hint in and its lease; otherwise a plan says PENDING (store unnumbered)."""
    clock = ImmediateReactor()
    profiles = ProfileDB(clock, SyncPool(), tmp_path / "p.sqlite", clock.seconds)  # type: ignore[arg-type]
    um = ClusterUserManager("n1", profiles, clock)
    um.known = {"n1", "n2", "n3"}
    um.install(BucketMap(("n1",) * N_BUCKETS, (2,) * N_BUCKETS), ["n1", "n2"])
    apply_hint(um, "n1", [B, 2, [], [], 1, []])
    clock.advance(2.0)  # settled by timeout: n2's hint missing
    assert um.missing[B] == {"n2"}
    assert result_of(um.delivery_plan(USER, 1))[1] == PENDING
    apply_hint(um, "n2", [B, 2, [[USER, True, 40, 3]], [], 700, [[USER, "n3"]]])
    assert um.pending[USER] == {"n2": 3} and um.away_of(USER) == ("n3",)
    nodes, first, fence = result_of(um.delivery_plan(USER, 1))
    assert (nodes, first, fence) == (("n2",), 700, "n1@2"), "above the mark from the hints"
    um.lease_ok = lambda: False
    assert result_of(um.delivery_plan(USER, 1))[1] == PENDING
    um.lease_ok = lambda: True
    um.install(BucketMap(("n1",) * N_BUCKETS, (2,) * N_BUCKETS), ["n1"])
    assert not um.quorum() and result_of(um.delivery_plan(USER, 1))[1] == PENDING
    assert has_majority(["n1", "n2"], ["n1", "n2", "n3"])
    assert not has_majority(["n1", "n4"], ["n1", "n2", "n3", "n4"])


def test_timed_fence_is_numbered_only_while_young_by_the_synced_cluster_clock(
    tmp_path: Path,
) -> None:
    """A delivery's allocation carries the manager's cluster time in its fence
    (``owner@epoch/at``): the storing node numbers it only while its own synced
    cluster clock says it is at most NODE_PLAN_TTL old; too old, no synced clock, or
    a junk time: stored unnumbered (never listed below UIDs shown meanwhile)."""
    s = store_at(tmp_path)
    now: list[float | None] = [100.4]
    s.cluster_now = lambda: now[0]
    assert [d.uid for d in s.store([new(b"a\r\n", 5, fence=timed_fence("n2@5", 100.0))])] == [5]
    now[0] = 100.0 + NODE_PLAN_TTL + 0.01
    assert [d.uid for d in s.store([new(b"b\r\n", 6, fence=timed_fence("n2@5", 100.0))])] == [0]
    now[0] = None  # not synced to the time reference (yet)
    assert [d.uid for d in s.store([new(b"c\r\n", 7, fence=timed_fence("n2@5", 100.0))])] == [0]
    now[0] = 100.1
    assert [d.uid for d in s.store([new(b"d\r\n", 8, fence="n2@5/soon")])] == [0]
    assert [d.uid for d in s.store([new(b"e\r\n", 9, fence=timed_fence("n3@4", 100.0))])] == [0]
    assert s.late_allocations == 3 and s.pending(USER) == 4
    assert [d.uid for d in s.store([new(b"f\r\n", 10, fence="n2@5")])] == [10], "untimed"


def test_timed_plan_leaves_the_horizon_after_the_short_ttl(tmp_path: Path) -> None:
    """With a synced cluster clock, the manager's plan carries a timed fence and the
    allocation holds readers back NODE_TIMED_ALLOCATION_TTL (a lost delivery hides
    newer mail that long, not NODE_ALLOCATION_TTL); without one, the long TTL."""
    clock = ImmediateReactor()
    profiles = ProfileDB(clock, SyncPool(), tmp_path / "p.sqlite", clock.seconds)  # type: ignore[arg-type]
    um = ClusterUserManager("n1", profiles, clock)
    um.install(BucketMap(("n1",) * N_BUCKETS, (2,) * N_BUCKETS), ["n1"])
    apply_hint(um, "n1", [B, 2, [], [], 1, []])
    clock.advance(1.0)
    um.cluster_now = lambda: 500.0 + clock.seconds()
    _, first, fence = result_of(um.delivery_plan(USER, 1))
    assert split_fence(fence) == ("n1@2", 500.0 + clock.seconds())
    assert um.horizon_of(USER).bound([]) == first, "outstanding"
    clock.advance(NODE_TIMED_ALLOCATION_TTL + 0.01)
    assert um.horizon_of(USER).bound([]) == first + 1, "expired: no store admits it now"
    um.cluster_now = lambda: None
    _, second, fence = result_of(um.delivery_plan(USER, 1))
    assert fence == "n1@2"
    clock.advance(NODE_TIMED_ALLOCATION_TTL + 0.01)
    assert um.horizon_of(USER).bound([]) == second, "untimed: the long TTL"
    clock.advance(NODE_ALLOCATION_TTL)
    assert um.horizon_of(USER).bound([]) == second + 1


def test_recovery_keeps_the_body_of_a_held_copy(tmp_path: Path) -> None:
    """A replica's held copy (waiting for the UID its coordinator's copy gets) keeps its
    body through a restart's recovery, so its promotion later is readable (the chaos
    run found index rows without bodies: recovery removed held bodies as orphans)."""
    s = store_at(tmp_path)
    key = "c0ffee.m"
    (s.tmp / key).write_bytes(b"held\r\n")
    s.hold(NewMessage(USER, INBOX, b"held\r\n", (), 5.0), key)
    s.recover()
    assert s.is_held(USER, key)
    assert s.promote(USER, key, 12)
    (d,) = s.digests(USER, INBOX)
    assert d.uid == 12 and s.fetch(USER, INBOX, [12]) == {12: b"held\r\n"}
