"""XOR parity and parity-aware placement."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from yimaporc.yima.parity import (
    FilePlacement,
    ParityError,
    default_group_size,
    group_members,
    group_of,
    make_parity,
    n_groups,
    reconstruct,
    xor_blocks,
)
from yimaporc.yima.placement import LogicalDisk, ScalingHistory


def disks(spec: str, start: int = 0) -> list[LogicalDisk]:
    """Logical disks from "n1:p1,p1,p2;..." style specs: node:physical per logical disk."""
    out = []
    for k, item in enumerate(spec.split(",")):
        node, phys = item.split(":")
        out.append(LogicalDisk(f"{phys}#{start + k}", node, phys))
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=6),
    st.data(),
)
def test_any_one_block_is_rebuilt_from_parity(blocks: list[bytes], data: st.DataObject) -> None:
    """XOR parity rebuilds any single missing block of a group byte-identically, short blocks included."""
    parity = make_parity(blocks)
    assert len(parity) == max(map(len, blocks))
    missing = data.draw(st.integers(0, len(blocks) - 1))
    others = {i: b for i, b in enumerate(blocks) if i != missing}
    assert reconstruct(missing, others, parity, len(blocks[missing])) == blocks[missing]


def test_reconstruct_refuses_bad_input() -> None:
    """Reconstructing a block that is present, or longer than its parity, is an error."""
    with pytest.raises(ParityError):
        reconstruct(0, {0: b"a"}, b"a")
    with pytest.raises(ParityError):
        reconstruct(1, {0: b"a"}, b"a", 2)
    with pytest.raises(ParityError):
        make_parity([])
    assert xor_blocks([b"\x01\x02", b"\x03"]) == b"\x02\x02"


def test_group_arithmetic() -> None:
    """Groups are runs of G consecutive blocks; the last one may be short; G=0 means no parity."""
    assert n_groups(10, 4) == 3
    assert n_groups(10, 0) == 0
    assert group_of(9, 4) == 2
    assert list(group_members(2, 4, 10)) == [8, 9]
    assert default_group_size(1) == 0
    assert default_group_size(3) == 2
    assert default_group_size(12) == 4


CLUSTERS = {
    "five nodes": "n1:a,n2:b,n3:c,n4:d,n5:e,n1:a,n2:b",
    "two nodes, five disks": "n1:a,n1:b,n1:c,n2:d,n2:e,n2:e",
    "three nodes, one disk each": "n1:a,n2:b,n3:c",
}


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_group_members_and_parity_use_distinct_domains(name: str) -> None:
    """A group and its parity use as many distinct nodes as exist, and distinct physical disks when there are enough."""
    h = ScalingHistory(disks(CLUSTERS[name]))
    g = 4 if name != "three nodes, one disk each" else 2
    fp = FilePlacement(11, 2000, g)
    layout = fp.layout(h)
    n_nodes = len({d.node_id for d in h.disks})
    n_phys = len({d.physical for d in h.disks})
    for group in range(fp.n_groups):
        members = [layout.data[i] for i in group_members(group, g, fp.n_blocks)]
        where = [h.disks[d] for d in [*members, layout.parity[group]]]
        assert len({d.node_id for d in where}) == min(len(where), n_nodes)
        assert len({d.physical for d in where}) == min(len(where), n_phys)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 5), st.integers(1, 80))
def test_layout_matches_single_lookups(seed: int, g: int, n: int) -> None:
    """The batch layout and per-block data_disk/parity_disk agree, also after scaling."""
    h = ScalingHistory(disks("n1:a,n2:b,n2:c,n3:d")).add(disks("n4:e,n4:e", 9)).remove([1])
    fp = FilePlacement(seed, n, g)
    layout = fp.layout(h)
    assert list(layout.data) == [fp.data_disk(i, h) for i in range(n)]
    assert list(layout.parity) == [fp.parity_disk(k, h) for k in range(fp.n_groups)]


def test_without_conflicts_data_follows_plain_scaddar_and_load_is_even() -> None:
    """With one disk per node, group size 4 over 12 nodes, load stays within 10% of the mean and moves stay near optimal."""
    h0 = ScalingHistory([LogicalDisk(f"p{i}#0", f"n{i}", f"p{i}") for i in range(12)])
    h1 = h0.add([LogicalDisk("p12#0", "n12", "p12")])
    fp = FilePlacement(5, 40_000, 4)
    a, b = fp.layout(h0), fp.layout(h1)
    load = Counter(a.data + a.parity)
    assert max(load.values()) / ((len(a.data) + len(a.parity)) / 12) <= 1.1
    moved = sum(h0.disks[x].disk_id != h1.disks[y].disk_id for x, y in zip(a.data, b.data))
    # Optimum 1/13; conflict retries add a little (measured ~1.2x, docs/storage.md).
    assert 1 / 13 <= moved / 40_000 <= 1.4 / 13


def test_out_of_range_blocks_are_refused() -> None:
    """Asking for a block or group past the end of the file is an IndexError."""
    h = ScalingHistory(("a", "b", "c"))
    fp = FilePlacement(1, 5, 2)
    with pytest.raises(IndexError):
        fp.data_disk(5, h)
    with pytest.raises(IndexError):
        fp.parity_disk(3, h)
    with pytest.raises(ParityError):
        FilePlacement(1, -1, 2)
    assert FilePlacement(1, 5, 0).layout(h).parity == ()
