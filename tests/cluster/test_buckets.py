"""Bucket map (Porcupine's user map): minimal moves, even spread, fresh buckets, wire."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yimaporc.cluster.buckets import BucketMap, MalformedMap

node_sets = st.sets(st.sampled_from([f"n{i}" for i in range(12)]), min_size=1, max_size=12)


@given(st.lists(node_sets, min_size=1, max_size=8))
def test_sequences_of_changes_keep_map_even_and_moves_minimal(changes: list[set[str]]) -> None:
    """After any change, spread is within 1 and only necessary buckets move."""
    m = BucketMap.empty(256)
    prev: set[str] = set()
    for epoch, live in enumerate(changes, 1):
        new = m.reassign(live, epoch)
        counts = new.counts()
        assert set(counts) == live
        assert max(counts.values()) - min(counts.values()) <= 1
        moved = {b for b in range(256) if new.owners[b] != m.owners[b]}
        assert moved == new.fresh(m)
        orphans = {b for b in range(256) if m.owners[b] not in live}
        assert orphans <= moved
        if prev and live >= prev:
            # Pure growth: only what the newcomers need moves.
            assert len(moved) == sum(counts[n] for n in live - prev)
        for b in moved:
            assert new.epochs[b] == epoch
        m, prev = new, live


def test_one_failure_moves_only_its_buckets() -> None:
    """When one of 4 nodes fails, exactly its 64 buckets move, spread over the 3 others."""
    m = BucketMap.empty(256).reassign(["a", "b", "c", "d"], 1)
    new = m.reassign(["a", "b", "c"], 2)
    assert len(new.fresh(m)) == 64
    assert sorted(new.counts().values()) == [85, 85, 86]


def test_weights_give_proportional_shares() -> None:
    """A node of weight 3 manages three times the buckets of a node of weight 1."""
    m = BucketMap.empty(256).reassign(["big", "small"], 1, {"big": 3, "small": 1})
    assert m.counts() == {"big": 192, "small": 64}


def test_empty_membership_and_same_membership() -> None:
    """Nobody live gives an empty map; an unchanged membership moves nothing."""
    m = BucketMap.empty(16).reassign(["a", "b"], 1)
    assert m.reassign(["a", "b"], 2) == m
    assert BucketMap.empty(16).reassign([], 3).counts() == {}


@given(node_sets, st.integers(0, 2**63))
def test_wire_round_trip(live: set[str], epoch: int) -> None:
    """serialize/parse round-trips; garbage is MalformedMap."""
    m = BucketMap.empty(256).reassign(live, epoch)
    assert BucketMap.parse(m.serialize()) == m
    with pytest.raises(MalformedMap):
        BucketMap.parse(m.serialize()[:-3])
