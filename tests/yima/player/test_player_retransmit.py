"""Per-node gap detection and the one-NACK, deadline-aware, rate-limited decision."""

from __future__ import annotations

import pytest

from yimaporc.yima.player.retransmit import RetransmitConfig, Retransmitter, RttEstimator


def make(**kw: float) -> Retransmitter:
    # Playout instant = 10 s + media time; one packet per 10 ms of media.
    cfg = RetransmitConfig(initial_rtt=0.05, reorder_grace=0.004, **kw)  # type: ignore[arg-type]
    return Retransmitter(lambda mt: 10.0 + mt, cfg)


def feed(r: Retransmitter, node: int, seqs: list[int], now: float) -> None:
    for s in seqs:
        r.on_packet(node, s, s * 0.01, now, retransmission=False)


def test_gap_in_one_nodes_sequence_is_nacked_to_that_node_only() -> None:
    """Node 1 skips 3 and 4: one NACK to node 1 naming them; node 0 is not asked."""
    r = make()
    feed(r, 0, [0, 1, 2, 3, 4, 5], 1.0)
    feed(r, 1, [0, 1, 2, 5, 6], 1.0)
    assert r.poll(1.0) == []  # reorder grace
    assert r.poll(1.01) == [(1, (3, 4))]
    assert r.poll(2.0) == []


def test_same_packet_is_never_nacked_twice() -> None:
    """Re-announcing the gap (duplicates, later packets) does not repeat the request."""
    r = make()
    feed(r, 0, [0, 2], 1.0)
    assert r.poll(1.01) == [(0, (1,))]
    feed(r, 0, [0, 2, 3], 1.02)
    assert r.add_tail_gap(0, 1, 0.01, 1.03) is False
    assert r.poll(1.5) == []
    assert r.stats.nacks_sent == 1


def test_reordered_packet_within_grace_is_not_nacked() -> None:
    """A packet arriving out of order before the grace expires closes its gap."""
    r = make()
    feed(r, 0, [0, 2], 1.0)
    feed(r, 0, [1], 1.002)
    assert r.poll(1.01) == []
    assert r.stats.gaps == 1


def test_no_nack_when_the_retransmission_cannot_arrive_in_time() -> None:
    """Gap whose playout is closer than the measured RTT is given up, not requested."""
    r = make()
    for _ in range(5):
        r.on_probe(0, 0.5)
    # Packet 1 plays at 10.01; at 9.8 a 0.5 s round trip cannot make it.
    feed(r, 0, [0, 2], 9.79)
    assert r.poll(9.8) == []
    assert r.stats.given_up_late == 1
    # The same gap earlier in time would have been requested.
    r2 = make()
    for _ in range(5):
        r2.on_probe(0, 0.5)
    feed(r2, 0, [0, 2], 5.0)
    assert r2.poll(5.01) == [(0, (1,))]


def test_rtt_learned_from_nack_to_retransmission_delay() -> None:
    """A retransmission answering a NACK feeds the node's RTT estimate."""
    r = make()
    feed(r, 3, [0, 2], 1.0)
    r.poll(1.01)
    r.on_packet(3, 1, 0.01, 1.09, retransmission=True)
    assert r.nodes[3].rtt.srtt == pytest.approx(0.08)
    assert r.stats.recovered == 1
    assert r.nodes[3].missing == {}


def test_token_bucket_caps_nacks_under_burst_loss() -> None:
    """A 500-packet burst yields at most ``burst`` requests at once, refilled at ``rate``."""
    r = make(rate=50.0, burst=20.0)
    feed(r, 0, [0, 501], 1.0)
    first = r.poll(1.01)
    assert sum(len(s) for _, s in first) == 20
    later = r.poll(1.31)
    assert sum(len(s) for _, s in later) == 15
    asked = [k for _, s in first + later for k in s]
    assert len(asked) == len(set(asked))


def test_nack_splits_at_max_per_message() -> None:
    """Never more than ``max_per_nack`` sequence numbers in one NACK message."""
    r = make(burst=500.0, max_per_nack=16)
    feed(r, 0, [0, 41], 1.0)
    out = r.poll(1.01)
    assert [len(s) for _, s in out] == [16]


def test_tail_gap_needs_no_reorder_grace() -> None:
    """A gap reported by the core's silence timeout is requested at once."""
    r = make()
    feed(r, 2, [0, 1], 1.0)
    assert r.add_tail_gap(2, 2, 0.02, 1.2)
    assert r.poll(1.2) == [(2, (2,))]


def test_rtt_estimator_follows_rfc6298() -> None:
    """First sample sets srtt and rttvar = rtt/2; later ones are smoothed."""
    e = RttEstimator(initial=1.0)
    assert e.timeout() == 1.0
    e.sample(0.1)
    assert e.timeout() == pytest.approx(0.1 + 4 * 0.05)
    e.sample(0.2)
    assert e.srtt == pytest.approx(0.1125)


def test_next_timer_points_at_the_grace_expiry() -> None:
    """With a fresh gap pending, the timer is when its grace ends."""
    r = make()
    assert r.next_timer(1.0) is None
    feed(r, 0, [0, 2], 1.0)
    assert r.next_timer(1.0) == pytest.approx(1.004)
