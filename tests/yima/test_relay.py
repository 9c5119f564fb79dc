"""The in-order relay for standard players."""

from __future__ import annotations

import bisect
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yimaporc.yima._rtsp_plan import _header_length
from yimaporc.yima.relay import Reorderer, rewrite, rewrite_run


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


# --- a release as one run: the batched paths give what the per-packet ones gave ----------


def _node_packet(draw: st.DrawFn) -> bytes:
    """A packet as a node (or a stranger) may send it: any flags, CSRCs, extension."""
    cc = draw(st.sampled_from([0, 0, 0, 1, 3]))
    x = draw(st.booleans())
    b0 = 0x80 | (0x10 if x else 0) | cc | draw(st.sampled_from([0, 0x20]))
    head = bytes((b0, draw(st.integers(0, 255)))) + draw(st.binary(min_size=10, max_size=10))
    body = draw(st.binary(min_size=4 * cc, max_size=4 * cc))
    if x:
        words = draw(st.integers(0, 3))
        ext = (
            b"\xbe\xde"
            + words.to_bytes(2, "big")
            + draw(st.binary(min_size=4 * words, max_size=4 * words))
        )
        body += ext[: draw(st.integers(0, len(ext)))]  # sometimes cut short
        if len(body) < 4 * cc + len(ext):
            return head + body
    return head + body + draw(st.binary(max_size=40))


@st.composite
def _runs(draw: st.DrawFn) -> list[bytes]:
    return draw(st.lists(st.composite(lambda d: _node_packet(d))(), min_size=1, max_size=12))


@given(_runs(), st.integers(-70_000, 70_000), st.binary(min_size=4, max_size=4), st.booleans())
def test_a_run_rewritten_at_once_is_byte_for_byte_the_packets_rewritten_one_by_one(
    packets: list[bytes], delta: int, ssrc: bytes, keep: bool
) -> None:
    """rewrite_run gives rewrite()'s packets back to back, their lengths, and the payload
    bytes the old per-packet count gave (length less the header), whatever the header."""
    buf, lengths, octets = rewrite_run(packets, delta, ssrc, keep)
    one = [rewrite(p, int.from_bytes(p[2:4], "big") + delta, ssrc, keep) for p in packets]
    assert bytes(buf) == b"".join(one)
    assert lengths == [len(p) for p in one]
    assert octets == sum(len(p) - _header_length(p) for p in one)


def _paced_pair(due_at: list[float]) -> tuple[Reorderer, Reorderer]:
    """The same paced reorderer twice: asking ``due`` packet by packet, and with the
    ``due_upto`` bound (first gseq not due, by bisection over ``due_at``)."""

    def due(g: int) -> float:
        return due_at[g] if g < len(due_at) else due_at[-1] + 1.0

    def upto(now: float) -> int:
        return bisect.bisect_right(due_at, now)

    return Reorderer(hold=0.05, due=due), Reorderer(hold=0.05, due=due, due_upto=upto)


@given(st.integers(0, 100_000))
def test_due_upto_and_settled_pushes_release_what_asking_every_packet_released(seed: int) -> None:
    """Paced: runs pushed (later ones of a run marked settled), ticks, duplicates, late
    ones and gaps: releases with due_upto and settled pushes are the same packets at the
    same calls, with the same counts, as asking due() for every packet."""
    rng = random.Random(seed)
    n = 200
    due_at = sorted(rng.uniform(0, 2.0) for _ in range(n))
    if rng.random() < 0.5:  # equal instants, as packets of one time-index entry have
        due_at = [round(t, 1) for t in due_at]
    slow, fast = _paced_pair(due_at)
    order = list(range(n))
    rng.shuffle(order)
    order.sort(key=lambda g: g + rng.uniform(-30, 30))  # roughly in order
    now, i = 0.0, 0
    while i < len(order) or now < 3.0:
        now += rng.uniform(0, 0.03)
        if i < len(order) and rng.random() < 0.8:
            run = order[i : i + rng.randint(1, 8)]
            i += len(run)
            if rng.random() < 0.1:
                run.append(rng.choice(run))  # a duplicate inside the run
            for k, g in enumerate(run):
                a = slow.push(g, g.to_bytes(2, "big"), now)
                b = fast.push(g, g.to_bytes(2, "big"), now, settled=k > 0)
                assert a == b
        else:
            assert slow.tick(now) == fast.tick(now)
        assert slow.next_deadline() == fast.next_deadline()
        assert slow.next == fast.next
    assert slow.stats == fast.stats
    assert slow.stats.forwarded + slow.stats.gaps_skipped >= n - 1


def test_skipped_gaps_are_remembered_once_and_bounded() -> None:
    """take_skipped is true once per given-up gseq, false for forwarded ones; it keeps at
    most ``limit`` of them however large the gap."""
    r = Reorderer(hold=0.1, limit=4)
    r.push(0, b"a", 0.0)
    r.push(10, b"k", 0.0)
    assert r.tick(1.0) == [b"k"]
    assert r.stats.gaps_skipped == 9
    assert [g for g in range(12) if r.take_skipped(g)] == [6, 7, 8, 9]
    assert not r.take_skipped(9), "only once"
    assert r.stats.too_late == 12 - 4 + 1
    r.reset(0)
    assert not r.take_skipped(7)
