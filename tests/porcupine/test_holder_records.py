"""No numbered message on a holder a majority has not recorded, and no 250 before the
holder record is durable (issue 14, chaos bug 4: mail hidden, then shown below; sim.mail
seed 65): a new holder is recorded before the numbered store (stored unnumbered if that
fails), and a delivery whose record failed after the store answers a temporary error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mailtest_helpers import SyncPool
from test_cluster_sim import Net, add_user, users_managed_by
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from yimaporc.cluster.buckets import BucketMap
from yimaporc.cluster.rpc import PeerUnavailable
from yimaporc.porcupine.cluster import (
    AllocationLapsed,
    ClusterUserManager,
    HolderNotRecorded,
    UidHolders,
)
from yimaporc.porcupine.profiledb import ProfileDB
from yimaporc.porcupine.reconstruct import (
    NODE_PLAN_TTL,
    NODE_TIMED_ALLOCATION_TTL,
    REPLICATED_ALLOCATION_TTL,
    admit_timed,
    split_fence,
)
from yimaporc.porcupine.usermap import N_BUCKETS, bucket_of
from yimaporc.testing.hints import apply_hint
from yimaporc.testing.simnet import SimNet

USER = "ulla@example.org"
B = bucket_of(USER)


def holders_on_majority(net: Net, user: str, node: str) -> int:
    """How many nodes recorded ``node`` as a holder of ``user``'s mail."""
    pair = [user, node]
    return sum(
        pair in n.mail.fragment_store.bucket_holders(bucket_of(user)) for n in net.nodes.values()
    )


def _three_nodes(tmp_path: Path) -> Net:
    net = Net(tmp_path)
    for i in (1, 2, 3):
        net.add(f"n{i}")
    net.commit(["n1", "n2", "n3"])
    return net


def _cluster_with_user(tmp_path: Path, manager: str) -> tuple[Net, str]:
    """Three nodes and a user (added on n1) whose bucket ``manager`` manages."""
    net = _three_nodes(tmp_path)
    user = users_managed_by(net, manager, 1)[0]
    add_user(net, "n1", user)
    return net, user


def _after_plan(um: ClusterUserManager, then: Callable[[str], object]) -> None:
    """Have ``then(address)`` run right after each delivery plan ``um`` answers."""
    plan = um.delivery_plan

    def hooked(a: str, c: int, u: bool = False, r: int = 1) -> Deferred[Any]:
        def run(p: Any) -> Any:
            then(a)
            return p

        return plan(a, c, u, r).addCallback(run)

    um.delivery_plan = hooked  # type: ignore[method-assign]


def test_a_holder_no_majority_recorded_gets_the_message_unnumbered(tmp_path: Path) -> None:
    """Holder records refused by the other nodes: the new holder cannot be recorded
    before the numbered store, so the message is stored unnumbered (durable: 250; the
    manager numbers it once it can record the holder).  Once they answer, the next
    delivery records the holder on a majority before its numbered store."""
    net, user = _cluster_with_user(tmp_path, "n3")
    for n in ("n1", "n2"):
        net.refuse.add((n, UidHolders.commandName))
    [first] = net.nodes["n2"].deliver(user, b"first\r\n")
    assert first.uid == 0, "stored unnumbered"
    assert net.nodes["n2"].mail.delivery.unrecorded_holders == 1
    assert holders_on_majority(net, user, first.node) < 2
    net.refuse.clear()
    [dig] = net.nodes["n2"].deliver(user, b"second\r\n")
    assert dig.uid > 0
    assert holders_on_majority(net, user, dig.node) >= 2


def test_failed_holder_record_after_the_store_fails_the_delivery(tmp_path: Path) -> None:
    """A holder the plan named as recorded whose record is gone by the store's note (a
    record that failed meanwhile): no 250 (PeerUnavailable, one retry)."""
    net, user = _cluster_with_user(tmp_path, "n3")
    [dig] = net.nodes["n2"].deliver(user, b"first\r\n")
    um = net.nodes["n3"].cluster.user_manager
    fence = um.core.fence(bucket_of(user))
    um.core.recorded.discard((user, dig.node, fence))
    um.core.confirmed.discard((user, dig.node, fence))
    um.core.holders_seen.pop(user, None)
    # the plan still names the node (as a node the soft list had recorded)
    plan = um.delivery_plan
    um.delivery_plan = lambda a, c, u=False, r=1: plan(a, c, u, r).addCallback(  # type: ignore[method-assign]
        lambda p: ((dig.node,), p[1], p[2])
    )
    for n in ("n1", "n2"):
        net.refuse.add((n, UidHolders.commandName))
    with pytest.raises(PeerUnavailable):
        net.nodes["n2"].deliver(user, b"second\r\n")
    assert net.nodes["n2"].mail.delivery.holder_retries == 1


