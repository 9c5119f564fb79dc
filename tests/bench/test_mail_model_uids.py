"""Issue 14 item 1's UID invariants in every simulator seed: ``mailsim.uid_seed`` runs
the shipped reconstruction core (porcupine/reconstruct.py) on 5 nodes under crashes,
restarts, clean and bridge partitions and pauses, checks every client read, then
heals and reads every user at every node (docs/mail.md, "One reconstruction core").

The classes below hold in every seed run so far (since the visibility horizon also
"newly visible below a UID shown": 0 in 500 seeds); "UID changed or message hidden"
(a manager cut off by a partition answering reads before failure detection, docs/mail.md
known limit (a), seeds 117 and 432) is closed by the read lease; "one message under
two UIDs" is checked since replicated users run here too (``replica_mix``).
"""

from __future__ import annotations

import pytest
from mailmodel.mailsim import (
    UID_FAULTS,
    uid_seed,
    uid_sweep,
    violation_kind,
)

from yimaporc.testing.seeds import sweep

#: Violation classes the core now rules out (see the module docstring).
GUARANTEED = {
    "UID changed or message hidden",
    "two messages under one UID",
    "one message under two UIDs",
    "UID reused",
    "newly visible below a UID shown",
    "UIDNEXT decreased",
    "UID at or above UIDNEXT",
    "acknowledged message hidden after the heal",
}


def hard_problems(problems: list[str]) -> list[str]:
    """The problems of a guaranteed class."""
    return [p for p in problems if violation_kind(p) in GUARANTEED]


@pytest.mark.parametrize("seed", sweep(range(20), 6))  # 20 under `make test-slow`
def test_uid_seed_keeps_the_guaranteed_invariants(seed: int) -> None:
    """Under crashes, partitions (clean and bridge) and pauses, with mail accepted on
    every side: never two messages under one UID, no UID reused, UIDNEXT never lower,
    and after the heal every acknowledged message listed at every node."""
    sim, log, problems = uid_seed(seed)
    assert len(sim.acked) > 300 and sim.checker.reads > 50, "the seed exercised the cluster"
    found = hard_problems(problems)
    assert not found, f"seed {seed}: {found[:5]} after {log}"


@pytest.mark.parametrize("seed", sweep(range(10), 4))  # 10 under `make test-slow`
def test_replicated_users_keep_the_guaranteed_invariants(seed: int) -> None:
    """Users with R = 1, 2 and 3 in turn (issue 14 bug 2): a replicated message's
    UID is fenced like an R=1 delivery's, its copies share the UID its first replica
    got (or wait, held, for the one it is numbered with): never two messages under one
    UID, never one message under two, and every acknowledged message listed after
    the heal."""
    sim, log, problems = uid_seed(seed, replica_mix=(1, 2, 3))
    replicated = [u for u in sim.users if sim.replicas_of(u) > 1]
    assert len(replicated) > 5 and len(sim.acked) > 300, "the seed exercised replication"
    assert any(
        sum(1 for m in sim.mail.values() if msg in m.uids.get(u, {})) > 1
        for u, msg in sim.acked
        if u in replicated
    ), "some replicated message has copies on several nodes"
    found = hard_problems(problems)
    assert not found, f"seed {seed}: {found[:5]} after {log}"
    assert sim.copy_collisions == 0


def test_unfenced_replicated_uids_break_the_invariants() -> None:
    """The checker sees bug 2: with the old path (a replicated delivery's UID taken
    unfenced, even without a majority, every copy numbered on its own) seed 0 lists
    two messages under one UID and one message under two UIDs (seed 5 did before
    numbering waited for the read lease; it still lists the second)."""
    _, _, problems = uid_seed(0, replica_mix=(1, 2, 3), fenced_replicas=False)
    kinds = {violation_kind(p) for p in problems}
    assert {"two messages under one UID", "one message under two UIDs"} <= kinds


@pytest.mark.parametrize("seed", [117, 197, 432])
def test_cut_off_manager_stops_answering_certain(seed: int) -> None:
    """The seeds the 500-seed sweeps left: 117 and 432 (a manager in a minority
    partition, its view not changed yet, answered reads as certain and a reader at its
    side listed the mailbox without mail the majority side had numbered and shown),
    197 (with the read lease: a manager that kept its bucket through a bridge listed
    without a recorded holder in its view whose own hint never reached it): every
    message once shown stays listed under its UID."""
    sim, log, problems = uid_seed(seed)
    assert not problems, f"seed {seed}: {problems[:5]} after {log}"
    assert sim.checker.reads > 50


def test_default_seeds_exercise_every_fault_kind() -> None:
    """The fault mix of the sweep happens: crash, restart, partition, bridge, pause,
    heal each at least once over 10 seeds, and some reads are honestly refused."""
    lines: list[str] = []
    figures = uid_sweep(range(10), out=lines.append)
    assert set(figures["faults"]) == set(UID_FAULTS)
    assert figures["refused"] > 0 and figures["reads"] > figures["refused"]
    assert figures["seeds_per_minute"] > 0 and lines


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_uid_sweep_500_seeds() -> None:
    """500 seeds (``make test-slow``): no guaranteed invariant broken in any of them;
    the figures (seeds per minute, violations by class) are printed."""
    figures = uid_sweep(range(500))
    broken = set(figures["violations_by_kind"]) & GUARANTEED
    assert not broken, figures
