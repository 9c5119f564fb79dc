"""The delivery load balancer: affinity, spread limit, widening under failure or imbalance."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from yimaporc.porcupine.balancer import FAIL_AVOID, IMBALANCE_SLACK, LoadBalancer, load_figure

NODES = [f"n{i:02d}" for i in range(10)]


def even(lb: LoadBalancer, now: float = 0.0, load: float = 1.0) -> None:
    """Every node reports the same load."""
    for n in NODES:
        lb.observe(n, load, now)


def test_load_figure_is_pending_ops_plus_a_little_rate() -> None:
    """Load is pending disk operations, plus 0.1 per op/s of recent rate, never negative."""
    assert load_figure(0) == 0.0
    assert load_figure(5) == 5.0
    assert load_figure(5, 10.0) == pytest.approx(6.0)
    assert load_figure(-3, -1.0) == 0.0


def test_bad_settings_are_refused() -> None:
    """A spread limit below 1 or an imbalance factor below 1 is a configuration error."""
    with pytest.raises(ValueError):
        LoadBalancer("n00", spread_limit=0)
    with pytest.raises(ValueError):
        LoadBalancer("n00", imbalance=0.5)


def test_new_user_gets_least_loaded_nodes() -> None:
    """A user without fragments is stored on the least loaded live node(s)."""
    lb = LoadBalancer("n00")
    for i, n in enumerate(NODES):
        lb.observe(n, 10.0 - i, 0.0)
    assert lb.choose(NODES, [], 1, 0.0) == ["n09"]
    lb.observe("n09", 1.0, 0.0)
    assert lb.choose(NODES, [], 2, 0.0) == ["n09", "n08"]


def test_affinity_keeps_existing_fragment_nodes() -> None:
    """With equal load, mail goes to nodes that already hold the user's mail."""
    lb = LoadBalancer("n00", spread_limit=2)
    even(lb)
    for i in range(50):
        (pick,) = lb.choose(NODES, ["n03", "n07"], 1, float(i) * 0.01)
        assert pick in {"n03", "n07"}
        lb.observe(pick, 1.0, float(i) * 0.01)


def test_ties_alternate_between_equal_nodes() -> None:
    """Equally loaded candidates take turns (hash tie-break), not always the same one."""
    lb = LoadBalancer("n00", spread_limit=2)
    even(lb)
    picks: Counter[str] = Counter()
    for _ in range(100):
        (pick,) = lb.choose(NODES, ["n03", "n07"], 1, 0.0)
        picks[pick] += 1
        lb.observe(pick, 1.0, 0.0)  # the reply reports the same load again
    assert set(picks) == {"n03", "n07"}
    assert min(picks.values()) >= 25


def test_spread_filled_up_to_limit_then_held_under_skew() -> None:
    """One very active user's mail never spreads past the limit while loads stay balanced."""
    lb = LoadBalancer("n00", spread_limit=3)
    rng = random.Random(1)
    frags: list[str] = []
    for i in range(2000):
        now = i * 0.001
        # Every node reports a modest, noisy load (the cluster is not imbalanced).
        for n in NODES:
            lb.observe(n, rng.uniform(0.0, 3.0), now)
        (pick,) = lb.choose(NODES, frags, 1, now)
        if pick not in frags:
            frags.append(pick)
        assert len(frags) <= 3
    assert len(frags) == 3
    assert lb.widened_imbalance == 0


def test_more_replicas_than_spread_limit() -> None:
    """Replicas beyond the spread limit are honoured: the candidate set is max(limit, replicas)."""
    lb = LoadBalancer("n00", spread_limit=1)
    even(lb)
    picks = lb.choose(NODES, ["n05"], 3, 0.0)
    assert len(picks) == 3 and len(set(picks)) == 3
    assert "n05" in picks


def test_failure_widens_and_dead_nodes_are_never_chosen() -> None:
    """A fragment node that is not live is replaced by another node (spread widens)."""
    lb = LoadBalancer("n00", spread_limit=2)
    even(lb)
    live = [n for n in NODES if n != "n03"]
    frags = ["n03", "n07"]
    picks: Counter[str] = Counter()
    for _ in range(40):
        (pick,) = lb.choose(live, frags, 1, 0.0)
        picks[pick] += 1
        if pick not in frags:
            frags.append(pick)
        lb.observe(pick, 1.0, 0.0)
    assert "n03" not in picks
    # One replacement joins n07; the user's spread is 3 (n03 keeps its old mail).
    assert len(picks) == 2 and "n07" in picks and len(frags) == 3
    assert lb.widened_failure == 1


def test_failed_call_is_avoided_for_a_while() -> None:
    """After failed(), a live node is skipped until FAIL_AVOID passes or it reports load."""
    lb = LoadBalancer("n00", spread_limit=1)
    even(lb)
    assert lb.choose(NODES, ["n04"], 1, 0.0) == ["n04"]
    lb.observe("n04", 1.0, 0.0)
    lb.failed("n04", 1.0)
    assert lb.choose(NODES, ["n04"], 1, 1.0) != ["n04"]
    assert lb.status()["avoiding"] == {"n04": 1.0 + FAIL_AVOID}
    even(lb, now=2.0)  # reports clear the failure mark
    assert lb.choose(NODES, ["n04"], 1, 2.0) == ["n04"]
    lb.failed("n04", 3.0)
    assert lb.choose(NODES, ["n04"], 1, 3.0 + FAIL_AVOID) == ["n04"]


def test_all_failed_still_chooses_someone() -> None:
    """If every live node failed recently, the balancer still names one rather than none."""
    lb = LoadBalancer("n00")
    for n in NODES[:3]:
        lb.failed(n, 0.0)
    assert len(lb.choose(NODES[:3], [], 1, 0.0)) == 1
    assert lb.choose([], ["n01"], 1, 0.0) == []
    assert lb.choose(NODES, [], 0, 0.0) == []


