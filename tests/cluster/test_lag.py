"""Reactor lag: the window core fed times, and the monitor on a task.Clock."""

from __future__ import annotations

import random
from pathlib import Path

from twisted.internet.task import Clock

from yimaporc.cluster.lag import LagWindow, ReactorLagMonitor
from yimaporc.cluster.node import ClusterNode, NodeConfig


def test_window_reports_max_and_p99_in_ms() -> None:
    """100 samples: 99 on time and one 250 ms late give max 250 and p99 0; two late give p99 > 0."""
    w = LagWindow(60.0)
    for i in range(99):
        w.observe(i * 0.1, i * 0.1)
    w.observe(9.9, 10.15)
    s = w.summary(10.15)
    assert (s.max_ms, s.p99_ms, s.samples) == (250.0, 0.0, 100)
    w.observe(10.2, 10.3)
    assert w.summary(10.3).p99_ms == 100.0


def test_window_forgets_samples_older_than_a_minute() -> None:
    """A 2 s stall stops counting once it is more than 60 s old."""
    w = LagWindow(60.0)
    w.observe(0.0, 2.0)
    assert w.summary(61.9).max_ms == 2000.0
    assert w.summary(62.1).as_status() == {"max_ms": 0.0, "p99_ms": 0.0}


def test_early_timer_counts_as_zero() -> None:
    """A timer that ran before it was due (float rounding) is not negative lag."""
    w = LagWindow()
    assert w.observe(1.0, 0.999) == 0.0


def test_monitor_measures_a_stalled_clock() -> None:
    """On a Clock, a timer that fires 1.5 s after it was due shows 1500 ms max lag."""
    clock = Clock()
    mon = ReactorLagMonitor(clock, interval=0.1)
    mon.startService()
    for _ in range(20):
        clock.advance(0.1)
    assert mon.summary().max_ms < 1.0
    clock.advance(1.6)  # the reactor was busy: the 0.1 s timer runs 1.5 s late
    s = mon.summary()
    assert abs(s.max_ms - 1500.0) < 1.0 and s.samples == 21
    mon.stopService()
    assert not clock.getDelayedCalls()


def test_node_status_has_reactor_lag(tmp_path: Path) -> None:
    """A ClusterNode's status carries reactor_lag {max_ms, p99_ms} from its own clock."""
    clock = Clock()
    cfg = NodeConfig("n1", "yima", tmp_path, "127.0.0.1", 7946)
    node = ClusterNode(clock, cfg, b"s" * 32, rng=random.Random(1))
    node.lag_monitor.startService()
    clock.advance(0.1)
    clock.advance(0.4)  # 300 ms late
    assert node.status()["reactor_lag"] == {"max_ms": 300.0, "p99_ms": 300.0}
    node.lag_monitor.stopService()
