"""The membership shell's one timer: kept while the core's deadline stays, moved when it moves."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.base import DelayedCall
from twisted.internet.task import Clock

from yimaporc.cluster import wire
from yimaporc.cluster.membership import Membership
from yimaporc.cluster.udp import MembershipProtocol

KEY = b"m" * 32
SCOPE = wire.Scope("test", "porcupine")


class CountingClock(Clock):
    """A Clock that counts the timers asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def callLater(self, delay: float, f: Callable[..., Any], *a: Any, **kw: Any) -> DelayedCall:
        self.asked += 1
        return super().callLater(delay, f, *a, **kw)


class Sink:
    """A UDP transport that keeps what is written."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


def shell() -> tuple[MembershipProtocol, CountingClock, Sink]:
    """A started shell of a node that knows one seed (so it probes on a timer)."""
    clock = CountingClock()
    core = Membership(
        wire.Member("n1", "10.0.0.1:7946", 1), seeds=["10.0.0.2:7946"], rng=random.Random(1)
    )
    proto = MembershipProtocol(core, KEY, clock, lambda old, new: None, scope=SCOPE)
    sink = Sink()
    proto.transport = sink  # type: ignore[assignment]
    proto.startProtocol()
    clock.advance(0)  # the first probe goes at once; the timer then waits for the next
    assert clock.getDelayedCalls()[0].getTime() > 0
    return proto, clock, sink


def test_unchanged_deadline_keeps_the_timer() -> None:
    """Handling work that moves no deadline asks the reactor for no new timer."""
    proto, clock, _ = shell()
    (timer,) = clock.getDelayedCalls()
    asked = clock.asked
    for _ in range(20):
        proto.perform([])
    assert clock.asked == asked
    assert clock.getDelayedCalls() == [timer]
    assert timer.active()


def test_kept_timer_still_fires_at_the_deadline() -> None:
    """The kept timer runs the core's tick at its deadline (probes go out, a new timer is set)."""
    proto, clock, sink = shell()
    deadline = proto.core.next_deadline()
    assert deadline is not None
    proto.perform([])
    sent = len(sink.sent)
    clock.advance(deadline - clock.seconds())
    assert len(sink.sent) > sent
    assert all(dc.getTime() > deadline for dc in clock.getDelayedCalls())
    assert len(clock.getDelayedCalls()) == 1


def test_moved_deadline_moves_the_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the core's next deadline changes, the old timer is cancelled and one new one set."""
    proto, clock, _ = shell()
    (old,) = clock.getDelayedCalls()
    sooner = old.getTime() - 0.1
    assert sooner > clock.seconds()
    monkeypatch.setattr(proto.core, "next_deadline", lambda: sooner)
    proto.perform([])
    (new,) = clock.getDelayedCalls()
    assert new is not old
    assert old.cancelled
    assert new.getTime() == sooner