def test_a_lapsed_allocation_fails_the_delivery_over_the_wire(tmp_path: Path) -> None:
    """Over AMP (Net): the plan's allocation leaves the horizon expired before the
    proxy's holder note (a reader past it while the proxy was paused): the delivery
    raises AllocationLapsed (SMTP 451), is not retried, and the copy stays recorded."""
    net, user = _cluster_with_user(tmp_path, "n3")
    net.nodes["n2"].deliver(user, b"first\r\n")  # holders recorded: one note, no record
    um = net.nodes["n3"].cluster.user_manager
    # a reader, much later: the allocation left the horizon expired
    _after_plan(um, lambda a: um.core.horizon(a.lower(), um._now() + 1000.0))
    with pytest.raises(AllocationLapsed):
        net.nodes["n2"].deliver(user, b"second\r\n")
    assert net.nodes["n2"].mail.delivery.holder_retries == 0
    assert um.status()["lapsed_notes"] == 1


def test_a_manager_paused_during_its_own_delivery_gets_no_250(tmp_path: Path) -> None:
    """Case A (docs/chaos.md): the node that plans a delivery as the user's manager
    loses its read lease before the 250 (paused: another manager may have numbered
    above the plan's UID meanwhile): the numbered copy gets a 451 (AllocationLapsed),
    counted as ``lease_lost``; with the lease held the 250 stands."""
    net, user = _cluster_with_user(tmp_path, "n2")
    node = net.nodes["n2"]
    core = node.cluster.user_manager.core
    core.read_leases, core.read_until = True, float("inf")
    [dig] = node.deliver(user, b"first\r\n")
    assert dig.uid > 0, "planned and numbered here, lease held: 250"
    um = node.cluster.user_manager
    # the pause outlasted the lease; no renewal since
    _after_plan(um, lambda a: setattr(core, "read_until", 0.0))
    with pytest.raises(AllocationLapsed):
        node.deliver(user, b"second\r\n")
    assert node.mail.delivery.status()["lease_lost"] == 1


def _manager(
    tmp_path: Path, *, timed: bool = False
) -> tuple[ClusterUserManager, SimNet, list[Deferred[bool]]]:
    """n1 manages every bucket of a 3-node cluster, on a kernel host's clock (``timed``:
    synced, so its fences are timed); holder records wait until the test answers them."""
    sim = SimNet()
    clock = sim.reactor("n1")
    profiles = ProfileDB(clock, SyncPool(), tmp_path / "p.sqlite", clock.seconds)  # type: ignore[arg-type]
    um = ClusterUserManager("n1", profiles, clock)
    if timed:
        um.cluster_now = clock.seconds
    um.known = {"n1", "n2", "n3"}
    um.install(BucketMap(("n1",) * N_BUCKETS, (2,) * N_BUCKETS), ["n1", "n2", "n3"])
    for n in ("n1", "n2", "n3"):
        apply_hint(um, n, [B, 2, [], [], 1, []])
    writes: list[Deferred[bool]] = []

    def holders_on(node: str, bucket: int, fence: str, holders: list[list[str]]) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        writes.append(d)
        return d

    um.holders_on = holders_on
    sim.flush()
    return um, sim, writes


def test_second_record_of_one_holder_waits_for_the_running_write(tmp_path: Path) -> None:
    """While a holder record is being written, another add_fragment for the same
    holder does not fire at once; both fail when no majority recorded it."""
    um, sim, writes = _manager(tmp_path)
    assert um.may_number(USER)
    first = um.add_fragment(USER, "n2")
    second = um.add_fragment(USER, "n2")
    got: list[object] = []
    for d in (first, second):
        d.addBoth(got.append)
    sim.flush()
    assert got == [], "no answer before the majority write ends"
    while any(not d.called for d in writes):
        for d in list(writes):
            if not d.called:
                d.callback(False)
        sim.flush()
    assert len(got) == 2
    assert all(isinstance(f, Failure) and f.check(HolderNotRecorded) for f in got)
    writes.clear()
    third = um.add_fragment(USER, "n2")
    sim.flush()
    for d in list(writes):
        d.callback(True)
    assert sim.result_of(third) is None
    writes.clear()
    assert sim.result_of(um.add_fragment(USER, "n2")) is None and writes == []


def test_a_slow_holder_record_renews_the_plans_allocation(tmp_path: Path) -> None:
    """The first message on a new holder waits for its record; a record slower than
    the store's age limit (1 s, NODE_PLAN_TTL) does not cost the plan's UID: the
    manager renews the allocation and answers a fence with a fresh time (without it
    the store went unnumbered and was numbered above: a UID gap)."""
    um, sim, writes = _manager(tmp_path, timed=True)
    _, first, fence = sim.result_of(um.delivery_plan(USER, 1))
    assert first > 0 and split_fence(fence)[1] == sim.seconds()
    sim.advance(0.5)  # the plan's way back, a loaded proxy
    got = um.add_holder(USER, "n2", first, fence)
    sim.advance(0.9)  # the record (within MARK_TIMEOUT): the plan is past NODE_PLAN_TTL
    assert not admit_timed(split_fence(fence)[1], sim.seconds())
    for d in list(writes):
        d.callback(True)
    renewed = sim.result_of(got)
    base, at = split_fence(renewed)
    assert base == split_fence(fence)[0] and at == sim.seconds()
    assert admit_timed(at, sim.seconds() + NODE_PLAN_TTL)
    sim.advance(2.5)  # the renewed allocation still holds the horizon back
    assert first in _outstanding(um)
    assert um.core.horizon(USER, sim.seconds()).outstanding[0][0] == first


