"""The in-order relay for standard players."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yimaporc.yima.relay import Reorderer


@given(st.integers(0, 10_000))
def test_any_interleaving_of_node_streams_comes_out_in_order(seed: int) -> None:
    """Packets from 3 nodes, each in its own order, jittered: output is exactly 0..n-1."""
    rng = random.Random(seed)
    n = 300
    arrivals = sorted((g * 0.001 + rng.uniform(0, 0.05), g) for g in range(n))
    r = Reorderer(hold=1.0)
    out = []
    for t, g in arrivals:
        out.extend(r.push(g, g.to_bytes(4, "big"), t))
    out.extend(r.tick(1e9))
    assert [int.from_bytes(b, "big") for b in out] == list(range(n))
    assert r.stats.gaps_skipped == 0


def test_gap_is_given_up_after_hold() -> None:
    """A missing packet holds the later ones for `hold` seconds, then the gap is skipped."""
    r = Reorderer(hold=0.2)
    assert r.push(0, b"a", 0.0) == [b"a"]
    assert r.push(2, b"c", 0.01) == []
    assert r.next_deadline() == pytest.approx(0.21)
    assert r.tick(0.1) == []
    assert r.tick(0.2101) == [b"c"]
    assert r.stats.gaps_skipped == 1
    assert r.push(1, b"b", 0.3) == [] and r.stats.too_late == 1


def test_duplicates_dropped_and_limit_bounds_memory() -> None:
    """Duplicates are dropped; more than `limit` held packets force the gap to be skipped."""
    r = Reorderer(hold=10, limit=3)
    assert r.push(5, b"5", 0) == []
    assert r.push(5, b"5", 0) == [] and r.stats.duplicates == 1
    r.push(6, b"6", 0)
    r.push(7, b"7", 0)
    assert r.push(8, b"8", 0) == [b"5", b"6", b"7", b"8"]
