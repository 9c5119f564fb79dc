"""Reorganisation planning and throttled execution."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from yimaporc.yima.disks import (
    MergePolicy,
    PhysicalDisk,
    add_physical,
    initial_history,
    remove_physical,
)
from yimaporc.yima.media import MediaInfo
from yimaporc.yima.parity import FilePlacement
from yimaporc.yima.placement import LogicalDisk, ScalingHistory
from yimaporc.yima.reorg import Move, MoveThrottle, plan_for, plan_moves, read_order
from yimaporc.yima.store import BlockKey


def physical(n: int, cap: int = 100) -> list[PhysicalDisk]:
    """``n`` physical disks on ``n`` nodes."""
    return [PhysicalDisk(f"p{i}", f"n{i}", f"/srv/p{i}", cap) for i in range(n)]


def test_add_plan_moves_about_the_new_share_onto_the_new_disk() -> None:
    """Adding one of five equal disks moves ~1/5 of the blocks, all onto the new disk."""
    policy = MergePolicy(unit=100)
    old = initial_history(physical(4), policy)
    new = add_physical(old, PhysicalDisk("p4", "n4", "/srv/p4", 100), policy)
    plan = plan_moves(FilePlacement(17, 20_000), old, new)
    assert plan.total == 20_000
    assert abs(plan.moved / 20_000 - 0.2) < 0.01
    assert {m.dst_disk.physical for m in plan.moves} == {"p4"}
    assert plan.summary() == f"moved {plan.moved} of 20000 blocks"


def test_remove_plan_moves_exactly_the_removed_disks_blocks() -> None:
    """Removing a disk moves exactly the blocks that were on it, and nothing between logical disks of one physical disk."""
    policy = MergePolicy(unit=50)
    old = initial_history(physical(4), policy)  # two logical disks each
    new = remove_physical(old, "p1")
    fp = FilePlacement(3, 5000)
    plan = plan_moves(fp, old, new)
    on_p1 = [i for i, d in enumerate(fp.layout(old).data) if old.disks[d].physical == "p1"]
    assert [m.key.index for m in plan.moves] == on_p1
    assert all(m.src_disk.physical == "p1" and m.dst_disk.physical != "p1" for m in plan.moves)


def test_plan_covers_parity_blocks_with_sizes() -> None:
    """A file with parity gets moves for data and parity blocks, sized from its MediaInfo."""
    info = MediaInfo("clip", "opaque", 10_500, 1000, seed=5, parity_group=2)
    old = ScalingHistory([LogicalDisk(f"p{i}", f"n{i}") for i in range(4)])
    new = old.add([LogicalDisk("p4", "n4")])
    plan = plan_for(info, old, new)
    assert plan.total == 11 + 6
    assert any(m.key.parity for m in plan.moves)
    for m in plan.moves:
        assert m.size == (500 if m.key == BlockKey(10) else 1000)


def test_read_order_is_new_place_then_old() -> None:
    """During a move readers look at the new place first and fall back to the old one."""
    old = ScalingHistory([LogicalDisk(f"p{i}", f"n{i}") for i in range(3)])
    new = old.add([LogicalDisk("p3", "n3")])
    fp = FilePlacement(8, 200, 2)
    plan = plan_moves(fp, old, new)
    m = plan.moves[0]
    assert read_order(fp, m.key, old, new) == [m.dst_disk, m.src_disk]
    stay = next(
        k for k in (BlockKey(i) for i in range(200)) if k not in {x.key for x in plan.moves}
    )
    assert len(read_order(fp, stay, old, new)) == 1
    assert read_order(fp, stay, old, None) == read_order(fp, stay, old, new)


def moves(sizes: list[int]) -> list[Move]:
    """Moves of the given sizes."""
    a, b = LogicalDisk("a"), LogicalDisk("b")
    return [Move(BlockKey(i), 0, 1, a, b, s) for i, s in enumerate(sizes)]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 5000), min_size=1, max_size=40),
    st.floats(100, 100_000),
    st.integers(1, 5),
)
def test_throttle_never_exceeds_rate_plus_burst(sizes: list[int], rate: float, cap: int) -> None:
    """Bytes started by time t never exceed burst + rate*t, at most max_in_flight run at once, and all moves finish."""
    throttle = MoveThrottle(moves(sizes), rate, now=0.0, max_in_flight=cap)
    now, started, running = 0.0, 0, []
    for _ in range(10 * len(sizes) + 10):
        for m in throttle.start(now):
            started += m.size
            running.append(m)
        assert started <= throttle.burst + rate * now + 1e-6
        assert len(throttle.in_flight) <= cap
        if throttle.complete:
            break
        # Finish the oldest running move, or sleep until the throttle's timer.
        wake = throttle.next_wakeup(now)
        if running and (wake is None or wake > now):
            throttle.finished(running.pop(0), now)
        elif wake is not None:
            now = max(now, wake)
    assert throttle.complete
    assert sorted(m.key.index for m in throttle.done) == list(range(len(sizes)))
    assert now <= sum(sizes) / rate + 1e-6


def test_failed_moves_are_retried_then_reported() -> None:
    """A failing move is retried up to max_attempts, then listed in failures."""
    throttle = MoveThrottle(moves([10]), rate=1e9, now=0.0, max_attempts=2)
    [m] = throttle.start(0.0)
    throttle.failed(m, 0.0)
    assert throttle.start(0.0) == [m]
    throttle.failed(m, 0.0)
    assert throttle.start(0.0) == []
    assert throttle.failures == [m] and throttle.complete
