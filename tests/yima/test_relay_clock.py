"""One reactor timer for every relayed session's releases (yima._relay_clock)."""

from __future__ import annotations

import random

from twisted.internet.task import Clock

from yimaporc.yima._relay_clock import RelayClock


class _Sessions:
    """Sessions whose release records the instant and arms the next one, if any."""

    def __init__(self, clock: Clock, slack: float = 0.01) -> None:
        self.clock = clock
        self.released: list[tuple[str, float]] = []
        self.next: dict[str, list[float]] = {}
        self.rc = RelayClock(clock, clock.seconds, self.release, slack)

    def release(self, sid: str) -> None:
        self.released.append((sid, self.clock.seconds()))
        later = self.next.get(sid)
        if later:
            self.rc.arm(sid, later.pop(0))


def test_sessions_due_within_the_slack_share_one_wake_up() -> None:
    """Three sessions whose releases fall within 10 ms of the first are released by one
    reactor call at the first's instant; one due later gets its own call at its instant."""
    clock = Clock()
    s = _Sessions(clock)
    for sid, at in (("a", 0.100), ("b", 0.104), ("c", 0.1095), ("d", 0.2)):
        s.rc.arm(sid, at)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.0999)
    assert s.released == []
    clock.advance(0.0001)
    assert sorted(s.released) == [("a", 0.1), ("b", 0.1), ("c", 0.1)]
    clock.advance(0.0999)
    assert len(s.released) == 3
    clock.advance(0.0001)
    assert s.released[-1] == ("d", 0.2) and s.rc.wakeups == 2 and s.rc.releases == 4


def test_a_cancelled_release_is_skipped_and_an_earlier_one_moves_the_timer() -> None:
    """A cancelled entry (a seek, a pause, a teardown) is never released; arming one
    earlier than the timer moves the one reactor call earlier."""
    clock = Clock()
    s = _Sessions(clock)
    w = s.rc.arm("a", 0.5)
    s.rc.arm("b", 0.3)
    (call,) = clock.getDelayedCalls()
    assert call.getTime() == 0.3
    w.cancel()
    assert not w.active()
    clock.advance(0.3)
    clock.advance(1.0)
    assert s.released == [("b", 0.3)] and clock.getDelayedCalls() == []


def test_no_session_is_released_earlier_than_its_instant_less_the_slack() -> None:
    """Random sessions re-arming at random instants: each release runs within the slack
    before its instant and never after it (the clock stepping finely), and every one
    armed is released once."""
    rng = random.Random(7)
    clock = Clock()
    s = _Sessions(clock, slack=0.01)
    wanted: dict[str, list[float]] = {}
    for i in range(20):
        times = sorted(rng.uniform(0, 2.0) for _ in range(30))
        wanted[f"s{i}"] = list(times)
        s.next[f"s{i}"] = times[1:]
        s.rc.arm(f"s{i}", times[0])
    while clock.getDelayedCalls():
        clock.advance(clock.getDelayedCalls()[0].getTime() - clock.seconds())
    got: dict[str, list[float]] = {}
    for sid, t in s.released:
        got.setdefault(sid, []).append(t)
    for sid, times in wanted.items():
        assert len(got[sid]) == len(times)
        for at, ran in zip(times, got[sid], strict=True):
            assert at - 0.01 - 1e-9 <= ran <= at + 1e-9
    assert s.rc.wakeups < s.rc.releases  # shared: fewer wake-ups than releases
