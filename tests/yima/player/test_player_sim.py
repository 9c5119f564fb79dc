"""Simulator: real node schedulers, lossy network, the player core end to end."""

from __future__ import annotations

import collections
import statistics

import pytest

from yimaporc.yima.player.sim import GilbertElliott, SimConfig, Simulation, loss_table, main

SEEDS = range(6)
DURATION = 20.0


def run(**kw: object) -> tuple[Simulation, dict]:  # type: ignore[type-arg]
    kw.setdefault("duration", DURATION)
    sim = Simulation(SimConfig(**kw))  # type: ignore[arg-type]
    return sim, sim.run()


def missing_fraction(**kw: object) -> tuple[float, list[dict]]:  # type: ignore[type-arg]
    stats = [run(seed=s, **kw)[1] for s in SEEDS]
    missing = sum(s["packets_missing_at_playout"] for s in stats)
    return missing / sum(s["packets_expected"] for s in stats), stats


@pytest.mark.parametrize("rate", [0.01, 0.03, 0.05])
def test_random_drop_is_recovered_down_to_the_single_retransmission_floor(rate: float) -> None:
    """--drop p: after one retransmission about p^2 is missing (<= 1.5 p^2 + 0.03%), no underflow."""
    frac, stats = missing_fraction(drop=rate)
    assert frac <= 1.5 * rate**2 + 0.0003
    assert all(s["underflows"] == 0 and s["nacks_given_up_late"] == 0 for s in stats)
    dropped = sum(s["packets_dropped_simulated"] for s in stats)
    arrivals = sum(s["packets_received"] + s["packets_dropped_simulated"] for s in stats)
    assert dropped / arrivals == pytest.approx(rate, rel=0.15)


def test_without_retransmission_the_loss_reaches_playout() -> None:
    """Control: with NACKs off, about the drop rate is missing at playout."""
    frac, stats = missing_fraction(drop=0.03, retransmit=False)
    assert frac == pytest.approx(0.03, rel=0.15)
    assert all(s["nacks_sent"] == 0 for s in stats)


@pytest.mark.parametrize("feedback_loss", [0.0, 0.03])
def test_path_loss_both_ways_stays_at_the_one_retransmission_floor(feedback_loss: float) -> None:
    """3% loss on the path, NACKs lost too or not: missing ~ p^2 (data) or ~ 2 p^2 (both ways)."""
    frac, _ = missing_fraction(loss=0.03, feedback_loss=feedback_loss)
    floor = 0.03**2 * (2 if feedback_loss else 1)
    assert frac <= 1.5 * floor + 0.0003


@pytest.mark.parametrize("seed", SEEDS)
def test_nacks_only_name_lost_packets_of_the_node_that_sent_them_once(seed: int) -> None:
    """Every NACKed node_seq was sent by that node and lost on the way; none is NACKed twice."""
    sim, st = run(seed=seed, loss=0.05)
    asked = collections.Counter(
        (stream, node, q) for node, stream, seqs in sim.nacks_by_node for q in seqs
    )
    assert asked, "some loss must have been NACKed"
    assert max(asked.values()) == 1
    for key in asked:
        assert key in sim.sent_by and key in sim.lost
    assert st["nacks_sent"] == len(asked)


@pytest.mark.parametrize("seed", SEEDS)
def test_burst_loss_is_recovered_without_a_nack_storm(seed: int) -> None:
    """Gilbert-Elliott bursts: NACKs never exceed losses or the token budget; little is missing."""
    sim, st = run(seed=seed, burst=GilbertElliott(p_good_bad=0.01, p_bad_good=0.25))
    lost_first = len(sim.lost)
    assert st["nacks_sent"] <= lost_first
    budget = sim.player.players["s0"].config.retransmit
    assert budget is not None
    assert st["nacks_sent"] <= budget.burst + budget.rate * (DURATION + 5)
    assert st["packets_missing_at_playout"] <= 0.003 * st["packets_expected"]
    assert st["underflows"] == 0


def test_heavy_bursts_stay_bounded() -> None:
    """Long bursts (13% mean loss): still one NACK per lost packet at most, most recovered."""
    ge = GilbertElliott(p_good_bad=0.02, p_bad_good=0.1, loss_bad=0.8)
    sim, st = run(seed=1, burst=ge)
    assert st["nacks_sent"] <= len(sim.lost)
    assert st["packets_missing_at_playout"] < 0.3 * len(sim.lost)


@pytest.mark.parametrize("flow", ["delta-p", "pause-resume"])
@pytest.mark.parametrize("seed", range(4))
def test_vbr_buffer_level_stays_inside_the_thresholds(flow: str, seed: int) -> None:
    """After start-up, bytes buffered stay within the bands widened by one VBR scene, no underflow."""
    sim, st = run(seed=seed, flow=flow, duration=30.0)
    player = sim.player.players["s0"]
    target = 2e6 / 8 * player.config.prebuffer
    lv = [b for t, b in st["buffer_levels"] if player.config.prebuffer + 3 < t < 29]
    assert st["underflows"] == 0 and st["packets_missing_at_playout"] == 0
    assert 0.35 * target <= min(lv) and max(lv) <= 1.8 * target
    if flow == "delta-p":
        bands = player.config.bands
        assert bands is not None
        assert bands.thresholds[0] <= statistics.median(lv) <= bands.thresholds[-1]
        assert st["band_changes"] <= 25
    else:
        pr = player.config.pause
        assert pr is not None and st["pauses"] >= 2
        assert min(lv) < pr.high and max(lv) > pr.low


@pytest.mark.parametrize("flow", ["delta-p", "pause-resume"])
def test_slow_node_is_corrected_by_delta_p(flow: str) -> None:
    """A node pacing at 90% of the schedule: late packets without the per-node trim, none with."""
    sim, st = run(seed=3, flow=flow, slow_node=1, slow_factor=0.9, duration=40.0)
    assert st["late_packets"] == 0 and sum(sim.node_late) == 0
    trim = sim.player.players["s0"].node_trim
    assert trim is not None and trim.factor[1] > 1.05
    sim, st = run(seed=3, flow=flow, slow_node=1, slow_factor=0.9, duration=40.0, trim=False)
    assert st["late_packets"] > 100 and sim.node_late[1] > 100


def test_node_with_a_long_path_is_moved_ahead() -> None:
    """A node whose packets take 1 s longer is advanced until none is late."""
    _, st = run(seed=4, slow_node=2, slow_delay=1.0, duration=30.0)
    assert st["late_packets"] == 0


@pytest.mark.parametrize("seed", range(4))
def test_two_streams_stay_within_one_frame(seed: int) -> None:
    """Video 2 Mbit/s + audio 300 kbit/s on one playout clock: skew < 33 ms (reached ~2 ms)."""
    _, st = run(seed=seed, bitrates=(2e6, 3e5), loss=0.01)
    assert st["max_sync_skew_ms"] < 33.0
    assert st["max_sync_skew_ms"] < 5.0
    assert st["max_level_spread_s"] < 1.5
    assert st["underflows"] == 0


def test_stats_are_deterministic_per_seed() -> None:
    """The same seed replays the same run exactly."""
    assert run(seed=9, loss=0.02)[1] == run(seed=9, loss=0.02)[1]


def test_table_entry_point_prints_rows(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m yimaporc.yima.player.sim`` prints one row per loss rate."""
    assert main(["--seeds", "1", "--duration", "5", "--rates", "0.02"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].strip().startswith("2.00%")
    rows = loss_table([0], [0.0], 3.0)
    assert rows[0][1] == 0 and rows[0][2] == 0
