"""Pseudorandom placement and SCADDAR remapping."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from yimaporc.yima.placement import (
    AddDisks,
    HistoryError,
    LogicalDisk,
    RemoveDisks,
    ScalingHistory,
    disk_of,
    disks_of,
    disks_trace,
    remap_add,
    remap_remove,
    word,
    words,
    x0_of,
)

N_BLOCKS = 100_000
MAX_DISKS = 16
BIG = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def histories(draw: st.DrawFn, max_ops: int = 8) -> ScalingHistory:
    """A random history over at most MAX_DISKS logical disks."""
    n0 = draw(st.integers(1, 12))
    h = ScalingHistory(tuple(f"d{i}" for i in range(n0)))
    for j in range(draw(st.integers(1, max_ops))):
        n = h.n_disks
        grow = n == 1 or (n < MAX_DISKS and draw(st.booleans()))
        if grow:
            k = draw(st.integers(1, min(4, MAX_DISKS - n)))
            h = h.add(f"a{j}.{i}" for i in range(k))
        else:
            gone = draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=min(3, n - 1)))
            h = h.remove(gone)
    return h


def check_step(before: list[int], after: list[int], h: ScalingHistory, step: int) -> None:
    """Assert the SCADDAR promises for operation ``step`` of ``h``."""
    old_ids = [d.disk_id for d in h.table(step - 1)]
    new_ids = [d.disk_id for d in h.table(step)]
    moved = [i for i, (a, b) in enumerate(zip(before, after)) if old_ids[a] != new_ids[b]]
    op = h.ops[step - 1]
    if isinstance(op, AddDisks):
        k, n = len(op.disks), len(old_ids)
        optimum = k / (n + k)
        assert abs(len(moved) / len(before) - optimum) <= 0.05 * optimum
        assert all(after[i] >= n for i in moved)
    else:
        gone = set(op.indices)
        assert moved == [i for i, a in enumerate(before) if a in gone]
    load = Counter(after)
    assert len(load) == len(new_ids)
    assert max(load.values()) / (len(after) / len(new_ids)) <= 1.1


@BIG
@given(histories(), st.integers(0, 2**64 - 1))
def test_scaddar_promises_hold_for_100k_blocks(h: ScalingHistory, seed: int) -> None:
    """Every add moves ~k/(N+k) of 100k blocks to new disks only, every remove moves exactly the removed disks' blocks, load stays within 10% of the mean."""
    trace = disks_trace(seed, N_BLOCKS, h)
    start = Counter(trace[0])
    assert max(start.values()) / (N_BLOCKS / h.counts()[0]) <= 1.1
    for step in range(1, h.steps + 1):
        check_step(trace[step - 1], trace[step], h, step)


def test_forty_operations_stay_balanced() -> None:
    """After 40 mixed operations blocks are still spread evenly and moves stay optimal (no randomness exhaustion)."""
    rng = random.Random(7)
    h = ScalingHistory(tuple(f"d{i}" for i in range(8)))
    for j in range(40):
        if h.n_disks <= 4 or (h.n_disks < MAX_DISKS and rng.random() < 0.5):
            h = h.add(f"a{j}.{i}" for i in range(rng.randint(1, 3)))
        else:
            h = h.remove(rng.sample(range(h.n_disks), rng.randint(1, 2)))
    trace = disks_trace(0xDEADBEEF, N_BLOCKS, h)
    for step in range(1, h.steps + 1):
        check_step(trace[step - 1], trace[step], h, step)


def test_fixed_64_bit_x0_runs_out_of_randomness() -> None:
    """With a fixed 64-bit X0 (the known limit) 40 operations collapse the placement; the wide X0 does not."""
    h = ScalingHistory(tuple(f"d{i}" for i in range(10)))
    for j in range(20):
        h = h.add([f"a{j}"]).remove([0])
    counts = h.counts()
    narrow = []
    for i in range(2000):
        x = word(1, i, 0)
        for j, op in enumerate(h.ops, start=1):
            if isinstance(op, AddDisks):
                x = remap_add(x, counts[j - 1], counts[j])
            else:
                x = remap_remove(x, counts[j - 1], op.indices)
        narrow.append(x % counts[-1])
    wide = [disk_of(1, i, h) for i in range(2000)]
    assert max(Counter(narrow).values()) > 2 * 200
    assert max(Counter(wide).values()) < 1.3 * 200


