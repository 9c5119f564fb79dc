"""Disk merging: heterogeneous physical disks as uniform logical disks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from yimaporc.yima.disks import (
    DiskError,
    MergePolicy,
    PhysicalDisk,
    add_physical,
    choose_unit,
    initial_history,
    merge_report,
    physical_loads,
    physical_of,
    remove_physical,
)
from yimaporc.yima.placement import disks_of

GB = 1 << 30


def disk(
    name: str, capacity: int | None, node: str = "n1", bandwidth: int | None = None
) -> PhysicalDisk:
    """A physical disk for tests."""
    return PhysicalDisk(name, node, f"/srv/{name}", capacity, bandwidth)


def test_logical_disks_per_physical_disk_follow_capacity() -> None:
    """A physical disk hosts floor(capacity/unit) logical disks with ids P#k, at least one."""
    policy = MergePolicy(unit=100 * GB)
    assert [d.disk_id for d in policy.logical_disks(disk("a", 250 * GB))] == ["a#0", "a#1"]
    assert policy.logical_count(disk("b", 50 * GB)) == 1
    assert policy.logical_count(disk("c", None)) == 1
    only = policy.logical_disks(disk("a", 250 * GB, node="n7"))[1]
    assert (only.node_id, only.physical, physical_of(only.disk_id)) == ("n7", "a", "a")


def test_bandwidth_limits_logical_disks() -> None:
    """A big but slow disk hosts no more logical disks than its bandwidth allows."""
    policy = MergePolicy(unit=100, unit_bandwidth=10)
    assert policy.logical_count(disk("a", 1000, bandwidth=30)) == 3
    assert policy.logical_count(disk("a", 1000, bandwidth=300)) == 10


def test_load_is_proportional_to_capacity() -> None:
    """With placement over merged logical disks each physical disk gets blocks in proportion to its capacity."""
    disks = [disk("a", 100), disk("b", 200, "n2"), disk("c", 300, "n3"), disk("d", 400, "n4")]
    policy = MergePolicy(unit=choose_unit([d.capacity or 0 for d in disks]))
    h = initial_history(disks, policy)
    loads = physical_loads(disks_of(9, 100_000, h), h)
    for d in disks:
        share = (d.capacity or 0) / 1000
        assert abs(loads[d.disk_id] / 100_000 - share) <= 0.05 * share


def test_adding_and_removing_a_physical_disk_moves_its_share() -> None:
    """Adding a physical disk moves about its capacity share of blocks onto it; removing it moves exactly its blocks."""
    policy = MergePolicy(unit=100)
    base = [disk("a", 200), disk("b", 200, "n2")]
    h0 = initial_history(base, policy)
    h1 = add_physical(h0, disk("c", 400, "n3"), policy)
    before, after = disks_of(3, 50_000, h0), disks_of(3, 50_000, h1)
    moved = sum(1 for x, y in zip(before, after) if h0.disks[x].disk_id != h1.disks[y].disk_id)
    assert abs(moved / 50_000 - 0.5) < 0.025
    assert physical_loads(after, h1)["c"] == moved
    h2 = remove_physical(h1, "a")
    again = disks_of(3, 50_000, h2)
    moved2 = [
        i
        for i, (x, y) in enumerate(zip(after, again))
        if h1.disks[x].disk_id != h2.disks[y].disk_id
    ]
    assert moved2 == [i for i, x in enumerate(after) if h1.disks[x].physical == "a"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=12))
def test_choose_unit_bounds_logical_disks(capacities: list[int]) -> None:
    """choose_unit never gives a disk more than 16 logical disks, nor zero."""
    unit = choose_unit(capacities)
    assert unit >= 1
    assert all(1 <= max(1, c // unit) <= 16 for c in capacities)


def test_choose_unit_prefers_little_waste() -> None:
    """choose_unit picks the largest unit that wastes at most 5% of the capacity."""
    assert choose_unit([100, 250, 400]) == 50
    assert choose_unit([300, 300]) == 300


def test_merge_report_shows_unused_capacity() -> None:
    """The report lists each physical disk's logical disks and the capacity below one unit."""
    report = merge_report([disk("a", 250), disk("b", None)], MergePolicy(unit=100))
    assert report == [
        {"disk_id": "a", "logical": 2, "unused": 50},
        {"disk_id": "b", "logical": 1, "unused": None},
    ]


def test_disk_json_round_trip_and_errors() -> None:
    """Disks and policies survive JSON; bad ids, sizes, fields and operations raise DiskError."""
    d = disk("a", 5, bandwidth=7)
    assert PhysicalDisk.from_json(d.to_json()) == d
    p = MergePolicy(10, 3)
    assert MergePolicy.from_json(p.to_json()) == p
    for bad in ("", "a#1", "x/y", " a"):
        with pytest.raises(DiskError):
            disk(bad, 1)
    with pytest.raises(DiskError, match="capacity"):
        disk("a", 0)
    with pytest.raises(DiskError, match="unknown"):
        PhysicalDisk.from_json({**d.to_json(), "speed": 1})
    policy = MergePolicy(unit=1)
    with pytest.raises(DiskError, match="duplicate"):
        policy.merge([disk("a", 1), disk("a", 1)])
    h = initial_history([disk("a", 1)], policy)
    with pytest.raises(DiskError, match="already"):
        add_physical(h, disk("a", 1), policy)
    with pytest.raises(DiskError, match="last disk"):
        remove_physical(h, "a")
    with pytest.raises(DiskError, match="no such"):
        remove_physical(h, "zz")
