"""Flow-control decisions: pause-resume, multi-threshold delta p, node trim, sync trims."""

from __future__ import annotations

import pytest

from yimaporc.yima.player.flow import (
    BandsConfig,
    DeltaP,
    NodeTrim,
    PauseResume,
    PauseResumeConfig,
    ScheduleMirror,
    TrimConfig,
)
from yimaporc.yima.player.sync import SkewMeter, SyncConfig, SyncController
from yimaporc.yima.schedule import PAYLOAD, MediaTiming, NodeScheduler


def test_pause_at_high_resume_at_low_only_once_each() -> None:
    """Pause fires on reaching max, nothing in between, resume on reaching min."""
    pr = PauseResume(PauseResumeConfig(high=100, low=40))
    assert [pr.update(x) for x in (10, 99, 100, 150, 60, 41, 40, 39, 99)] == [
        None,
        None,
        "pause",
        None,
        None,
        None,
        "resume",
        None,
        None,
    ]


def test_pause_resume_config_is_checked() -> None:
    """Inverted thresholds or a non-over-rate speed are refused."""
    with pytest.raises(ValueError):
        PauseResumeConfig(high=10, low=20)
    with pytest.raises(ValueError):
        PauseResumeConfig(high=20, low=10, speed=1.0)


def test_bands_map_levels_to_falling_speeds() -> None:
    """Five bands: an empty buffer speeds up, a full one slows down."""
    dp = DeltaP(BandsConfig((10, 20, 30, 40), dwell=0.0))
    assert dp.update(5, 0.0) is None  # starts in band 0
    assert dp.update(25, 1.0) == 1.0
    assert dp.update(45, 2.0) == 0.6
    assert dp.update(15, 3.0) == 1.15


def test_hysteresis_stops_oscillation_around_a_threshold() -> None:
    """A level wobbling within +/- hysteresis of a threshold never changes the band."""
    dp = DeltaP(BandsConfig((10, 20, 30, 40), hysteresis=2.0, dwell=0.0))
    dp.band = 2
    changes = [dp.update(x, t) for t, x in enumerate([29, 31, 28.5, 31.9, 29, 31.5] * 5)]
    assert changes == [None] * 30
    assert dp.update(32.5, 100) == 0.85


def test_dwell_delays_inner_changes_but_not_the_outer_bands() -> None:
    """Within ``dwell`` of a change inner bands wait; an emergency band applies at once."""
    dp = DeltaP(BandsConfig((10, 20, 30, 40), dwell=1.0))
    dp.band = 2
    assert dp.update(35, 0.0) == 0.85
    assert dp.update(15, 0.5) is None
    assert dp.update(5, 0.6) == 1.5
    assert dp.update(25, 1.7) == 1.0


def test_bands_config_validation_and_centring() -> None:
    """Speeds must fall with level and outnumber thresholds by one; around() centres."""
    with pytest.raises(ValueError):
        BandsConfig((1, 2), speeds=(1.0, 1.1, 0.9))
    with pytest.raises(ValueError):
        BandsConfig((1, 2, 3, 4), speeds=(1.0,))
    b = BandsConfig.around(300.0)
    assert b.thresholds[1] < 300.0 < b.thresholds[2]


def test_schedule_mirror_matches_scheduler_anchor_math() -> None:
    """Speed changes and a pause re-anchor exactly as NodeScheduler does."""
    media = MediaTiming("m", 100 * PAYLOAD, 10 * PAYLOAD, tuple(float(i) for i in range(10)), 10.0)
    sched = NodeScheduler()
    session = sched.add("s", media, range(10), start_ct=5.0)
    mirror = ScheduleMirror(5.0)
    for speed, at in ((1.25, 6.0), (1e-9, 7.0), (0.9, 9.5)):
        sched.set_speed("s", speed, at)
        mirror.set_speed(speed, at)
    for mt in (3.0, 4.0, 8.0):
        assert mirror.deadline(mt) == pytest.approx(session.deadline(mt))
    assert mirror.deadline(0.5) == pytest.approx(5.5)


def test_schedule_mirror_paused_has_no_deadline() -> None:
    """While the mirror is stopped, media beyond the stop point has no send instant."""
    m = ScheduleMirror(0.0)
    m.set_speed(0.0, 2.0)
    assert m.deadline(1.0) == 1.0
    assert m.deadline(2.5) is None
    m.set_speed(1.0, 4.0)
    assert m.deadline(2.5) == pytest.approx(4.5)


def test_node_trim_speeds_up_the_node_that_runs_behind() -> None:
    """A node whose packets arrive 0.3 s later than the others gets a factor above 1."""
    trim = NodeTrim(TrimConfig(alpha=1.0))
    for node, slack in ((0, 1.0), (1, 1.0), (2, 0.7)):
        trim.observe(node, slack)
    changed = trim.update(0.0)
    assert changed[2] > 1.1
    assert 0 not in changed and 1 not in changed


def test_node_trim_integral_holds_a_drifting_node() -> None:
    """Repeated lag accumulates an integral term up to the bound, never beyond."""
    c = TrimConfig(alpha=1.0, kp=0.0, ki=1.0, max_trim=0.2)
    trim = NodeTrim(c)
    for t in range(50):
        for node, slack in ((0, 1.0), (1, 1.0), (2, 0.5)):
            trim.observe(node, slack)
        trim.update(float(t))
    assert trim.factor[2] == pytest.approx(1.2)


def test_sync_controller_pulls_levels_together() -> None:
    """The fuller stream slows, the emptier one speeds up, within the bound."""
    sync = SyncController(SyncConfig(gain=0.1, max_trim=0.1))
    trims = sync.update({"a": 1.0, "b": 3.0})
    assert trims == {"a": 1.1, "b": 0.9}
    assert sync.update({"a": 2.0, "b": 2.01}) == {"a": 1.0, "b": 1.0}
    assert sync.update({"a": 2.0}) == {}


def test_skew_meter_needs_every_stream_presenting() -> None:
    """A stream presenting nothing leaves the instant out; otherwise spread is recorded."""
    meter = SkewMeter()
    assert meter.sample({"a": 1.0, "b": None}) is None
    assert meter.sample({"a": 1.0, "b": 1.02}) == pytest.approx(0.02)
    meter.sample({"a": 2.0, "b": 2.0})
    assert meter.max_skew == pytest.approx(0.02)
    assert meter.mean_skew == pytest.approx(0.01)