@settings(max_examples=25, deadline=None)
@given(histories(max_ops=12), st.integers(0, 2**64 - 1), st.integers(0, 2**40))
def test_batch_single_and_fresh_objects_agree(h: ScalingHistory, seed: int, start: int) -> None:
    """disks_of (digit-wise), disk_of (literal REMAP on big X0) and a history rebuilt from JSON give identical answers."""
    fresh = ScalingHistory.from_json(json.loads(json.dumps(h.to_json())))
    batch = disks_of(seed, 64, h, start=start)
    single = [disk_of(seed, start + i, fresh) for i in range(64)]
    assert batch == single
    assert all(0 <= d < h.n_disks for d in batch)


@settings(max_examples=25, deadline=None)
@given(histories(), st.integers(0, 2**64 - 1))
def test_growing_history_never_changes_past_answers(h: ScalingHistory, seed: int) -> None:
    """Block positions after step j depend only on the first j operations."""
    trace = disks_trace(seed, 200, h)
    for step in range(h.steps + 1):
        assert disks_of(seed, 200, h.prefix(step)) == trace[step]
    assert x0_of(seed, 5, h.prefix(0)) % h.counts()[0] == trace[0][5]


@settings(max_examples=40, deadline=None)
@given(histories())
def test_history_json_round_trip(h: ScalingHistory) -> None:
    """A history survives to_json/json text/from_json unchanged."""
    assert ScalingHistory.from_json(json.loads(json.dumps(h.to_json()))) == h


def test_remap_add_matches_formula() -> None:
    """remap_add keeps a block unless q mod N_j names a new disk, then moves it there."""
    # X=37, 4 -> 6 disks: q=9, r=1, 9%6=3 < 4 so stays on disk 1; X1 = 6 + 1.
    assert remap_add(37, 4, 6) == 7
    # X=17, 4 -> 6: q=4, r=1, 4%6=4 >= 4 so moves to new disk 4; X1 = 0 + 4.
    assert remap_add(17, 4, 6) == 4


def test_remap_remove_matches_formula() -> None:
    """remap_remove renumbers survivors and sends blocks of removed disks to q mod N_j."""
    # X=23, 5 -> 3 removing {1, 3}: q=4, r=3 removed -> (4//3)*3 + 4%3 = 4, disk 1.
    assert remap_remove(23, 5, (1, 3)) == 4
    # X=24: q=4, r=4 survives as new(4)=2 -> 3 + 2 = 5, disk 2.
    assert remap_remove(24, 5, (1, 3)) == 5


def test_placement_is_pinned() -> None:
    """The hash and the REMAP chain are frozen: every node and every version computes these values."""
    h = ScalingHistory(("a", "b", "c")).add(["d", "e"]).remove([1])
    assert word(42, 0, 0) == 10153590893375828546
    assert list(words(42, 5, 3, 1)) == [word(42, i, 1) for i in (5, 6, 7)]
    assert disks_of(42, 16, h) == PINNED


PINNED = [1, 1, 3, 1, 3, 3, 1, 2, 2, 1, 2, 2, 0, 0, 1, 0]


def test_history_tables_and_ids() -> None:
    """Removal renumbers survivors in order and disk ids stay attached to their disks."""
    h = ScalingHistory(("a", "b", "c")).add([LogicalDisk("d", "n2", "p")]).remove_ids(["b"])
    assert h.disk_ids == ("a", "c", "d")
    assert h.counts() == (3, 4, 3)
    assert h.index_of("d") == 2
    assert h.disks[2].physical == "p"
    assert h.disks[0].physical == "a"
    assert h.prefix(1).disk_ids == ("a", "b", "c", "d")
    assert h.ops[1] == RemoveDisks((1,))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ScalingHistory(()), "at least one disk"),
        (lambda: ScalingHistory(("a",)).remove([0]), "every disk"),
        (lambda: ScalingHistory(("a", "b")).remove([2]), "out of range"),
        (lambda: ScalingHistory(("a", "b")).add(["a"]), "duplicate"),
        (lambda: ScalingHistory(("a",)).add([]), "adding no disks"),
        (lambda: ScalingHistory(("a",)).index_of("zz"), "no such"),
        (lambda: ScalingHistory.from_json({"initial": ["a"], "ops": [{"grow": 1}]}), "unknown"),
        (lambda: ScalingHistory.from_json({"ops": []}), "malformed"),
    ],
)
def test_bad_histories_are_refused(build: object, message: str) -> None:
    """Inconsistent histories raise HistoryError with a clear message."""
    with pytest.raises(HistoryError, match=message):
        build()  # type: ignore[operator]