def test_imbalance_widens_beyond_the_limit() -> None:
    """If the user's nodes are much busier than the least loaded node, mail goes elsewhere."""
    lb = LoadBalancer("n00", spread_limit=2, imbalance=2.0)
    even(lb, load=1.0)
    lb.observe("n03", 40.0, 0.0)
    lb.observe("n07", 30.0, 0.0)
    (pick,) = lb.choose(NODES, ["n03", "n07"], 1, 0.0)
    assert pick not in {"n03", "n07"}
    assert lb.widened_imbalance == 1
    # Moderately busier (below imbalance x least + slack): affinity wins.
    lb.observe("n03", 5.0, 0.0)
    assert lb.choose(NODES, ["n03", "n07"], 1, 0.0) == ["n03"]


def test_slow_node_gets_less() -> None:
    """A node whose queue stays long (slow disk) receives less mail; the spread limit holds."""
    lb = LoadBalancer("n00", spread_limit=2)
    rng = random.Random(7)
    pending = dict.fromkeys(NODES, 0)
    got: Counter[str] = Counter()
    frags: dict[str, list[str]] = {}
    for i in range(500):
        now = i * 0.01
        for _ in range(7):  # 7 arrivals per tick; the cluster drains up to 9.25
            user = f"u{rng.randrange(300)}"
            (pick,) = lb.choose(NODES, frags.get(user, []), 1, now)
            got[pick] += 1
            if pick not in frags.setdefault(user, []):
                frags[user].append(pick)
            pending[pick] += 1
        for n in NODES:  # each tick a node finishes one operation; n05 only every 4th
            rate = 0.25 if n == "n05" else 1.0
            if pending[n] and rng.random() < rate:
                pending[n] -= 1
            lb.observe(n, load_figure(pending[n]), now)
    others = [got[n] for n in NODES if n != "n05"]
    assert got["n05"] < 0.5 * (sum(others) / len(others))
    assert max(len(f) for f in frags.values()) == 2


def test_unknown_and_stale_load_count_as_average() -> None:
    """A node never heard from, or heard from too long ago, is assumed average."""
    lb = LoadBalancer("n00", stale_after=30.0)
    lb.observe("a", 2.0, 0.0)
    lb.observe("b", 4.0, 0.0)
    assert lb.load_of("zz", 0.0) == pytest.approx(3.0)
    lb.observe("c", 100.0, -60.0)
    assert lb.load_of("c", 0.0) == pytest.approx(3.0)
    assert LoadBalancer("x").load_of("y", 0.0) == 0.0


def test_choices_count_until_next_report() -> None:
    """Messages sent since a node's last report add to its assumed load."""
    lb = LoadBalancer("n00", spread_limit=3)
    even(lb, load=0.0)
    picks = [lb.choose(NODES, ["n01", "n02", "n03"], 1, 0.0)[0] for _ in range(6)]
    assert Counter(picks) == {"n01": 2, "n02": 2, "n03": 2}
    lb.observe("n01", 0.0, 0.0)
    assert lb.load_of("n01", 0.0) == 0.0
    assert lb.load_of("n02", 0.0) == 2.0


def test_status_is_json() -> None:
    """status() is JSON-able and names the settings and known loads."""
    lb = LoadBalancer("n00", spread_limit=3)
    even(lb)
    lb.choose(NODES, [], 2, 0.0)
    st = json.loads(json.dumps(lb.status()))
    assert st["spread_limit"] == 3 and st["me"] == "n00"
    assert set(st["loads"]) == set(NODES)


def test_deterministic() -> None:
    """The same calls give the same choices."""

    def run() -> list[list[str]]:
        lb = LoadBalancer("n00")
        even(lb)
        return [lb.choose(NODES, [], 2, 0.0) for _ in range(20)]

    assert run() == run()


def test_prefer_takes_a_free_place_and_goes_first_within_the_slack() -> None:
    """The delivering node (``prefer``) fills a free place of a new user's spread and is
    chosen while its load is within IMBALANCE_SLACK of the lightest candidate's."""
    lb = LoadBalancer("n05")
    even(lb)
    lb.own_load = lambda: 1.0 + IMBALANCE_SLACK
    assert lb.choose(NODES, [], 1, 0.0, prefer="n05") == ["n05"]
    assert lb.choose(NODES, ["n03"], 1, 0.0, prefer="n05") == ["n05"], "the 2nd place"
    assert lb.preferred == 2
    assert lb.choose(NODES, [], 1, 0.0) != ["n05"], "not preferred: the lighter nodes"


def test_prefer_yields_to_load_and_to_a_full_spread() -> None:
    """An overloaded delivering node is not chosen, nor one outside a user's full spread."""
    lb = LoadBalancer("n05", spread_limit=2)
    even(lb)
    lb.own_load = lambda: 1.0 + IMBALANCE_SLACK + 0.5
    assert lb.choose(NODES, ["n03"], 1, 0.0, prefer="n05") == ["n03"]
    lb.own_load = lambda: 0.0
    assert lb.choose(NODES, ["n03", "n07"], 1, 0.0, prefer="n05") in (["n03"], ["n07"])


def test_own_load_is_read_live_without_picks() -> None:
    """With ``own_load`` the node's own figure is that function's (its stores in progress
    are counted there), not a report plus the picks since."""
    lb = LoadBalancer("n00")
    even(lb, load=3.0)
    for _ in range(5):
        lb.choose(["n00"], [], 1, 0.0)
    assert lb.load_of("n00", 0.0) == 8.0
    lb.own_load = lambda: 0.5
    assert lb.load_of("n00", 0.0) == 0.5
