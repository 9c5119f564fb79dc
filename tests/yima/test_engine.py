"""DeliveryEngine: reads ahead off a fake store, sends each packet at its deadline."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from yimaporc.yima.engine import DeliveryEngine
from yimaporc.yima.schedule import PAYLOAD, MediaTiming, NodeScheduler, Packet

BLOCK = 4 * PAYLOAD


def media(blocks: int) -> MediaTiming:
    return MediaTiming(
        "m", blocks * BLOCK, BLOCK, tuple(float(i) for i in range(blocks)), float(blocks)
    )


def block_bytes(i: int) -> bytes:
    return bytes([i]) * BLOCK


def test_packets_go_out_on_time_with_right_payload() -> None:
    """Every packet is emitted at (not before) its deadline with its slice of the block."""
    clock = Clock()
    sched = NodeScheduler(prefetch=1.5)
    sent: list[tuple[float, Packet, bytes]] = []
    eng = DeliveryEngine(
        clock, clock.seconds, sched,
        lambda m, b: succeed(block_bytes(b)),
        lambda p, data: sent.append((clock.seconds(), p, data)),
    )  # fmt: skip
    sched.add("s", media(3), [0, 2], start_ct=1.0)
    eng.poke()
    for _ in range(400):
        clock.advance(0.01)
    assert [p.gseq for _, p, _ in sent] == [0, 1, 2, 3, 8, 9, 10, 11]
    for t, p, data in sent:
        assert t >= p.deadline - 1e-9 and t - p.deadline < 0.02
        assert data == bytes([p.block]) * PAYLOAD


def test_slow_read_delays_then_recovers_and_failure_retries() -> None:
    """A block read that is slow holds its packets; a failed read is retried."""
    clock = Clock()
    sched = NodeScheduler(prefetch=0.5)
    pending: dict[int, Deferred[bytes]] = {}
    attempts: list[int] = []

    def read(m: str, b: int) -> Deferred[bytes]:
        attempts.append(b)
        if b == 1 and attempts.count(1) == 1:
            return fail(OSError("disk hiccup"))
        d: Deferred[bytes] = Deferred()
        pending[b] = d
        return d

    sent: list[Packet] = []
    eng = DeliveryEngine(clock, clock.seconds, sched, read, lambda p, d: sent.append(p))
    sched.add("s", media(2), [0, 1], start_ct=0.0)
    eng.poke()
    clock.advance(0.3)
    assert sent == []
    pending.pop(0).callback(block_bytes(0))
    assert [p.gseq for p in sent] == [0, 1]
    for _ in range(300):
        clock.advance(0.01)
        for b in list(pending):
            pending.pop(b).callback(block_bytes(b))
    assert [p.gseq for p in sent] == list(range(8))
    assert attempts.count(1) == 2 and eng.read_errors == 1


def test_many_sessions_share_wake_ups() -> None:
    """With sessions offset by less than a millisecond, one wake-up sends every due
    packet (at most ``min_interval`` late), not one wake-up per packet."""
    clock = Clock()
    sched = NodeScheduler(prefetch=1.5)
    sent: list[tuple[float, Packet]] = []
    eng = DeliveryEngine(
        clock, clock.seconds, sched,
        lambda m, b: succeed(block_bytes(b)),
        lambda p, data: sent.append((clock.seconds(), p)),
    )  # fmt: skip
    for k in range(40):
        sched.add(f"s{k}", media(3), [0, 1, 2], start_ct=1.0 + k * 0.00001)
    eng.poke()
    for _ in range(10000):
        clock.advance(0.0005)
    assert len(sent) == 40 * 12
    assert all(p.deadline - 1e-9 <= t <= p.deadline + eng.min_interval + 1e-4 for t, p in sent)
    assert eng.ticks < len(sent) / 10, (eng.ticks, len(sent))


def test_send_ahead_batches_a_session_per_wake_up_never_late() -> None:
    """With ``send_ahead`` a tick takes every packet due within it: runs of several
    packets per call, none sent late or more than ``send_ahead`` early, wake-ups at
    least that far apart."""
    clock = Clock()
    sched = NodeScheduler(prefetch=1.5)
    runs: list[tuple[float, tuple]] = []  # type: ignore[type-arg]
    fine = MediaTiming("m", 3 * BLOCK * 8, BLOCK * 8, (0.0, 1.0, 2.0), 3.0)  # 32 pkt/s
    eng = DeliveryEngine(
        clock, clock.seconds, sched,
        lambda m, b: succeed(bytes(BLOCK * 8)),
        lambda p, data: None,
        emit_run=lambda run, data: runs.append((clock.seconds(), run)),
        send_ahead=0.1,
    )  # fmt: skip
    sched.add("s", fine, [0, 1, 2], start_ct=1.0)
    eng.poke()
    for _ in range(5000):
        clock.advance(0.001)
    assert sum(r[3] for _, r in runs) == 96 and eng.sent == 96
    for t, (_sid, _b, _j, count, _ns, d0, step) in runs:
        assert d0 - 0.1 - 1e-9 <= t <= d0 + 0.002, "never late, at most send_ahead early"
        assert t >= d0 + (count - 1) * step - 0.1 - 1e-9
    assert len(runs) <= 96 / 3, "several packets per run"
    assert eng.stats.late_packets == 0


def test_early_runs_leave_one_timer_not_one_chain_each() -> None:
    """poke() and block arrivals while a wake-up is pending replace it: one timer in all,
    so the tick count follows the packets, not the number of sessions started."""
    clock = Clock()
    sched = NodeScheduler(prefetch=1.5)
    eng = DeliveryEngine(clock, clock.seconds, sched, lambda m, b: succeed(block_bytes(b)),
                         lambda p, data: None)  # fmt: skip
    for k in range(50):
        sched.add(f"s{k}", media(3), [0, 1, 2], start_ct=1.0)
        eng.poke()
        clock.advance(0.001)
    assert len(clock.getDelayedCalls()) == 1
    for _ in range(4000):
        clock.advance(0.001)
    assert eng.sent == 50 * 12
    assert eng.ticks < 200, eng.ticks  # 12 distinct deadlines (+ the pokes), not 50 x that


def test_a_block_read_ahead_waits_for_the_timer_and_a_waited_for_one_goes_at_once() -> None:
    """A block that arrives ahead of its packets runs no tick of its own (the timer's
    tick sends them, whole); one that due packets wait for is sent on arrival."""
    clock = Clock()
    sched = NodeScheduler(prefetch=1.5)
    reads: dict[int, Deferred[bytes]] = {}

    def read(m: str, b: int) -> Deferred[bytes]:
        reads[b] = Deferred()
        return reads[b]

    sent: list[tuple[float, Packet]] = []
    eng = DeliveryEngine(clock, clock.seconds, sched, read,
                         lambda p, data: sent.append((clock.seconds(), p)))  # fmt: skip
    sched.add("s", media(3), [0, 1, 2], start_ct=1.0)
    eng.poke()
    clock.advance(0.5)
    ticks = eng.ticks
    reads[0].callback(block_bytes(0))  # 0.5 s before its first packet: read ahead
    assert eng.ticks == ticks and sent == []
    clock.advance(0.5)  # the timer, at the first deadline
    assert [p.gseq for _, p in sent] == [0]
    clock.advance(1.0)  # block 1's packets are due from 2.0: it is still being read
    assert [p.gseq for _, p in sent] == [0, 1, 2, 3]
    late = clock.seconds()
    reads[1].callback(block_bytes(1))  # waited for: its due packet goes now
    assert sent[-1] == (late, sent[-1][1]) and sent[-1][1].gseq == 4