def test_an_expired_allocation_is_not_renewed(tmp_path: Path) -> None:
    """A record slower than the manager's own hold (3 s): readers may have been shown
    UIDs above the allocation, so it is not renewed (the store goes unnumbered)."""
    um, sim, writes = _manager(tmp_path, timed=True)
    _, first, fence = sim.result_of(um.delivery_plan(USER, 1))
    sim.advance(NODE_TIMED_ALLOCATION_TTL - 0.1)
    got = um.add_holder(USER, "n2", first, fence)
    sim.advance(0.6)
    for d in list(writes):
        d.callback(True)
    assert sim.result_of(got) == ""


def _outstanding(um: ClusterUserManager) -> set[int]:
    return set(um.core.allocated.get(USER, {}))


def test_a_holder_note_after_the_allocation_lapsed_gets_no_250(tmp_path: Path) -> None:
    """A replicated delivery's coordinator paused right after committing its copy
    (docs/chaos.md, case B): a reader after the allocation's expiry is shown UIDs
    above it; the coordinator's holder note after SIGCONT is refused with
    AllocationLapsed (the proxy answers 451, so the copy that then appears below
    those UIDs was never acknowledged).  The holder is recorded all the same (the
    copy is stored).  A note in time confirms; an R=1 plan expires sooner."""
    um, sim, writes = _manager(tmp_path, timed=True)
    _, single, _ = sim.result_of(um.delivery_plan(USER, 1))
    _, first, fence = sim.result_of(um.delivery_plan(USER, 1, False, 3))
    _, kept, _ = sim.result_of(um.delivery_plan(USER, 1, False, 3))
    assert kept > first > single > 0 and fence
    assert REPLICATED_ALLOCATION_TTL > NODE_TIMED_ALLOCATION_TTL
    sim.advance(NODE_TIMED_ALLOCATION_TTL + 0.5)
    assert um.core.horizon(USER, sim.seconds()).outstanding == (
        (first, first + 1),
        (kept, kept + 1),
    ), "the R=1 plan expired, the replicated ones hold"
    ok = um.add_fragment(USER, "n1", kept)  # in time: the 250 stands
    for d in list(writes):
        d.callback(True)
    writes.clear()
    sim.result_of(ok)
    sim.advance(REPLICATED_ALLOCATION_TTL)  # the coordinator is still paused
    assert um.core.horizon(USER, sim.seconds()).outstanding == ()  # a reader goes on
    late = um.add_fragment(USER, "n2", first)  # SIGCONT: its note
    for d in list(writes):
        d.callback(True)
    with pytest.raises(AllocationLapsed) as lapsed:
        sim.result_of(late)
    assert isinstance(lapsed.value, HolderNotRecorded)  # not tried elsewhere either
    assert "n2" in um.state.fragments.get(USER, set()), "the copy is recorded"
    assert um.status()["lapsed_notes"] == 1


def test_renewal_never_shortens_a_replicated_hold(tmp_path: Path) -> None:
    """A new holder's record renews the plan for the store's age limit only: a
    replicated user's longer hold stays as it was."""
    um, sim, writes = _manager(tmp_path, timed=True)
    _, first, fence = sim.result_of(um.delivery_plan(USER, 1, False, 2))
    got = um.add_holder(USER, "n2", first, fence)
    for d in list(writes):
        d.callback(True)
    assert sim.result_of(got)
    sim.advance(REPLICATED_ALLOCATION_TTL - 0.1)
    assert um.core.horizon(USER, sim.seconds()).outstanding == ((first, first + 1),)
    sim.advance(0.2)
    assert um.core.horizon(USER, sim.seconds()).outstanding == ()


def test_a_full_disk_refuses_holder_records_and_marks_without_a_traceback(
    tmp_path: Path,
) -> None:
    """A node whose disk (SQLite) is full cannot write a holder record or a UID mark:
    asked over AMP it answers *not recorded* (the majority round's own answer), counted
    in ``full_disk_refusals``; before, the sqlite3 error went back as an undeclared AMP
    error, logged with a traceback on both nodes."""
    import sqlite3

    net = _three_nodes(tmp_path)
    full = net.nodes["n1"].cluster
    store = full.storage.fragment_store

    def disk_full(*a: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    store.record_holders = disk_full  # type: ignore[method-assign]
    store.raise_mark = disk_full  # type: ignore[method-assign]
    asker = net.nodes["n2"].cluster
    fence = asker.user_manager.core.fence(5)
    got = net.result_of(asker._holders_on("n1", 5, fence, [("u@example.org", "n2")]))
    assert got is False
    assert net.result_of(asker._mark_on("n1", 5, fence, 500)) is False
    assert full.status()["mail_cluster"]["full_disk_refusals"] == 2
