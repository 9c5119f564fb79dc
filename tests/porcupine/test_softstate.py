"""Soft-state reconstruction: after any membership change, fragment lists equal hard state."""

from __future__ import annotations

import random

import pytest

from yimaporc.cluster.buckets import BucketMap
from yimaporc.porcupine.softstate import UserManagerState, bucket_of, hints_for
from yimaporc.testing.seeds import sweep

NB = 256


def run(seed: int, n_nodes: int, n_users: int = 200, changes: int = 8) -> dict[str, float]:
    """Random mail placement, random crashes/returns/additions; check after each change."""
    rng = random.Random(seed)
    all_nodes = [f"n{i:02d}" for i in range(n_nodes + 3)]
    live = set(all_nodes[:n_nodes])
    users = [f"user{u}@example.org" for u in range(n_users)]
    mail = {u: set(rng.sample(sorted(live), rng.randint(1, 3))) for u in users}
    profile_replicas = {u: set(rng.sample(sorted(live), 2)) for u in users}
    states = {n: UserManagerState(n, NB) for n in all_nodes}
    current = BucketMap.empty(NB)
    reads_per_node: list[float] = []
    for epoch in range(1, changes + 1):
        if epoch > 1:
            action = rng.choice(["crash", "return", "add"])
            if action == "crash" and len(live) > 2:
                live.discard(rng.choice(sorted(live)))
            elif action == "return":
                back = sorted(set(all_nodes[:n_nodes]) - live)
                if back:
                    live.add(rng.choice(back))
            elif action == "add":
                new = sorted(set(all_nodes) - live)
                if new:
                    live.add(new[0])
        previous = set(current.owners)
        current = current.reassign(live, epoch)
        hints = []
        reads = 0
        for n in sorted(live):
            fresh = states[n].install(current, live)
            if n not in previous:
                fresh = set(range(NB))  # a (re)joining node tells every manager
            reads += len(fresh)

            def users_with_mail(b: int, n: str = n) -> list[str]:
                return [u for u in users if n in mail[u] and bucket_of(u, NB) == b]

            def profiles_here(b: int, n: str = n) -> dict[str, bytes]:
                return {
                    u: u.encode()
                    for u in users
                    if n in profile_replicas[u] and bucket_of(u, NB) == b
                }

            def sender(u: str, n: str = n) -> bool:
                return n == max(profile_replicas[u] & live)

            hints.extend(hints_for(n, current, fresh, users_with_mail, profiles_here, sender))
        reads_per_node.append(reads / len(live))
        rng.shuffle(hints)
        for dest, hint in hints:
            assert dest in live
            assert states[dest].apply_hint(hint)
        for u in users:
            manager = current.owners[bucket_of(u, NB)]
            assert manager in live
            assert states[manager].fragment_list(u) == mail[u] & live, (epoch, u)
            if profile_replicas[u] & live:
                assert states[manager].profiles.get(u) == u.encode()
    return {"reads_per_node": sum(reads_per_node[1:]) / max(1, len(reads_per_node) - 1)}


@pytest.mark.parametrize("seed", sweep(range(30), 6))
def test_fragment_lists_match_hard_state_after_changes(seed: int) -> None:
    """Crashes, returns and additions in random order: every manager's lists are exact
    (seeds 0-5, two per cluster size, in `make test`; all 30 under `make test-slow`)."""
    run(seed, n_nodes=[3, 10, 30][seed % 3])


def test_reconstruction_cost_per_node_does_not_grow_with_cluster() -> None:
    """Directory reads per node per change stay flat (or fall) from 3 to 30 nodes."""
    cost = {n: sum(run(s, n)["reads_per_node"] for s in range(4)) / 4 for n in (3, 10, 30)}
    assert cost[30] <= cost[3] * 1.2, cost


def test_hint_for_other_map_is_ignored() -> None:
    """A hint computed against an older map epoch is not merged."""
    s = UserManagerState("a", 8)
    s.install(BucketMap.empty(8).reassign(["a"], 2), ["a", "b"])
    from yimaporc.porcupine.softstate import Hint

    assert not s.apply_hint(Hint("b", 0, 1, ("x",)))
    assert s.apply_hint(Hint("b", bucket_of("x", 8), 2, ("x",)))
    assert s.fragment_list("x") == {"b"}
