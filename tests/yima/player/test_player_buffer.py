"""Reassembly buffer, playout consumer and 16-bit sequence extension."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yimaporc.yima.player.buffer import Buffered, PlayoutBuffer
from yimaporc.yima.player.seq import SeqExtender, extend_seq, seq_lt


def pkt(g: int, mt: float | None = None, size: int = 100) -> Buffered:
    return Buffered(g, g * 0.01 if mt is None else mt, size, node=g % 3, node_seq=g // 3)


def test_extend_seq_wraps_forward_65535_to_0() -> None:
    """65535 followed by 0 continues upward instead of jumping back."""
    assert extend_seq(65535, 0) == 65536
    assert extend_seq(65536 + 65535, 1) == 2 * 65536 + 1


def test_extend_seq_late_packet_before_wrap_stays_behind() -> None:
    """A reordered 65534 after 0 (extended 65536) maps before it, not a cycle ahead."""
    assert extend_seq(65536, 65534) == 65534
    assert extend_seq(None, 65535) == 65535


def test_extend_seq_rejects_non_16_bit() -> None:
    """Numbers outside 0..65535 are refused."""
    with pytest.raises(ValueError):
        extend_seq(0, 65536)


def test_seq_lt_is_serial_across_wrap() -> None:
    """RFC 1982 order: 65535 precedes 0, and 0 does not precede 65535."""
    assert seq_lt(65535, 0)
    assert not seq_lt(0, 65535)
    assert not seq_lt(7, 7)


@given(st.integers(0, 200_000), st.lists(st.integers(-300, 300), max_size=60))
def test_extender_recovers_true_numbers_under_reordering(start: int, jitter: list[int]) -> None:
    """Any reordering of less than half the space is undone exactly, across several wraps."""
    truth = [max(0, start + i * 1000 + j) for i, j in enumerate(jitter)]
    ext = SeqExtender()
    ext.highest = truth[0] if truth else None
    for t in truth:
        assert ext.extend(t % 65536) == t


def test_out_of_order_duplicates_from_several_nodes_play_in_global_order() -> None:
    """Shuffled packets with duplicates are played once each, ascending, at their times."""
    rng = random.Random(4)
    b = PlayoutBuffer(playout_start=1.0, total=50)
    arrivals = [pkt(g) for g in range(50)] + [pkt(g) for g in range(0, 50, 7)]
    rng.shuffle(arrivals)
    results = [b.insert(p, 0.5) for p in arrivals]
    assert results.count("duplicate") == 8
    assert b.level_bytes == 50 * 100
    played = b.play(1.0 + 0.245)
    assert [p.gseq for p in played] == list(range(25))
    played += b.play(10.0)
    assert [p.gseq for p in played] == list(range(50))
    assert b.stats.missing == 0 and b.stats.underflows == 0 and b.done


def test_missing_and_late_packets_are_counted_once() -> None:
    """A hole passed by the consumer is missing; its packet arriving afterwards is late."""
    b = PlayoutBuffer(playout_start=0.0, total=4)
    for g in (0, 1, 3):
        b.insert(pkt(g, mt=g * 1.0), 0.0)
    assert [p.gseq for p in b.play(3.0)] == [0, 1, 3]
    assert b.stats.missing == 1
    assert b.insert(pkt(2, mt=2.0), 3.1) == "late"
    assert b.stats.late == 1 and b.stats.missing == 1


def test_packet_past_its_playout_instant_is_late_even_if_not_yet_skipped() -> None:
    """Arriving after its own playout instant counts late and is not buffered."""
    b = PlayoutBuffer(playout_start=0.0)
    assert b.insert(pkt(0, mt=1.0), 1.5) == "late"
    assert b.level_bytes == 0


def test_underflow_counted_per_dry_spell() -> None:
    """Running dry while playing is one underflow until data comes back."""
    b = PlayoutBuffer(playout_start=0.0, total=10)
    b.insert(pkt(0, mt=0.0), 0.0)
    b.play(0.0)
    b.play(0.1)
    b.play(0.2)
    assert b.stats.underflows == 1
    b.insert(pkt(1, mt=0.5), 0.3)
    b.play(0.6)
    assert b.stats.underflows == 2


def test_playout_follows_rate_and_level_seconds() -> None:
    """At rate 2 media second 1.0 plays at 0.5 s; level counts media seconds ahead."""
    b = PlayoutBuffer(playout_start=0.0, rate=2.0)
    b.insert(pkt(0, mt=1.0), 0.0)
    b.insert(pkt(1, mt=3.0), 0.0)
    assert b.playout_time(1.0) == 0.5
    assert b.level_seconds(0.0) == 3.0
    assert b.level_seconds(1.0) == 1.0
    assert [p.gseq for p in b.play(0.5)] == [0]


def test_finish_counts_unplayed_tail_as_missing() -> None:
    """At the end every position never played is missing."""
    b = PlayoutBuffer(playout_start=0.0, total=10)
    for g in range(6):
        b.insert(pkt(g), 0.0)
    b.play(1.0)
    b.finish()
    assert b.stats.missing == 4 and b.done


@given(
    st.lists(st.integers(0, 59), max_size=120),
    st.floats(0.0, 1.0),
)
def test_any_arrival_order_plays_ascending_and_accounts_every_position(
    arrivals: list[int], cut: float
) -> None:
    """Whatever arrives, played + missing covers every position once, in ascending order."""
    b = PlayoutBuffer(playout_start=0.0, total=60)
    played: list[int] = []
    for i, g in enumerate(arrivals):
        now = cut * i / max(1, len(arrivals))
        played += [p.gseq for p in b.play(now)]
        b.insert(pkt(g), now)
    played += [p.gseq for p in b.play(100.0)]
    b.finish()
    assert played == sorted(set(played))
    assert len(played) + b.stats.missing == 60
    assert b.level_bytes == 0
